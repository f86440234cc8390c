"""Multimodal collator: pads token columns (like TextCollator) and stacks every image of the batch.

    collator = MultimodalCollator(tokenizer, image_shape=ve.image_shape)   # (3, H, W) of the tower
    batch = collator([ds[0], ds[1]])
    # {"input_ids", "attention_mask", "labels": [B, T], "pixel_values": [n_images, 3, H, W]}
    # packed blocks (rows with position_ids): ONE flattened row [1, total], "position_ids" instead of
    # "attention_mask" (TextCollator's flattening)

`pixel_values` holds the images in the order their IMAGE_TOKEN_INDEX placeholders appear, row by row,
which is the order `LlavaFtModel` splices them in. A batch without any image gets ONE dummy (zero)
image: the model adds its features x 0, so the vision tower and projector run on every rank and ZeRO-3
cannot hang waiting for a rank that skipped them (DeepSpeed #7170) -- packed blocks without an image
included. Padding is on the right. Packed blocks (`data.pack_to_max_length`) are concatenated into one
row, as in `TextCollator`: `position_ids` (one per input id, restarting at each sample), no padding, no
attention_mask. The images stay in placeholder order, so the splice still gives each sample its own
images; the model expands the positions with the image features.
"""
from __future__ import annotations

from typing import Optional

import torch

from llava_ft import IMAGE_TOKEN_INDEX
from llava_ft.data.collate import TextCollator
from llava_ft.errors import UserError


class MultimodalCollator:
    def __init__(self, tokenizer=None, image_shape=None, pad_token_id: Optional[int] = None,
                 pad_to_multiple_of: Optional[int] = None):
        self.text = TextCollator(tokenizer, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)
        # Without image_shape the dummy is 3x336x336; LlavaFtModel swaps a wrongly sized dummy for one
        # of its tower's size, so this only costs a little memory -- pass `ve.image_shape` anyway.
        self.image_shape = tuple(int(v) for v in (image_shape or (3, 336, 336)))

    def __call__(self, features: list) -> dict:
        packed = ["position_ids" in f for f in features]
        if any(packed) and not all(packed):
            raise UserError("a batch mixes packed blocks and unpacked samples; prepare the data once with "
                            "data.pack_to_max_length set either way")
        keys = ("input_ids", "labels", "position_ids") if all(packed) else ("input_ids", "labels")
        batch = self.text([{k: f[k] for k in keys} for f in features])
        images, sizes = [], []
        for f in features:
            pixels = f.get("pixel_values")
            n_placeholders = sum(1 for t in f["input_ids"] if t == IMAGE_TOKEN_INDEX)
            # AnyRes samples carry several views per image and one (height, width) per image.
            image_sizes = f.get("image_sizes")
            if image_sizes is not None:
                n_images = int(image_sizes.shape[0])
                sizes.append(image_sizes)
            else:
                n_images = 0 if pixels is None else int(pixels.shape[0])
            if n_images != n_placeholders:
                raise UserError(f"sample {f.get('id', '?')}: {n_placeholders} <image> placeholders but "
                                f"{n_images} images")
            if n_images:
                images.append(pixels)
        if images:
            batch["pixel_values"] = torch.cat(images).float()
            if sizes:
                batch["image_sizes"] = torch.cat(sizes)
        else:
            batch["pixel_values"] = torch.zeros((1, *self.image_shape), dtype=torch.float32)
        return batch
