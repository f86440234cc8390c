"""Torch Dataset over a prepared LLaVA dataset: token columns from Arrow, images decoded lazily.

    ds = LlavaDataset(prepared.dataset, ve, cfg.data)   # ve: VisualEncoder (preprocess, image_mean)
    item = ds[i]   # {"id", "input_ids", "labels", "length", "modality_length",
                   #  "pixel_values": float tensor [n_images, 3, H, W] or None when the sample has no image;
                   #  AnyRes: "pixel_values" [all views, 3, S, S] + "image_sizes" [n_images, 2]}
                   # (+ "position_ids" for packed blocks: a row is then a whole block of samples)
    ds.num_bad_images  # images found unreadable during training (summed over DataLoader workers)
    ds["modality_length"], ds.column_names   # columns of the prepared dataset (for the sampler)

Images are opened in `__getitem__`, i.e. inside DataLoader worker processes, never all up front: files by
path, or (images stored inside a `datasets` source) the row's `image_bytes`, decoded by the same function. Each
sample must have exactly one image per IMAGE_TOKEN_INDEX in its input_ids (else UserError naming the
sample id). A truncated or corrupt image met during training:
  * skip_bad_samples=true: logged with sample id, path and reason (not the error's advice to set the
    flag), counted (the engine's end-of-run summary includes `num_bad_images`), and the sample replaced by
    the next sample (in index order) whose images all load -- the run goes on (a packed row is one
    block of samples: the whole block is replaced);
  * skip_bad_samples=false: BadImageError naming sample id and path. `images.verify_images` (which
    llava_ft.data.read runs before the model loads in that mode) normally finds such files first.
"""
from __future__ import annotations

import logging
import multiprocessing
from typing import Callable, Optional

import torch
from torch.utils.data import Dataset

from llava_ft import IMAGE_TOKEN_INDEX
from llava_ft.data.images import BadImageError, expand2square, load_image, load_image_bytes
from llava_ft.errors import UserError

log = logging.getLogger(__name__)

# Give up replacing after this many bad samples in a row (the data set is then mostly broken).
MAX_REPLACEMENTS = 50


class LlavaDataset(Dataset):
    """`LlavaDataset(hf_dataset, visual_encoder, data_cfg)` (what the engine calls), or with explicit
    keywords `preprocess=`, `image_mean=`, `pad_to_square=`, `skip_bad_samples=` (they win over the
    visual encoder / data config values)."""

    def __init__(self, hf_dataset, visual_encoder=None, data_cfg=None, *, preprocess: Optional[Callable] = None,
                 image_mean=None, pad_to_square: Optional[bool] = None, skip_bad_samples: Optional[bool] = None):
        self.data = hf_dataset
        self.preprocess = preprocess or getattr(visual_encoder, "preprocess", None)
        if self.preprocess is None:
            raise ValueError("LlavaDataset needs a visual_encoder or a preprocess function")
        if image_mean is None:
            image_mean = getattr(visual_encoder, "image_mean", (0, 0, 0))
        self.image_mean = tuple(int(c) for c in image_mean)
        self.pad_to_square = bool(pad_to_square if pad_to_square is not None
                                  else getattr(data_cfg, "pad_image_to_square", False))
        self.skip_bad_samples = bool(skip_bad_samples if skip_bad_samples is not None
                                     else getattr(data_cfg, "skip_bad_samples", False))
        # AnyRes settings of the tower (model.image_aspect=anyres), else None.
        self.anyres = getattr(visual_encoder, "anyres", None)
        # Shared with forked DataLoader workers, so the main process sees their count.
        self._bad = multiprocessing.Value("i", 0)
        self._known_bad: set = set()  # per process; avoids re-reading a file known to be broken

    @property
    def column_names(self) -> list:
        """The prepared dataset's columns (lets samplers look for `modality_length` as on a HF dataset)."""
        return list(self.data.column_names)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def num_bad_images(self) -> int:
        return int(self._bad.value)

    @property
    def modality_lengths(self) -> list:
        return list(self.data["modality_length"])

    def load_pixels(self, row: dict):
        """[n_images, 3, H, W] for the row's images (in placeholder order), or None without images.

        AnyRes: ([views of all images, 3, S, S], image_sizes [n_images, 2] as (height, width))."""
        paths = list(row.get("images") or [])
        n_placeholders = sum(1 for t in row["input_ids"] if t == IMAGE_TOKEN_INDEX)
        if n_placeholders != len(paths):
            raise UserError(f"sample {row.get('id')}: {n_placeholders} <image> placeholders in the text but "
                            f"{len(paths)} images; give one image per <image>")
        if not paths:
            return None
        tensors, sizes = [], []
        # Images stored inside a `datasets` source arrive as encoded bytes (llava_ft.data.hub); b"" = a path.
        data = list(row.get("image_bytes") or [b""] * len(paths))
        if hasattr(self.anyres, "sample_views"):  # a released LlavaNext/OneVision: its processor sees the sample
            from llava_ft.data.videos import is_video

            sid = row.get("id", "?")
            return self.anyres.sample_views([
                load_image_bytes(blob, path, sid) if blob else
                self._clip(path, sid) if is_video(path) else load_image(path, sid)
                for path, blob in zip(paths, data)])
        for path, blob in zip(paths, data):
            img = load_image_bytes(blob, path, row.get("id", "?")) if blob else load_image(path, row.get("id", "?"))
            if self.anyres is not None:
                # AnyRes: the overview + tiles of each image; its size tells the model how to lay them out.
                sizes.append((img.height, img.width))
                tensors.append(self.anyres.views(img))
                continue
            if self.pad_to_square:
                img = expand2square(img, self.image_mean)
            tensors.append(self.preprocess(img))
        if self.anyres is not None:
            return torch.cat(tensors), torch.tensor(sizes, dtype=torch.long)
        return torch.stack(tensors)

    def _clip(self, path: str, sample_id):
        """A `"video"` entry's sampled frames; a bad clip is a bad sample like a bad image."""
        from llava_ft.data.videos import BadVideoError, load_video_frames

        try:
            return load_video_frames(path, self.anyres.video_frames)
        except BadVideoError as err:
            raise BadImageError(sample_id, path, err.reason) from None

    def _item(self, index: int) -> dict:
        row = self.data[index]
        keys = ("id", "input_ids", "labels", "length", "modality_length", "position_ids")  # + packed blocks
        item = {k: row[k] for k in keys if k in row}
        pixels = self.load_pixels(row)
        if isinstance(pixels, tuple):
            pixels, item["image_sizes"] = pixels
        item["pixel_values"] = pixels
        return item

    def __getitem__(self, index):
        if isinstance(index, str):
            return self.data[index]  # a whole column, as `datasets.Dataset["modality_length"]`
        if not self.skip_bad_samples:
            return self._item(index)
        n = len(self.data)
        for attempt in range(min(MAX_REPLACEMENTS, n)):
            candidate = (index + attempt) % n
            if candidate in self._known_bad:
                continue
            try:
                return self._item(candidate)
            except BadImageError as err:
                self._known_bad.add(candidate)
                with self._bad.get_lock():
                    self._bad.value += 1
                # The reason only: the error's own advice (set skip_bad_samples) is what the user already did.
                log.warning("skipping bad image (%d so far): sample %s: image %s: %s; using sample %d instead of %d",
                            self._bad.value, err.sample_id, err.path, err.reason, (candidate + 1) % n, index)
        raise UserError(f"{MAX_REPLACEMENTS} consecutive samples from index {index} have unreadable images; "
                        "check data.sources.*.image_folder and run `llava_ft data check`")
