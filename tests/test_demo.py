"""`llava_ft demo --fast` through the CLI entry point: every stage runs, artifacts and summary are written,
and a rerun reuses every finished stage instead of training again.

    pytest tests/test_demo.py -m slow
"""
from __future__ import annotations

import json

import pytest

from llava_ft.cli import main

STAGES = ["workspace", "text_pretrain", "llava_pretrain", "eval_before", "llava_finetune", "eval_after",
          "convert", "chat", "preference", "eval_preference", "corner_pad", "corner_anyres", "eval_corner"]


@pytest.mark.slow
def test_fast_demo_runs_end_to_end_and_reuses_stages(tmp_path, capsys):
    ws = tmp_path / "demo_ws"
    assert main(["demo", "--workspace", str(ws), "--fast"]) == 0
    out = capsys.readouterr().out
    summary = json.loads((ws / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == STAGES
    assert all(s["status"] == "done" for s in summary["stages"])
    for stage in STAGES:  # the printed table names every stage
        assert stage in out
    assert (ws / "summary.md").read_text().count("\n") >= len(STAGES) + 2

    # Training stages wrote their checkpoints; the text stage's export is a full HF model.
    for run in ("tiny_incremental_pretrain", "tiny_llava_pretrain", "tiny_llava_finetune_qlora", "tiny_llava_dpo_qlora"):
        assert list((ws / "work_dirs" / run).glob("iter_*.pth")), run
    assert (ws / "llm_pretrained" / "config.json").is_file()
    # Exports: XTuner layout with the finetune's three trained parts, and a llava-hf folder.
    for part in ("projector", "llm_adapter", "visual_encoder_adapter"):
        assert (ws / "export" / "xtuner" / part).is_dir(), part
    hf_cfg = json.loads((ws / "export" / "llava_hf" / "config.json").read_text())
    assert "Llava" in hf_cfg["architectures"][0]
    # Both evaluations scored the held-out colour questions (the fast run's accuracy means nothing).
    for key in ("colour_accuracy_before", "colour_accuracy_after", "corner_accuracy_one_view",
                "corner_accuracy_anyres", "preference_reward_accuracy_after", "preference_prefers_chosen_before",
                "preference_prefers_chosen_after", "preference_shape_accuracy_after"):
        assert 0.0 <= summary[key] <= 1.0
    # The AnyRes arm trained on tiles (its iter file holds the image-newline vector), the other did not.
    import torch

    for aspect, has_newline in (("anyres", True), ("pad", False)):
        pth = next((ws / "work_dirs" / f"tiny_llava_corner_{aspect}").glob("iter_*.pth"))
        assert ("projector.image_newline" in torch.load(pth, weights_only=True)["state_dict"]) == has_newline
    preds = (ws / "eval" / "eval_after.predictions.jsonl").read_text().splitlines()
    assert len(preds) == len((ws / "data" / "eval.jsonl").read_text().splitlines()) > 0
    chat = next(s for s in summary["stages"] if s["name"] == "chat")
    assert chat["data"]["truth"] in ("red", "green", "blue", "yellow", "purple")
    assert isinstance(chat["data"]["answer"], str)

    # Rerun: nothing is trained again, every stage is reused with its recorded result.
    iter_file = next((ws / "work_dirs" / "tiny_llava_finetune_qlora").glob("iter_*.pth"))
    mtime = iter_file.stat().st_mtime_ns
    assert main(["demo", "--workspace", str(ws), "--fast"]) == 0
    again = json.loads((ws / "summary.json").read_text())
    assert all(s["status"] == "reused" for s in again["stages"])
    assert [s["result"] for s in again["stages"]] == [s["result"] for s in summary["stages"]]
    assert iter_file.stat().st_mtime_ns == mtime


def test_demo_workspace_that_is_a_file_is_a_user_error(tmp_path, capsys):
    target = tmp_path / "not_a_dir"
    target.write_text("x")
    assert main(["demo", "--workspace", str(target), "--fast"]) == 2
    err = capsys.readouterr().err
    assert str(target) in err and "not a folder" in err


def test_demo_recipes_load_and_start_with_their_command():
    from llava_ft.config import CONFIG_ROOT, load_config

    recipes = sorted((CONFIG_ROOT / "demo").glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"tiny_text_sft_qlora", "tiny_incremental_pretrain", "tiny_llava_pretrain",
                                         "tiny_llava_finetune_qlora", "tiny_llava_dpo_qlora"}
    phases = {}
    for path in recipes:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# llava_ft ") and f"configs/{path.relative_to(CONFIG_ROOT)}" in first, path
        phases[path.stem] = load_config(str(path)).resolved_phase
    assert phases["tiny_text_sft_qlora"] == "sft"
    assert phases["tiny_incremental_pretrain"] == "incremental_pretrain"
    assert phases["tiny_llava_pretrain"] == "pretrain"
    assert phases["tiny_llava_finetune_qlora"] == "finetune"
    assert phases["tiny_llava_dpo_qlora"] == "preference"
