"""Projector: MLP mapping vision-tower features to the LLM's embedding width (LLaVA-1.5 `mlp2x_gelu`).

    proj = Projector(in_dim=1024, out_dim=4096, depth=2)   # Linear, GELU, Linear
    proj.save_pretrained("out/projector")                   # config.json + model.safetensors
    proj = Projector.from_pretrained("out/projector")

Layout: Linear(in->out), then (depth-1) x [GELU, Linear(out->out)], stored in `self.layers`
(an nn.Sequential), so weight names are `layers.0.weight`, `layers.2.weight`, ... -- the same names
XTuner's ProjectorModel uses (`model.0`, `model.2`) up to the prefix, which `convert` relies on.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from llava_ft import fileio
from llava_ft.errors import UserError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, image_newline: bool = False):
        super().__init__()
        if depth < 1:
            raise UserError(f"projector depth must be >= 1, got {depth} (model.projector_depth)")
        self.in_dim, self.out_dim, self.depth = int(in_dim), int(out_dim), int(depth)
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(out_dim, out_dim)]
        self.layers = nn.Sequential(*layers)
        # AnyRes: the vector that ends each row of a tiled image's feature map. It lives here so that it
        # trains with the projector in both phases and is saved with it (iter_N.pth, projector/ folder).
        # Initialised like transformers' LlavaNext (normal, std 1/sqrt(hidden)).
        self.image_newline = (nn.Parameter(torch.randn(out_dim) / float(out_dim) ** 0.5)
                              if image_newline else None)

    def forward(self, x: torch.Tensor, pack=None):
        """Project `x`; with `pack` (AnyRes: `pack(features, newline) -> per-image list`) the projected
        features are packed here, inside forward, because ZeRO-3 gathers a module's own parameters (the
        newline) only around its forward/backward: read elsewhere it would rely on DeepSpeed's
        fetch-on-access fallback."""
        out = self.layers(x)
        if pack is None:
            return out
        if self.image_newline is None:
            raise ValueError("AnyRes packing needs a projector built with image_newline=True")
        return pack(out, self.image_newline)

    def config_dict(self) -> dict:
        return {"model_type": "llava_ft_projector", "in_dim": self.in_dim, "out_dim": self.out_dim,
                "depth": self.depth, "hidden_act": "gelu", "image_newline": self.image_newline is not None}

    def save_pretrained(self, out_dir, state_dict: dict | None = None) -> None:
        """Write config.json + model.safetensors into `out_dir` (each atomically)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        sd = state_dict if state_dict is not None else self.state_dict()
        sd = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
        with fileio.atomic_path(out / WEIGHTS_NAME) as tmp:
            save_file(sd, str(tmp), metadata={"format": "pt"})
        fileio.write_json(out / CONFIG_NAME, self.config_dict())

    @classmethod
    def from_pretrained(cls, path, dtype: torch.dtype | None = None) -> "Projector":
        folder = Path(path)
        cfg_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
        if not cfg_file.is_file() or not weights.is_file():
            raise UserError(f"{folder}: not a projector folder (needs {CONFIG_NAME} and {WEIGHTS_NAME}, "
                            "as written by Projector.save_pretrained / `llava_ft convert pth_to_hf`)")
        try:
            cfg = json.loads(cfg_file.read_text())
            proj = cls(cfg["in_dim"], cfg["out_dim"], cfg.get("depth", 2), bool(cfg.get("image_newline", False)))
        except (KeyError, ValueError, TypeError) as err:
            raise UserError(f"{cfg_file}: bad projector config ({err}); expected keys in_dim, out_dim, depth") from None
        sd = load_file(str(weights))
        missing, unexpected = proj.load_state_dict(sd, strict=False)
        if missing or unexpected:
            raise UserError(f"{weights}: weights do not match {cfg_file} (missing {sorted(missing)}, "
                            f"unexpected {sorted(unexpected)})")
        return proj.to(dtype) if dtype is not None else proj
