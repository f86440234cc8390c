"""Exact resume: a run SIGKILLed between checkpoints and resumed with `--resume auto` ends with the same
weights (and the same loss at every step) as one that was never interrupted.

    pytest tests/test_resume_exact.py        # ~2 min on 2 cores (one process ~40 s, 2 x ZeRO-2 ~80 s)

What must come back for that to hold: trainable weights (iter file, or DeepSpeed's shards), optimizer
moments, scheduler position, RNG states (LoRA dropout 0.1 in the one-process test makes them matter) and
the sampler's position inside the epoch (the runs kill at step 10 and resume from step 8, crossing the
epoch boundary after step 11). A checkpoint folder left half-written by a kill is skipped with a warning.
A DPO run from an SFT iter file resumes exactly too, its reference still the SFT start.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llava_ft.engine import launch
from test_distributed import ONE_PROCESS, SAVE, STEPS, assert_same_weights, iter_state, losses, run_cli, write_configs

KILL_AT = 10  # after the step-8 checkpoint, before step 12's: steps 9-10 are lost and must be redone

KILLER = '''
"""Train like `llava_ft COMMAND`, but SIGKILL rank 0 at the end of step KILL (not a save step)."""
import os, signal, sys
from transformers import TrainerCallback
from llava_ft.config import load_config
from llava_ft.engine.run import run_training


class KillAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step and state.is_world_process_zero:
            os.kill(os.getpid(), signal.SIGKILL)


command, config, work, deepspeed, step, *overrides = sys.argv[1:]
run_training(load_config(config, overrides), work_dir=work, deepspeed=None if deepspeed == "none" else deepspeed,
             command=command, extra_callbacks=[KillAt(int(step))])
raise SystemExit("finished without being killed")
'''


def run_killed(tmp_path: Path, config: str, work: str, deepspeed: str, overrides: list, nproc: int = 1,
               command: str = "finetune", kill_at: int = KILL_AT, last_save: int = SAVE * 2,
               steps: int = STEPS) -> None:
    """Run until rank 0 is SIGKILLed after step `kill_at`: checkpoint `last_save` is whole, `steps` never came."""
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    cmd = [sys.executable, str(script), command, config, work, deepspeed, str(kill_at), *overrides]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={launch.free_port()}", *cmd[1:]]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "finished without being killed" not in out, out[-3000:]
    if nproc == 1:
        assert proc.returncode == -signal.SIGKILL
    assert (Path(work) / f"checkpoint-{last_save}" / "trainer_state.json").is_file(), out[-3000:]
    assert not (Path(work) / f"iter_{steps}.pth").exists()


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict:
    return write_configs(tmp_path_factory.mktemp("resume"))


@pytest.mark.slow
def test_one_process_resume_after_sigkill_equals_uninterrupted(configs, tmp_path):
    """~40 s: reference run, killed run, resumed run; LoRA dropout on so RNG state must be restored."""
    overrides = [ONE_PROCESS, "model.llm_lora.dropout=0.1"]
    ref, work = str(tmp_path / "ref"), str(tmp_path / "work")
    run_cli(["finetune", configs["llava"], *overrides, "--work-dir", ref])
    run_killed(tmp_path, configs["llava"], work, "none", overrides)
    # What a kill during a save leaves: a checkpoint folder without trainer_state.json, a temp iter file.
    half = Path(work) / f"checkpoint-{KILL_AT - 1}"
    half.mkdir()
    (half / "optimizer.pt").write_bytes(b"truncated")
    (Path(work) / f".iter_{KILL_AT - 1}.pth.x.tmp").write_bytes(b"truncated")
    proc = run_cli(["finetune", configs["llava"], *overrides, "--work-dir", work, "--resume", "auto"])
    out = proc.stdout + proc.stderr
    assert "ignoring incomplete checkpoint" in out and f"checkpoint-{KILL_AT - 1}" in out
    assert f"resuming from {work}/checkpoint-{SAVE * 2}" in out
    assert losses(work) == pytest.approx(losses(ref), rel=1e-6)  # the log reads as one run, steps 1..12
    assert_same_weights(iter_state(work, STEPS), iter_state(ref, STEPS), atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero2_two_process_resume_after_sigkill_equals_uninterrupted(configs, tmp_path):
    """~90 s: 2 processes under ZeRO-2, rank 0 SIGKILLed at step 10, resumed by torchrun --resume auto.

    Reference: one uninterrupted process with the same global batch (test_distributed shows those match).
    """
    ref, work = str(tmp_path / "ref"), str(tmp_path / "work")
    run_cli(["finetune", configs["llava"], ONE_PROCESS, "--work-dir", ref])
    run_killed(tmp_path, configs["llava"], work, "zero2", [], nproc=2)
    proc = run_cli(["finetune", configs["llava"], "--work-dir", work, "--deepspeed", "zero2", "--resume", "auto"],
                   nproc=2)
    assert f"resuming from {work}/checkpoint-{SAVE * 2}" in proc.stdout + proc.stderr
    assert losses(work) == pytest.approx(losses(ref), rel=1e-5)
    assert_same_weights(iter_state(work, STEPS), iter_state(ref, STEPS))


@pytest.mark.slow
def test_dpo_resume_after_sigkill_equals_uninterrupted(configs, tmp_path):
    """~40 s: DPO from an SFT iter file (weight-swap reference, LoRA dropout 0.1, length-grouped pairs), 6 steps
    saving every 2, SIGKILLed after step 5 and resumed from step 4: the same losses, reward margins and weights
    as the uninterrupted run (the reference stays the SFT start, not the resumed weights)."""
    import json

    import yaml

    from llava_ft.engine.callbacks import read_train_log

    run_cli(["train", configs["text"], "--work-dir", str(tmp_path / "sft")])
    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as fh:
        for k in range(6):
            fh.write(json.dumps({"prompt": f"Who are you? ({k})", "chosen": "I am the demo assistant." * (k % 3 + 1),
                                 "rejected": f"I am a cat number {k}."}) + "\n")
    raw = yaml.safe_load(Path(configs["text"]).read_text())
    raw["model"]["pretrained_pth"] = str(tmp_path / "sft" / "iter_4.pth")
    raw["model"]["llm_lora"]["dropout"] = 0.1
    raw["data"]["sources"] = [{"path": str(pairs)}]
    raw["preference"] = {"loss": "sigmoid", "beta": 0.5, "sft_weight": 0.1}
    raw["train"].update(max_steps=6, save_steps=2, per_device_batch_size=2, gradient_accumulation_steps=1,
                        group_by_length=True)
    config = tmp_path / "dpo.yaml"
    config.write_text(yaml.safe_dump(raw))
    ref, work = str(tmp_path / "ref"), str(tmp_path / "work")
    run_cli(["train", str(config), "--work-dir", ref])
    run_killed(tmp_path, str(config), work, "none", [], command="train", kill_at=5, last_save=4, steps=6)
    proc = run_cli(["train", str(config), "--work-dir", work, "--resume", "auto"])
    assert f"resuming from {work}/checkpoint-4" in proc.stdout + proc.stderr
    assert losses(work) == pytest.approx(losses(ref), rel=1e-6)
    margins = [[r["rewards/margins"] for r in read_train_log(w)] for w in (ref, work)]
    assert margins[1] == pytest.approx(margins[0], abs=1e-6) and any(margins[0][1:])
    assert_same_weights(iter_state(work, 6), iter_state(ref, 6), atol=1e-6)
