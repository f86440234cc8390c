"""How many feature vectors an image becomes: one type for a fixed count and for AnyRes' per-size count.

Data preparation (lengths, `max_length` truncation, packing), `data check`/`data stats` and the
trainer's `tokens_per_s` all need the number of positions an `<image>` placeholder expands to. For a
plain tower it is the same for every image (576 for CLIP-L/336); with AnyRes it depends on the image's
size (`llava_ft.model.anyres.AnyResTokenCounter`, a subclass). Code takes an `ImageTokenCount` and
asks it, instead of testing whether it was handed an int or a callable:

    count = FixedImageTokens(576)          # or image_token_counter(visual_encoder) (llava_ft.model.anyres)
    count(image)                           # one image: a path, a PIL image or a datasets Image value
    count.for_size((h, w))                 # one image of known size (the trainer has the batch's sizes)
    count.total(images)                    # every image of a sample
    as_image_token_count(576)              # an int (the plain form callers and `--num-image-tokens` give)

Instances are picklable (datasets.map may run them in worker processes); `cache_key` enters the
tokenized-data cache key, so a changed count re-tokenizes.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence, Union


class ImageTokenCount:
    """Feature vectors per image. Subclasses define `for_size`, `__call__`, `cache_key` and `describe`."""

    @property
    def cache_key(self) -> Union[int, str]:
        raise NotImplementedError

    def for_size(self, image_hw: Optional[Sequence[int]]) -> int:
        """Features of an image of (height, width) `image_hw` (None: size unknown)."""
        raise NotImplementedError

    def __call__(self, image) -> int:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def total(self, images: Sequence) -> int:
        return sum(int(self(image)) for image in images)

    def __bool__(self) -> bool:
        """False for a text-only run (no image features at all)."""
        return True


class FixedImageTokens(ImageTokenCount):
    """The same count for every image (a tower without AnyRes; 0 = text-only)."""

    def __init__(self, n: int):
        self.n = int(n or 0)

    @property
    def cache_key(self) -> int:
        return self.n  # an int, as the cache key held before this type existed: old caches stay valid

    def for_size(self, image_hw=None) -> int:
        return self.n

    def __call__(self, image=None) -> int:
        return self.n

    def total(self, images: Sequence) -> int:
        return self.n * len(images)  # no image is opened

    def describe(self) -> str:
        return f"{self.n} tokens each"

    def __bool__(self) -> bool:
        return self.n > 0

    def __eq__(self, other) -> bool:
        return isinstance(other, FixedImageTokens) and other.n == self.n

    def __hash__(self) -> int:
        return hash(self.n)

    def __repr__(self) -> str:
        return f"FixedImageTokens({self.n})"


def as_image_token_count(value: Union[int, None, ImageTokenCount]) -> ImageTokenCount:
    """An ImageTokenCount from what a caller gives: one already, or an int (None = 0, text-only)."""
    if isinstance(value, ImageTokenCount):
        return value
    if value is None or isinstance(value, numbers.Integral):
        return FixedImageTokens(value or 0)
    raise TypeError(f"num_image_tokens must be an int or an ImageTokenCount, not {type(value).__name__}")
