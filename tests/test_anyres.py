"""AnyRes tiling, token counts and feature packing agree with transformers' LlavaNext for many image sizes."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaNextConfig
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

from llava_ft.errors import UserError
from llava_ft.model.anyres import (anyres_image_processor, anyres_num_tokens, default_grid_pinpoints,
                                   num_tiles, pack_anyres_features, resolve_grid_pinpoints)

TILE, PATCH = 32, 8
SIDE = TILE // PATCH
# (height, width): square, wide, tall, extreme ratios, smaller than a tile, odd sizes.
SIZES = [(32, 32), (48, 48), (30, 90), (90, 30), (64, 200), (200, 64), (17, 5), (5, 17), (100, 101),
         (333, 222), (222, 333), (96, 32), (31, 64), (1, 1), (640, 480), (480, 640)]


@pytest.fixture(scope="module")
def llava_next():
    """A tiny LlavaNextModel (random): the reference for packing and counting."""
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=TILE, patch_size=PATCH, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=64),
        image_grid_pinpoints=default_grid_pinpoints(TILE), vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaNextModel(cfg).eval()


def test_default_pinpoints_are_llava_next_ones_at_336():
    assert default_grid_pinpoints(336) == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.mark.parametrize("hw", SIZES)
def test_packing_and_count_equal_llava_next(llava_next, hw):
    pinpoints = llava_next.config.image_grid_pinpoints
    views = num_tiles(hw, pinpoints, TILE)
    assert views == image_size_to_num_patches(list(hw), pinpoints, TILE)
    torch.manual_seed(hash(hw) % 1000)
    feats = torch.randn(views, SIDE * SIDE, 24)
    expected, lens = llava_next.pack_image_features([feats], torch.tensor([hw]), "default",
                                                    image_newline=llava_next.image_newline)
    ours = pack_anyres_features(feats, hw, pinpoints, TILE, llava_next.image_newline)
    assert torch.equal(ours, expected[0])
    assert anyres_num_tokens(hw, pinpoints, TILE, SIDE, base_tokens=SIDE * SIDE) == int(lens[0]) == ours.shape[0]


@pytest.mark.parametrize("hw", [(30, 90), (90, 30), (48, 48), (17, 5)])
def test_processor_makes_one_overview_plus_the_grid(hw):
    tower = CLIPImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})
    pinpoints = default_grid_pinpoints(TILE)
    proc = anyres_image_processor(tower, pinpoints)
    image = Image.new("RGB", (hw[1], hw[0]), (200, 30, 30))
    out = proc(images=[image], return_tensors="pt")
    assert tuple(out["image_sizes"][0].tolist()) == hw
    assert out["pixel_values"].shape == (1, num_tiles(hw, pinpoints, TILE), 3, TILE, TILE)
    assert list(proc.image_mean) == list(tower.image_mean) and list(proc.image_std) == list(tower.image_std)


def test_pinpoints_are_checked_and_limited():
    assert resolve_grid_pinpoints(TILE, max_tiles=2) == [[32, 64], [64, 32]]
    assert len(resolve_grid_pinpoints(TILE)) == 5
    with pytest.raises(UserError, match="multiple of the vision tower's input size 32"):
        resolve_grid_pinpoints(TILE, [[32, 50]])
    with pytest.raises(UserError, match="max_image_tiles=0"):
        resolve_grid_pinpoints(TILE, max_tiles=0)
