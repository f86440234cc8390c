"""Validation loss: held-out data, Trainer's eval loop settings, the final evaluation, `train.keep_best`.

    train_hf, eval_hf, info = eval_split(cfg, tokenizer, num_image_tokens, prepared.dataset)
    args = TrainingArguments(**base, **eval_training_kwargs(cfg))   # eval every evaluation.every_n_steps
    callbacks.append(FinalEvalCallback())                            # ... and once more at the last step
    keeper = BestKeeper(work_dir)   # LlavaFtTrainer calls keeper.after_eval / keeper.after_save

Where the held-out samples come from:
  * `data.val_sources` (same schema as data.sources): encoded and cached like the training data;
  * `data.val_split: 0.02`: that share of the encoded training SAMPLES, picked by a permutation seeded
    with `train.seed` (so every rank and every rerun holds out the same samples), removed from training.
    With `data.pack_to_max_length` the data is encoded unpacked (`encoding_config`), the samples are held
    out, and only then are both parts packed (`eval_split`): a held-out sample never shares a block with
    a training one, and "N samples" counts samples, not blocks.
The loop is transformers.Trainer's own (`prediction_loss_only`, the training collator, a sequential
sampler; sharded across ranks when distributed), but `eval_loss` is the token-weighted mean over the
whole validation set: sum of the token losses / number of supervised tokens, whatever the batch size or
packing (Trainer averages per-batch means, which moves with both). `LlavaFtTrainer.prediction_step` adds
each batch's (mean x supervised tokens, supervised tokens) to `EvalTokenTotals`, `evaluation_loop` sums
them over ranks. Distributed, the eval set is padded with rows that have no supervised token
(`EvenShards`) so that accelerate never repeats real samples to even out the ranks' batches.

`train.keep_best: eval_loss`: whenever the eval loss improves, the weights of that step become
`best_iter.pth` (same layout as iter_N.pth) and `best_checkpoint.json` records {step, eval_loss}. When iter_<step>.pth is saved at the same step it is hard-linked (copied where links
are not supported), otherwise the trainable weights are written directly. Rotation only touches
iter_<step>.pth names, so the best file outlives it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from llava_ft.errors import UserError

BEST_NAME = "best_iter.pth"
BEST_RECORD = "best_checkpoint.json"
METRIC = "eval_loss"


def has_validation(cfg) -> bool:
    return bool(cfg.data.val_sources or cfg.data.val_split)


def eval_training_kwargs(cfg) -> dict:
    """TrainingArguments fields that switch on Trainer's eval loop (empty without validation data)."""
    if not has_validation(cfg):
        return {}
    return {"eval_strategy": "steps", "eval_steps": cfg.evaluation.every_n_steps,
            "per_device_eval_batch_size": cfg.train.per_device_batch_size,
            "prediction_loss_only": True, "label_names": ["labels"]}


def encoding_config(cfg):
    """The data settings to encode with: unpacked when data.val_split must pick samples before packing."""
    if cfg.data.val_split and cfg.data.pack_to_max_length:
        return dataclasses.replace(cfg.data, pack_to_max_length=False)
    return cfg.data


def hold_out(dataset, fraction: float, seed: int):
    """(train, held_out) datasets: `fraction` of the rows, chosen by a permutation seeded with `seed`."""
    import numpy as np

    n = len(dataset)
    k = max(1, int(round(n * fraction)))
    if k >= n:
        raise UserError(f"data.val_split={fraction} would hold out all {n} sample(s); lower it or use "
                        "data.val_sources")
    order = np.random.default_rng(seed).permutation(n)
    held, kept = sorted(order[:k].tolist()), sorted(order[k:].tolist())
    # keep_in_memory: only the index mapping is built (the rows stay memory-mapped in the cache)
    return dataset.select(kept, keep_in_memory=True), dataset.select(held, keep_in_memory=True)


def eval_split(cfg, tokenizer, num_image_tokens, train_dataset, cache_path=None):
    """-> (train dataset, eval dataset or None, info dict or None) from data.val_sources / data.val_split.
    `num_image_tokens`: an ImageTokenCount (llava_ft.data.image_tokens) or an int, as prepare_dataset takes.

    `cache_path`: the cache folder of `train_dataset` (prepare_dataset's stats["cache_path"]); with packing
    after data.val_split the packed parts are cached beside it."""
    if cfg.data.val_sources:
        from llava_ft.data.dataset import prepare_dataset

        val_cfg = dataclasses.replace(cfg.data, sources=list(cfg.data.val_sources), val_sources=[], val_split=0.0)
        prepared = prepare_dataset(val_cfg, tokenizer, num_image_tokens=num_image_tokens, seed=cfg.train.seed)
        # stats["samples"]: samples, also when the validation data is packed into blocks
        return train_dataset, prepared.dataset, {"samples": prepared.stats["samples"], "from": "val_sources",
                                                 "dropped": prepared.stats.get("dropped_total", 0)}
    if cfg.data.val_split:
        if "position_ids" in train_dataset.column_names:
            raise UserError("data.val_split holds out samples, but the dataset given is already packed into "
                            "blocks; encode it with validation.encoding_config(cfg)")
        train, held = hold_out(train_dataset, cfg.data.val_split, cfg.train.seed)
        info = {"samples": len(held), "from": f"val_split {cfg.data.val_split} (seed {cfg.train.seed})"}
        if cfg.data.pack_to_max_length:
            from llava_ft.data.dataset import pack_dataset

            # The unpacked cache's key covers data, tokenizer, max_length and shuffle_before_pack; add the split.
            base = f"{cache_path}.val_split-{cfg.data.val_split}-seed-{cfg.train.seed}" if cache_path else None
            train, info["packing"] = pack_dataset(train, cfg.data, cfg.train.seed, base and f"{base}-train")
            held, _ = pack_dataset(held, cfg.data, cfg.train.seed, base and f"{base}-validation")
        return train, held, info
    return train_dataset, None, None


class EvalTokenTotals:
    """(sum of token losses, supervised tokens) over an evaluation; `eval_loss` = their ratio.

    `add` takes a batch's mean loss (the model's: over the batch's supervised tokens) and its labels, counted
    as Trainer counts them for a causal LM (labels[..., 1:] != -100: the first label of a row is never a
    target), so the sum is exact whatever the batch size, padding or packing."""

    def __init__(self):
        self.totals = None  # float64 [sum, count] on the loss's device (all_reduce needs it there)

    def add(self, mean_loss, labels) -> None:
        import torch

        from llava_ft import IGNORE_INDEX

        count = labels[..., 1:].ne(IGNORE_INDEX).sum().to(device=mean_loss.device, dtype=torch.float64)
        # A batch without any supervised token (EvenShards' filler rows) has a NaN mean: it adds nothing.
        total = torch.where(count > 0, mean_loss.detach().double() * count, torch.zeros_like(count))
        pair = torch.stack([total, count])
        self.totals = pair if self.totals is None else self.totals + pair

    def mean(self, accelerator=None):
        """The token-weighted mean over every rank (each rank must call it), or None without any batch."""
        totals = self.totals
        if totals is None:
            return None
        if accelerator is not None and accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        return float(totals[0] / totals[1]) if float(totals[1]) > 0 else float("nan")


class EvenShards:
    """The eval dataset padded to a multiple of `multiple` (world size x eval batch) with filler rows.

    accelerate evens out the ranks' last batches by repeating samples from the start (gather_for_metrics
    drops them again, but only for per-sample outputs); a token-weighted sum would count them twice. A filler
    is a copy of a real row whose labels are all -100: every rank still runs the same forwards (ZeRO-3), and
    the filler adds no token to the loss."""

    def __init__(self, dataset, multiple: int):
        self.dataset = dataset
        n = len(dataset)
        self.length = -(-n // multiple) * multiple

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        n = len(self.dataset)
        if index < n:
            return self.dataset[index]
        import torch

        from llava_ft import IGNORE_INDEX

        item = dict(self.dataset[index % n])
        labels = item["labels"]
        item["labels"] = (torch.full_like(labels, IGNORE_INDEX) if torch.is_tensor(labels)
                          else [IGNORE_INDEX] * len(labels))
        return item


class FinalEvalCallback(TrainerCallback):
    """Evaluate at the last step too (Trainer evaluates only every eval_steps)."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            control.should_evaluate = True
        return control


def _link_or_copy(src: Path, dst: Path) -> None:
    import shutil

    from llava_ft.fileio import atomic_path

    with atomic_path(dst) as tmp:
        os.unlink(tmp)  # os.link wants a free name
        try:
            os.link(src, tmp)  # no second copy of the weights on disk
        except OSError:
            shutil.copyfile(src, tmp)


class BestKeeper(TrainerCallback):
    """Keeps `best_iter.pth` = the weights at the lowest eval loss so far (see module docstring).

    LlavaFtTrainer registers it as a callback (on_train_begin restores the best of a resumed run) and
    calls `after_eval` from `evaluate` and `after_save` from `_save_checkpoint`.
    """

    def __init__(self, work_dir):
        self.work_dir = Path(work_dir)
        self.best: Optional[tuple] = None  # (step, eval_loss)
        self.pending: Optional[int] = None  # step whose iter file, once saved, becomes the best file

    def on_train_begin(self, args, state, control, **kwargs):
        self.best, self.pending = None, None
        if state.global_step:
            self.restore(state.global_step)

    def restore(self, resumed_step: int) -> None:
        """On resume: the best so far, if it was recorded at or before the resumed step."""
        record = self.work_dir / BEST_RECORD
        if record.is_file() and (self.work_dir / BEST_NAME).is_file():
            data = json.loads(record.read_text())
            if data.get("step", 1 << 62) <= resumed_step:
                self.best = (int(data["step"]), float(data[METRIC]))

    def _record(self, step: int, value: float) -> None:
        from llava_ft.fileio import write_text

        write_text(self.work_dir / BEST_RECORD,
                   json.dumps({"step": step, METRIC: value, "file": BEST_NAME}) + "\n")

    def after_eval(self, trainer, metrics: dict) -> None:
        value = (metrics or {}).get(METRIC)
        step = trainer.state.global_step
        if value is None or (self.best is not None and value >= self.best[1]):
            return
        self.best = (step, float(value))
        if trainer.control.should_save:  # iter_<step>.pth is written right after this evaluation
            self.pending = step
            return
        state_dict = trainer.trainable_state_dict()  # every rank: gathers ZeRO-3 shards
        if trainer.args.should_save:
            from llava_ft.fileio import torch_save

            meta = dict(trainer.checkpoint_meta(), **{METRIC: float(value)})
            torch_save({"state_dict": state_dict, "meta": meta}, self.work_dir / BEST_NAME)
            self._record(step, float(value))

    def after_save(self, trainer, step: int) -> None:
        if self.pending != step:
            return
        self.pending = None
        if trainer.args.should_save:
            from llava_ft.checkpoint import iter_path

            _link_or_copy(iter_path(self.work_dir, step), self.work_dir / BEST_NAME)
            self._record(step, self.best[1])
