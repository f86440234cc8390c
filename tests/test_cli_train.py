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


# ---- bad data: reported before the model loads, or skipped and counted -----------------------------

def write_llava_cfg(tmp_path: Path, llm: str, clip: str, data: str, image_folder: str, **data_kw) -> str:
    body = {
        "model": {"llm": llm, "quantization": "none", "dtype": "fp32", "freeze_llm": True,
                  "llm_lora": {"enabled": False}, "visual_encoder": clip, "projector_depth": 2},
        "data": {"sources": [{"path": data, "format": "llava", "image_folder": image_folder}],
                 "template": "qwen_chat", "max_length": 256, "cache_dir": str(tmp_path / "cache"), **data_kw},
        "train": {"per_device_batch_size": 4, "max_steps": 1, "save_steps": 1, "logging_steps": 1,
                  "dataloader_num_workers": 0},
    }
    path = tmp_path / "llava_recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


def llava_rows(demo_data, n: int) -> list:
    return json.loads(Path(demo_data["pretrain"]).read_text())[:n]


def test_data_errors_come_before_the_model_loads(tiny_llama, tiny_clip, demo_data, tmp_path, capsys):
    """model.llm is a hub id that exists nowhere (offline; only loading it can tell): had the model loaded
    first, every error below would be about the model. (A missing local path fails before the data: see
    test_missing_model_paths_fail_before_the_data_pass.)"""
    rows = llava_rows(demo_data, 8)
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    folder = demo_data["image_folder"]
    wd = tmp_path / "wd"

    def error(cfg: str, *extra: str) -> str:
        assert main(["train", cfg, "model.llm=nowhere/model", "--work-dir", str(wd), *extra]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and "nowhere/model" not in err
        return err

    cfg = write_llava_cfg(tmp_path, tiny_llama, tiny_clip, str(tmp_path / "missing.json"), folder)
    assert "missing.json' does not exist" in error(cfg)
    cfg = write_llava_cfg(tmp_path, tiny_llama, tiny_clip, str(data), str(tmp_path / "no_images"))
    assert "image_folder" in error(cfg) and "is not a folder" in error(cfg)
    latin = tmp_path / "latin.json"
    latin.write_bytes(json.dumps(rows).encode().replace(b"caption", b"capti\xf3n", 1))
    cfg = write_llava_cfg(tmp_path, tiny_llama, tiny_clip, str(latin), folder)
    assert "latin.json:1: byte 0xf3 at byte offset" in error(cfg)
    broken = tmp_path / "broken_images"
    broken.mkdir()
    for row in rows[:6]:
        (broken / Path(row["image"]).name).write_bytes(b"\x89PNG\r\n\x1a\n cut")
        row["image"] = str(broken / Path(row["image"]).name)
    data.write_text(json.dumps(rows))
    cfg = write_llava_cfg(tmp_path, tiny_llama, tiny_clip, str(data), folder)
    err = error(cfg)
    assert "6 bad record(s) in the training data (unreadable_image: 6)" in err
    assert sum(str(broken) in line for line in err.splitlines()) == 6  # all six listed, not five
    assert not wd.exists()  # nothing was started


def test_skip_bad_samples_counts_everything_at_prep_and_at_the_end(tiny_llama, tiny_clip, demo_data, tmp_path,
                                                                   capsys, caplog):
    rows = llava_rows(demo_data, 5)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n cut")
    rows[1]["image"] = str(broken)  # found only during training: no image check up front with the flag
    rows[2]["conversations"][0]["from"] = "robot"
    lines = [json.dumps(r) for r in rows] + ['{"id": "cut", "conversations": [']
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = write_llava_cfg(tmp_path, tiny_llama, tiny_clip, str(data), demo_data["image_folder"],
                          skip_bad_samples=True)
    assert main(["pretrain", cfg, "--work-dir", str(tmp_path / "wd")]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "6 records -> 4 samples" in out and "skipped 2 bad record(s) (bad_role: 1, invalid_json: 1)" in out
    final = [line for line in out.splitlines() if line.startswith("[llava_ft] bad samples:")]
    assert final == ["[llava_ft] bad samples: 3 in all: 2 bad record(s) skipped while reading (bad_role: 1, "
                     "invalid_json: 1), 0 sample(s) dropped at encoding, 1 unreadable image(s) skipped during training"]
    assert "skipping bad image (1 so far): sample pretrain_00001" in caplog.text
    assert "skip_bad_samples=true" not in out + caplog.text  # the flag is on: nothing tells the user to set it


def test_pretrained_pth_accepts_a_pretrain_work_dir(tiny_llama, tiny_clip, demo_data, tmp_path, capsys):
    data = tmp_path / "d.json"
    data.write_text(json.dumps(llava_rows(demo_data, 4)))
    cfg = write_llava_cfg(tmp_path, tiny_llama, tiny_clip, str(data), demo_data["image_folder"])
    pre = tmp_path / "pre"
    assert main(["pretrain", cfg, "--work-dir", str(pre)]) == 0
    capsys.readouterr()
    fine = tmp_path / "fine"
    assert main(["finetune", cfg, f"model.pretrained_pth={pre}", "--work-dir", str(fine)]) == 0
    out = capsys.readouterr().out
    loaded = torch.load(pre / "iter_1.pth", weights_only=True)["state_dict"]
    assert (f"[llava_ft] model.pretrained_pth: loaded {len(loaded)} tensor(s) (projector {len(loaded)}) from "
            f"{(pre / 'iter_1.pth').resolve()} (newest checkpoint of work dir {pre})") in out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["finetune", cfg, f"model.pretrained_pth={empty}", "--work-dir", str(tmp_path / "x")]) == 2
    assert "without last_checkpoint or iter_N.pth" in capsys.readouterr().err


def test_missing_model_paths_fail_before_the_data_pass(tiny_llama, tiny_clip, demo_data, tmp_path, capsys):
    """A local path in the model section that does not exist fails when the config loads, naming the key,
    before any data message (the data below is bad too: read first, it would be the error). Hub ids
    (org/name) and open_clip names (ViT-L-14-336) are not paths: they pass this check."""
    rows = llava_rows(demo_data, 4)
    rows[1]["conversations"][0]["from"] = "robot"  # a bad record: the data pass would stop on it
    data = tmp_path / "d.json"
    data.write_text(json.dumps(rows))
    cfg = write_llava_cfg(tmp_path, tiny_llama, tiny_clip, str(data), demo_data["image_folder"])
    wd = tmp_path / "wd"

    def run(*overrides: str) -> tuple:
        assert main(["train", cfg, *overrides, "--work-dir", str(wd)]) == 2
        captured = capsys.readouterr()
        return captured.out, captured.err.strip()

    for key, value in [("model.llm", "/nope"), ("model.tokenizer", "./no/such/tokenizer"),
                       ("model.visual_encoder", str(tmp_path / "no_tower")),
                       ("model.pretrained_pth", str(tmp_path / "pre" / "iter_9.pth"))]:
        out, err = run(f"{key}={value}")
        assert len(err.splitlines()) == 1 and key in err and value in err, err
        assert "[llava_ft] data" not in out and "robot" not in err
    # not paths: the run gets as far as the data, which stops it
    for override in ("model.llm=nowhere/model", "model.visual_encoder=ViT-L-14-336"):
        out, err = run(override)
        assert "robot" in err, err
    assert not wd.exists()
