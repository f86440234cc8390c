"""Tests for the data tools (llava_ft.datatools, `llava_ft data ...`, data_tools/*.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
from PIL import Image

from llava_ft.cli import main as cli_main
from llava_ft.data import jsonio
from llava_ft.datatools.check import check_data
from llava_ft.datatools.convert import convert_dataset
from llava_ft.datatools.repeat import repeat_dataset
from llava_ft.datatools.replace import replace_in_dataset
from llava_ft.datatools.sources import Plan, Source
from llava_ft.datatools.stats import compute_stats
from llava_ft.errors import UserError

REPO = Path(__file__).resolve().parent.parent


def _records(path) -> list:
    return [r.value for r in jsonio.iter_raw(path)]


def _write_jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------- io


def test_json_list_streaming_matches_json_load(tmp_path, monkeypatch):
    rows = [{"id": i, "text": "line\n" * i, "n": [1.5, None, True]} for i in range(30)] + [7, "s"]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(rows, indent=2))
    monkeypatch.setattr(jsonio, "_CHUNK", 5)  # force records to straddle chunk borders
    got = list(jsonio.iter_raw(path))
    assert [r.value for r in got] == rows
    text_lines = path.read_text().splitlines()
    assert text_lines[got[3].line - 1].strip() == "{"  # line numbers point at the record's start


def test_invalid_json_is_reported_with_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[\n {"a": 1},\n {"a": 2,,}\n]\n')
    with pytest.raises(UserError, match=r"bad\.json:3: not valid JSON"):
        list(jsonio.iter_raw(bad))
    bad_l = tmp_path / "bad.jsonl"
    bad_l.write_text('{"a": 1}\n{oops\n{"a": 3}\n')
    problems = []
    assert [r.value["a"] for r in jsonio.iter_raw(bad_l, on_error=problems.append)] == [1, 3]
    assert [p.line for p in problems] == [2]


# ---------------------------------------------------------------------------------------------- repeat


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_repeat_keeps_format_and_content(tmp_path, demo_data, suffix):
    src = tmp_path / f"in{suffix}"
    convert_dataset(demo_data["finetune"], str(src), suffix[1:], progress=False)
    original = _records(src)
    out = tmp_path / f"out{suffix}"
    assert repeat_dataset(str(src), str(out), 3) == 3 * len(original)
    assert jsonio.detect_container(out) == suffix[1:]
    if suffix == ".json":
        assert json.loads(out.read_text()) == original * 3  # a valid JSON list
    assert _records(out) == original * 3

    shuffled = tmp_path / f"shuf{suffix}"
    repeat_dataset(str(src), str(shuffled), 2, shuffle=True, seed=5)
    got = _records(shuffled)
    first, second = got[: len(original)], got[len(original):]
    key = lambda r: r["id"]  # noqa: E731
    assert sorted(first, key=key) == sorted(original, key=key) == sorted(second, key=key)
    assert first != original and first != second
    again = tmp_path / f"again{suffix}"
    repeat_dataset(str(src), str(again), 2, shuffle=True, seed=5)
    assert again.read_bytes() == shuffled.read_bytes()


def test_repeat_memory_does_not_grow_with_n(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"id": i, "text": "x" * 200} for i in range(100)])
    peaks = {}
    for n in (2, 200):
        tracemalloc.start()
        repeat_dataset(src, str(tmp_path / f"out{n}.jsonl"), n)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert len(_records(tmp_path / "out200.jsonl")) == 20000
    assert peaks[200] < 3 * peaks[2], peaks


def test_outputs_never_overwrite_input_or_existing_files(tmp_path, demo_data):
    src = tmp_path / "in.jsonl"
    shutil.copy(demo_data["self_cognition"], src)
    before = src.read_bytes()
    with pytest.raises(UserError, match="the output is the input"):
        repeat_dataset(str(src), str(src), 2, force=True)
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(UserError, match="--force"):
        replace_in_dataset(str(src), str(out), "a", "b", progress=False)
    assert out.read_text() == "keep me\n" and src.read_bytes() == before
    # a failure midway (invalid JSON on line 3) leaves no output and no temp file behind
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"a": 1}\n{"a": 2}\n{nope\n')
    with pytest.raises(UserError, match=r"broken\.jsonl:3"):
        repeat_dataset(str(broken), str(tmp_path / "new.jsonl"), 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.jsonl", "in.jsonl", "out.jsonl"]


# ---------------------------------------------------------------------------------------------- replace


def test_replace_counts_and_rewrites_every_string(tmp_path, demo_data):
    out = tmp_path / "named.jsonl"
    res = replace_in_dataset(demo_data["self_cognition"], str(out), "{{NAME}}", "Shapey", progress=False)
    original = _records(demo_data["self_cognition"])
    expected = sum(json.dumps(r).count("{{NAME}}") for r in original)
    assert res.replacements == expected > 0
    assert res.records == len(original) and res.records_changed == len(original)
    text = out.read_text()
    assert "{{NAME}}" not in text and text.count("Shapey") == expected and "{{AUTHOR}}" in text
    nested = _write_jsonl(tmp_path / "nested.jsonl", [{"NAME": {"deep": ["NAME", 3, "no"]}}, {"x": "none"}])
    res = replace_in_dataset(nested, str(tmp_path / "n_out.jsonl"), "NAME", "B", progress=False)
    assert (res.replacements, res.records_changed) == (1, 1)
    assert _records(tmp_path / "n_out.jsonl")[0] == {"NAME": {"deep": ["B", 3, "no"]}}  # keys untouched


def test_replace_cli_prints_count(tmp_path, demo_data, capsys):
    out = tmp_path / "o.jsonl"
    rc = cli_main(["data", "replace", "-i", demo_data["self_cognition"], "-o", str(out),
                   "--old", "{{AUTHOR}}", "--new", "ACME"])
    assert rc == 0
    n = sum(json.dumps(r).count("{{AUTHOR}}") for r in _records(demo_data["self_cognition"]))
    assert f"replaced {n} occurrence(s)" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------- convert


def test_convert_round_trips(tmp_path, demo_data):
    original = _records(demo_data["finetune"])
    convert_dataset(demo_data["finetune"], str(tmp_path / "ft.jsonl"), "openai", progress=False)
    as_openai = _records(tmp_path / "ft.jsonl")
    assert as_openai[0]["messages"][0]["role"] == "user" and as_openai[0]["images"] == [original[0]["image"]]
    convert_dataset(str(tmp_path / "ft.jsonl"), str(tmp_path / "back.json"), "llava", progress=False)
    back = json.loads((tmp_path / "back.json").read_text())
    for a, b in zip(original, back):
        assert b["id"] == a["id"] and b["conversations"] == a["conversations"]
        assert b["image"] in (a["image"], [a["image"]])

    alpaca = [{"instruction": "Name a colour.", "input": "", "output": "red"},
              {"instruction": "Translate", "input": "rouge", "output": "red"}]
    src = _write_jsonl(tmp_path / "alpaca.jsonl", alpaca)
    convert_dataset(src, str(tmp_path / "a_llava.json"), "llava", progress=False)
    convert_dataset(str(tmp_path / "a_llava.json"), str(tmp_path / "a_share.jsonl"), "sharegpt", progress=False)
    convert_dataset(str(tmp_path / "a_share.jsonl"), str(tmp_path / "a_back.jsonl"), "alpaca", progress=False)
    back = _records(tmp_path / "a_back.jsonl")
    assert back[0] == {"id": "alpaca-0", "instruction": "Name a colour.", "input": "", "output": "red"}
    # XTuner joins instruction and input with a newline; converting keeps the text the model sees
    assert back[1]["instruction"] == "Translate\nrouge" and back[1]["output"] == "red"

    convert_dataset(demo_data["pretrain"], str(tmp_path / "p.jsonl"), "jsonl", progress=False)
    convert_dataset(str(tmp_path / "p.jsonl"), str(tmp_path / "p.json"), "json", progress=False)
    assert json.loads((tmp_path / "p.json").read_text()) == json.loads(Path(demo_data["pretrain"]).read_text())


def test_convert_rejects_what_the_target_cannot_hold(tmp_path, demo_data):
    with pytest.raises(UserError, match="finetune_00000.*alpaca cannot hold images"):
        convert_dataset(demo_data["finetune"], str(tmp_path / "x.jsonl"), "alpaca", progress=False)
    multi = _write_jsonl(tmp_path / "m.jsonl", [{"id": "conv7", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]}])
    with pytest.raises(UserError, match="conv7.*4 turns"):
        convert_dataset(multi, str(tmp_path / "y.jsonl"), "alpaca", progress=False)
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "y.jsonl").exists()


# ---------------------------------------------------------------------------------------------- check


def _turns(*pairs):
    return [{"from": f, "value": v} for f, v in pairs]


@pytest.fixture
def defective(tmp_path, demo_data):
    """A LLaVA jsonl with exactly one instance of each defect `data check` must find."""
    images = tmp_path / "images"
    images.mkdir()
    good = Path(demo_data["image_folder"]) / "pretrain" / "pretrain_00000.png"
    shutil.copy(good, images / "good.png")
    (images / "garbage.png").write_bytes(b"this is not an image at all" * 10)
    data = good.read_bytes()
    (images / "cut.png").write_bytes(data[: len(data) // 2])
    qa = _turns(("human", "<image>\nWhat colour is the shape?"), ("gpt", "red"))
    lines = [
        json.dumps({"id": "ok", "image": "good.png", "conversations": qa}),
        "{this is not json",
        json.dumps({"id": "malformed", "image": "good.png", "conversations": "hello"}),
        json.dumps({"id": "empty", "image": "good.png", "conversations": []}),
        json.dumps({"id": "order", "image": "good.png",
                    "conversations": _turns(("gpt", "red"), ("human", "<image>\nWhat colour?"))}),
        json.dumps({"id": "mismatch", "image": "good.png",
                    "conversations": _turns(("human", "<image>\n<image>\nCompare."), ("gpt", "same"))}),
        json.dumps({"id": "ok", "image": "good.png", "conversations": qa}),
        json.dumps({"id": "missing", "image": "nowhere.png", "conversations": qa}),
        json.dumps({"id": "unreadable", "image": "garbage.png", "conversations": qa}),
        json.dumps({"id": "truncated", "image": "cut.png", "conversations": qa}),
        json.dumps({"id": "long", "image": "good.png",
                    "conversations": _turns(("human", "<image>\nDescribe."), ("gpt", "A red circle. " * 20))}),
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), str(images)


def test_check_finds_each_defect(defective, tiny_tokenizer):
    path, images = defective
    plan = Plan([Source(path, "auto", images)], tokenizer=tiny_tokenizer, max_length=64, num_image_tokens=16)
    report = check_data(plan, workers=4)
    errors = {(p.kind, p.id if p.id is not None else p.line) for p in report.problems if p.severity == "error"}
    assert errors == {
        ("invalid_json", 2), ("malformed", "malformed"), ("empty_conversation", "empty"),
        ("roles_out_of_order", "order"), ("image_count_mismatch", "mismatch"),
        ("missing_image", "missing"), ("unreadable_image", "unreadable"), ("truncated_image", "truncated"),
        ("too_long", "long"),
    }
    dup = [p for p in report.problems if p.kind == "duplicate_id"]
    assert len(dup) == 1 and dup[0].id == "ok" and dup[0].severity == "warning"
    assert dup[0].line == 7 and "line 1" in dup[0].message
    assert report.records == 10  # every parseable line was looked at


def test_check_cli_exit_codes_and_report(defective, tiny_tokenizer, demo_data, tmp_path, capsys):
    path, images = defective
    report_path = tmp_path / "report.json"
    rc = cli_main(["data", "check", "--data", path, "--image-folder", images, "--tokenizer", tiny_tokenizer,
                   "--max-length", "64", "--num-image-tokens", "16", "--report", str(report_path)])
    out = capsys.readouterr().out
    assert rc == 1
    assert "truncated_image" in out and "bad.jsonl:2" in out
    report = json.loads(report_path.read_text())
    assert report["errors"] == 9 and report["counts"]["missing_image"] == 1
    # the demo data is clean; default report goes next to the data
    clean = tmp_path / "clean.json"
    shutil.copy(demo_data["finetune"], clean)
    rc = cli_main(["data", "check", "--data", str(clean), "--image-folder", demo_data["image_folder"]])
    assert rc == 0
    assert json.loads((tmp_path / "clean.json.check.json").read_text())["errors"] == 0


def test_check_reports_non_utf8_and_paths_leaving_the_image_folder(tmp_path, demo_data, capsys):
    images = tmp_path / "images"
    images.mkdir()
    good = Path(demo_data["image_folder"]) / "pretrain" / "pretrain_00000.png"
    shutil.copy(good, images / "good.png")
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(good, tmp_path / "elsewhere" / "x.png")
    qa = _turns(("human", "<image>\nWhat colour is the shape?"), ("gpt", "red"))
    lines = [json.dumps({"id": "in", "image": "good.png", "conversations": qa}).encode(),
             json.dumps({"id": "up", "image": "../elsewhere/x.png", "conversations": qa}).encode(),
             b'{"id": "latin", "image": "good.png", "conversations": [{"from": "human", "value": "caf\xe9"}]}']
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rc = cli_main(["data", "check", "--data", str(path), "--image-folder", str(images)])
    out = capsys.readouterr().out
    assert rc == 1 and "Traceback" not in out
    offset = len(lines[0]) + len(lines[1]) + 2 + lines[2].index(b"\xe9")
    assert f"error: {path}:3: not_utf8: byte 0xe9 at byte offset {offset} is not UTF-8" in out
    assert f"warning: {path}:2 (id up): image_outside_folder: image {tmp_path / 'elsewhere' / 'x.png'}" in out
    path.write_bytes(b"\n".join(lines[:2]) + b"\n")  # the path alone is a warning: training accepts it
    assert cli_main(["data", "check", "--data", str(path), "--image-folder", str(images)]) == 0
    assert cli_main(["data", "check", "--data", str(path), "--image-folder", str(tmp_path / "nope")]) == 2
    assert "image folder" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- stats


def test_stats_lengths_and_modalities(tmp_path, demo_data, tiny_tokenizer, capsys):
    mixed = tmp_path / "mixed.jsonl"
    convert_dataset(demo_data["finetune"], str(mixed), "openai", progress=False)
    with open(mixed, "a") as f:
        for r in _records(demo_data["self_cognition"]):
            f.write(json.dumps(r) + "\n")
    plan = Plan([Source(str(mixed), "auto", demo_data["image_folder"])], tokenizer=tiny_tokenizer,
                max_length=2048, num_image_tokens=16)
    stats = compute_stats(plan)
    n_ft, n_cog = len(_records(demo_data["finetune"])), len(_records(demo_data["self_cognition"]))
    assert (stats.records, stats.with_images, stats.text_only, stats.images) == (n_ft + n_cog, n_ft, n_cog, n_ft)
    # each image adds 16 feature tokens in place of 1 placeholder... and text length excludes the placeholder
    diffs = sorted(full - text for full, text in zip(stats.full_lengths, stats.text_lengths))
    assert diffs == [0] * n_cog + [16] * n_ft
    plot = tmp_path / "h.png"
    rc = cli_main(["data", "stats", "--data", str(mixed), "--image-folder", demo_data["image_folder"],
                   "--tokenizer", tiny_tokenizer, "--num-image-tokens", "16", "--plot", str(plot)])
    assert rc == 0 and Image.open(plot).format == "PNG"
    out = capsys.readouterr().out
    assert f"with images: {n_ft}, text-only: {n_cog}" in out and "p95" in out


# ---------------------------------------------------------------------------------------------- scripts, demo


def test_script_and_demo_command(tmp_path, demo_data):
    out = tmp_path / "rep.jsonl"
    proc = subprocess.run([sys.executable, str(REPO / "data_tools" / "repeat.py"), "-i", demo_data["eval"],
                           "-o", str(out), "-n", "2"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert len(_records(out)) == 2 * len(_records(demo_data["eval"]))
    proc = subprocess.run([sys.executable, str(REPO / "data_tools" / "repeat.py"), "-i", demo_data["eval"],
                           "-o", str(out), "-n", "2"], capture_output=True, text=True)
    assert proc.returncode == 2 and "already exists" in proc.stderr

    assert cli_main(["data", "demo", str(tmp_path / "ws")]) == 0
    info = json.loads((tmp_path / "ws" / "workspace.json").read_text())
    assert Path(info["paths"]["llm"], "config.json").is_file()
    assert Path(info["paths"]["finetune"]).is_file()


def test_check_and_stats_from_a_config(tmp_path, demo_data, tiny_llama, tiny_clip, capsys):
    import yaml

    cfg = {
        "model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True},
        "data": {"sources": [{"path": demo_data["finetune"], "image_folder": demo_data["image_folder"]}],
                 "template": "vicuna", "max_length": 256},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    report = tmp_path / "r.json"
    assert cli_main(["data", "check", str(path), "--report", str(report)]) == 0
    assert json.loads(report.read_text())["lengths_checked"] is True
    # the tiny CLIP (32 px, patch 8) gives 16 tokens per image; a max_length below that flags every sample
    assert cli_main(["data", "check", str(path), "data.max_length=16", "--report", str(report)]) == 1
    counts = json.loads(report.read_text())["counts"]
    assert counts == {"too_long": len(_records(demo_data["finetune"]))}
    capsys.readouterr()
    assert cli_main(["data", "stats", str(path), "--plot", str(tmp_path / "s.png")]) == 0
    assert "16 tokens each" in capsys.readouterr().out


def test_image_check_kinds_for_jpeg(tmp_path, demo_data):
    from llava_ft.datatools.check import check_image_file

    img = Image.open(Path(demo_data["image_folder"]) / "eval" / "eval_00000.png").convert("RGB")
    img.save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) * 2 // 3])
    assert check_image_file(str(tmp_path / "ok.jpg")) is None
    assert check_image_file(str(tmp_path / "cut.jpg"))[0] == "truncated_image"
    assert check_image_file(str(tmp_path / "none.jpg"))[0] == "missing_image"


def test_check_accepts_a_greeting_after_the_system_prompt(tmp_path, tiny_tokenizer):
    """Training keeps an assistant greeting after the system prompt as a turn (as XTuner does), so data check
    does not call it out of order; an assistant first in the list (dropped by both) still is."""
    greeting = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "assistant", "content": "Hi!"},
                             {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    first = {"messages": greeting["messages"][1:]}
    path = tmp_path / "greet.jsonl"
    path.write_text(json.dumps(greeting) + "\n" + json.dumps(first) + "\n")
    report = check_data(Plan([Source(str(path), "openai", None)], tokenizer=tiny_tokenizer, max_length=64))
    assert [(p.kind, p.line) for p in report.problems] == [("roles_out_of_order", 2)]
