"""The NaN guard: a diverging run stops with one clear error (exit 2) and never saves NaN weights.

The runs are real training through the CLI on the tiny Llama: a learning rate of 1e30 makes AdamW's first
update push the weights to ~1e30, after which every forward overflows to NaN.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml

from llava_ft.cli import main
from llava_ft.engine.callbacks import read_train_log


def write_cfg(tmp_path: Path, llm: str, data: str, **train) -> str:
    body = {
        "model": {"llm": llm, "quantization": "none", "llm_lora": {"enabled": True, "r": 4, "alpha": 8}},
        "data": {"sources": [{"path": data}], "template": "qwen_chat", "max_length": 64,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"per_device_batch_size": 2, "max_steps": 12, "save_steps": 100, "logging_steps": 1,
                  "warmup_ratio": 0.0, **train},
    }
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def finite(path: Path) -> bool:
    sd = torch.load(path, weights_only=True)["state_dict"]
    return all(torch.isfinite(v).all() for v in sd.values())


def test_diverging_run_stops_after_max_nonfinite_steps(tiny_llama, demo_data, tmp_path, capsys):
    cfg = write_cfg(tmp_path, tiny_llama, demo_data["self_cognition"], learning_rate=1e30)
    wd = tmp_path / "wd"
    assert main(["train", cfg, "--work-dir", str(wd)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert not any("Traceback" in line for line in lines)
    err = [line for line in lines if "error" in line]
    assert len(err) == 1 and err[0].startswith("llava_ft train: error: "), err  # on a line of its own
    # Step 1 is finite (the update to ~1e30 happens after it); steps 2, 3, 4 are NaN -> stop at 4.
    assert "training stopped at step 4" in err[0] and "steps 2-4" in err[0] and "NaN/inf" in err[0]
    assert "train.learning_rate" in err[0] and "model.dtype" in err[0] and "data" in err[0]
    assert "No checkpoint was saved" in err[0]
    assert not list(wd.glob("iter_*.pth"))
    assert max(r["step"] for r in read_train_log(wd)) < 12  # it did stop early


def test_max_nonfinite_steps_is_configurable(tiny_llama, demo_data, tmp_path, capsys):
    cfg = write_cfg(tmp_path, tiny_llama, demo_data["self_cognition"], learning_rate=1e30, max_nonfinite_steps=1)
    assert main(["train", cfg, "--work-dir", str(tmp_path / "wd")]) == 2
    assert "training stopped at step 2: the loss and gradient norm (step 2) was NaN/inf for 1 consecutive" in capsys.readouterr().err
    assert main(["train", cfg, "--work-dir", str(tmp_path / "x"), "train.max_nonfinite_steps=-1"]) == 2
    assert "'train.max_nonfinite_steps' must be >= 0" in capsys.readouterr().err


def test_nan_weights_are_never_saved(tiny_llama, demo_data, tmp_path, capsys):
    # Saving every step: iter_1 (finite, if useless) is written; step 2's weights are NaN and are not.
    cfg = write_cfg(tmp_path, tiny_llama, demo_data["self_cognition"], learning_rate=1e30, save_steps=1,
                    save_total_limit=5)
    wd = tmp_path / "wd"
    assert main(["train", cfg, "--work-dir", str(wd)]) == 2
    err = capsys.readouterr().err
    assert "training stopped at step 2: the trainable weights hold NaN/inf, so iter_2.pth was not saved" in err
    assert f"The last saved checkpoint is {(wd / 'iter_1.pth').resolve()}" in err
    assert sorted(p.name for p in wd.glob("iter_*.pth")) == ["iter_1.pth"] and finite(wd / "iter_1.pth")
    assert (wd / "last_checkpoint").read_text().strip().endswith("iter_1.pth")


def test_guard_off_lets_nan_through_and_healthy_run_is_unaffected(tiny_llama, demo_data, tmp_path, capsys):
    # With the guard off, the same run "succeeds" and saves NaN weights: what the guard prevents.
    cfg = write_cfg(tmp_path, tiny_llama, demo_data["self_cognition"], learning_rate=1e30, max_steps=3,
                    save_steps=3, max_nonfinite_steps=0)
    assert main(["train", cfg, "--work-dir", str(tmp_path / "off")]) == 0
    assert not finite(tmp_path / "off" / "iter_3.pth")
    # A normal learning rate trains to the end with the guard on (default 3) and saves finite weights.
    cfg = write_cfg(tmp_path, tiny_llama, demo_data["self_cognition"], learning_rate=1e-3, max_steps=4, save_steps=2)
    assert main(["train", cfg, "--work-dir", str(tmp_path / "ok")]) == 0
    assert finite(tmp_path / "ok" / "iter_2.pth") and finite(tmp_path / "ok" / "iter_4.pth")
    assert "training stopped" not in capsys.readouterr().err
