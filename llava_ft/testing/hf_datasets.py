"""Tiny `datasets` copies of LLaVA json data, with the images stored inside (for tests of llava_ft.data.hub).

    ds = llava_json_as_dataset("finetune.json", "images/", style="llava")   # id, conversations, image (Image)
    ds = llava_json_as_dataset(..., style="llava_list")                      # ... images (list of Image)
    ds = llava_json_as_dataset(..., style="trl")        # TRL vision format: messages (content parts) + images
    ds.save_to_disk(folder)   or   ds.to_parquet(folder / "train-00000.parquet")

The images are the PNG files' own bytes, so decoding them gives exactly the pixels the json + image_folder
source gives.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def _trl_messages(conversations: list) -> list:
    out = []
    for turn in conversations:
        text = turn["value"]
        parts = []
        if "<image>" in text:
            parts.append({"type": "image", "text": None})
            text = text.replace("<image>", "").strip()
        parts.append({"type": "text", "text": text})
        out.append({"role": _ROLES[turn["from"]], "content": parts})
    return out


def llava_json_as_dataset(json_path, image_folder, style: str = "llava"):
    """A datasets.Dataset holding the records of a LLaVA json file with their images as datasets.Image."""
    import datasets

    records = json.loads(Path(json_path).read_text())
    rows = []
    for rec in records:
        names = rec.get("image") or []
        names = names if isinstance(names, list) else [names]
        images = [{"bytes": (Path(image_folder) / n).read_bytes(), "path": os.path.basename(n)} for n in names]
        if style == "llava":
            rows.append({"id": rec["id"], "conversations": rec["conversations"], "image": images[0] if images else None})
        elif style == "llava_list":
            rows.append({"id": rec["id"], "conversations": rec["conversations"], "images": images})
        elif style == "trl":
            rows.append({"id": rec["id"], "messages": _trl_messages(rec["conversations"]), "images": images})
        else:
            raise ValueError(f"unknown style {style!r}")
    ds = datasets.Dataset.from_list(rows)
    column = "image" if style == "llava" else "images"
    feature = datasets.Image() if style == "llava" else datasets.List(datasets.Image())
    return ds.cast_column(column, feature)
