"""Stop words in streamed text: where an answer ends, and how much of its tail may not be shown yet.

Used by ChatModel (one answer) and batch_stream.RowStreamer (many answers in one generate call):

    text, found = cut_at_stop("red<|im_end|>x", ["<|im_end|>"])     # ("red", True)
    safe = len(text) - holdback("red<|im", ["<|im_end|>"])           # 3: "<|im" may start a stop word
"""
from __future__ import annotations

from typing import Sequence


def holdback(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters of `text` could be the start of a stop word (not yet safe to show)."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                best = max(best, k)
                break
    return best


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the earliest stop word, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)
