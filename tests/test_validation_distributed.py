"""Validation loss with 2 processes (torchrun, DDP): the eval set is sharded across ranks and the token totals
summed, so eval_loss equals that of one process, also when the eval set does not divide into the ranks' batches."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from test_distributed import ONE_PROCESS, run_cli, write_configs

# 24 text samples (self_cognition x 4): val_split 0.5 holds out 12 = 2 ranks x eval batch 3 x 2 batches,
# so both layouts evaluate the same batches (a partial batch would be padded by accelerate).
VAL = ["data.val_split=0.5", "evaluation.every_n_steps=2"]


def eval_losses(work_dir) -> list:
    rows = [json.loads(line) for line in Path(work_dir, "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_eval_loss_two_processes_matches_one(tmp_path):
    configs = write_configs(tmp_path)
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    run_cli(["train", configs["text"], ONE_PROCESS, *VAL, "--work-dir", single])
    proc = run_cli(["train", configs["text"], *VAL, "--work-dir", multi], nproc=2)
    assert "validation: 12 samples from val_split 0.5" in proc.stdout
    one, two = eval_losses(single), eval_losses(multi)
    assert [s for s, _ in one] == [s for s, _ in two] == [2, 4]
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_llava_eval_loss_two_processes_matches_one(tmp_path):
    # 66 LLaVA + text samples: val_split 0.18 holds out 12 (2 ranks x 3 x 2 batches), image and text rows mixed
    configs = write_configs(tmp_path)
    val = ["data.val_split=0.18", "evaluation.every_n_steps=2", "train.max_steps=4", "train.save_steps=4"]
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    run_cli(["finetune", configs["llava"], ONE_PROCESS, *val, "--work-dir", single])
    run_cli(["finetune", configs["llava"], *val, "--work-dir", multi], nproc=2)
    one, two = eval_losses(single), eval_losses(multi)
    assert [s for s, _ in one] == [s for s, _ in two] == [2, 4]
    # Training losses agree to 1e-6 here but eval losses only to ~5e-5 relative (4-bit LLM + LoRA vision
    # tower, fp32 on CPU; the cause of that gap is not pinned down), hence the looser tolerance.
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=2e-4)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_uneven_eval_set_two_processes_matches_one(tmp_path):
    # 5 validation samples over 2 ranks x eval batch 3: rank 1's batch is filled up with a label-less row
    # (validation.EvenShards), not with repeated samples that a token-weighted sum would count twice.
    configs = write_configs(tmp_path)
    cfg = yaml.safe_load(Path(configs["text"]).read_text())
    lines = Path(cfg["data"]["sources"][0]["path"]).read_text().splitlines()[:5]
    (tmp_path / "val.jsonl").write_text("\n".join(lines) + "\n")
    cfg["data"]["val_sources"] = [{"path": str(tmp_path / "val.jsonl"), "format": "openai"}]
    Path(configs["text"]).write_text(yaml.safe_dump(cfg))
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    run_cli(["train", configs["text"], ONE_PROCESS, "evaluation.every_n_steps=2", "--work-dir", single])
    proc = run_cli(["train", configs["text"], "evaluation.every_n_steps=2", "--work-dir", multi], nproc=2)
    assert "validation: 5 samples from val_sources" in proc.stdout
    one, two = eval_losses(single), eval_losses(multi)
    assert [s for s, _ in one] == [s for s, _ in two] == [2, 4]
    assert [v for _, v in two] == pytest.approx([v for _, v in one], rel=1e-5)
