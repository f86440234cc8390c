"""Tell InternLM2 checkpoints and adapters apart, by their files (never by a folder's name).

    if is_internlm2(folder): ...            # config.json model_type internlm2 / architectures InternLM2ForCausalLM
    adapter_layout(adapter_dir)             # 'llama' | 'internlm2' | None: which layout a PEFT adapter targets
    check_adapter_layout(adapter_dir, base) # UserError for an adapter on InternLM2's own wqkv/w1/... names

Used by `model.llm` (load InternLM2 as Llama), `convert` (merge and export layouts) and `inference.loader`;
the conversion itself is `internlm2_convert`, the InternLM2-layout export `internlm2_export`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from llava_ft.errors import UserError

LAYOUTS = ("llama", "internlm2")
ARCHITECTURE = "InternLM2ForCausalLM"
# Module names LoRA adapters use in each layout (to tell which layout an adapter targets).
INTERNLM2_MODULES = {"wqkv", "wo", "w1", "w2", "w3", "output"}
LLAMA_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"}


def read_config(folder) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None


def is_internlm2_config(cfg: dict) -> bool:
    return cfg.get("model_type") == "internlm2" or ARCHITECTURE in (cfg.get("architectures") or [])


def is_internlm2(folder) -> bool:
    """True when `folder` holds an InternLM2 checkpoint (by its config.json, never by its name)."""
    return os.path.isdir(str(folder)) and is_internlm2_config(read_config(folder))


def adapter_layout(adapter_dir) -> Optional[str]:
    """'llama' | 'internlm2' for a PEFT adapter folder: what llava_ft recorded, else read from the
    adapter's target module names; None when neither tells."""
    adapter_dir = Path(adapter_dir)
    meta = adapter_dir / "llava_ft.json"
    if meta.is_file():
        try:
            recorded = json.loads(meta.read_text(encoding="utf-8")).get("llm_layout")
        except ValueError:
            recorded = None
        if recorded in LAYOUTS:
            return recorded
    try:
        targets = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8")).get("target_modules")
    except (OSError, ValueError):
        return None
    if isinstance(targets, str):
        targets = [targets]
    names = {str(t).rsplit(".", 1)[-1] for t in targets or []}
    if names & INTERNLM2_MODULES and not names & LLAMA_MODULES:
        return "internlm2"
    if names & LLAMA_MODULES:
        return "llama"
    return None


def check_adapter_layout(adapter_dir, base: str) -> None:
    """UserError when a PEFT adapter targets InternLM2's own layout: llava_ft runs every base as Llama."""
    if adapter_layout(adapter_dir) == "internlm2":
        raise UserError(f"adapter {adapter_dir} targets InternLM2's own layout (wqkv/wo/w1/w2/w3), but llava_ft "
                        f"runs {base} in the Llama layout (q/k/v_proj, o_proj, gate/up/down_proj). Merge it with "
                        "InternLM's or XTuner's tools, or train the adapter with llava_ft")
