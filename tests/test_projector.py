"""Tests for llava_ft.model.projector: layout, save/load round trip, clear errors.

Run: python -m pytest tests/test_projector.py -x -q
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from llava_ft.errors import UserError
from llava_ft.model.projector import Projector


def test_layout_depth_2_is_mlp2x_gelu():
    proj = Projector(16, 32, depth=2)
    kinds = [type(m) for m in proj.layers]
    assert kinds == [nn.Linear, nn.GELU, nn.Linear]
    assert proj(torch.randn(3, 5, 16)).shape == (3, 5, 32)
    assert sorted(proj.state_dict()) == ["layers.0.bias", "layers.0.weight", "layers.2.bias", "layers.2.weight"]
    assert [type(m) for m in Projector(16, 32, depth=1).layers] == [nn.Linear]
    assert len(Projector(16, 32, depth=3).layers) == 5


def test_save_load_roundtrip(tmp_path):
    proj = Projector(16, 32, depth=3)
    proj.save_pretrained(tmp_path / "p")
    assert json.loads((tmp_path / "p" / "config.json").read_text())["depth"] == 3
    back = Projector.from_pretrained(tmp_path / "p")
    x = torch.randn(2, 4, 16)
    assert torch.equal(proj(x), back(x))
    assert not list((tmp_path / "p").glob("*.tmp"))


def test_bad_folder_and_bad_depth(tmp_path):
    with pytest.raises(UserError, match="not a projector folder"):
        Projector.from_pretrained(tmp_path)
    with pytest.raises(UserError, match="projector_depth"):
        Projector(4, 4, depth=0)
    Projector(16, 32, depth=2).save_pretrained(tmp_path / "p")
    cfg = json.loads((tmp_path / "p" / "config.json").read_text())
    cfg["depth"] = 1
    (tmp_path / "p" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="do not match"):
        Projector.from_pretrained(tmp_path / "p")
