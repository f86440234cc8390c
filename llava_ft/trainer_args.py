"""`train.report_to` and `train.trainer_args`: the transformers.TrainingArguments settings llava_ft passes on.

    check_train_settings(cfg.train, where="cfg.yaml")   # at config load: UserError on a bad name or an owned key

(llava_ft.engine.tracking.training_kwargs adds the checked settings to the TrainingArguments the engine builds.)

`trainer_args` reaches any TrainingArguments field that llava_ft has no key for (optim: paged_adamw_8bit,
torch_compile, neftune_noise_alpha, include_num_input_tokens_seen, ...). Each key is checked against the
dataclass fields of the installed transformers when the config loads, so a typo fails before any model
loads, naming the closest field. Fields that llava_ft sets from its own keys (batch size, lr, save
schedule, ...) are refused there with a pointer to that key: two places for one setting would let one
silently win over the other.

transformers is imported only when a config actually sets `trainer_args` or `report_to` (config loading
stays light for `list-cfg` and the data tools).
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from llava_ft.errors import UserError

# TrainingArguments field -> where llava_ft sets it (a config key, a CLI flag, or "set by llava_ft").
OWNED = {
    "output_dir": "the work dir (--work-dir, default work_dirs/<name>)",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "per_device_eval_batch_size": "train.per_device_batch_size (evaluation uses the same)",
    "gradient_accumulation_steps": "train.gradient_accumulation_steps",
    "learning_rate": "train.learning_rate (and train.projector_lr / train.visual_encoder_lr)",
    "num_train_epochs": "train.num_epochs",
    "max_steps": "train.max_steps",
    "warmup_steps": "train.warmup_steps (a step count) or train.warmup_ratio (a share of the steps)",
    "lr_scheduler_type": "train.lr_scheduler",
    "weight_decay": "train.weight_decay",
    "adam_beta1": "train.adam_beta1",
    "adam_beta2": "train.adam_beta2",
    "max_grad_norm": "train.max_grad_norm",
    "save_strategy": "train.save_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "logging_steps": "train.logging_steps",
    "logging_strategy": "train.logging_steps",
    "seed": "train.seed",
    "data_seed": "train.seed",
    "bf16": "model.dtype",
    "fp16": "model.dtype",
    "use_cpu": "set by llava_ft (GPU when one is visible)",
    "report_to": "train.report_to",
    "remove_unused_columns": "set by llava_ft (the collators need every column)",
    "dataloader_num_workers": "train.dataloader_num_workers",
    "deepspeed": "the --deepspeed flag",
    "resume_from_checkpoint": "the --resume flag",
    "eval_strategy": "evaluation.every_n_steps (with data.val_sources or data.val_split)",
    "eval_steps": "evaluation.every_n_steps",
    "do_eval": "data.val_sources or data.val_split",
    "prediction_loss_only": "set by llava_ft (validation computes the loss only)",
    "label_names": "set by llava_ft",
    "load_best_model_at_end": "train.keep_best",
    "metric_for_best_model": "train.keep_best",
    "greater_is_better": "train.keep_best",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "train_sampling_strategy": "train.group_by_length",
}


def _fields() -> dict:
    from transformers import TrainingArguments

    return {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}


def report_targets() -> tuple:
    """Values `train.report_to` accepts with the installed transformers."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    return ("none", "all", *INTEGRATION_TO_CALLBACK)


def report_list(value: Any) -> list:
    if value is None:
        return ["none"]
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def check_train_settings(train_cfg, where: str) -> None:
    """Validate `train.report_to` and `train.trainer_args` (see module docstring)."""
    targets = report_list(train_cfg.report_to)
    if targets != ["none"]:
        allowed = report_targets()
        for t in targets:
            if t not in allowed:
                match = difflib.get_close_matches(t, allowed, n=1, cutoff=0.4)
                raise UserError(f"{where}: 'train.report_to' has {t!r}; allowed: {', '.join(allowed)}."
                                + (f" Did you mean '{match[0]}'?" if match else ""))
    extra = train_cfg.trainer_args
    if extra is None:
        train_cfg.trainer_args = {}
        return
    if not isinstance(extra, dict):
        raise UserError(f"{where}: 'train.trainer_args' must be a mapping of TrainingArguments fields, got {extra!r}")
    if not extra:
        return
    fields = _fields()
    for key in extra:
        if key in OWNED:
            raise UserError(f"{where}: 'train.trainer_args.{key}' is set by llava_ft; use {OWNED[key]} instead")
        if key not in fields:
            match = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            raise UserError(f"{where}: 'train.trainer_args.{key}' is not a transformers.TrainingArguments field."
                            + (f" Did you mean '{match[0]}'?" if match else "")
                            + " See https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments")
    _check_values(extra, where)


def _check_values(extra: dict, where: str) -> None:
    """Values of named choices (optim, hub_strategy, ...) and plain bool/int/float fields, checked from the
    dataclass annotations. Building a TrainingArguments here would be simpler but initialises the device
    and, under torchrun, the process group -- not something loading a config may do."""
    import enum
    import typing

    from transformers import TrainingArguments

    hints = typing.get_type_hints(TrainingArguments)
    for key, value in extra.items():
        hint = hints.get(key)
        options = typing.get_args(hint) or (hint,)
        enums = [o for o in options if isinstance(o, type) and issubclass(o, enum.Enum)]
        if enums and isinstance(value, str):
            allowed = [m.value for m in enums[0]]
            if value not in allowed:
                match = difflib.get_close_matches(value, allowed, n=1, cutoff=0.5)
                raise UserError(f"{where}: 'train.trainer_args.{key}' is {value!r}; allowed: {', '.join(allowed)}."
                                + (f" Did you mean '{match[0]}'?" if match else ""))
            continue
        plain = [o for o in options if o in (bool, int, float)]
        if value is None or not plain or len(options) != len(plain) + (type(None) in options):
            continue  # strings, dicts, unions with str: transformers checks them when the run starts
        if plain == [bool]:
            ok = isinstance(value, bool)
        else:  # a YAML int is a fine float; a bool is neither
            ok = not isinstance(value, bool) and isinstance(value, (int, float) if float in plain else int)
        if not ok:
            kind = " or ".join(o.__name__ for o in plain)
            raise UserError(f"{where}: 'train.trainer_args.{key}' must be {kind}, got {value!r}")

