"""Modality-aware length-grouped sampler (and its plain-shuffle twin) for transformers.Trainer.

    sampler = LengthGroupedSampler(dataset["modality_length"], batch_size=16, world_size=8, grad_accum=2,
                                   seed=42)
    sampler.set_epoch(epoch)       # Trainer/accelerate call this every epoch

Algorithm (LLaVA's `get_modality_length_grouped_indices`, made deterministic, resumable and safe when only
one modality is present -- LLaVA #715 crashed there):
  1. split indices by the sign of `modality_length` (> 0: has images, < 0: text only);
  2. permute each group with a generator seeded by seed + epoch;
  3. cut each group into megabatches of world_size x batch_size x grad_accum x mega_multiplier indices
     and sort each megabatch by |length|, longest first;
  4. shuffle the full megabatches; the two groups' leftovers form one final megabatch (kept last, so
     every full megabatch stays aligned to whole optimizer steps; inside it each modality stays a run);
  5. the megabatch holding the longest sample goes first, so an out-of-memory shows at step 1, not hours in.

Plugging into Trainer (the engine does this in `_get_train_sampler`): return this sampler; the
DataLoader batches its index stream by per-device batch size, and accelerate shards that stream in
order: batch j goes to rank j % world_size. So the world_size consecutive batches of one micro-step come
from the same sorted megabatch and have similar lengths on every rank. Each rank builds the same
sampler (same seed, same epoch), so no communication is needed. On resume, Trainer/accelerate skip the
first batches of the epoch themselves (`skip_first_batches`), which works because the order is a pure
function of (seed, epoch).

`group_by_length=False` gives a plain seeded shuffle with the same epoch behaviour.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


def _perm(n: int, gen: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=gen).tolist()


def length_grouped_indices(modality_lengths: Sequence[int], megabatch_size: int, seed: int) -> list[int]:
    """The index order for one epoch (see module docstring). Pure function of its arguments."""
    gen = torch.Generator().manual_seed(int(seed))
    lengths = [int(v) for v in modality_lengths]
    groups = [[i for i, v in enumerate(lengths) if v > 0], [i for i, v in enumerate(lengths) if v <= 0]]

    def by_length(mb):
        return sorted(mb, key=lambda i: abs(lengths[i]), reverse=True)

    full, leftovers = [], []
    for group in groups:
        if not group:
            continue  # one modality only: nothing to do for the other (LLaVA #715)
        order = [group[j] for j in _perm(len(group), gen)]
        cut = len(order) - len(order) % megabatch_size
        full += [by_length(order[s:s + megabatch_size]) for s in range(0, cut, megabatch_size)]
        if order[cut:]:
            leftovers.append(by_length(order[cut:]))
    full = [full[j] for j in _perm(len(full), gen)]
    if not lengths:
        return []
    longest = max(range(len(lengths)), key=lambda i: abs(lengths[i]))
    same_mod = [k for k, mb in enumerate(full) if (lengths[mb[0]] > 0) == (lengths[longest] > 0)]
    if same_mod:
        # First megabatch: the full one of the longest sample's modality with the largest maximum. If the
        # longest sample sits in a leftover, swap it with that megabatch's head (same modality).
        k = max(same_mod, key=lambda k: abs(lengths[full[k][0]]))
        full.insert(0, full.pop(k))
        for left in leftovers:
            if longest in left:
                left[left.index(longest)], full[0][0] = full[0][0], longest
                left.sort(key=lambda i: abs(lengths[i]), reverse=True)
    # The leftovers stay modality-sorted (image run, then text run) so at most one batch mixes them.
    leftovers.sort(key=lambda left: abs(lengths[left[0]]), reverse=True)
    leftover = [i for left in leftovers for i in left]
    if not same_mod and longest in leftover:
        # The longest sample's modality has no full megabatch: start with the leftover instead.
        return leftover + [i for mb in full for i in mb]
    return [i for mb in full for i in mb] + leftover


class LengthGroupedSampler(Sampler[int]):
    """Yields dataset indices; deterministic per (seed, epoch); see the module docstring."""

    def __init__(self, modality_lengths: Sequence[int], batch_size: int, world_size: int = 1, grad_accum: int = 1,
                 seed: int = 0, mega_multiplier: int = 1, group_by_length: bool = True):
        if batch_size < 1 or world_size < 1 or grad_accum < 1 or mega_multiplier < 1:
            raise ValueError("batch_size, world_size, grad_accum and mega_multiplier must be >= 1")
        self.modality_lengths = [int(v) for v in modality_lengths]
        self.megabatch_size = batch_size * world_size * grad_accum * mega_multiplier
        self.seed = int(seed)
        self.group_by_length = group_by_length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self, epoch: int | None = None) -> list[int]:
        """The full order of `epoch` (default: the current one)."""
        seed = self.seed + (self.epoch if epoch is None else int(epoch))
        if not self.group_by_length:
            return _perm(len(self.modality_lengths), torch.Generator().manual_seed(seed))
        return length_grouped_indices(self.modality_lengths, self.megabatch_size, seed)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.modality_lengths)
