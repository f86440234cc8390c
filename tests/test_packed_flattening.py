"""Packed batches reach the LLM as ONE flattened row at any per_device_batch_size (issue 19 item 3).

transformers' flash-attention path treats position_ids as packed only for a batch of one row
(`_is_packed_sequence(position_ids, batch_size)` is False for batch_size != 1), so a batch of several
packed rows would run plain causal attention over each whole row there. These tests capture what
actually reaches the LLM (a forward pre-hook), ask transformers' own detection function about it, and
compare per-sample logits with each sample run alone: with sdpa and eager, with `varlen_cpu` (an attention
function registered with transformers that makes flash-attention's dispatch decisions with the real
`_is_packed_sequence` / `prepare_fa_kwargs_from_position_ids` and computes on the CPU with sdpa) and, on a
GPU, with flash_attention_2 itself.
"""
from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AttentionInterface, AttentionMaskInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.masking_utils import flash_attention_mask
from transformers.modeling_flash_attention_utils import _is_packed_sequence, prepare_fa_kwargs_from_position_ids

from llava_ft.config import DataConfig, DataSource
from llava_ft.data.collate import TextCollator
from llava_ft.data.dataset import prepare_dataset
from llava_ft.data.mm_collate import MultimodalCollator
from llava_ft.model.llava import LlavaFtModel
from test_mm_packing import build, datasets_for, make_cfg, mixed_data  # noqa: F401  (fixture)


def varlen_cpu(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, **kwargs):
    """flash-attention's choice of kernel (transformers' `_flash_attention_forward`, no-mask branches), on the CPU.

    Varlen per `cu_seqlens` when `_is_packed_sequence` says the batch is packed, else causal over each row.
    Why by hand: flash-attn cannot be installed here; only the dispatch matters, the maths is sdpa's."""
    assert attention_mask is None  # packed batches carry no mask; flash_attention_mask gives None then
    batch, heads, length, dim = query.shape
    groups = heads // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    if not _is_packed_sequence(position_ids, batch):
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2), None
    (cu_seqlens, _), _ = prepare_fa_kwargs_from_position_ids(position_ids)
    q, k, v = (x.transpose(1, 2).reshape(-1, heads, dim).transpose(0, 1) for x in (query, key, value))
    bounds = cu_seqlens.tolist()
    outs = [torch.nn.functional.scaled_dot_product_attention(q[:, a:b], k[:, a:b], v[:, a:b], is_causal=True,
                                                             scale=scaling) for a, b in zip(bounds, bounds[1:])]
    return torch.cat(outs, dim=1).transpose(0, 1).reshape(batch, length, heads, dim), None


AttentionInterface.register("varlen_cpu", varlen_cpu)
AttentionMaskInterface.register("varlen_cpu", flash_attention_mask)


class Capture:
    """Forward pre-hook on the LLM's decoder: keeps the kwargs of its last call (what the attention layers
    see). The decoder, not the causal-LM wrapper: with labels LlavaFtModel runs the decoder itself and the
    head only where a label is (llava_ft.model.lm_loss)."""

    def __init__(self, llm):
        self.kwargs = None
        llm.get_decoder().register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.kwargs = dict(kwargs)

    @property
    def rows(self) -> int:
        x = self.kwargs.get("inputs_embeds")
        return (x if x is not None else self.kwargs["input_ids"]).shape[0]


def per_sample_logits(logits: torch.Tensor, position_ids: torch.Tensor) -> list:
    """Split a packed [1, T, V] output at every restart of position_ids (0), in order."""
    assert logits.shape[0] == position_ids.shape[0] == 1
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist() + [position_ids.shape[1]]
    return [logits[0, a:b] for a, b in zip(starts, starts[1:])]


def logits_of(model, batch: dict) -> torch.Tensor:
    """Logits of a collated batch: without labels, since a forward with labels computes the loss only where a
    label is and returns no logits (llava_ft.model.lm_loss)."""
    return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def check_flattened(model, collate, seen: Capture, blocks: list, samples: list, lengths: list) -> None:
    """The batch of `blocks` reaches the LLM as one packed row of the samples' `lengths` (no padding), and each
    sample's logits there equal its logits run alone."""
    with torch.no_grad():
        logits = logits_of(model, collate(blocks))
    pos = seen.kwargs["position_ids"]
    assert seen.kwargs.get("attention_mask") is None and seen.rows == 1
    assert _is_packed_sequence(pos, seen.rows)  # what flash-attention's varlen dispatch asks
    assert pos.shape[1] == sum(lengths)  # no padding between the blocks
    pieces = per_sample_logits(logits, pos)
    assert [p.shape[0] for p in pieces] == lengths
    for sample, piece in zip(samples, pieces):
        with torch.no_grad():
            alone = logits_of(model, collate([sample]))[0]
        torch.testing.assert_close(piece, alone, atol=1e-5, rtol=1e-5)


# ---- text ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_data(tmp_path_factory, tiny_tokenizer):
    rng = random.Random(0)
    words = "the cat sat on a mat red blue green square circle answer question".split()
    rows = [{"instruction": " ".join(rng.choices(words, k=rng.randint(2, 20))), "input": "",
             "output": " ".join(rng.choices(words, k=rng.randint(1, 30)))} for _ in range(40)]
    out = tmp_path_factory.mktemp("flat")
    (out / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    cfg = DataConfig(sources=[DataSource(path=str(out / "d.jsonl"))], template="qwen_chat", max_length=160,
                     cache_dir=str(out / "cache"))
    plain = prepare_dataset(cfg, tok).dataset
    cfg.pack_to_max_length = True
    packed = prepare_dataset(cfg, tok).dataset
    return tok, packed, {r["id"]: r for r in plain}


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen_cpu"])
def test_text_packed_batch_is_one_flattened_row(text_data, tiny_llama, attn, batch_size):
    tok, packed, by_id = text_data
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation=attn, dtype=torch.float32)
    model = LlavaFtModel(llm).eval()
    seen = Capture(model.llm)
    blocks = [packed[i] for i in range(batch_size)]
    assert all(len(b["id"].split(",")) > 1 for b in blocks)  # several samples a block
    samples = [by_id[s] for b in blocks for s in b["id"].split(",")]
    check_flattened(model, TextCollator(tok), seen, blocks, samples, [len(s["input_ids"]) for s in samples])


def test_model_flattens_a_multi_row_packed_batch(text_data, tiny_llama):
    """A caller that stacks padded packed rows itself (not our collator) still gets one row at the LLM."""
    tok, packed, by_id = text_data
    model = LlavaFtModel(AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="varlen_cpu",
                                                              dtype=torch.float32)).eval()
    seen = Capture(model.llm)
    blocks = [packed[i] for i in range(3)]
    longest = max(len(b["input_ids"]) for b in blocks)
    ids = torch.full((3, longest), tok.pad_token_id)
    labels = torch.full((3, longest), -100)
    pos = torch.arange(longest).repeat(3, 1)  # right padding restarts at 0: a segment of its own
    for r, b in enumerate(blocks):
        n = len(b["input_ids"])
        ids[r, :n], labels[r, :n], pos[r, :n] = (torch.tensor(b[k]) for k in ("input_ids", "labels", "position_ids"))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels, position_ids=pos).loss
        flat = model(**TextCollator(tok)(blocks)).loss
    assert seen.rows == 1 and _is_packed_sequence(seen.kwargs["position_ids"], 1)
    torch.testing.assert_close(loss, flat, atol=1e-5, rtol=1e-5)
    # The defect this prevents: the same rows given to the LLM as they are attend across samples.
    with torch.no_grad():
        leaky = model.llm(input_ids=ids, labels=labels, position_ids=pos, use_cache=False).loss
    assert not _is_packed_sequence(pos, 3)
    assert not torch.allclose(leaky, flat, atol=1e-3)


def test_packed_loss_is_the_unpacked_per_token_mean(text_data, tiny_llama):
    tok, packed, by_id = text_data
    model = LlavaFtModel(AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa",
                                                              dtype=torch.float32)).eval()
    blocks = [packed[i] for i in range(4)]
    collate = TextCollator(tok)
    with torch.no_grad():
        loss = model(**collate(blocks)).loss
        ref = model(**collate([by_id[s] for b in blocks for s in b["id"].split(",")])).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)


# ---- LLaVA -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen_cpu"])
def test_llava_packed_batch_is_one_flattened_row(tiny_llama, tiny_clip, mixed_data, attn, batch_size):  # noqa: F811
    cfg = make_cfg(tiny_llama, tiny_clip, mixed_data, "pretrain")
    model, tok = build(cfg)
    model.llm.config._attn_implementation = attn
    seen = Capture(model.llm)
    packed, by_id, _ = datasets_for(cfg, model, tok)
    collate = MultimodalCollator(tok, image_shape=model.visual_encoder.image_shape)
    blocks = [packed[i] for i in range(batch_size)]
    samples = [by_id[s] for b in blocks for s in b["id"].split(",")]
    assert any(s["pixel_values"] is not None for s in samples)
    check_flattened(model, collate, seen, blocks, samples, [s["length"] for s in samples])


@pytest.mark.gpu
@pytest.mark.parametrize("batch_size", [1, 4])
def test_flash_attention_2_packed_logits_equal_unpacked(text_data, tiny_llama, batch_size):
    pytest.importorskip("flash_attn")
    tok, packed, by_id = text_data
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="flash_attention_2",
                                               dtype=torch.bfloat16).cuda()
    model = LlavaFtModel(llm).eval()
    blocks = [packed[i] for i in range(batch_size)]
    collate = TextCollator(tok)
    batch = {k: v.cuda() for k, v in collate(blocks).items()}
    with torch.no_grad():
        pieces = per_sample_logits(logits_of(model, batch).float(), batch["position_ids"])
        samples = [by_id[s] for b in blocks for s in b["id"].split(",")]
        for sample, piece in zip(samples, pieces):
            alone = logits_of(model, {k: v.cuda() for k, v in collate([sample]).items()})[0].float()
            torch.testing.assert_close(piece, alone, atol=2e-2, rtol=2e-2)  # bf16
