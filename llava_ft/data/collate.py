"""Text collator: pads encoded samples, or flattens packed blocks, into a batch for `LlavaFtModel.forward`.

Unpacked rows -> {"input_ids", "attention_mask", "labels"} (right padding; labels -100 on padding).
Packed rows (they carry `position_ids`) -> {"input_ids", "labels", "position_ids"} of shape [1, total]:
every block of the batch concatenated into ONE row, no padding between them, no attention_mask, as
transformers' DataCollatorWithFlattening does. transformers 5 then treats each run of increasing
position_ids as its own sequence: block-diagonal causal mask for sdpa/eager, varlen kernels for
flash-attention -- and the flash path does so only for a batch of one row (`_is_packed_sequence` is False
for batch_size != 1), so several padded rows would attend across samples there. The label of every
position where a sample starts (position 0) is -100: it is never a target unpacked, and flattened it
would be the target of the previous block's last token. `pad_to_multiple_of` pads the row's end with
positions 0..k-1 (a segment of its own that no real token sees). Call the model with `use_cache=False`
when training on packed batches (a KV cache switches the packed detection off).

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

    def _round_up(self, n: int) -> int:
        m = self.pad_to_multiple_of
        return (n + m - 1) // m * m if m else n

    def __call__(self, features: list) -> dict:
        if "position_ids" in features[0]:
            return self._flatten(features)
        longest = self._round_up(max(len(f["input_ids"]) for f in features))
        input_ids = torch.full((len(features), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(features), longest), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            input_ids[row, :n] = torch.as_tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(f["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}

    def _flatten(self, features: list) -> dict:
        """Packed blocks -> one row (see the module docstring)."""
        def cat(key):
            return torch.cat([torch.as_tensor(f[key], dtype=torch.long).flatten() for f in features])

        input_ids, labels, position_ids = cat("input_ids"), cat("labels"), cat("position_ids")
        labels = labels.masked_fill(position_ids == 0, IGNORE_INDEX)
        extra = self._round_up(input_ids.shape[0]) - input_ids.shape[0]
        if extra:
            input_ids = torch.cat([input_ids, input_ids.new_full((extra,), self.pad_token_id)])
            labels = torch.cat([labels, labels.new_full((extra,), IGNORE_INDEX)])
            position_ids = torch.cat([position_ids, torch.arange(extra)])
        return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None]}
