"""An `iter_N.pth` with random (non-zero) trained weights, without running a training loop.

    pth = write_random_checkpoint(tmp / "run", {"model": {...}, "data": {...}}, seed=0)

Builds the run's model with `build_model` exactly as training would, fills every trainable weight
(LoRA A and B, projector, ...) with small random values -- so LoRA changes the output, unlike the zero
init of a fresh adapter -- and saves it in the engine's checkpoint format with the config in `meta`.
Used by the inference/convert/chat/eval tests and the generation benchmark.
"""
from __future__ import annotations

import torch


def write_random_checkpoint(work_dir, raw_config: dict, seed: int = 0, step: int = 3, scale: float = 0.05):
    from llava_ft.config import config_from_dict, config_to_dict
    from llava_ft.checkpoint import save_iter_checkpoint
    from llava_ft.model.builder import build_model

    cfg = config_from_dict(raw_config)
    model, _ = build_model(cfg)
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen, dtype=torch.float32) * scale
             for k, v in model.trainable_state_dict().items()}
    meta = {"phase": cfg.resolved_phase, "config": config_to_dict(cfg)}
    return str(save_iter_checkpoint(work_dir, step, state, meta))
