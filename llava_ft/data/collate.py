"""Text collator: pads encoded (or packed) samples into a batch for `LlavaFtModel.forward`.

Unpacked rows -> {"input_ids", "attention_mask", "labels"} (right padding; labels -100 on padding).
Packed rows (they carry `position_ids`) -> {"input_ids", "labels", "position_ids"} and NO attention_mask:
transformers 5 then treats each run of increasing position_ids as its own sequence (block-diagonal causal
mask for sdpa/eager, varlen flash-attention), so attention never crosses samples. Row padding gets
position_ids 0..k-1, i.e. it forms its own segment that no real token can see. Call the model with
`use_cache=False` when training on packed batches (a KV cache switches the packed detection off).

    collator = TextCollator(tokenizer)
    batch = collator([dataset[0], dataset[1]])
"""
from __future__ import annotations

from typing import Optional

import torch

from llava_ft import IGNORE_INDEX


def pad_token_id_of(tokenizer) -> int:
    """The id used for padding: pad, else EOS, else 0 (labels are -100 there, so the choice is harmless)."""
    if tokenizer is None:
        return 0
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


class TextCollator:
    """Callable collator for text runs; `pad_to_multiple_of` rounds the batch length up (tensor cores)."""

    def __init__(self, tokenizer=None, pad_token_id: Optional[int] = None, pad_to_multiple_of: Optional[int] = None):
        self.pad_token_id = pad_token_id if pad_token_id is not None else pad_token_id_of(tokenizer)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list) -> dict:
        longest = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            longest = (longest + m - 1) // m * m
        packed = "position_ids" in features[0]
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        extra = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            if packed:
                extra[row, :n] = torch.as_tensor(f["position_ids"], dtype=torch.long)
                extra[row, n:] = torch.arange(longest - n)
            else:
                extra[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels}
        batch["position_ids" if packed else "attention_mask"] = extra
        return batch
