"""Pack whole encoded samples into `max_length` blocks (`data.pack_to_max_length: true`), text or LLaVA.

Unlike XTuner's Packer (which concatenates everything and cuts every max_length tokens, splitting
samples), a sample is never split: blocks are filled by best-fit-decreasing on each sample's `length`,
which already counts its image features (encode.py), which leaves well under 1 % padding on LLaVA-mix-like
and alpaca-like length mixes. A block row holds its samples' `input_ids`/`labels` back to back (one
IMAGE_TOKEN_INDEX per image, as unpacked) and their `images` in the same order, so images stay in
placeholder order and each lands in its own sample. `position_ids` count one per input id and restart at
0 at every sample's first token; for LLaVA blocks `LlavaFtModel` expands them with the image features
(a placeholder becomes num_image_tokens positions, still restarting at each sample start).

Packed batches carry no attention_mask: transformers 5 reads a restart of `position_ids` as a
packed-sequence boundary (block-diagonal causal mask on sdpa/eager, varlen kernels on flash-attention),
so attention never crosses samples -- but only without a KV cache: training calls the model with
`use_cache=False`. The first label of every sample is set to -100: unpacked it is never a target (nothing
precedes it), packed it would be the target of the previous sample's last token.

    packed, stats = pack_samples(dataset, max_length=2048, seed=42)
"""
from __future__ import annotations

import bisect
import random
from typing import Optional

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llava_ft import IGNORE_INDEX
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


def arrow_column(dataset: datasets.Dataset, name: str) -> pa.ChunkedArray:
    """One column as Arrow (datasets 5 iterates a Column row by row through the formatter: ~50 us a row)."""
    return dataset.select_columns([name]).with_format("arrow")[:].column(name)


def _pack_table(dataset: datasets.Dataset, bins: list, lengths: list) -> datasets.Dataset:
    """Build the packed dataset with Arrow gathers (no per-token Python work: 100k samples in seconds).

    `lengths` (expanded, image features counted) only size the blocks; the token columns are laid out by
    the number of input ids, which differs from `length` for samples with images.
    """
    order = pa.array([i for members in bins for i in members], type=pa.int64())
    table = dataset.with_format("arrow")[:]  # pyarrow.Table over the (memory-mapped) rows
    bin_sizes = np.asarray([len(m) for m in bins], dtype=np.int64)
    bin_starts = np.concatenate([[0], np.cumsum(bin_sizes)[:-1]]).astype(np.int64)

    def per_bin(per_sample: np.ndarray) -> np.ndarray:  # sum of a per-sample count over each bin
        return np.add.reduceat(per_sample, bin_starts) if bins else per_sample

    def as_blocks(column: str) -> tuple:
        """(flat values of `column` in bin order, per-sample value counts in that order)."""
        lists = table.column(column).take(order).combine_chunks()
        return lists.flatten(), pc.list_value_length(lists).to_numpy(zero_copy_only=False).astype(np.int64)

    def offsets(counts: np.ndarray) -> pa.Array:
        return pa.array(np.concatenate([[0], np.cumsum(per_bin(counts))]).astype(np.int32))

    ids, n_ids = as_blocks("input_ids")
    labels, _ = as_blocks("labels")
    starts = np.cumsum(n_ids) - n_ids  # flat index of each sample's first token
    labels = labels.to_numpy(zero_copy_only=False).copy()
    labels[starts[n_ids > 0]] = IGNORE_INDEX
    token_offsets = offsets(n_ids)
    columns = {
        "input_ids": pa.ListArray.from_arrays(token_offsets, ids),
        "labels": pa.ListArray.from_arrays(token_offsets, pa.array(labels, type=pa.int32())),
    }
    positions = (np.arange(int(n_ids.sum()), dtype=np.int64) - np.repeat(starts, n_ids)).astype(np.int32)
    columns["position_ids"] = pa.ListArray.from_arrays(token_offsets, pa.array(positions))
    images, n_images = as_blocks("images")
    columns["images"] = pa.ListArray.from_arrays(offsets(n_images), images)
    ids_text = arrow_column(dataset, "id").to_pylist()
    columns["id"] = pa.array([",".join(ids_text[i] for i in members) for members in bins], type=pa.string())
    bin_tokens = per_bin(np.asarray([lengths[i] for members in bins for i in members], dtype=np.int64))
    columns["length"] = pa.array(bin_tokens.astype(np.int32))
    # modality_length keeps its meaning (+ with images, - text only); packed runs do not group by it.
    has_image = per_bin(n_images) > 0
    columns["modality_length"] = pa.array(np.where(has_image, bin_tokens, -bin_tokens).astype(np.int32))
    names = ["id", "input_ids", "labels", "position_ids", "length", "modality_length", "images"]
    return datasets.Dataset(pa.table({n: columns[n] for n in names}))


def pack_samples(dataset: datasets.Dataset, max_length: int, seed: Optional[int] = 0) -> tuple:
    """Pack an encoded dataset; returns (packed dataset, {"blocks", "samples", "padding_ratio"} + "image_blocks"
    when some block holds an image). Samples must already fit `max_length` (encode.py truncates or drops)."""
    if "position_ids" in dataset.column_names:
        raise UserError("dataset is already packed")
    lengths = arrow_column(dataset, "length").to_pylist()
    bins = plan_bins(lengths, max_length, seed)
    packed = _pack_table(dataset, bins, lengths)
    used = sum(lengths)
    padding = 1.0 - used / (len(bins) * max_length) if bins else 0.0
    stats = {"blocks": len(bins), "samples": len(lengths), "padding_ratio": round(padding, 5)}
    image_blocks = sum(1 for v in arrow_column(packed, "modality_length").to_pylist() if v > 0)
    if image_blocks:
        stats["image_blocks"] = image_blocks
    return packed, stats
