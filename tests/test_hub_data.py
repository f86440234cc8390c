"""Data sources read with `datasets` (llava_ft.data.hub): save_to_disk folders with Image columns, parquet
folders loaded like a Hub id, format auto, column mapping, the offline error, the cache key, data check /
stats, and a LLaVA training run (with validation loss) on images stored inside the dataset."""
from __future__ import annotations

import json
import shutil
from argparse import Namespace

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from llava_ft.config import DataConfig, DataSource, config_from_dict
from llava_ft.data import hub
from llava_ft.data.dataset import prepare_dataset
from llava_ft.data.llava_dataset import LlavaDataset
from llava_ft.errors import UserError
from llava_ft.testing.hf_datasets import llava_json_as_dataset

NUM_IMAGE_TOKENS = 16


def _prepare(path, tokenizer, tmp_path, **source):
    cfg = DataConfig(sources=[DataSource(path=str(path), **source)], template="qwen_chat", max_length=256,
                     cache_dir=str(tmp_path / "cache"))
    return prepare_dataset(cfg, tokenizer, num_image_tokens=NUM_IMAGE_TOKENS)


def _pixels(dataset) -> list:
    """Decoded images of every sample (through LlavaDataset, as training reads them)."""
    ds = LlavaDataset(dataset, preprocess=lambda img: torch.from_numpy(np.asarray(img).copy()))
    return [ds[i]["pixel_values"] for i in range(len(ds))]


@pytest.fixture(scope="module")
def reference(demo_data, tiny_qwen2, tmp_path_factory):
    """The LLaVA json + image_folder source, prepared: what every dataset copy must reproduce."""
    tok = AutoTokenizer.from_pretrained(tiny_qwen2)
    tmp = tmp_path_factory.mktemp("ref")
    prepared = _prepare(demo_data["finetune"], tok, tmp, image_folder=demo_data["image_folder"])
    return tok, prepared.dataset


@pytest.mark.smoke
@pytest.mark.parametrize("style", ["llava", "llava_list", "trl"])
def test_saved_dataset_with_image_column_gives_the_json_tokens_and_pixels(style, reference, demo_data, tmp_path, capsys):
    tok, ref = reference
    folder = tmp_path / style
    llava_json_as_dataset(demo_data["finetune"], demo_data["image_folder"], style).save_to_disk(str(folder))
    got = _prepare(folder, tok, tmp_path).dataset
    expected_format = "openai" if style == "trl" else "llava"
    assert f"format auto -> {expected_format}" in capsys.readouterr().out
    for column in ("id", "input_ids", "labels", "modality_length"):
        assert list(got[column]) == list(ref[column]), column
    # the images travel as bytes (never decoded while preparing) and decode to the same pixels
    assert all(len(b) == 1 and b[0].startswith(b"\x89PNG") for b in got["image_bytes"])
    for a, b in zip(_pixels(got), _pixels(ref)):
        assert torch.equal(a, b)


def test_parquet_folder_is_loaded_like_a_hub_id_with_splits(reference, demo_data, tmp_path):
    tok, ref = reference
    folder = tmp_path / "pq"
    folder.mkdir()
    ds = llava_json_as_dataset(demo_data["finetune"], demo_data["image_folder"], "llava_list")
    ds.select(range(50)).to_parquet(str(folder / "train-00000-of-00001.parquet"))
    ds.select(range(50, len(ds))).to_parquet(str(folder / "validation-00000-of-00001.parquet"))
    src = DataSource(path=str(folder))
    assert hub.is_dataset_source(src) and not hub.is_hub_id(str(folder))
    assert len(hub.load_source(src)) == 50  # split defaults to train
    train = _prepare(folder, tok, tmp_path).dataset
    val = _prepare(folder, tok, tmp_path, split="validation").dataset
    assert list(train["input_ids"]) + list(val["input_ids"]) == list(ref["input_ids"])
    with pytest.raises(UserError, match="no split 'test'.*train, validation"):
        _prepare(folder, tok, tmp_path, split="test")
    # a dataset with one split that is not called train: that split is used when none is set
    only = tmp_path / "only_val"
    only.mkdir()
    ds.select(range(4)).to_parquet(str(only / "validation-00000-of-00001.parquet"))
    assert len(hub.load_source(DataSource(path=str(only)))) == 4


def test_column_mapping_and_format_auto(reference, demo_data, tmp_path, capsys):
    tok, ref = reference
    ds = llava_json_as_dataset(demo_data["finetune"], demo_data["image_folder"], "llava")
    ds = ds.rename_columns({"conversations": "dialog", "image": "picture"})
    folder = tmp_path / "renamed"
    ds.save_to_disk(str(folder))
    # without the mapping nothing says which column holds the conversation
    with pytest.raises(UserError, match="cannot detect the data format"):
        _prepare(folder, tok, tmp_path)
    got = _prepare(folder, tok, tmp_path, columns={"conversations": "dialog", "image": "picture"}).dataset
    assert "format auto -> llava (columns: id, conversations, image)" in capsys.readouterr().out
    assert list(got["input_ids"]) == list(ref["input_ids"])
    with pytest.raises(UserError, match=r"columns \['dialogue'\].*its columns: id, dialog, picture"):
        _prepare(folder, tok, tmp_path, columns={"conversations": "dialogue"})


@pytest.mark.skipif(not datasets.config.HF_HUB_OFFLINE, reason="the offline path needs HF_HUB_OFFLINE=1")
def test_hub_id_offline_without_cache_is_one_line(reference, tmp_path):
    tok, _ = reference
    src = DataSource(path="llava-ft-tests/no-such-dataset", split="train")
    assert hub.is_dataset_source(src) and hub.is_hub_id(src.path)
    with pytest.raises(UserError) as err:
        _prepare(src.path, tok, tmp_path, split="train")
    assert "offline (HF_HUB_OFFLINE=1) with no cached copy of this Hub dataset" in str(err.value)
    assert "\n" not in str(err.value)
    # a local-looking path that does not exist is a missing file, not a Hub id
    with pytest.raises(UserError, match="does not exist"):
        _prepare(tmp_path / "missing" / "train.parquet", tok, tmp_path)


def test_cache_key_follows_the_saved_dataset(reference, demo_data, tmp_path):
    tok, _ = reference
    folder = tmp_path / "saved"
    ds = llava_json_as_dataset(demo_data["finetune"], demo_data["image_folder"], "llava")
    ds.save_to_disk(str(folder))
    first = _prepare(folder, tok, tmp_path)
    assert first.stats["cache_hit"] is False
    again = _prepare(folder, tok, tmp_path)
    assert again.stats["cache_hit"] is True and list(again.dataset["input_ids"]) == list(first.dataset["input_ids"])
    assert again.dataset[0]["image_bytes"] == first.dataset[0]["image_bytes"]
    shutil.rmtree(folder)
    ds.select(range(10)).save_to_disk(str(folder))
    changed = _prepare(folder, tok, tmp_path)
    assert changed.stats["cache_hit"] is False and len(changed.dataset) == 10
    # no scratch files left beside the cache
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]


def test_data_check_and_stats_read_dataset_sources(demo_data, tiny_qwen2, tmp_path):
    from llava_ft.datatools.check import check_data
    from llava_ft.datatools.sources import plan_from_args
    from llava_ft.datatools.stats import compute_stats

    ds = llava_json_as_dataset(demo_data["finetune"], demo_data["image_folder"], "trl").select(range(6))
    rows = ds.cast_column("images", datasets.List(datasets.Image(decode=False))).to_list()
    rows[2]["images"][0]["bytes"] = rows[2]["images"][0]["bytes"][:40]  # a cut PNG inside the dataset
    broken = datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image()))
    folder = tmp_path / "broken"
    broken.save_to_disk(str(folder))
    args = Namespace(config=None, data=str(folder), format=None, image_folder=None, tokenizer=tiny_qwen2,
                     template="qwen_chat", system=None, max_length=256, num_image_tokens=NUM_IMAGE_TOKENS)
    plan = plan_from_args(args)
    report = check_data(plan)
    assert report.records == 6
    bad = [p for p in report.problems if p.kind == "truncated_image"]  # the same kinds as image files get
    assert [(p.line, p.id) for p in bad] == [(3, rows[2]["id"])]
    assert "images[0]" in bad[0].message
    stats = compute_stats(plan)
    assert stats.records == 6 and stats.with_images == 6 and stats.images == 6


def test_llava_run_on_dataset_images_logs_eval_loss(demo_data, tiny_qwen2, tiny_clip, tmp_path):
    from llava_ft.engine import run_training
    from llava_ft.engine.callbacks import read_train_log

    folder = tmp_path / "ds"
    llava_json_as_dataset(demo_data["finetune"], demo_data["image_folder"], "llava_list").save_to_disk(str(folder))
    cfg = config_from_dict({
        "name": "hub_llava",
        "model": {"llm": tiny_qwen2, "visual_encoder": tiny_clip, "freeze_llm": True},
        "data": {"sources": [{"path": str(folder)}], "template": "qwen_chat", "max_length": 256,
                 "val_split": 0.1, "cache_dir": str(tmp_path / "cache")},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 2, "max_steps": 3, "save_steps": 3,
                  "logging_steps": 1, "warmup_ratio": 0.0},
        "evaluation": {"every_n_steps": 2},
    })
    result = run_training(cfg, work_dir=str(tmp_path / "wd"))
    assert result.global_step == 3
    assert result.data_stats["validation"]["samples"] == 6
    log = read_train_log(tmp_path / "wd")
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 3]
    assert all(np.isfinite(r["eval_loss"]) and r["eval_loss"] > 0 for r in evals)
    saved = torch.load(tmp_path / "wd" / "iter_3.pth", weights_only=True)
    assert saved["state_dict"] and all(k.startswith("projector.") for k in saved["state_dict"])
    assert json.loads((tmp_path / "wd" / "train_log.jsonl").read_text().splitlines()[0])["step"] == 1


def test_column_mapping_on_json_files_and_format_line(reference, demo_data, tmp_path, capsys):
    tok, ref = reference
    records = json.loads(open(demo_data["finetune"]).read())
    path = tmp_path / "renamed.jsonl"
    path.write_text("".join(json.dumps({"id": r["id"], "dialog": r["conversations"], "pic": r["image"]}) + "\n"
                            for r in records))
    got = _prepare(path, tok, tmp_path, image_folder=demo_data["image_folder"],
                   columns={"conversations": "dialog", "image": "pic"}).dataset
    assert "renamed.jsonl: format auto -> llava (keys: id, conversations, image)" in capsys.readouterr().out
    assert list(got["input_ids"]) == list(ref["input_ids"])


def test_text_config_on_a_dataset_with_images_says_what_is_missing(demo_data, tiny_qwen2, tmp_path):
    from llava_ft.engine import run_training

    folder = tmp_path / "trl"
    llava_json_as_dataset(demo_data["finetune"], demo_data["image_folder"], "trl").save_to_disk(str(folder))
    cfg = config_from_dict({"model": {"llm": tiny_qwen2},
                            "data": {"sources": [{"path": str(folder)}], "template": "qwen_chat",
                                     "cache_dir": str(tmp_path / "cache")},
                            "train": {"max_steps": 1}})
    with pytest.raises(UserError, match="60 sample\\(s\\) carry images but model.visual_encoder is not set"):
        run_training(cfg, work_dir=str(tmp_path / "wd"))


def _parquet_with_a_cut_jpeg(demo_data, tmp_path) -> tuple:
    """A parquet file whose second record's image is a JPEG cut to 2/3 of its bytes (no end marker)."""
    import io

    from PIL import Image

    ds = llava_json_as_dataset(demo_data["finetune"], demo_data["image_folder"], "trl").select(range(4))
    rows = ds.cast_column("images", datasets.List(datasets.Image(decode=False))).to_list()
    buf = io.BytesIO()
    Image.open(io.BytesIO(rows[1]["images"][0]["bytes"])).convert("RGB").save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    rows[1]["images"][0] = {"bytes": data[: len(data) * 2 // 3], "path": None}
    path = tmp_path / "cut.parquet"
    datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image())).to_parquet(str(path))
    return str(path), rows[1]["id"]


def test_a_cut_jpeg_inside_a_parquet_fails_data_check(demo_data, tiny_qwen2, tmp_path, capsys):
    """Images stored in a dataset get the same check as image files: PIL's verify does not read a JPEG's
    entropy data, so a cut one passed; the end-marker check (then a full decode) finds it."""
    from llava_ft.cli import main as cli_main

    path, bad_id = _parquet_with_a_cut_jpeg(demo_data, tmp_path)
    report = tmp_path / "report.json"
    rc = cli_main(["data", "check", "--data", path, "--tokenizer", tiny_qwen2, "--template", "qwen_chat",
                   "--num-image-tokens", str(NUM_IMAGE_TOKENS), "--report", str(report)])
    assert rc == 1
    problems = json.loads(report.read_text())["problems"]
    assert [(p["kind"], p["id"]) for p in problems] == [("truncated_image", bad_id)]
    assert "JPEG has no end-of-image marker" in problems[0]["message"] and "images[0]" in problems[0]["message"]


def test_a_cut_jpeg_inside_a_parquet_stops_training_before_step_1(demo_data, tiny_qwen2, tiny_clip, tmp_path):
    from llava_ft.engine import run_training

    path, bad_id = _parquet_with_a_cut_jpeg(demo_data, tmp_path)
    cfg = config_from_dict({
        "name": "cut_jpeg",
        "model": {"llm": tiny_qwen2, "visual_encoder": tiny_clip, "freeze_llm": True},
        "data": {"sources": [{"path": path}], "template": "qwen_chat", "max_length": 256,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"learning_rate": 1e-3, "per_device_batch_size": 2, "max_steps": 2, "warmup_ratio": 0.0},
    })
    with pytest.raises(UserError, match=rf"1 unreadable image\(s\): sample {bad_id}: .*JPEG has no end-of-image"):
        run_training(cfg, work_dir=str(tmp_path / "wd"))
    assert not (tmp_path / "wd" / "train_log.jsonl").exists()
