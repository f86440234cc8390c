"""PreferenceCollator: lays out each preference pair ONCE as [prompt][chosen][rejected].

    collate = PreferenceCollator(pad_token_id=tok.pad_token_id, image_shape=ve.image_shape, pack_length=None)
    batch = collate([pair, ...])   # pairs as data.preference.encode_pair returns them (+ pixel_values)

TRL, LLaMA-Factory and XTuner run every pair as two sequences, prompt + chosen and prompt + rejected, so
the prompt and its images (most of a LLaVA pair's positions) go through the vision tower and the LLM
twice. Here the prompt appears once; the engine (llava_ft.engine.preference.sequence_logps) gives the two
answers the positions they would have had in their own sequence (both continue from len(prompt)) and an
attention mask in which each answer sees the prompt and itself, never the other answer. The loss and its
gradients equal the duplicated computation (tests/test_preference.py).

Batch keys (tensors, rows right-padded):
- `input_ids` [rows, L]: the pairs' tokens, one IMAGE_TOKEN_INDEX per image (the splice expands them);
- `attention_mask` [rows, L]: 1 on real tokens (for the splice; the LLM gets the 4D block mask);
- `pair_index` [rows, L]: the pair (0..pairs-1 over the batch) each token belongs to, -1 on padding;
- `segment` [rows, L]: 0 prompt, 1 chosen, 2 rejected, -1 padding;
- `targets` [rows, L]: the answer's label at this token (its id where supervised), -100 elsewhere;
- `pixel_values` [images, 3, H, W] in placeholder order (each pair's images once), a dummy image when a
  LLaVA batch has none (every rank runs the vision path), `image_sizes` with AnyRes;
- `ref_chosen_logps` / `ref_rejected_logps` [pairs] when the pairs carry precomputed reference log-probs.
`pack_length` (data.pack_to_max_length: data.max_length): the batch's pairs share rows (in order, while a row's
positions -- image features counted, from `modality_length` or `num_image_tokens` -- stay within it), so
short pairs leave no padding; attention never crosses pairs, and the batch still holds the same pairs.
"""
from __future__ import annotations

from typing import Optional

import torch

from llava_ft import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data.llava_dataset import LlavaDataset

PROMPT, CHOSEN, REJECTED = 0, 1, 2


def pair_positions(pair: dict, num_image_tokens: int = 0) -> int:
    """Positions a pair takes in the shared layout: prompt (images expanded) + chosen + rejected."""
    n_images = sum(1 for t in pair["prompt_ids"] if t == IMAGE_TOKEN_INDEX)
    return (len(pair["prompt_ids"]) + n_images * max(num_image_tokens - 1, 0)
            + len(pair["chosen_ids"]) + len(pair["rejected_ids"]))


class PreferenceCollator:
    def __init__(self, pad_token_id: Optional[int] = 0, image_shape=None, pack_length: Optional[int] = None,
                 num_image_tokens: int = 0):
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
        self.image_shape = tuple(image_shape) if image_shape else None  # LLaVA run: always some image
        self.pack_length = pack_length
        self.num_image_tokens = num_image_tokens

    def _rows(self, pairs: list) -> list:
        if not self.pack_length:
            return [[p] for p in pairs]
        rows, used = [], 0
        for p in pairs:
            # a prepared pair knows its positions (AnyRes images vary); a bare encoded one is counted here
            size = abs(p["modality_length"]) if "modality_length" in p else pair_positions(p, self.num_image_tokens)
            if rows and used + size <= self.pack_length:
                rows[-1].append(p)
                used += size
            else:
                rows.append([p])
                used = size
        return rows

    def __call__(self, pairs: list) -> dict:
        rows = self._rows(pairs)
        ids_rows, pair_rows, seg_rows, tgt_rows = [], [], [], []
        pixel_values, image_sizes = [], []
        index = 0
        for row in rows:
            ids, pair_idx, seg, tgt = [], [], [], []
            for p in row:
                prompt = list(p["prompt_ids"])
                parts = ((PROMPT, prompt, [IGNORE_INDEX] * len(prompt)),
                         (CHOSEN, list(p["chosen_ids"]), list(p["chosen_labels"])),
                         (REJECTED, list(p["rejected_ids"]), list(p["rejected_labels"])))
                for kind, part_ids, labels in parts:
                    if len(labels) != len(part_ids):
                        raise ValueError(f"pair {p.get('id', index)}: labels and ids differ in length")
                    ids += part_ids
                    pair_idx += [index] * len(part_ids)
                    seg += [kind] * len(part_ids)
                    tgt += labels
                pv = p.get("pixel_values")
                if pv is not None and len(pv):
                    pixel_values.append(pv)
                    if p.get("image_sizes") is not None:
                        image_sizes.append(torch.as_tensor(p["image_sizes"]))
                index += 1
            ids_rows.append(ids)
            pair_rows.append(pair_idx)
            seg_rows.append(seg)
            tgt_rows.append(tgt)
        width = max(len(r) for r in ids_rows)

        def pad(rows_, value):
            return torch.tensor([r + [value] * (width - len(r)) for r in rows_], dtype=torch.long)

        batch = {
            "input_ids": pad(ids_rows, self.pad_token_id),
            "attention_mask": pad([[1] * len(r) for r in ids_rows], 0),
            "pair_index": pad(pair_rows, -1),
            "segment": pad(seg_rows, -1),
            "targets": pad(tgt_rows, IGNORE_INDEX),
        }
        if pixel_values:
            batch["pixel_values"] = torch.cat([torch.as_tensor(pv) for pv in pixel_values])
            if image_sizes:
                batch["image_sizes"] = torch.cat([s.reshape(-1, 2) for s in image_sizes])
        elif self.image_shape:
            batch["pixel_values"] = torch.zeros((1, *self.image_shape))
        if all("ref_chosen_logps" in p for p in pairs):
            batch["ref_chosen_logps"] = torch.tensor([float(p["ref_chosen_logps"]) for p in pairs])
            batch["ref_rejected_logps"] = torch.tensor([float(p["ref_rejected_logps"]) for p in pairs])
        return batch


PAIR_KEYS = ("id", "prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels",
             "modality_length", "ref_chosen_logps", "ref_rejected_logps")


class PreferenceLlavaDataset(LlavaDataset):
    """LlavaDataset over a prepared preference dataset (data.preference_dataset): an item is the pair's
    token columns plus `pixel_values` of its prompt's images (once per pair), decoded lazily as in SFT."""

    def _item(self, index: int) -> dict:
        row = self.data[index]
        item = {k: row[k] for k in PAIR_KEYS if k in row}
        pixels = self.load_pixels({**row, "input_ids": row["prompt_ids"]})
        if isinstance(pixels, tuple):
            pixels, item["image_sizes"] = pixels
        item["pixel_values"] = pixels
        return item
