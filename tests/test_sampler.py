"""Tests for llava_ft.data.sampler: coverage, modality grouping, single modality, determinism, resume,
longest first, and the per-rank split accelerate makes of the index stream.

Run: python -m pytest tests/test_sampler.py -x -q
"""
from __future__ import annotations

import random

import pytest

from llava_ft.data.sampler import LengthGroupedSampler


def _lengths(n_img=300, n_txt=200, seed=0):
    rng = random.Random(seed)
    lengths = [rng.randint(600, 1400) for _ in range(n_img)] + [-rng.randint(20, 800) for _ in range(n_txt)]
    rng.shuffle(lengths)
    return lengths


def _batches(order, size):
    return [order[i:i + size] for i in range(0, len(order), size)]


def test_every_index_exactly_once_per_epoch():
    lengths = _lengths()
    s = LengthGroupedSampler(lengths, batch_size=4, world_size=2, grad_accum=2, seed=3)
    for epoch in range(3):
        s.set_epoch(epoch)
        assert sorted(s) == list(range(len(lengths)))
        assert len(s) == len(lengths)


def test_batches_do_not_mix_modalities_except_the_leftover():
    lengths = _lengths()
    bs, ws, ga = 4, 2, 2
    s = LengthGroupedSampler(lengths, batch_size=bs, world_size=ws, grad_accum=ga, seed=1)
    order = list(s)
    mega = bs * ws * ga
    n_full = sum(n // mega for n in (sum(v > 0 for v in lengths), sum(v < 0 for v in lengths)))
    full_part = order[: n_full * mega]
    for mb in _batches(full_part, mega):
        signs = {lengths[i] > 0 for i in mb}
        assert len(signs) == 1
        ab = [abs(lengths[i]) for i in mb]
        assert ab == sorted(ab, reverse=True)  # longest first inside a megabatch
    mixed = [b for b in _batches(order, bs) if len({lengths[i] > 0 for i in b}) > 1]
    assert len(mixed) <= 1  # only where the two leftovers meet


def test_longest_sample_is_in_the_first_batch():
    for seed in range(5):
        lengths = _lengths(seed=seed)
        s = LengthGroupedSampler(lengths, batch_size=4, world_size=2, grad_accum=1, seed=seed)
        longest = max(range(len(lengths)), key=lambda i: abs(lengths[i]))
        assert list(s)[0] == longest


@pytest.mark.parametrize("sign", [1, -1])
def test_single_modality_works(sign):
    lengths = [sign * (10 + i % 37) for i in range(103)]
    s = LengthGroupedSampler(lengths, batch_size=8, world_size=1, grad_accum=1, seed=0)
    order = list(s)
    assert sorted(order) == list(range(103))
    assert abs(lengths[order[0]]) == 46


def test_tiny_and_empty_datasets():
    assert list(LengthGroupedSampler([], batch_size=4)) == []
    assert sorted(LengthGroupedSampler([5, -3], batch_size=4, world_size=2)) == [0, 1]


def test_deterministic_per_epoch_and_different_across_epochs():
    lengths = _lengths()
    a = LengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=7)
    b = LengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=7)
    assert list(a) == list(b)
    a.set_epoch(1)
    b.set_epoch(1)
    assert list(a) == list(b)
    b.set_epoch(0)
    assert list(a) != list(b)
    assert list(LengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=8)) != list(b)


def test_resume_mid_epoch_continues_the_same_order():
    # Resume rebuilds the sampler and Trainer skips the batches already seen (skip_first_batches): that
    # continues the interrupted order only because the order depends on nothing but (seed, epoch).
    lengths = _lengths()
    s = LengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=5)
    s.set_epoch(2)
    full = list(s)
    resumed = LengthGroupedSampler(lengths, batch_size=4, world_size=2, seed=5)
    resumed.set_epoch(2)
    assert len(resumed) == len(lengths)
    assert list(resumed)[100:] == full[100:]
    assert list(resumed) == full


def test_grouping_cuts_padding_against_plain_shuffle():
    lengths = _lengths(n_img=600, n_txt=400)
    bs = 8

    def waste(order):
        pad = total = 0
        for b in _batches(order, bs):
            ab = [abs(lengths[i]) for i in b]
            pad += max(ab) * len(ab) - sum(ab)
            total += max(ab) * len(ab)
        return pad / total

    grouped = waste(list(LengthGroupedSampler(lengths, batch_size=bs, world_size=1, grad_accum=4, seed=0,
                                              mega_multiplier=4)))
    shuffled = waste(list(LengthGroupedSampler(lengths, batch_size=bs, grad_accum=4, seed=0, group_by_length=False)))
    assert grouped < 0.05 < 0.25 < shuffled


def test_ranks_get_similar_lengths_per_step():
    # accelerate gives batch j of the stream to rank j % world_size: one step's batches share a megabatch.
    lengths = _lengths(n_img=512, n_txt=0)
    bs, ws = 4, 4
    order = list(LengthGroupedSampler(lengths, batch_size=bs, world_size=ws, grad_accum=4, mega_multiplier=2, seed=0))
    for step in _batches(order, bs * ws)[:-1]:
        per_rank_max = [max(lengths[i] for i in step[r * bs:(r + 1) * bs]) for r in range(ws)]
        assert max(per_rank_max) - min(per_rank_max) <= 0.2 * max(per_rank_max)


def test_bad_arguments():
    with pytest.raises(ValueError):
        LengthGroupedSampler([1, 2], batch_size=0)
