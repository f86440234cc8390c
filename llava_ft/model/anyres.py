"""AnyRes (LLaVA-NeXT) high-resolution images: tiling, token counts and feature packing.

An image is resized (aspect kept) and padded into the best of `image_grid_pinpoints` (multiples of the
tower's input size), cut into tower-sized tiles, and a squashed whole-image overview is put first. Each
view goes through the tower and the projector; then the tile features are laid out as one feature map,
the padding is removed ("unpadding"), and a learned newline vector ends every row of it:

    proc = anyres_image_processor(tower_processor, pinpoints)      # PIL -> [1 + tiles, 3, S, S]
    n = anyres_num_tokens((h, w), pinpoints, tile_size=S, patches_per_side=S // patch, base_tokens=N)
    feats = pack_anyres_features(projected [1 + tiles, N, D], (h, w), pinpoints, S, newline)  # [n, D]

Everything is computed the way transformers' `LlavaNextImageProcessor` / `LlavaNextForConditionalGeneration`
do it (their processor makes the tiles; their `select_best_resolution`, `get_anyres_image_grid_shape` and
`unpad_image` are called here), so a run exported as a LlavaNext folder sees the same tokens. What is
ours is only the part transformers keeps inside its model class: the per-image packing over a list of
images whose tile counts differ, and the token count before any image is decoded (from the image size
alone), which length grouping, packing and `max_length` truncation need at data-preparation time.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from llava_ft.data.image_tokens import FixedImageTokens, ImageTokenCount

# LLaVA-NeXT's pinpoints for a 336 px tower are these multiples of the tile size:
# [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]].
_LLAVA_NEXT_MULTIPLES = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))


def default_grid_pinpoints(tile_size: int) -> list[list[int]]:
    """LLaVA-NeXT's default resolutions, scaled to a tower whose input is `tile_size` pixels."""
    return [[rows * tile_size, cols * tile_size] for rows, cols in _LLAVA_NEXT_MULTIPLES]


def resolve_grid_pinpoints(tile_size: int, pinpoints: Optional[Sequence[Sequence[int]]] = None,
                           max_tiles: Optional[int] = None) -> list[list[int]]:
    """The (height, width) resolutions an image may be tiled into, checked against the tower size.

    `max_tiles` drops resolutions that would need more tiles than that (the overview is not counted).
    """
    from llava_ft.errors import UserError

    chosen = [list(map(int, p)) for p in (pinpoints or default_grid_pinpoints(tile_size))]
    for height, width in chosen:
        if height % tile_size or width % tile_size:
            raise UserError(f"model.image_grid_pinpoints: {[height, width]} is not a multiple of the vision "
                            f"tower's input size {tile_size}; use multiples such as {[tile_size, 2 * tile_size]}")
    if max_tiles is not None:
        chosen = [p for p in chosen if (p[0] // tile_size) * (p[1] // tile_size) <= max_tiles]
        if not chosen:
            raise UserError(f"model.max_image_tiles={max_tiles} leaves none of model.image_grid_pinpoints; "
                            "raise it or add smaller resolutions")
    return chosen


def anyres_image_processor(tower_processor, pinpoints: Sequence[Sequence[int]]):
    """transformers' LlavaNext image processor with the tower's own resize/normalisation settings."""
    from transformers import LlavaNextImageProcessor

    tile = _tile_size_of(tower_processor)
    return LlavaNextImageProcessor(
        image_mean=list(tower_processor.image_mean), image_std=list(tower_processor.image_std),
        size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=[list(p) for p in pinpoints],
        resample=getattr(tower_processor, "resample", 3), do_center_crop=True, do_pad=True,
    )


def _tile_size_of(processor) -> int:
    crop = getattr(processor, "crop_size", None) or {}
    size = getattr(processor, "size", None) or {}
    get = (lambda d, k: d.get(k) if isinstance(d, dict) else getattr(d, k, None))
    return int(get(crop, "height") or get(size, "height") or get(size, "shortest_edge"))


def grid_shape(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int) -> tuple[int, int]:
    """(rows, cols) of tiles an image of (height, width) is cut into."""
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    return tuple(get_anyres_image_grid_shape(list(map(int, image_hw)), [list(p) for p in pinpoints], tile_size))


def num_tiles(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int) -> int:
    """Views the tower sees for one image: the overview plus rows x cols tiles."""
    rows, cols = grid_shape(image_hw, pinpoints, tile_size)
    return 1 + rows * cols


def anyres_num_tokens(image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]], tile_size: int,
                      patches_per_side: int, base_tokens: int) -> int:
    """Feature vectors one image becomes: overview + unpadded tile grid + one newline per grid row.

    Computed on a shape-only (meta) tensor through transformers' own `unpad_image`, so the count agrees
    with LlavaNext by construction, without decoding the image.
    """
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    rows, cols = grid_shape(image_hw, pinpoints, tile_size)
    grid = torch.empty(1, rows * patches_per_side, cols * patches_per_side, device="meta")
    unpadded = unpad_image(grid, list(map(int, image_hw)))
    height, width = unpadded.shape[1:]
    return base_tokens + height * (width + 1)


def pack_anyres_features(views: torch.Tensor, image_hw: Sequence[int], pinpoints: Sequence[Sequence[int]],
                         tile_size: int, newline: torch.Tensor) -> torch.Tensor:
    """[1 + tiles, N, D] projected features of one image -> [anyres_num_tokens, D].

    The tiles' patch grids are joined into one map in reading order, the padding the tiling added is cut
    away, a `newline` vector is appended to each row, and the overview's N vectors come first.
    """
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    base, tiles = views[0], views[1:]
    side = int(round(tiles.shape[1] ** 0.5))
    if side * side != tiles.shape[1]:
        raise ValueError(f"AnyRes needs square patch grids per tile; got {tiles.shape[1]} tokens per tile")
    rows, cols = grid_shape(image_hw, pinpoints, tile_size)
    if rows * cols != tiles.shape[0]:
        raise ValueError(f"image {tuple(image_hw)} needs {rows}x{cols} tiles but {tiles.shape[0]} were given")
    dim = tiles.shape[-1]
    # [rows, cols, side, side, D] -> [D, rows*side, cols*side]: tile (r, c) patch (y, x) lands at
    # (r*side + y, c*side + x) of the joined map.
    grid = tiles.view(rows, cols, side, side, dim).permute(4, 0, 2, 1, 3).reshape(dim, rows * side, cols * side)
    grid = unpad_image(grid, list(map(int, image_hw)))
    with_newline = torch.cat([grid, newline.to(grid)[:, None, None].expand(dim, grid.shape[1], 1)], dim=-1)
    return torch.cat([base, with_newline.flatten(1, 2).transpose(0, 1)], dim=0)


class AnyResTokenCounter(ImageTokenCount):
    """Picklable `image -> feature count` for data preparation (datasets.map may run it in workers).

    An image is given as a path, a PIL image, or a datasets Image value ({"bytes", "path"}); only its
    header is read. EXIF orientations that swap the sides are applied, as image loading does.
    `cache_key` enters the tokenized-data cache key, so changing pinpoints re-tokenizes.
    """

    def __init__(self, pinpoints, tile_size: int, patches_per_side: int, base_tokens: int):
        self.pinpoints = [list(map(int, p)) for p in pinpoints]
        self.tile_size, self.patches_per_side, self.base_tokens = int(tile_size), int(patches_per_side), int(base_tokens)

    @property
    def cache_key(self) -> str:
        return f"anyres:{self.pinpoints}:{self.tile_size}:{self.patches_per_side}:{self.base_tokens}"

    def for_size(self, image_hw_: Optional[Sequence[int]]) -> int:
        if image_hw_ is None:
            # Unreadable: image verification reports it (or skips the sample); count the overview only.
            return self.base_tokens
        return anyres_num_tokens([int(v) for v in image_hw_], self.pinpoints, self.tile_size,
                                 self.patches_per_side, self.base_tokens)

    def __call__(self, image) -> int:
        return self.for_size(image_hw(image))

    def describe(self) -> str:
        return "AnyRes: tokens per image from its size"


_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees


def image_hw(image) -> Optional[tuple[int, int]]:
    """(height, width) as the image will be seen after EXIF rotation, from its header; None if unreadable."""
    import io

    from PIL import Image

    try:
        if isinstance(image, Image.Image):
            img, close = image, False
        elif isinstance(image, dict):
            img = Image.open(io.BytesIO(image["bytes"])) if image.get("bytes") else Image.open(image["path"])
            close = True
        else:
            img, close = Image.open(image), True
        try:
            width, height = img.size
            if img.getexif().get(0x0112) in _SWAPPING_ORIENTATIONS:
                width, height = height, width
        finally:
            if close:
                img.close()
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return height, width


class AnyResSpec:
    """AnyRes settings of one vision tower: makes the views of an image and counts its tokens.

    `enable_anyres(ve, pinpoints, max_tiles)` attaches one to a VisualEncoder as `ve.anyres`.
    """

    def __init__(self, tower_processor, pinpoints, base_tokens: int):
        self._set_geometry(tower_processor, pinpoints, base_tokens)
        self.processor = anyres_image_processor(tower_processor, self.pinpoints)

    def _set_geometry(self, processor, pinpoints, base_tokens: int) -> None:
        """Tile size, base tokens, patches per side and pinpoints (shared with released_anyres' subclass)."""
        self.tile_size = _tile_size_of(processor)
        self.base_tokens = int(base_tokens)
        self.patches_per_side = int(round(self.base_tokens ** 0.5))
        if self.patches_per_side ** 2 != self.base_tokens:
            raise ValueError(f"AnyRes needs a square patch grid; the tower gives {self.base_tokens} tokens")
        self.pinpoints = [list(map(int, p)) for p in pinpoints]

    def views(self, image) -> torch.Tensor:
        """PIL RGB image -> [1 + tiles, 3, S, S]: the overview, then the tiles in reading order."""
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def token_counter(self) -> AnyResTokenCounter:
        return AnyResTokenCounter(self.pinpoints, self.tile_size, self.patches_per_side, self.base_tokens)

    def num_views(self, image_hw_: Sequence[int]) -> int:
        return num_tiles(image_hw_, self.pinpoints, self.tile_size)

    def num_tokens(self, image_hw_: Sequence[int]) -> int:
        return anyres_num_tokens(image_hw_, self.pinpoints, self.tile_size, self.patches_per_side, self.base_tokens)

    def pack(self, features: torch.Tensor, image_sizes, newline: torch.Tensor) -> list[torch.Tensor]:
        """Projected features of every view of a batch [V, N, D] -> one [tokens_i, D] tensor per image."""
        out, start = [], 0
        for hw in image_sizes:
            hw = [int(v) for v in hw]
            n = self.num_views(hw)
            out.append(pack_anyres_features(features[start:start + n], hw, self.pinpoints, self.tile_size, newline))
            start += n
        if start != features.shape[0]:
            raise ValueError(f"{features.shape[0]} image views given but the image sizes account for {start}")
        return out


def enable_anyres(visual_encoder, pinpoints=None, max_tiles: Optional[int] = None):
    """Switch a VisualEncoder to AnyRes (`model.image_aspect: anyres`); returns it."""
    from llava_ft.errors import UserError

    processor = getattr(visual_encoder, "processor", None)
    if visual_encoder.kind == "open_clip" or not hasattr(processor, "image_mean"):
        raise UserError("model.image_aspect=anyres needs a Hugging Face CLIP or SigLIP vision tower (its image "
                        f"processor settings drive the tiling); {visual_encoder.name!r} is {visual_encoder.kind}")
    tile = _tile_size_of(processor)
    visual_encoder.anyres = AnyResSpec(processor, resolve_grid_pinpoints(tile, pinpoints, max_tiles),
                                       visual_encoder.num_image_tokens)
    return visual_encoder


def image_token_counter(visual_encoder) -> ImageTokenCount:
    """Feature vectors per image of this tower: a fixed count, or AnyRes' count from each image's size."""
    if visual_encoder is None:
        return FixedImageTokens(0)
    spec = getattr(visual_encoder, "anyres", None)
    return spec.token_counter() if spec is not None else FixedImageTokens(visual_encoder.num_image_tokens)


def counter_from_model_config(model_cfg, base_tokens: int) -> AnyResTokenCounter:
    """The AnyRes counter of `model_cfg` (image_aspect anyres) without loading the tower's weights:
    only its image processor is read (data tools count tokens with it)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(model_cfg.visual_encoder)
    tile = _tile_size_of(processor)
    pinpoints = resolve_grid_pinpoints(tile, model_cfg.image_grid_pinpoints, model_cfg.max_image_tiles)
    return AnyResTokenCounter(pinpoints, tile, int(round(base_tokens ** 0.5)), base_tokens)
