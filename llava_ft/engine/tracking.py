"""The TrainingArguments kwargs llava_ft adds to its own: experiment tracking, validation, trainer_args.

    from llava_ft.engine.tracking import training_arguments
    args = training_arguments(cfg, {"output_dir": ..., "learning_rate": ..., ...})   # TrainingArguments

`train.report_to` goes to transformers' own integrations (tensorboard writes event files under
<work_dir>/runs/, wandb/mlflow/... read their usual environment variables); the run is named after the
config. `train.trainer_args` (checked at config load by llava_ft.trainer_args) is applied last, on fields
that llava_ft never sets itself.
"""
from __future__ import annotations

from llava_ft.engine.validation import eval_training_kwargs
from llava_ft.trainer_args import report_list


def training_arguments(cfg, base: dict):
    """transformers.TrainingArguments from `training_kwargs`; a value transformers rejects (one that the
    config-load check cannot see, e.g. optim_args) becomes a UserError naming train.trainer_args."""
    from transformers import TrainingArguments

    from llava_ft.errors import UserError

    kwargs = training_kwargs(cfg, base)
    try:
        return TrainingArguments(**kwargs)
    except (ValueError, TypeError) as err:
        if not cfg.train.trainer_args:
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"transformers rejected the TrainingArguments built with train.trainer_args "
                        f"{cfg.train.trainer_args}: {first}") from None


def training_kwargs(cfg, base: dict) -> dict:
    """llava_ft's own kwargs (`base`) + report_to (+ run_name) + validation settings + trainer_args."""
    kwargs = dict(base)
    targets = report_list(cfg.train.report_to)
    _check_installed(targets)
    kwargs["report_to"] = "none" if targets == ["none"] else targets
    extra = dict(cfg.train.trainer_args or {})
    if targets != ["none"] and "run_name" not in extra and cfg.name:
        kwargs["run_name"] = cfg.name  # the run's name in wandb / mlflow
    kwargs.update(eval_training_kwargs(cfg))
    kwargs.update(extra)
    return kwargs


def _check_installed(targets: list) -> None:
    """A tracker named in train.report_to whose package is missing: one line before any model loads
    (transformers would fail later, inside Trainer)."""
    if targets in (["none"], ["all"]):
        return
    from transformers.integrations import get_available_reporting_integrations

    from llava_ft.errors import UserError

    available = set(get_available_reporting_integrations())
    missing = [t for t in targets if t not in available]
    if missing:
        raise UserError(f"train.report_to: {', '.join(missing)} is not installed here (available: "
                        f"{', '.join(sorted(available)) or 'none'}); `pip install {' '.join(missing)}` or "
                        "change train.report_to")
