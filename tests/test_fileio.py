"""Outputs follow the umask: what llava_ft writes (training work dir, exports, data-tool outputs) comes out
0644 / 0755 under umask 022 like any other tool's, though it is written atomically through temp files
(which `tempfile` creates 0600 / 0700); and a crash never leaves a half file under the real name."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import yaml

from llava_ft import fileio
from llava_ft.cli import main


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _tree_modes(root: Path) -> dict:
    """{relative path: mode} for root and everything below it."""
    out = {".": _mode(root)}
    for p in root.rglob("*"):
        out[str(p.relative_to(root))] = _mode(p)
    return out


def test_training_work_dir_and_exports_are_0644_files_in_0755_folders(umask_022, tmp_path, tiny_llama, tiny_clip,
                                                                        demo_data):
    from llava_ft.convert import pth_to_hf
    from llava_ft.testing.checkpoints import write_random_checkpoint

    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": {"llm": tiny_llama, "llm_lora": {"enabled": True, "r": 4, "alpha": 8}},
        "data": {"sources": [{"path": demo_data["self_cognition"]}], "template": "qwen_chat", "max_length": 128,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"per_device_batch_size": 2, "max_steps": 2, "save_steps": 2, "logging_steps": 1}}))
    wd = tmp_path / "wd"
    assert main(["train", str(cfg), "--work-dir", str(wd)]) == 0
    for name in ("iter_2.pth", "train_log.jsonl", "last_checkpoint", "config.yaml"):
        assert _mode(wd / name) == 0o644, name
    cache = [p for p in (tmp_path / "cache").iterdir()]
    assert cache and all(_mode(p) == 0o755 for p in cache if p.is_dir())  # the tokenized-data cache

    pth = write_random_checkpoint(tmp_path / "llava_run", {
        "model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True,
                  "llm_lora": {"enabled": True, "r": 4, "alpha": 8}},
        "data": {"template": "chatml", "sources": [{"path": "unused.json"}]}})
    hf = Path(pth_to_hf(None, pth, tmp_path / "export" / "llava_hf", fmt="llava-hf"))
    xtuner = Path(pth_to_hf(None, pth, tmp_path / "export" / "xtuner"))
    assert (hf / "model.safetensors").is_file() and (xtuner / "projector" / "model.safetensors").is_file()
    for root in (hf, xtuner):
        modes = _tree_modes(root)
        wrong = {k: oct(m) for k, m in modes.items() if m != (0o755 if (root / k).is_dir() else 0o644)}
        assert not wrong, wrong
    assert _mode(pth) == 0o644
    ckpt_dir = _tree_modes(wd / "checkpoint-2")  # what transformers.Trainer writes beside iter_2.pth
    assert {m for k, m in ckpt_dir.items() if not (wd / "checkpoint-2" / k).is_dir()} == {0o644}, ckpt_dir


def test_data_tool_outputs_follow_the_umask(umask_022, tmp_path, demo_data):
    out = tmp_path / "o.jsonl"
    assert main(["data", "replace", "-i", demo_data["self_cognition"], "-o", str(out),
                 "--old", "{{AUTHOR}}", "--new", "ACME"]) == 0
    assert _mode(out) == 0o644
    assert main(["copy-cfg", "tiny_text_sft_qlora", str(tmp_path / "cfg")]) == 0
    assert _mode(tmp_path / "cfg" / "tiny_text_sft_qlora_copy.yaml") == 0o644


@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750),
                                                      (0o077, 0o600, 0o700)])
def test_helpers_give_what_open_and_mkdir_give(tmp_path, umask, file_mode, dir_mode):
    old = os.umask(umask)
    try:
        fileio.write_text(tmp_path / "a.txt", "x")
        fileio.write_json(tmp_path / "b.json", {"k": "é"})
        fileio.torch_save({"x": 1}, tmp_path / "c.pth")
        with fileio.atomic_dir(tmp_path / "folder") as staged:
            (staged / "inside.txt").write_text("y")
        plain = tmp_path / "plain.txt"
        plain.write_text("z")
    finally:
        os.umask(old)
    assert _mode(plain) == file_mode
    assert {_mode(tmp_path / n) for n in ("a.txt", "b.json", "c.pth", "folder/inside.txt")} == {file_mode}
    assert _mode(tmp_path / "folder") == dir_mode
    assert (tmp_path / "b.json").read_text(encoding="utf-8") == '{\n  "k": "é"\n}\n'


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "state.json"
    fileio.write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with fileio.atomic_open(target) as fh:
            fh.write('{"v": 2, ')
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        with fileio.atomic_dir(tmp_path / "folder") as staged:
            (staged / "half").write_text("x")
            raise RuntimeError("killed")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]
