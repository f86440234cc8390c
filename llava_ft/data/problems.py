"""Per-record data problems found in one data pass: counted by reason, listed up to a cap, then raised or skipped.

    problems = DataProblems(skip=cfg.data.skip_bad_samples)
    for rec in iter_records(src, on_problem=problems.add): ...
    problems.finish()     # skip=False and any problem: one UserError listing the first 20 ("... and N more")
    problems.counts       # Counter {reason: n}, e.g. {"invalid_json": 1, "bad_role": 2}
    format_listing(["sample 1: ...", ...], header="6 unreadable image(s)")   # the same capped listing

A user fixing a 600k-record file should see every problem of the pass at once, not one per rerun; with
`data.skip_bad_samples: true` the same problems are skipped and only counted (the first few are logged,
without telling the user to set the flag they already set).
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Optional, Sequence

from llava_ft.errors import UserError

log = logging.getLogger(__name__)

LIST_CAP = 20  # problems listed by name; the rest are counted ("... and N more")
SKIP_HINT = "or set data.skip_bad_samples=true to skip (and count) such records"


def format_listing(items: Sequence[str], header: str, total: Optional[int] = None, cap: int = LIST_CAP) -> str:
    """`header:` then one indented line per item, at most `cap` of them, then '... and N more'."""
    total = len(items) if total is None else total
    lines = [f"{header}:"] + [f"  {item}" for item in items[:cap]]
    if total > min(cap, len(items)):
        lines.append(f"  ... and {total - min(cap, len(items))} more")
    return "\n".join(lines)


def format_counts(counts: dict) -> str:
    """'bad_role: 2, invalid_json: 1' (sorted by reason)."""
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.items()))


class DataProblems:
    """Collects (reason, message) pairs; see the module docstring."""

    def __init__(self, skip: bool, cap: int = LIST_CAP, fatal_reasons: frozenset = frozenset()):
        self.skip = skip
        self.cap = cap
        self.fatal_reasons = fatal_reasons  # reported even when skipping (e.g. a JSON list cut short)
        self.counts: Counter = Counter()
        self.messages: list[str] = []

    def add(self, reason: str, message: str) -> None:
        self.counts[reason] += 1
        if len(self.messages) < self.cap:
            self.messages.append(message)
            if self.skip:
                log.warning("skipping bad record (%s): %s", reason, message)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def finish(self, what: str = "bad record(s) in the training data") -> None:
        """Raise one UserError naming every problem (up to the cap) unless problems are being skipped
        (and none of them is of a fatal reason)."""
        fatal = any(reason in self.fatal_reasons for reason in self.counts)
        if not self.total or (self.skip and not fatal):
            return
        header = f"{self.total} {what} ({format_counts(self.counts)})"
        advice = (f"Fix or delete them, {SKIP_HINT}" if not self.skip else
                  "A JSON list cannot be read past a syntax error, so it cannot be skipped: fix that position")
        raise UserError(format_listing(self.messages, header, self.total, self.cap) + "\n" + advice)
