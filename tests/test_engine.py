"""Training engine on tiny models (CPU, fp32): a QLoRA run learns and touches only LoRA weights, the work
dir holds what users rely on, an interrupted run resumed with --resume auto reproduces the uninterrupted
loss curve, and checkpoint helpers behave under interruption."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from llava_ft.config import config_from_dict
from llava_ft.checkpoint import load_iter_checkpoint, save_iter_checkpoint
from llava_ft.engine import resume
from llava_ft.engine import run_training
from llava_ft.engine.callbacks import read_train_log
from llava_ft.errors import UserError


def make_cfg(llm, data_path, tmp_path, **overrides):
    raw = {
        "name": "tiny",
        "model": {"llm": llm, "quantization": "4bit",
                  "llm_lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"sources": [{"path": data_path}], "template": "qwen_chat", "max_length": 128,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"learning_rate": 1e-2, "per_device_batch_size": 2, "max_steps": 6, "save_steps": 3,
                  "save_total_limit": 2, "logging_steps": 1, "warmup_ratio": 0.0},
        "evaluation": {"prompts": ["Who are you?"], "every_n_steps": 3, "max_new_tokens": 6},
    }
    for dotted, value in overrides.items():
        node = raw
        *parents, last = dotted.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config_from_dict(raw)


@pytest.mark.smoke
def test_qlora_run_learns_only_lora_and_fills_work_dir(tiny_qwen2, demo_data, tmp_path):
    cfg = make_cfg(tiny_qwen2, demo_data["self_cognition"], tmp_path)
    wd = tmp_path / "wd"
    result = run_training(cfg, work_dir=str(wd))
    assert result.global_step == 6

    log = read_train_log(wd)
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    assert all(r["tokens_per_s"] > 0 and r["elapsed"] >= 0 and r["grad_norm"] is not None for r in log)
    assert log[-1]["loss"] < log[0]["loss"]

    saved = torch.load(wd / "iter_6.pth", weights_only=True)
    assert saved["meta"]["step"] == 6 and saved["meta"]["phase"] == "sft"
    keys = list(saved["state_dict"])
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert any(v.abs().sum() > 0 for k, v in saved["state_dict"].items() if ".lora_B." in k)  # B starts at 0
    assert Path((wd / "last_checkpoint").read_text().strip()) == (wd / "iter_6.pth").resolve()

    # Base (4-bit) weights and lm_head are exactly those of a fresh load of the same model.
    from llava_ft.model.builder import build_model

    fresh, _ = build_model(cfg)
    trained = dict(result.model.named_parameters())
    for name, param in fresh.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, trained[name]), name

    for name in ("config.yaml", "loss.png", "train_log.jsonl", "eval_outputs_iter_3.txt",
                 "eval_outputs_iter_6.txt", "checkpoint-6", "iter_3.pth"):
        assert (wd / name).exists(), name
    assert "Who are you?" in (wd / "eval_outputs_iter_6.txt").read_text()


def test_resume_auto_reproduces_uninterrupted_curve(tiny_llama, demo_data, tmp_path):
    # fp32 LoRA with dropout (RNG must be restored) and the length-grouped sampler (data position).
    def cfg():
        return make_cfg(tiny_llama, demo_data["self_cognition"], tmp_path, model__quantization="none",
                        model__llm_lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.1},
                        train__group_by_length=True, train__per_device_batch_size=1,
                        train__gradient_accumulation_steps=2, train__save_total_limit=3,
                        evaluation__prompts=[])

    full = tmp_path / "full"
    run_training(cfg(), work_dir=str(full))
    reference = read_train_log(full)

    # The interrupted run: the state on disk after a crash right after the step-3 save. Step 6's save
    # was cut short: its folder exists without trainer_state.json and must be ignored with a warning.
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    (cut / "iter_6.pth").unlink()
    (cut / "checkpoint-6" / "trainer_state.json").unlink()
    (cut / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reference[:4]))
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        result = run_training(cfg(), work_dir=str(cut), resume="auto")
    assert result.global_step == 6
    resumed = read_train_log(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(reference, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert a["lr"] == pytest.approx(b["lr"], rel=1e-6)
    end_full = torch.load(full / "iter_6.pth", weights_only=True)["state_dict"]
    end_cut = torch.load(cut / "iter_6.pth", weights_only=True)["state_dict"]
    for k in end_full:
        torch.testing.assert_close(end_full[k], end_cut[k], rtol=1e-5, atol=1e-6)


def test_rotation_keeps_limit_and_resume_path_errors(tmp_path):
    wd = tmp_path / "wd"
    for step in (2, 4, 6):
        save_iter_checkpoint(wd, step, {"w": torch.ones(2)}, {"phase": "sft"})
        (wd / f"checkpoint-{step}").mkdir()
        (wd / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    removed = resume.rotate_checkpoints(wd, limit=2, keep=6)
    assert sorted(p.name for p in wd.iterdir() if p.name != "last_checkpoint") == \
        ["checkpoint-4", "checkpoint-6", "iter_4.pth", "iter_6.pth"]
    assert len(removed) == 2
    assert resume.resolve_resume(str(wd / "iter_4.pth"), wd) == str(wd / "checkpoint-4")
    with pytest.raises(UserError, match="no such checkpoint folder"):
        resume.resolve_resume(str(wd / "checkpoint-9"), wd)
    assert resume.resolve_resume("auto", tmp_path / "empty") is None
    (wd / "iter_6.pth").write_bytes(b"truncated")
    with pytest.raises(UserError, match="cannot be read"):
        load_iter_checkpoint(wd / "iter_6.pth")


def test_training_refuses_when_no_sample_is_left(tiny_llama, tmp_path):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi " * 200},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    cfg = make_cfg(tiny_llama, str(data), tmp_path, data__max_length=16)
    with pytest.raises(UserError, match="no training samples left"):
        run_training(cfg, work_dir=str(tmp_path / "wd"))
    assert not list((tmp_path / "wd").glob("iter_*.pth"))
