"""Token-length distribution and modality counts: `llava_ft data stats (CONFIG | --data F --tokenizer T ...)`.

Lengths are computed by llava_ft.data.encode (the same tokens training sees) with no truncation:
`text` = tokens without image features, `full` = after each image expands to `num_image_tokens`.
Writes a PNG histogram (matplotlib, Agg backend) with max_length marked. Preference pair files
(llava_ft.datatools.pairs) add prompt / chosen / rejected lengths; a pair's `full` length is its positions
(prompt with images expanded + chosen + rejected), what length-grouped sampling sorts on. Records the parser rejects are
counted as `skipped` (run `data check` to see why).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from llava_ft.datatools.sources import Plan, encode_lengths, iter_canonical, load_tokenizer
from llava_ft.errors import UserError
from llava_ft.fileio import atomic_path

PERCENTILES = (50, 90, 95, 99, 100)


@dataclass
class Stats:
    records: int = 0
    skipped: int = 0
    dropped: dict = field(default_factory=dict)  # encode drop reason -> count
    with_images: int = 0
    text_only: int = 0
    images: int = 0
    max_images_per_sample: int = 0
    turns: int = 0
    text_lengths: list = field(default_factory=list)
    full_lengths: list = field(default_factory=list)
    over_max_length: int = 0
    pairs: int = 0  # preference pairs among the records, and their lengths (prompt positions, answers' tokens)
    prompt_lengths: list = field(default_factory=list)
    chosen_lengths: list = field(default_factory=list)
    rejected_lengths: list = field(default_factory=list)

    def count_record(self, n_images: int) -> None:
        self.records += 1
        self.images += n_images
        self.max_images_per_sample = max(self.max_images_per_sample, n_images)
        if n_images:
            self.with_images += 1
        else:
            self.text_only += 1

    def percentiles(self, values: list) -> dict:
        import numpy as np

        if not values:
            return {}
        arr = np.asarray(values)
        out = {f"p{p}": int(np.percentile(arr, p, method="nearest")) for p in PERCENTILES}
        out["mean"] = round(float(arr.mean()), 1)
        return out

    def to_json(self) -> dict:
        return {"records": self.records, "skipped": self.skipped, "dropped": self.dropped,
                "with_images": self.with_images, "text_only": self.text_only, "images": self.images,
                "max_images_per_sample": self.max_images_per_sample, "turns": self.turns,
                "over_max_length": self.over_max_length,
                "text_length": self.percentiles(self.text_lengths),
                "full_length": self.percentiles(self.full_lengths),
                **({"pairs": self.pairs, "prompt_length": self.percentiles(self.prompt_lengths),
                    "chosen_length": self.percentiles(self.chosen_lengths),
                    "rejected_length": self.percentiles(self.rejected_lengths)} if self.pairs else {})}


def compute_stats(plan: Plan, batch: int = 512) -> Stats:
    if not plan.tokenizer:
        raise UserError("stats needs a tokenizer: give a CONFIG (uses model.tokenizer / model.llm) or --tokenizer DIR")
    tokenizer = load_tokenizer(plan.tokenizer)
    stats = Stats()

    def skip(problem) -> None:
        stats.skipped += 1

    def flush(records: list) -> None:
        for rec, res in zip(records, encode_lengths(records, tokenizer, plan)):
            if res.sample is None:
                stats.dropped[res.drop_reason] = stats.dropped.get(res.drop_reason, 0) + 1
                continue
            n_img = len(res.sample["images"])
            text_len = len(res.sample["input_ids"]) - n_img  # placeholders are not text
            full = res.sample["length"] if plan.num_image_tokens else text_len + n_img
            stats.text_lengths.append(text_len)
            stats.full_lengths.append(full)
            if plan.max_length and full > plan.max_length:
                stats.over_max_length += 1
        records.clear()

    from llava_ft.datatools.pairs import add_pair_stats, pair_format

    for src in plan.sources:
        fmt = pair_format(src)
        if fmt is not None:
            add_pair_stats(src, fmt, plan, tokenizer, stats)
            continue
        pending: list = []
        for item in iter_canonical(src.path, src.format, src.image_folder, skip, source=src):
            rec = item.record
            stats.count_record(len(rec.get("images") or []))
            stats.turns += sum(m["role"] == "assistant" for m in rec.get("messages", ()))
            pending.append(rec)
            if len(pending) >= batch:
                flush(pending)
        if pending:
            flush(pending)
    return stats


def _per_image(num_image_tokens) -> str:
    from llava_ft.data.image_tokens import as_image_token_count

    return as_image_token_count(num_image_tokens).describe()


def format_stats(stats: Stats, plan: Plan) -> str:
    lines = [f"records: {stats.records}  (with images: {stats.with_images}, text-only: {stats.text_only}, "
             f"skipped as malformed: {stats.skipped})",
             f"images: {stats.images}  (max per sample: {stats.max_images_per_sample}; "
             f"{_per_image(plan.num_image_tokens)})  assistant turns: {stats.turns}"]
    if stats.dropped:
        lines.append("dropped by the encoder: " + ", ".join(f"{k}={v}" for k, v in sorted(stats.dropped.items())))
    lines.append(f"  {'length':<22}" + "".join(f"{'p' + str(p) if p < 100 else 'max':>8}" for p in PERCENTILES)
                 + f"{'mean':>9}")
    rows = [("text (no image tokens)", stats.text_lengths), ("full (with images)", stats.full_lengths)]
    if stats.pairs:
        lines.insert(1, f"preference pairs: {stats.pairs}  (full = prompt with images + chosen + rejected)")
        rows += [("pair prompt", stats.prompt_lengths), ("pair chosen", stats.chosen_lengths),
                 ("pair rejected", stats.rejected_lengths)]
    for name, values in rows:
        pct = stats.percentiles(values)
        if pct:
            lines.append(f"  {name:<22}" + "".join(f"{pct[f'p{p}']:>8}" for p in PERCENTILES) + f"{pct['mean']:>9}")
    if plan.max_length:
        lines.append(f"over max_length {plan.max_length}: {stats.over_max_length}")
    return "\n".join(lines)


def plot_histogram(stats: Stats, path: str, max_length: Optional[int] = None) -> str:
    """Histogram of full and text lengths as a PNG (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    bins = 50
    if stats.full_lengths:
        ax.hist(stats.full_lengths, bins=bins, alpha=0.6, label="with image tokens")
        ax.hist(stats.text_lengths, bins=bins, alpha=0.6, label="text only")
    if max_length:
        ax.axvline(max_length, color="red", linestyle="--", label=f"max_length {max_length}")
    ax.set_xlabel("tokens per sample")
    ax.set_ylabel("samples")
    ax.set_title(f"token lengths ({stats.records} records)")
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path, suffix=".partial.png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path
