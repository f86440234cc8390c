"""run_training: one call from a validated Config to a finished work dir.

    from llava_ft.config import load_config
    from llava_ft.engine.run import run_training
    result = run_training(load_config("configs/demo/tiny_text_sft_qlora.yaml"), work_dir="work_dirs/x")
    result.last_checkpoint   # work_dirs/x/iter_<step>.pth

Order matters for the user: the config is checked, the resume point and DeepSpeed config are resolved,
the data is read and checked (llava_ft.data.read: missing files or image folders, undecodable data, bad
records and, for LLaVA, unreadable images are reported before any model loads), the config is saved, the
model loads, the dataset is encoded and its counts printed (training refuses to start on an empty
dataset) and only then does training start. The run ends with one line totalling the bad samples
skipped or dropped, images found unreadable during training included. `command` ('train' | 'pretrain' |
'finetune') adds the phase checks of `llava_ft pretrain` / `llava_ft finetune`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from llava_ft.config import CONFIG_ROOT, Config, check_model_paths, save_config
from llava_ft.engine.resume import resolve_resume
from llava_ft.errors import UserError


@dataclass
class TrainResult:
    work_dir: str
    global_step: int
    train_loss: Optional[float]
    last_checkpoint: Optional[str]  # newest iter_<step>.pth
    data_stats: dict = field(default_factory=dict)
    log_history: list = field(default_factory=list)
    model: Any = field(default=None, repr=False)  # the trained LlavaFtModel (in memory, for library users)


def default_work_dir(cfg: Config) -> str:
    return os.path.join("work_dirs", cfg.name or "run")


def check_phase(cfg: Config, command: str) -> None:
    """`pretrain`: LLaVA with only the projector training; `finetune`: LLaVA (a visual encoder is set)."""
    if command not in ("pretrain", "finetune"):
        return
    if not cfg.is_llava:
        raise UserError(f"`llava_ft {command}` is for LLaVA configs but model.visual_encoder is not set; "
                        "use `llava_ft train` for text-only runs or set model.visual_encoder")
    if command == "pretrain":
        m = cfg.model
        wrong = [k for k, bad in (("model.freeze_llm=true", not m.freeze_llm),
                                  ("model.llm_lora.enabled=false", m.llm_lora.enabled),
                                  ("model.freeze_visual_encoder=true", not m.freeze_visual_encoder),
                                  ("model.visual_encoder_lora.enabled=false", m.visual_encoder_lora.enabled)) if bad]
        if wrong:
            raise UserError("`llava_ft pretrain` trains only the projector, but this config trains more; set "
                            + " ".join(wrong) + " (or use `llava_ft finetune`)")


def resolve_deepspeed(name_or_path: Optional[str]) -> Optional[str]:
    """A DeepSpeed JSON path, or a name under configs/deepspeed/ (`zero2` -> configs/deepspeed/zero2.json)."""
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if path.is_file():
        return str(path)
    builtin = CONFIG_ROOT / "deepspeed" / f"{path.stem}.json"
    if builtin.is_file() and path.parent == Path("."):
        return str(builtin)
    names = sorted(p.stem for p in (CONFIG_ROOT / "deepspeed").glob("*.json"))
    raise UserError(f"--deepspeed {name_or_path}: no such file and no built-in DeepSpeed config of that name; "
                    f"built-in: {', '.join(names)}")


def training_arguments(cfg: Config, work_dir: str, deepspeed: Optional[str]):
    import torch

    from llava_ft.engine.tracking import training_arguments as with_tracking_and_passthrough
    from llava_ft.model.llm import resolve_dtype

    t = cfg.train
    dtype = resolve_dtype(cfg.model.dtype)
    on_gpu = torch.cuda.is_available()
    # training_arguments adds train.report_to, the validation settings and train.trainer_args
    return with_tracking_and_passthrough(cfg, dict(
        output_dir=work_dir,
        per_device_train_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps,
        learning_rate=t.learning_rate,
        num_train_epochs=t.num_epochs,
        max_steps=t.max_steps,
        # transformers 5 reads a float in [0, 1) as a ratio of the total steps, an int >= 1 as steps
        warmup_steps=t.warmup_ratio if t.warmup_steps is None else int(t.warmup_steps),
        lr_scheduler_type=t.lr_scheduler,
        weight_decay=t.weight_decay,
        adam_beta1=t.adam_beta1,
        adam_beta2=t.adam_beta2,
        max_grad_norm=t.max_grad_norm,
        optim="adamw_torch",
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # our trainer rotates iter_*.pth and checkpoint-*/ together
        logging_steps=t.logging_steps,
        seed=t.seed,
        data_seed=t.seed,
        # Autocast in the compute dtype; trainable weights are fp32 masters (model.builder.keep_trainable_fp32).
        # bf16 autocast runs on the CPU too (same code path as on a GPU); accelerate switches fp16 autocast and
        # its GradScaler on only off the CPU, so fp16 is asked for on a GPU only.
        bf16=dtype == torch.bfloat16,
        fp16=on_gpu and dtype == torch.float16,
        remove_unused_columns=False,  # the collators need `images`, the sampler `modality_length`
        dataloader_num_workers=t.dataloader_num_workers,
        deepspeed=deepspeed,
        disable_tqdm=False,
        use_cpu=not on_gpu,
    ))


def _print_data_stats(stats: dict) -> None:
    from llava_ft.data.problems import format_counts

    dropped = stats.get("dropped") or {}
    line = (f"[llava_ft] data: {stats.get('records', '?')} records -> {stats.get('samples', '?')} samples, "
            f"{stats.get('tokens', '?')} tokens; dropped {stats.get('dropped_total', 0)}")
    if dropped:
        line += f" ({format_counts(dropped)})"
    if stats.get("skipped"):
        line += f"; skipped {stats.get('skipped_total', 0)} bad record(s) ({format_counts(stats['skipped'])})"
    if stats.get("images_outside_folder"):
        line += (f"; {stats['images_outside_folder']} image path(s) lie outside their image_folder "
                 "(used as given)")
    if stats.get("packing"):
        line += f"; packed: {json.dumps(stats['packing'])}"
    if stats.get("cache_hit"):
        line += f"; from cache {stats.get('cache_path')}"
    print(line, flush=True)


def _print_bad_summary(stats: dict, dataset, skip_bad_samples: bool) -> None:
    """The end-of-run line totalling what was skipped or dropped (silent when nothing was and the flag is off)."""
    from llava_ft.data.problems import format_counts

    bad_images = int(getattr(dataset, "num_bad_images", 0))
    skipped, dropped = stats.get("skipped") or {}, stats.get("dropped") or {}
    total = sum(skipped.values()) + sum(dropped.values()) + bad_images
    if not total and not skip_bad_samples:
        return
    parts = [f"{sum(skipped.values())} bad record(s) skipped while reading"
             + (f" ({format_counts(skipped)})" if skipped else ""),
             f"{sum(dropped.values())} sample(s) dropped at encoding" + (f" ({format_counts(dropped)})" if dropped else ""),
             f"{bad_images} unreadable image(s) skipped during training"]
    print(f"[llava_ft] bad samples: {total} in all: " + ", ".join(parts), flush=True)


def build_train_data(cfg: Config, model, tokenizer, source_data=None, with_eval: bool = False):
    """-> (train dataset, collator, stats): text runs use TextCollator, LLaVA runs the multimodal pair.

    `source_data`: the records read (and checked, images included) by llava_ft.data.read.read_sources.
    with_eval=True: (train dataset, collator, stats, eval dataset or None), the eval data from
    data.val_sources / data.val_split (llava_ft.engine.validation; stats["validation"] counts it).
    """
    from llava_ft.data.dataset import prepare_dataset
    from llava_ft.engine.validation import encoding_config, eval_split

    from llava_ft.model.anyres import image_token_counter

    num_image_tokens = image_token_counter(model.visual_encoder if cfg.is_llava else None)
    # unpacked when data.val_split holds out samples: eval_split packs after the hold-out
    prepared = prepare_dataset(encoding_config(cfg), tokenizer, num_image_tokens=num_image_tokens,
                               seed=cfg.train.seed, source_data=source_data)
    if len(prepared.dataset) == 0:
        raise UserError("no training samples left after encoding; see the dropped counts above")
    train_hf, eval_hf, eval_info = eval_split(cfg, tokenizer, num_image_tokens, prepared.dataset,
                                              prepared.stats.get("cache_path"))
    if eval_info:
        if "packing" in eval_info:
            prepared.stats["packing"] = eval_info.pop("packing")
        prepared.stats["validation"] = eval_info
    if cfg.is_llava:
        from llava_ft.data.llava_dataset import LlavaDataset
        from llava_ft.data.mm_collate import MultimodalCollator

        from llava_ft.data import hub

        if not cfg.data.skip_bad_samples and any(map(hub.is_dataset_source, cfg.data.sources)):
            from llava_ft.data.images import verify_images

            # Images inside `datasets` sources are not part of the data pass before the model (read.py,
            # which checks files on disk): find unreadable ones here, before step 1.
            problems = [p for part in (prepared.dataset, eval_hf) if part is not None for p in verify_images(part)]
            if problems:
                listed = "; ".join(str(p) for p in problems[:5])
                raise UserError(f"{len(problems)} unreadable image(s): {listed}. Fix or remove them, or set "
                                "data.skip_bad_samples=true to skip (and count) such samples")
        dataset = LlavaDataset(train_hf, model.visual_encoder, cfg.data)
        eval_dataset = None if eval_hf is None else LlavaDataset(eval_hf, model.visual_encoder, cfg.data)
        collator = MultimodalCollator(tokenizer, image_shape=model.visual_encoder.image_shape)
    else:
        from llava_ft.data.collate import TextCollator
        import pyarrow.compute as pc

        from llava_ft.data.packing import arrow_column

        with_images = pc.sum(pc.greater(arrow_column(prepared.dataset, "modality_length"), 0)).as_py() or 0
        if with_images:  # e.g. a Hub VLM dataset in a text config: image placeholders would crash the LLM
            raise UserError(f"{with_images} sample(s) carry images but model.visual_encoder is not set; set it "
                            "for a LLaVA run, or use a source without images")
        dataset, eval_dataset, collator = train_hf, eval_hf, TextCollator(tokenizer)
    return (dataset, collator, prepared.stats, eval_dataset) if with_eval else (dataset, collator, prepared.stats)


def run_training(cfg: Config, work_dir: Optional[str] = None, resume: Optional[str] = None,
                 deepspeed: Optional[str] = None, command: str = "train",
                 extra_callbacks: Optional[list] = None) -> TrainResult:
    """Train per `cfg` into `work_dir` (default work_dirs/<cfg.name>); see the module docstring."""
    from llava_ft.data.read import check_sources, read_sources
    from llava_ft.engine import distributed as dist
    from llava_ft.model.builder import resolve_pretrained_pth

    check_phase(cfg, command)
    work_dir = str(work_dir or default_work_dir(cfg))
    ds_config = resolve_deepspeed(deepspeed)
    if ds_config is not None:
        from llava_ft.versions import check_versions

        check_versions(("deepspeed",))
    resume_from = resolve_resume(resume, work_dir)
    # Data before model (and before transformers is even imported, which alone takes seconds): a missing file
    # or image folder, undecodable data and bad records (all of them, or skipped and counted) are reported at
    # once. Rank 0 of each node reads (it encodes and caches below); the other ranks load that cache, so they
    # only check that the files exist.
    check_model_paths(cfg, cfg.source_path or "config")  # missing model folders fail before the data pass
    if cfg.model.pretrained_pth:
        resolve_pretrained_pth(cfg.model.pretrained_pth)  # a wrong path fails now, not after the LLM loads
    preference = cfg.resolved_phase == "preference"
    if preference:
        from llava_ft.engine.preference import prepare_preference_config

        cfg = prepare_preference_config(cfg)  # flash-attention cannot take the pairs' block mask: sdpa
    if dist.local_rank() == 0 and not preference:  # pair files are read by data.preference_dataset
        source_data = read_sources(cfg.data, check_images=cfg.is_llava)
    else:
        check_sources(cfg.data)
        source_data = None
    from transformers import set_seed

    from llava_ft.engine.callbacks import EvalChatCallback, JsonlLogCallback, LossPlotCallback
    from llava_ft.engine.nonfinite import NonFiniteGuard
    from llava_ft.engine.trainer import LlavaFtTrainer
    from llava_ft.model.builder import build_model, trainable_summary

    # The process group opens before model and data: the data barrier below needs it (distributed.py).
    dist.init_distributed(use_deepspeed=ds_config is not None)
    dist.check_deepspeed_config(ds_config, cfg)
    args = None
    if dist.zero_stage(ds_config) == 3:
        # load_llm stores 4-bit weights in the compute dtype then, so ZeRO-3 can shard them (QLoRA + ZeRO-3).
        os.environ["LLAVA_FT_ZERO_STAGE"] = "3"
        if cfg.model.quantization == "none":
            # TrainingArguments with a ZeRO-3 config, alive while the model loads, make transformers'
            # from_pretrained build it under deepspeed.zero.Init: each rank holds only its shard instead of the
            # whole model. Not for 4/8-bit LLMs: bitsandbytes loading needs a device_map, which transformers
            # refuses under ZeRO-3 (their weights are small anyway).
            args = training_arguments(cfg, work_dir, ds_config)
    is_main = dist.is_main_process()
    if is_main:
        os.makedirs(work_dir, exist_ok=True)
        save_config(cfg, os.path.join(work_dir, "config.yaml"))
    set_seed(cfg.train.seed)  # LoRA / projector init depends on it
    model, tokenizer = build_model(cfg, for_training=True)
    if is_main:
        print(f"[llava_ft] {cfg.resolved_phase}: {trainable_summary(model)}", flush=True)
        sharded = sum(hasattr(p, "ds_id") for p in model.parameters())
        if sharded:
            print(f"[llava_ft] ZeRO-3: {sharded} weight tensors were built sharded (deepspeed.zero.Init); "
                  "each rank holds only its part", flush=True)
    with dist.main_process_first("tokenize"):  # rank 0 of each node encodes + caches; the others load the cache
        if preference:
            from llava_ft.engine.preference import build_preference_data

            dataset, collator, stats, eval_dataset = build_preference_data(cfg, model, tokenizer)
        else:
            dataset, collator, stats, eval_dataset = build_train_data(cfg, model, tokenizer, source_data,
                                                                      with_eval=True)
    source_data = None  # the encoded dataset holds what training needs; free the raw records
    if preference:  # reference=precompute: the log-probs from the cache, or computed when training begins
        from llava_ft.engine.preference_reference import attach_precomputed_reference

        dataset, eval_dataset = attach_precomputed_reference(cfg, model, work_dir, dataset, eval_dataset)
    if is_main:
        _print_data_stats(stats)
        from llava_ft.convert.model_card import RUN_INFO, current_command, run_info
        from llava_ft.fileio import write_json

        write_json(Path(work_dir) / RUN_INFO, run_info(current_command(), stats))  # for model cards
        if cfg.data.pack_to_max_length and cfg.train.group_by_length and not preference:
            print("[llava_ft] packed data: train.group_by_length does not apply (blocks are all ~max_length); "
                  "blocks are shuffled per epoch instead", flush=True)
        if stats.get("validation"):
            v = stats["validation"]
            print(f"[llava_ft] validation: {v['samples']} samples from {v['from']}; eval_loss every "
                  f"{cfg.evaluation.every_n_steps} steps and at the end", flush=True)
    args = args or training_arguments(cfg, work_dir, ds_config)
    callbacks = [JsonlLogCallback(work_dir), LossPlotCallback(work_dir), EvalChatCallback(work_dir, cfg, tokenizer)]
    callbacks.append(NonFiniteGuard(cfg.train.max_nonfinite_steps))  # stops NaN runs before they save
    if eval_dataset is not None:
        from llava_ft.engine.validation import FinalEvalCallback

        callbacks.append(FinalEvalCallback())
    callbacks += list(extra_callbacks or ())
    trainer_cls, extra = LlavaFtTrainer, {}
    if preference:
        from llava_ft.engine.preference import PreferenceTrainer, Reference

        trainer_cls, extra = PreferenceTrainer, {"reference": Reference.build(model, cfg)}
    trainer = trainer_cls(model=model, args=args, train_dataset=dataset, eval_dataset=eval_dataset,
                          data_collator=collator, callbacks=callbacks, llava_cfg=cfg, work_dir=work_dir, **extra)
    if resume_from and is_main:
        print(f"[llava_ft] resuming from {resume_from}", flush=True)
    output = trainer.train(resume_from_checkpoint=resume_from)
    stats["bad_images_in_training"] = int(getattr(dataset, "num_bad_images", 0))
    if is_main:
        _print_bad_summary(stats, dataset, cfg.data.skip_bad_samples)
    last = Path(work_dir) / "last_checkpoint"
    return TrainResult(
        work_dir=work_dir,
        global_step=trainer.state.global_step,
        train_loss=output.training_loss,
        last_checkpoint=last.read_text().strip() if last.is_file() else None,
        data_stats=stats,
        log_history=list(trainer.state.log_history),
        model=trainer.accelerator.unwrap_model(trainer.model),
    )
