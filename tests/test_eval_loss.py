"""eval_loss is the token-weighted mean over the whole validation set, and data.val_split holds out samples
before packing (issue 19 item 6).

Trainer's own loop averages per-batch means, which moves with the batch size and with packing; these tests
evaluate one validation set at batch 1, batch 4 and packed (fp32, tiny models) and compare with the mean
computed token by token from each sample run alone.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from llava_ft import IGNORE_INDEX
from llava_ft.config import config_from_dict
from llava_ft.data.collate import TextCollator
from llava_ft.data.dataset import prepare_dataset
from llava_ft.data.llava_dataset import LlavaDataset
from llava_ft.data.mm_collate import MultimodalCollator
from llava_ft.engine.run import build_train_data, training_arguments
from llava_ft.engine.trainer import LlavaFtTrainer
from llava_ft.engine.validation import EvalTokenTotals, EvenShards, hold_out
from llava_ft.model.builder import build_model
from test_mm_packing import build, datasets_for, make_cfg, mixed_data  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(5)
    words = "the cat sat on a mat red blue green square circle answer question".split()
    rows = [{"instruction": " ".join(rng.choices(words, k=rng.randint(2, 20))), "input": "",
             "output": " ".join(rng.choices(words, k=rng.randint(1, 40)))} for _ in range(30)]
    path = tmp_path_factory.mktemp("evalloss") / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def text_cfg(llm, path, tmp_path, **data):
    return config_from_dict({
        "name": "eval_weighting", "model": {"llm": llm, "dtype": "fp32", "attn_implementation": "sdpa"},
        "data": {"sources": [{"path": path}], "template": "qwen_chat", "max_length": 160, "val_split": 0.2,
                 "cache_dir": str(tmp_path / "cache"), **data},
        "train": {"per_device_batch_size": 1, "max_steps": 1, "seed": 3}})


def evaluate(cfg, model, dataset, collator, batch_size, work_dir) -> float:
    cfg.train.per_device_batch_size = batch_size
    trainer = LlavaFtTrainer(model=model, args=training_arguments(cfg, str(work_dir), None), llava_cfg=cfg,
                             eval_dataset=dataset, data_collator=collator)
    return trainer.evaluate()["eval_loss"]


def token_weighted_reference(model, collator, samples) -> float:
    """Sum of every supervised token's cross-entropy / their number, each sample run alone."""
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            batch = collator([sample])
            out = model(**batch)
            n = int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())
            total += float(out.loss) * n
            count += n
    return total / count


def test_text_eval_loss_is_the_same_at_batch_1_batch_4_and_packed(tiny_llama, text_file, tmp_path):
    cfg = text_cfg(tiny_llama, text_file, tmp_path)
    torch.manual_seed(0)
    model, tok = build_model(cfg, for_training=True)
    model.eval()
    collator = TextCollator(tok)
    plain = prepare_dataset(cfg.data, tok, seed=3).dataset
    cfg.data.pack_to_max_length = True
    packed = prepare_dataset(cfg.data, tok, seed=3).dataset
    assert len(packed) < len(plain)
    ref = token_weighted_reference(model, collator, [plain[i] for i in range(len(plain))])
    losses = {"batch 1": evaluate(cfg, model, plain, collator, 1, tmp_path),
              "batch 4": evaluate(cfg, model, plain, collator, 4, tmp_path),
              "packed, batch 1": evaluate(cfg, model, packed, collator, 1, tmp_path),
              "packed, batch 3": evaluate(cfg, model, packed, collator, 3, tmp_path)}
    for name, value in losses.items():
        assert value == pytest.approx(ref, abs=1e-5, rel=1e-5), name


def test_llava_eval_loss_is_the_same_at_batch_1_batch_4_and_packed(tiny_llama, tiny_clip, mixed_data,  # noqa: F811
                                                                   tmp_path):
    cfg = make_cfg(tiny_llama, tiny_clip, mixed_data, "pretrain")
    model, tok = build(cfg)
    packed, by_id, _ = datasets_for(cfg, model, tok)
    plain = list(by_id.values())
    collator = MultimodalCollator(tok, image_shape=model.visual_encoder.image_shape)
    ref = token_weighted_reference(model, collator, plain)
    for name, dataset, batch in (("batch 1", plain, 1), ("batch 4", plain, 4), ("packed", packed, 2)):
        value = evaluate(cfg, model, dataset, collator, batch, tmp_path)
        assert value == pytest.approx(ref, abs=1e-5, rel=1e-5), name


def test_val_split_holds_out_samples_before_packing(tiny_llama, text_file, tmp_path):
    cfg = text_cfg(tiny_llama, text_file, tmp_path, pack_to_max_length=True)
    model, tok = build_model(cfg, for_training=True)
    train, _, stats, held = build_train_data(cfg, model, tok, with_eval=True)
    assert "position_ids" in train.column_names and "position_ids" in held.column_names  # both packed
    # The same samples as holding out from the unpacked data.
    cfg_plain = text_cfg(tiny_llama, text_file, tmp_path)
    _, expected = hold_out(prepare_dataset(cfg_plain.data, tok, seed=3).dataset, 0.2, seed=3)
    held_ids = [s for block in held["id"] for s in block.split(",")]
    train_ids = [s for block in train["id"] for s in block.split(",")]
    assert sorted(held_ids) == sorted(expected["id"])
    assert not set(held_ids) & set(train_ids) and len(held_ids) + len(train_ids) == stats["samples"]
    # What the run's "validation: N samples" line prints counts samples, not blocks.
    assert stats["validation"]["samples"] == len(held_ids) == round(stats["samples"] * 0.2) > len(held)
    assert stats["packing"]["samples"] == len(train_ids)
    # The packed parts are cached beside the unpacked data (memory-mapped, not one copy per rank in RAM).
    train2, _, stats2, held2 = build_train_data(cfg, model, tok, with_eval=True)
    assert train2.cache_files and held2.cache_files
    assert train2["id"] == train["id"] and held2["id"] == held["id"] and stats2["packing"] == stats["packing"]


def test_filler_rows_add_no_token_to_the_eval_loss(text_file, tiny_tokenizer, tmp_path, tiny_llama):
    """Distributed eval pads the set to world size x batch with rows whose labels are all -100."""
    cfg = text_cfg(tiny_llama, text_file, tmp_path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    plain = prepare_dataset(cfg.data, tok, seed=3).dataset
    padded = EvenShards(plain, 8)
    assert len(padded) % 8 == 0 and len(plain) < len(padded) < len(plain) + 8
    assert padded[0] == plain[0]
    filler = padded[len(plain)]
    assert filler["input_ids"] == plain[0]["input_ids"] and set(filler["labels"]) == {IGNORE_INDEX}
    totals = EvalTokenTotals()
    batch = TextCollator(tok)([plain[1]])
    totals.add(torch.tensor(2.0), batch["labels"])
    totals.add(torch.tensor(float("nan")), TextCollator(tok)([filler])["labels"])  # mean over 0 tokens
    assert totals.mean() == pytest.approx(2.0)
