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

import bisect
import random
from typing import Optional

import datasets

from llava_ft.errors import UserError


def plan_bins(lengths: list[int], max_length: int, seed: Optional[int] = 0) -> list[list[int]]:
    """Group sample indices into bins whose lengths sum to <= max_length (best-fit decreasing).

    Bins are kept in buckets by remaining capacity; a sorted list of the (at most max_length+1) distinct
    capacities finds the tightest bin that fits by bisection, so 100k+ samples pack in well under a second. `seed` shuffles the bin order
    (None keeps it).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    by_room: dict[int, list[int]] = {}  # room -> ids of bins with exactly that much room left
    rooms_sorted: list[int] = []  # distinct rooms that have at least one bin (<= max_length+1 values)
    bins: list[list[int]] = []
    rooms: list[int] = []
    for idx in order:
        need = lengths[idx]
        if need > max_length:
            raise UserError(f"sample of length {need} is longer than data.max_length={max_length}; "
                            "it should have been truncated or dropped before packing")
        k = bisect.bisect_left(rooms_sorted, need)  # tightest room that still fits
        if k < len(rooms_sorted):
            room = rooms_sorted[k]
            chosen = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms_sorted.pop(k)
        else:
            chosen = len(bins)
            bins.append([])
            rooms.append(max_length)
        bins[chosen].append(idx)
        rooms[chosen] -= need
        left = rooms[chosen]
        if left not in by_room:
            by_room[left] = []
            bisect.insort(rooms_sorted, left)
        by_room[left].append(chosen)
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
