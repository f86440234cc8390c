"""Pack whole encoded samples into `max_length` blocks (`data.pack_to_max_length: true`).

Unlike XTuner's Packer (which concatenates everything and cuts every max_length tokens, splitting
samples), a sample is never split: blocks are filled by best-fit-decreasing, which leaves well under 5 %
padding on alpaca-like length mixes. Each block carries `position_ids` that restart at 0 for every
sample; with no attention_mask, transformers 5 reads these as packed-sequence boundaries (block-diagonal
causal mask on sdpa/eager, varlen kernels on flash-attention), so attention never crosses samples.
The model must be called with `use_cache=False` during training (a cache disables that detection).

    packed, stats = pack_samples(dataset, max_length=2048, seed=42)
"""
from __future__ import annotations

import random
from typing import Optional

import datasets

from llava_ft.errors import UserError


def plan_bins(lengths: list[int], max_length: int, seed: Optional[int] = 0) -> list[list[int]]:
    """Group sample indices into bins whose lengths sum to <= max_length (best-fit decreasing).

    Bins are kept in buckets by remaining capacity, so finding the tightest bin that fits is a short
    upward scan instead of a sorted-list insert (fast for 100k+ samples). `seed` shuffles the bin order
    (None keeps it).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    by_room: list[list[int]] = [[] for _ in range(max_length + 1)]  # room -> bin ids with that room
    bins: list[list[int]] = []
    rooms: list[int] = []
    for idx in order:
        need = lengths[idx]
        if need > max_length:
            raise UserError(f"sample of length {need} is longer than data.max_length={max_length}; "
                            "it should have been truncated or dropped before packing")
        chosen = -1
        for room in range(need, max_length + 1):
            if by_room[room]:
                chosen = by_room[room].pop()
                break
        if chosen < 0:
            chosen = len(bins)
            bins.append([])
            rooms.append(max_length)
        bins[chosen].append(idx)
        rooms[chosen] -= need
        by_room[rooms[chosen]].append(chosen)
    if seed is not None:
        random.Random(seed).shuffle(bins)
    return bins


def _pack_rows(batch: dict, bins: list, lengths: list) -> dict:
    out = {"id": [], "input_ids": [], "labels": [], "position_ids": [], "length": [], "modality_length": [],
           "images": []}
    for members in bins:
        ids, labels, pos, images, names = [], [], [], [], []
        for i in members:
            ids += batch["input_ids"][i]
            labels += batch["labels"][i]
            pos += range(len(batch["input_ids"][i]))
            images += batch["images"][i]
            names.append(batch["id"][i])
        total = sum(lengths[i] for i in members)
        out["id"].append(",".join(names))
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["position_ids"].append(pos)
        out["length"].append(total)
        out["modality_length"].append(total if images else -total)
        out["images"].append(images)
    return out


def pack_samples(dataset: datasets.Dataset, max_length: int, seed: Optional[int] = 0) -> tuple:
    """Pack an encoded dataset; returns (packed dataset, {"blocks", "samples", "padding_ratio"})."""
    if "position_ids" in dataset.column_names:
        raise UserError("dataset is already packed")
    if any(len(x) for x in dataset["images"]):
        raise UserError("data.pack_to_max_length is supported for text-only runs (image features would break "
                        "per-sample positions); set data.pack_to_max_length=false for LLaVA data")
    lengths = dataset["length"]
    bins = plan_bins(lengths, max_length, seed)
    columns = dataset.select_columns(["id", "input_ids", "labels", "images"]).to_dict()
    packed = datasets.Dataset.from_dict(_pack_rows(columns, bins, lengths))
    used = sum(lengths)
    padding = 1.0 - used / (len(bins) * max_length) if bins else 0.0
    return packed, {"blocks": len(bins), "samples": len(lengths), "padding_ratio": round(padding, 5)}
