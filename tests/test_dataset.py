"""prepare_dataset: mixed sources, repeat, drop counts, cache hits/misses, nothing-left error."""
import json
import os
import time

import pytest
from transformers import AutoTokenizer

from llava_ft.config import DataConfig, DataSource
from llava_ft.data.dataset import prepare_dataset
from llava_ft.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return AutoTokenizer.from_pretrained(tiny_tokenizer)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def sources(tmp_path):
    alpaca = write_jsonl(tmp_path / "alpaca.jsonl", [{"instruction": f"task {i}", "input": "", "output": f"done {i}"}
                                                     for i in range(10)] + [{"instruction": "x", "input": "", "output": ""}])
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"corpus line {i}"} for i in range(4)])
    return alpaca, text


def cfg(tmp_path, paths, **kw):
    return DataConfig(sources=[DataSource(path=p, repeat=r) for p, r in paths], template="qwen_chat",
                      max_length=128, cache_dir=str(tmp_path / "cache"), **kw)


def test_mixed_sources_repeat_and_drop_counts(tmp_path, tok, sources):
    alpaca, text = sources
    prepared = prepare_dataset(cfg(tmp_path, [(alpaca, 1), (text, 2)]), tok)
    assert prepared.stats["records"] == 15
    assert prepared.stats["dropped"] == {"empty_answer": 1}
    assert len(prepared.dataset) == 10 + 2 * 4 == prepared.stats["samples"]
    assert set(prepared.dataset.column_names) >= {"id", "input_ids", "labels", "length", "modality_length", "images"}
    assert prepared.dataset[0]["id"] == f"{alpaca}:1"


def test_cache_hit_and_invalidation(tmp_path, tok, sources):
    alpaca, _ = sources
    first = prepare_dataset(cfg(tmp_path, [(alpaca, 1)]), tok)
    second = prepare_dataset(cfg(tmp_path, [(alpaca, 1)]), tok)
    assert not first.stats["cache_hit"] and second.stats["cache_hit"]
    assert second.dataset["input_ids"] == first.dataset["input_ids"]
    assert second.stats["dropped"] == first.stats["dropped"]
    # Each input of the key gives a fresh build.
    assert not prepare_dataset(cfg(tmp_path, [(alpaca, 1)], ), tok, num_image_tokens=8).stats["cache_hit"]
    other = cfg(tmp_path, [(alpaca, 1)])
    other.max_length = 64
    assert not prepare_dataset(other, tok).stats["cache_hit"]
    other = cfg(tmp_path, [(alpaca, 1)])
    other.template = "default"
    assert not prepare_dataset(other, tok).stats["cache_hit"]
    # Editing the data file (size/mtime) invalidates it too.
    with open(alpaca, "a") as fh:
        fh.write(json.dumps({"instruction": "new", "input": "", "output": "row"}) + "\n")
    os.utime(alpaca, (time.time() + 5, time.time() + 5))
    again = prepare_dataset(cfg(tmp_path, [(alpaca, 1)]), tok)
    assert not again.stats["cache_hit"] and len(again.dataset) == 11


def test_nothing_left_raises(tmp_path, tok):
    p = write_jsonl(tmp_path / "empty.jsonl", [{"instruction": "q", "input": "", "output": ""}] * 3)
    with pytest.raises(UserError, match="all dropped.*empty_answer"):
        prepare_dataset(cfg(tmp_path, [(p, 1)]), tok)


def test_unknown_template_fails_before_work(tmp_path, tok, sources):
    c = cfg(tmp_path, [(sources[0], 1)])
    c.template = "nope"
    with pytest.raises(UserError, match="valid templates: default"):
        prepare_dataset(c, tok)


def test_llava_source_with_demo_data(tmp_path, tok, demo_data):
    c = DataConfig(sources=[DataSource(path=demo_data["finetune"], image_folder=demo_data["image_folder"])],
                   template="qwen_chat", max_length=512, cache_dir=str(tmp_path / "cache"))
    prepared = prepare_dataset(c, tok, num_image_tokens=16)
    row = prepared.dataset[0]
    assert row["modality_length"] > 0 and row["length"] == len(row["input_ids"]) + 15 * len(row["images"])
    assert all(os.path.isabs(p) and p.startswith(demo_data["image_folder"]) for p in row["images"])
