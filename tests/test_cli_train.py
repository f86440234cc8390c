"""The commands as users type them, through llava_ft.cli.main: train (overrides, bad config, missing model,
wrong phase), list-cfg, copy-cfg and log-dataset (text and --json)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from llava_ft import IGNORE_INDEX
from llava_ft.cli import main


def write_cfg(tmp_path: Path, llm: str, data: str) -> str:
    body = {
        "model": {"llm": llm, "quantization": "4bit", "llm_lora": {"enabled": True, "r": 4, "alpha": 8}},
        "data": {"sources": [{"path": data}], "template": "qwen_chat", "max_length": 128,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"per_device_batch_size": 2, "max_steps": 2, "save_steps": 2, "logging_steps": 1},
    }
    path = tmp_path / "my_recipe.yaml"
    path.write_text("# llava_ft train my_recipe.yaml\n" + yaml.safe_dump(body))
    return str(path)


def test_train_command_with_overrides(tiny_llama, demo_data, tmp_path, capsys):
    cfg = write_cfg(tmp_path, tiny_llama, demo_data["self_cognition"])
    wd = tmp_path / "wd"
    rc = main(["train", cfg, "--work-dir", str(wd), "train.max_steps=3", "train.seed=3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "6 records -> 6 samples" in out and "dropped 0" in out
    saved = yaml.safe_load((wd / "config.yaml").read_text())
    assert saved["train"]["max_steps"] == 3 and saved["train"]["seed"] == 3 and saved["name"] == "my_recipe"
    sd = torch.load(wd / "iter_3.pth", weights_only=True)
    assert sd["meta"]["step"] == 3 and all("lora_" in k for k in sd["state_dict"])


def test_train_config_errors_exit_2_with_one_line(tiny_llama, demo_data, tmp_path, capsys):
    cfg = write_cfg(tmp_path, tiny_llama, demo_data["self_cognition"])
    assert main(["train", cfg, "train.lerning_rate=1e-3"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'learning_rate'" in err and "Traceback" not in err
    assert main(["train", cfg, "model.llm=/nowhere/model", "--work-dir", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/nowhere/model does not exist" in err[0]
    assert main(["pretrain", cfg, "--work-dir", str(tmp_path / "y")]) == 2
    assert "model.visual_encoder is not set" in capsys.readouterr().err
    assert main(["train", cfg, "--deepspeed", "zero9", "--work-dir", str(tmp_path / "z")]) == 2
    assert "zero2" in capsys.readouterr().err


def test_list_and_copy_cfg(tmp_path, capsys):
    assert main(["list-cfg", "-p", "QWEN2_5_0_5b"]) == 0
    names = capsys.readouterr().out.split()
    assert "qwen2_5_0_5b_instruct_qlora_alpaca_e3" in names and all("qwen2_5_0_5b" in n for n in names)
    assert main(["copy-cfg", "qwen2_5_0_5b_instruct_qlora_alpaca_e3", str(tmp_path / "cfg")]) == 0
    copy = tmp_path / "cfg" / "qwen2_5_0_5b_instruct_qlora_alpaca_e3_copy.yaml"
    assert copy.is_file() and copy.read_text().startswith("# llava_ft train")
    assert main(["copy-cfg", "qwen2_5_0_5b_qlora", str(tmp_path)]) == 2
    assert "list-cfg" in capsys.readouterr().err


def test_log_dataset_json_and_text(tiny_llama, demo_data, tmp_path, capsys):
    cfg = write_cfg(tmp_path, tiny_llama, demo_data["self_cognition"])
    assert main(["log-dataset", cfg, "--json", "-n", "0"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert len(rows) == 6
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"])
        supervised = [lab for lab in row["labels"] if lab != IGNORE_INDEX]
        assert supervised and row["labels"][0] == IGNORE_INDEX  # prompt masked, answer supervised
    assert main(["log-dataset", cfg, "--show", "masked_text", "-n", "1"]) == 0
    out = capsys.readouterr().out
    assert "<masked " in out and "--- masked_text ---" in out and "--- input_ids ---" not in out
