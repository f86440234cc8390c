"""Packing: whole samples, positions restart, and packed batches give the same per-token loss as unpacked."""
import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llava_ft import IGNORE_INDEX
from llava_ft.config import DataConfig, DataSource
from llava_ft.data.collate import TextCollator
from llava_ft.data.dataset import prepare_dataset
from llava_ft.data.packing import plan_bins


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return AutoTokenizer.from_pretrained(tiny_tokenizer)


@pytest.fixture
def data_file(tmp_path):
    rng = random.Random(0)
    words = "the cat sat on a mat red blue green square circle answer question".split()
    rows = [{"instruction": " ".join(rng.choices(words, k=rng.randint(2, 20))), "input": "",
             "output": " ".join(rng.choices(words, k=rng.randint(1, 30)))} for _ in range(40)]
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def prepare(tmp_path, data_file, tok, pack):
    c = DataConfig(sources=[DataSource(path=data_file)], template="qwen_chat", max_length=256,
                   pack_to_max_length=pack, cache_dir=str(tmp_path / "cache"))
    return prepare_dataset(c, tok)


def test_packed_blocks_hold_whole_samples(tmp_path, data_file, tok):
    plain = prepare(tmp_path, data_file, tok, False).dataset
    packed = prepare(tmp_path, data_file, tok, True)
    by_id = {r["id"]: r for r in plain}
    seen = []
    for block in packed.dataset:
        assert len(block["input_ids"]) <= 256 and block["length"] == len(block["input_ids"])
        start = 0
        for sid in block["id"].split(","):
            n = len(by_id[sid]["input_ids"])
            assert block["input_ids"][start:start + n] == by_id[sid]["input_ids"]
            assert block["labels"][start:start + n] == by_id[sid]["labels"]
            assert block["position_ids"][start:start + n] == list(range(n))
            start += n
            seen.append(sid)
        assert start == len(block["input_ids"])
    assert sorted(seen) == sorted(by_id)
    assert packed.stats["packing"]["blocks"] == len(packed.dataset)


def test_best_fit_padding_is_small():
    rng = random.Random(1)
    lengths = [rng.randint(40, 600) for _ in range(3000)]  # alpaca-like spread
    bins = plan_bins(lengths, 2048, seed=0)
    assert sorted(i for b in bins for i in b) == list(range(3000))
    assert all(sum(lengths[i] for i in b) <= 2048 for b in bins)
    padding = 1 - sum(lengths) / (len(bins) * 2048)
    assert padding <= 0.05


def test_collator_shapes_and_padding(tok):
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = TextCollator(tok)(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, tok.pad_token_id, tok.pad_token_id]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    packed = TextCollator(tok, pad_to_multiple_of=4)([{"input_ids": [5, 6, 7], "labels": [5, 6, 7],
                                                       "position_ids": [0, 1, 0]}])
    assert "attention_mask" not in packed and packed["position_ids"].tolist() == [[0, 1, 0, 0]]


def per_token_losses(model, batch):
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                       position_ids=batch.get("position_ids"), use_cache=False).logits
    out = []
    for row in range(logits.shape[0]):
        labels = batch["labels"][row]
        for t in range(1, labels.shape[0]):
            if labels[t] != IGNORE_INDEX:
                out.append(torch.nn.functional.cross_entropy(logits[row, t - 1], labels[t]).item())
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_unpacked(tmp_path, data_file, tok, tiny_llama, attn):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn, dtype=torch.float32).eval()
    packed = prepare(tmp_path, data_file, tok, True).dataset
    plain = {r["id"]: r for r in prepare(tmp_path, data_file, tok, False).dataset}
    collate = TextCollator(tok)
    blocks = [packed[i] for i in range(min(3, len(packed)))]
    packed_losses = per_token_losses(model, collate(blocks))
    # Same samples, same order, one per row (padded, attention_mask): the reference.
    order = [plain[sid] for b in blocks for sid in b["id"].split(",")]
    plain_losses = per_token_losses(model, collate(order))
    assert len(packed_losses) == len(plain_losses) > 0
    assert torch.allclose(torch.tensor(packed_losses), torch.tensor(plain_losses), atol=1e-4)
    # Sanity: without position_ids restarting, attention crosses samples and losses differ.
    leaky = collate(blocks)
    leaky["position_ids"] = torch.arange(leaky["input_ids"].shape[1]).expand_as(leaky["input_ids"])
    assert not torch.allclose(torch.tensor(per_token_losses(model, leaky)), torch.tensor(plain_losses), atol=1e-4)
