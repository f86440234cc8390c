"""AnyRes as a released LLaVA-NeXT / LLaVA-OneVision checkpoint does it (its own image processor and rules).

    spec = ReleasedAnyResSpec(image_processor, pinpoints, base_tokens, newline_after_single=True,
                              max_tiles_before_shrink=9, single_view_for_multi_image=True)   # OneVision
    views, sizes = spec.sample_views([img1, img2])       # what the checkpoint's processor makes of a sample
    spec.count_sample([path1, path2])                    # feature vectors, from the image headers only
    feats = spec.pack(projected_views, sizes, newline)   # list of [tokens_i, D], as transformers packs them

`llava_hf_import` attaches one to the tower (`ve.anyres`) when `model.llava` is a LlavaNext / LlavaOnevision
checkpoint. It extends llava_ft's own AnyResSpec (llava_ft.model.anyres) with what differs in OneVision,
read from transformers' LlavaOnevisionModel / LlavaOnevisionProcessor (5.x):
  * `vision_aspect_ratio: anyres_max_N`: when the unpadded tile grid holds more than N tiles' worth of
    patches (ratio > 1.1), it is shrunk by bilinear interpolation before the newlines are added;
  * several images in one sample: each is padded to square and seen as one view (no tiles), and gets
    base + one newline; the image size is then recorded as (0, 0) so the model packs it that way;
  * the checkpoint's own image processor makes the views (OneVision squashes to a square, LLaVA-NeXT
    resizes the short side and centre-crops) rather than one rebuilt from the tower's settings.
Counts are computed with the same transformers functions on shape-only tensors, so data preparation
(length grouping, packing, truncation) knows each sample's length before any image is decoded.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from llava_ft.data.image_tokens import ImageTokenCount
from llava_ft.model.anyres import AnyResSpec, grid_shape, image_hw

SINGLE_VIEW = (0, 0)  # image size recorded for an image seen as one view (OneVision's multi-image rule)
# A video clip (OneVision) is recorded with size (-frames, -1): its frames are its views, pooled 2x2.


def _video_frames_of(hw) -> int:
    """Frames of a clip recorded as (-frames, -1); 0 for an image."""
    return -int(hw[0]) if int(hw[0]) < 0 else 0


def _is_clip(item) -> bool:
    """A decoded video clip (uint8 frames [F, H, W, 3]) rather than a PIL image."""
    return getattr(item, "ndim", 0) == 4


class ReleasedAnyResSpec(AnyResSpec, ImageTokenCount):
    """AnyRes settings of a released LlavaNext / LlavaOnevision checkpoint (see module docstring)."""

    def __init__(self, image_processor, pinpoints, base_tokens: int, max_tiles_before_shrink: Optional[int] = None,
                 single_view_for_multi_image: bool = False, video_processor=None, video_frames: int = 8):
        self._set_geometry(image_processor, pinpoints, base_tokens)
        self.processor = image_processor  # the checkpoint's own, not one rebuilt from the tower's settings
        self.max_tiles = max_tiles_before_shrink
        self.single_view_for_multi_image = bool(single_view_for_multi_image)
        self.video_processor = video_processor  # OneVision: clips become frames pooled 2x2 + one newline
        self.takes_video = video_processor is not None
        self.video_frames = int(video_frames)

    # ---- views ------------------------------------------------------------------------------------
    def sample_views(self, images: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """PIL images (and, for OneVision, clips as uint8 frame arrays [F, H, W, 3]) of one sample ->
        ([all views, 3, S, S], sizes [n, 2]) as the checkpoint's processors make them (one call with the
        sample's images, so its multi-image rule applies)."""
        pictures = [im for im in images if not _is_clip(im)]
        single = self.single_view_for_multi_image and len(pictures) > 1
        pixel_values = None
        if pictures:
            batch = [pictures] if single else pictures
            pixel_values = self.processor(images=batch, return_tensors="pt")["pixel_values"]
        views, sizes, k = [], [], 0
        for item in images:
            if _is_clip(item):
                if self.video_processor is None:
                    raise ValueError("this checkpoint has no video processor: only LLaVA-OneVision takes videos")
                frames = self.video_processor(videos=[item], return_tensors="pt")["pixel_values_videos"][0]
                views.append(frames)
                sizes.append((-frames.shape[0], -1))
                continue
            hw = SINGLE_VIEW if single else (item.height, item.width)
            views.append(pixel_values[k][:self.num_views(hw)])  # the processor pads images to the most views
            sizes.append(hw)
            k += 1
        return torch.cat(views), torch.tensor(sizes, dtype=torch.long)

    def views(self, image) -> torch.Tensor:
        return self.sample_views([image])[0]

    def overview(self, image) -> torch.Tensor:
        """[3, S, S]: the whole image as one tower-sized view (the tower's plain preprocessing)."""
        return self.views(image)[0]

    def num_views(self, image_hw_: Sequence[int]) -> int:
        if tuple(image_hw_) == SINGLE_VIEW:
            return 1
        if _video_frames_of(image_hw_):
            return _video_frames_of(image_hw_)
        return super().num_views(image_hw_)

    # ---- counts -----------------------------------------------------------------------------------
    def _grid_after_shrink(self, height: int, width: int) -> tuple[int, int]:
        """OneVision's anyres_max_N: the unpadded grid shrunk when it exceeds N tiles' patches."""
        if self.max_tiles is None:
            return height, width
        ratio = math.sqrt(height * width / (self.max_tiles * self.patches_per_side ** 2))
        if ratio > 1.1:
            return int(height // ratio), int(width // ratio)
        return height, width

    def num_tokens(self, image_hw_: Sequence[int]) -> int:
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        if tuple(image_hw_) == SINGLE_VIEW:
            return self.base_tokens + 1
        if _video_frames_of(image_hw_):  # frames pooled 2x2 (ceil), one newline after the clip
            return _video_frames_of(image_hw_) * math.ceil(self.patches_per_side / 2) ** 2 + 1
        rows, cols = grid_shape(image_hw_, self.pinpoints, self.tile_size)
        side = self.patches_per_side
        grid = torch.empty(1, rows * side, cols * side, device="meta")
        height, width = unpad_image(grid, list(map(int, image_hw_))).shape[1:]
        height, width = self._grid_after_shrink(height, width)
        return self.base_tokens + height * (width + 1)

    def count_sample(self, images: Sequence) -> int:
        """Feature vectors of one sample's images (paths, PIL images or {"bytes", "path"}), headers only."""
        from llava_ft.data.videos import is_video

        clips = [im for im in images if is_video(im)]
        images = [im for im in images if not is_video(im)]
        total = len(clips) * self.num_tokens((-self.video_frames, -1))
        if self.single_view_for_multi_image and len(images) > 1:
            return total + len(images) * (self.base_tokens + 1)
        for image in images:
            size = image_hw(image)
            # Unreadable: image verification reports it (or skips the sample); count the overview only.
            total += self.base_tokens if size is None else self.num_tokens(size)
        return total

    def token_counter(self) -> "ReleasedAnyResSpec":
        """A copy without the processors: counting needs only the numbers, and datasets.map pickles and
        fingerprints the counter it is given."""
        import copy

        lite = copy.copy(self)
        lite.processor = lite.video_processor = None
        return lite

    def __call__(self, image) -> int:
        return self.count_sample([image])

    # ImageTokenCount: data preparation asks per sample (OneVision's multi-image rule depends on the count
    # of images), the trainer's tokens_per_s per recorded size (single views are recorded as (0, 0)).
    def total(self, images: Sequence) -> int:
        return self.count_sample(images)

    def for_size(self, image_hw_: Optional[Sequence[int]]) -> int:
        return self.base_tokens if image_hw_ is None else self.num_tokens(image_hw_)

    def describe(self) -> str:
        return "released LLaVA-NeXT/OneVision: tokens per sample from its images' sizes"

    @property
    def cache_key(self) -> str:
        return (f"released-anyres:{self.pinpoints}:{self.tile_size}:{self.base_tokens}:{self.max_tiles}:"
                f"{self.single_view_for_multi_image}:{self.video_frames if self.takes_video else 0}")

    # ---- packing ----------------------------------------------------------------------------------
    def pack(self, features: torch.Tensor, image_sizes, newline: torch.Tensor) -> list[torch.Tensor]:
        """[V, N, D] projected views of a batch -> one [tokens_i, D] tensor per image, as transformers'
        LlavaNext / LlavaOnevision `pack_image_features` lays them out."""
        from transformers.models.llava_next.modeling_llava_next import unpad_image

        out, start = [], 0
        side = self.patches_per_side
        for hw in image_sizes:
            hw = [int(v) for v in hw]
            n = self.num_views(hw)
            views = features[start:start + n]
            start += n
            if tuple(hw) == SINGLE_VIEW:
                out.append(torch.cat([views[0], newline[None].to(views)], dim=0))
                continue
            if _video_frames_of(hw):  # LlavaOnevision's apply_pooling: bilinear to ceil(side/2), then a newline
                grid = views.reshape(n, side, side, -1).permute(0, 3, 1, 2)
                pooled = torch.nn.functional.interpolate(grid, size=[math.ceil(side / 2)] * 2, mode="bilinear")
                pooled = pooled.permute(0, 2, 3, 1).reshape(-1, views.shape[-1])
                out.append(torch.cat([pooled, newline[None].to(pooled)], dim=0))
                continue
            rows, cols = grid_shape(hw, self.pinpoints, self.tile_size)
            dim = views.shape[-1]
            grid = views[1:].reshape(rows, cols, side, side, dim).permute(4, 0, 2, 1, 3).reshape(
                dim, rows * side, cols * side)
            grid = unpad_image(grid, hw)
            height, width = grid.shape[1:]
            shrunk = self._grid_after_shrink(height, width)
            if shrunk != (height, width):
                grid = torch.nn.functional.interpolate(grid[None], list(shrunk), mode="bilinear")[0]
            grid = torch.cat([grid, newline.to(grid)[:, None, None].expand(dim, grid.shape[1], 1)], dim=-1)
            out.append(torch.cat([views[0], grid.flatten(1, 2).transpose(0, 1)], dim=0))
        if start != features.shape[0]:
            raise ValueError(f"{features.shape[0]} image views given but the image sizes account for {start}")
        return out
