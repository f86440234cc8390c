"""Validation loss (data.val_sources / data.val_split, train.keep_best), experiment tracking (train.report_to)
and TrainingArguments pass-through (train.trainer_args) on tiny text runs."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import torch

from llava_ft.config import config_from_dict
from llava_ft.engine import run_training
from llava_ft.engine.callbacks import read_train_log
from llava_ft.engine.validation import BEST_NAME, BEST_RECORD, hold_out
from llava_ft.errors import UserError


def _cfg(llm, sources, tmp_path, data=None, train=None, evaluation=None, model=None):
    raw = {"name": "tiny_val", "model": {"llm": llm, **(model or {})},
           "data": {"sources": sources, "template": "qwen_chat", "max_length": 64,
                    "cache_dir": str(tmp_path / "cache"), **(data or {})},
           "train": {"learning_rate": 1e-2, "per_device_batch_size": 2, "max_steps": 5, "save_steps": 5,
                     "logging_steps": 1, "warmup_ratio": 0.0, **(train or {})},
           "evaluation": {"every_n_steps": 2, **(evaluation or {})}}
    return config_from_dict(raw)


def _event_scalars(folder: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list(folder.rglob("events.out.tfevents.*"))
    assert events, f"no tensorboard event file under {folder}"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_text_run_logs_eval_loss_to_jsonl_plot_and_tensorboard(tiny_qwen2, demo_data, tmp_path):
    # QLoRA: evaluating in eval mode must leave the 4-bit layers trainable (bitsandbytes on CPU)
    cfg = _cfg(tiny_qwen2, [{"path": demo_data["self_cognition"]}], tmp_path,
               model={"quantization": "4bit", "llm_lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}},
               data={"val_split": 0.25},
               train={"report_to": "tensorboard", "trainer_args": {"include_num_input_tokens_seen": True}})
    wd = tmp_path / "wd"
    result = run_training(cfg, work_dir=str(wd))
    log = read_train_log(wd)
    evals = [r for r in log if "eval_loss" in r]
    # every evaluation.every_n_steps and at the end
    assert [r["step"] for r in evals] == [2, 4, 5]
    assert all(r["eval_loss"] > 0 for r in evals)
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5]
    assert (wd / "loss.png").stat().st_size > 0
    held = result.data_stats["validation"]["samples"]
    assert held == round(result.data_stats["samples"] * 0.25)
    # tensorboard: the event file holds the same training and eval losses
    scalars = _event_scalars(wd / "runs")
    train_loss = {step: value for step, value in scalars["train/loss"]}
    for row in log:
        if "loss" in row:
            assert train_loss[row["step"]] == pytest.approx(row["loss"], rel=1e-6)
    assert [s for s, _ in scalars["eval/loss"]] == [2, 4, 5]
    assert [v for _, v in scalars["eval/loss"]] == pytest.approx([r["eval_loss"] for r in evals], rel=1e-6)
    # trainer_args reached the Trainer: it counted the input tokens
    seen = [h["num_input_tokens_seen"] for h in result.log_history if "num_input_tokens_seen" in h]
    assert seen and seen[-1] > 0
    assert "train/num_input_tokens_seen" in scalars


def test_val_split_is_deterministic_by_seed():
    ds = datasets.Dataset.from_dict({"id": [str(i) for i in range(100)]})
    train_a, val_a = hold_out(ds, 0.1, seed=42)
    train_b, val_b = hold_out(ds, 0.1, seed=42)
    _, val_c = hold_out(ds, 0.1, seed=7)
    assert list(val_a["id"]) == list(val_b["id"]) and len(val_a) == 10
    assert list(val_a["id"]) != list(val_c["id"])
    assert sorted(list(train_a["id"]) + list(val_a["id"]), key=int) == [str(i) for i in range(100)]
    with pytest.raises(UserError, match="hold out all"):
        hold_out(ds.select(range(1)), 0.5, seed=0)


def test_keep_best_survives_rotation_and_resume(tiny_qwen2, tmp_path):
    # Training on one word and validating on another: the eval loss rises after the first evaluation,
    # so the best weights are those of step 2 -- whose iter file rotation removes (save_total_limit 2).
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("".join(json.dumps({"text": "apple " * 20}) + "\n" for _ in range(8)))
    (data / "b.jsonl").write_text("".join(json.dumps({"text": "zebra " * 20}) + "\n" for _ in range(4)))
    cfg = _cfg(tiny_qwen2, [{"path": str(data / "a.jsonl")}], tmp_path,
               data={"val_sources": [{"path": str(data / "b.jsonl")}]},
               train={"learning_rate": 0.05, "max_steps": 6, "save_steps": 2, "save_total_limit": 2,
                      "keep_best": "eval_loss"})
    wd = tmp_path / "wd"
    run_training(cfg, work_dir=str(wd))
    evals = [r for r in read_train_log(wd) if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4, 6]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert best["step"] == 2
    record = json.loads((wd / BEST_RECORD).read_text())
    assert record["step"] == 2 and record["eval_loss"] == pytest.approx(best["eval_loss"])
    assert not (wd / "iter_2.pth").exists() and (wd / "iter_6.pth").exists()
    kept = torch.load(wd / BEST_NAME, weights_only=True)
    last = torch.load(wd / "iter_6.pth", weights_only=True)
    assert kept["meta"]["step"] == 2 and kept["state_dict"].keys() == last["state_dict"].keys()
    assert any(not torch.equal(kept["state_dict"][k], last["state_dict"][k]) for k in kept["state_dict"])

    # Interrupted after step 4 and resumed: the best of before the interruption still counts, so the
    # (worse) step-6 evaluation of the resumed run does not replace it.
    (wd / "iter_6.pth").unlink()
    (wd / "checkpoint-6" / "trainer_state.json").unlink()
    with pytest.warns(UserWarning, match="incomplete checkpoint"):
        run_training(cfg, work_dir=str(wd), resume="auto")
    assert json.loads((wd / BEST_RECORD).read_text())["step"] == 2
    assert torch.load(wd / BEST_NAME, weights_only=True)["meta"]["step"] == 2
    assert [r["step"] for r in read_train_log(wd) if "eval_loss" in r] == [2, 4, 6]


@pytest.mark.parametrize("trainer_args, message", [
    ({"learning_rate": 1e-4}, "'train.trainer_args.learning_rate' is set by llava_ft; use train.learning_rate"),
    ({"per_device_train_batch_size": 4}, "use train.per_device_batch_size"),
    ({"save_steps": 10}, "use train.save_steps"),
    ({"neftune_noise_alph": 5}, "not a transformers.TrainingArguments field. Did you mean 'neftune_noise_alpha'?"),
    ({"optim": "paged_adamw_8bitt"}, "'train.trainer_args.optim' is 'paged_adamw_8bitt'; allowed: adamw_torch"),
    ({"torch_compile": "yes please"}, "'train.trainer_args.torch_compile' must be bool, got 'yes please'"),
    ({"neftune_noise_alpha": "loud"}, "'train.trainer_args.neftune_noise_alpha' must be float"),
])
def test_trainer_args_refused_or_unknown_keys_point_to_the_right_key(trainer_args, message):
    with pytest.raises(UserError) as err:
        config_from_dict({"model": {"llm": "x"}, "data": {"sources": [{"path": "d.jsonl"}]},
                         "train": {"trainer_args": trainer_args}})
    assert message in str(err.value)


def test_report_to_and_keep_best_are_checked_at_load():
    base = {"model": {"llm": "x"}, "data": {"sources": [{"path": "d.jsonl"}]}}
    with pytest.raises(UserError, match="'train.report_to' has 'tensorbord'.*Did you mean 'tensorboard'"):
        config_from_dict({**base, "train": {"report_to": "tensorbord"}})
    with pytest.raises(UserError, match="keep_best=eval_loss needs validation data"):
        config_from_dict({**base, "train": {"keep_best": "eval_loss"}})
    with pytest.raises(UserError, match=r"val_split' must be in \[0, 1\)"):
        config_from_dict({**base, "data": {**base["data"], "val_split": 1.5}})
    cfg = config_from_dict({**base, "train": {"report_to": ["tensorboard", "mlflow"],
                                              "trainer_args": {"optim": "paged_adamw_8bit", "torch_compile": False}}})
    assert cfg.train.trainer_args["optim"] == "paged_adamw_8bit"


def test_passed_through_fields_reach_the_trainer_arguments(tmp_path):
    from llava_ft.engine.run import training_arguments

    cfg = config_from_dict({"name": "n", "model": {"llm": "x"},
                            "data": {"sources": [{"path": "d.jsonl"}], "val_split": 0.1},
                            "train": {"report_to": "tensorboard",
                                      "trainer_args": {"optim": "adafactor", "neftune_noise_alpha": 5.0}},
                            "evaluation": {"every_n_steps": 7}})
    args = training_arguments(cfg, str(tmp_path), None)
    assert args.optim == "adafactor" and args.neftune_noise_alpha == 5.0
    assert args.report_to == ["tensorboard"] and args.run_name == "n"
    assert args.eval_strategy == "steps" and args.eval_steps == 7 and args.prediction_loss_only


def test_report_to_a_tracker_that_is_not_installed_says_so(tmp_path):
    from transformers.integrations import get_available_reporting_integrations

    from llava_ft.engine.run import training_arguments

    missing = [t for t in ("wandb", "mlflow", "comet_ml", "clearml") if t not in get_available_reporting_integrations()]
    if not missing:
        pytest.skip("every tracker is installed here")
    cfg = config_from_dict({"model": {"llm": "x"}, "data": {"sources": [{"path": "d.jsonl"}]},
                            "train": {"report_to": missing[0]}})
    with pytest.raises(UserError, match=f"train.report_to: {missing[0]} is not installed here.*pip install"):
        training_arguments(cfg, str(tmp_path), None)


def test_a_value_transformers_rejects_at_build_is_one_user_error(tmp_path):
    from llava_ft.engine.run import training_arguments

    # a valid field and type, but transformers refuses it with train.dataloader_num_workers 0
    cfg = config_from_dict({"model": {"llm": "x"}, "data": {"sources": [{"path": "d.jsonl"}]},
                            "train": {"trainer_args": {"dataloader_prefetch_factor": 2}}})
    with pytest.raises(UserError, match="transformers rejected the TrainingArguments built with train.trainer_args.*prefetch"):
        training_arguments(cfg, str(tmp_path), None)
