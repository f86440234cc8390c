"""LlavaFtTrainer: transformers.Trainer with what our runs need and Trainer does not do by itself.

- sampler: `llava_ft.data.sampler.LengthGroupedSampler` over `modality_length` when
  `train.group_by_length` (image and text-only samples grouped apart, deterministic per seed + epoch);
  packed data (`position_ids` column) gets the same sampler's plain seeded shuffle instead: blocks are
  all about `max_length` long, so there is nothing to group;
- optimizer: AdamW with one param group per (module, decay) so `train.projector_lr` and
  `train.visual_encoder_lr` apply to the projector / vision tower (Trainer's scheduler scales each group);
- checkpoints: `iter_<step>.pth` with only the trainable weights (docs/architecture.md), written before
  Trainer's `checkpoint-<step>/` (optimizer, scheduler, RNG, trainer_state.json). The folder holds no
  model weights: resume loads them back from the iter file. Both are rotated with `save_total_limit`;
- logs: `tokens_per_s` (image features counted; padding not: packed batches are one flattened row without
  padding, whatever the number of blocks) and `elapsed` added to every logged step;
- validation: Trainer's own eval loop, but `eval_loss` is the token-weighted mean over the whole eval set
  (independent of batch size and packing; `prediction_step` / `evaluation_loop` below); with
  `train.keep_best` a `validation.BestKeeper` keeps the best weights as best_iter.pth
  (llava_ft.engine.validation).

Built by `llava_ft.engine.run.run_training`; not meant to be constructed by users directly.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from transformers import Trainer

from llava_ft import __version__
from llava_ft.checkpoint import iter_path, load_iter_checkpoint, save_iter_checkpoint
from llava_ft.config import config_to_dict
from llava_ft.engine.resume import rotate_checkpoints
from llava_ft.model.llava import LlavaFtModel


class LlavaFtTrainer(Trainer):
    def __init__(self, *args, llava_cfg=None, work_dir=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.llava_cfg = llava_cfg
        self.work_dir = Path(work_dir or self.args.output_dir)
        self._tokens_since_log = 0
        self._last_log_time = None
        self._start_time = None
        self.best_keeper = None
        if llava_cfg is not None and llava_cfg.train.keep_best == "eval_loss":
            from llava_ft.engine.validation import BestKeeper

            self.best_keeper = BestKeeper(self.work_dir)
            self.add_callback(self.best_keeper)

    # ---- data order -------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None):
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        tc = self.llava_cfg.train
        columns = getattr(dataset, "column_names", ())
        packed = "position_ids" in columns
        if (tc.group_by_length or packed) and "modality_length" in columns:
            from llava_ft.data.sampler import LengthGroupedSampler

            return LengthGroupedSampler(
                list(dataset["modality_length"]), batch_size=self.args.per_device_train_batch_size,
                world_size=self.args.world_size, grad_accum=self.args.gradient_accumulation_steps,
                seed=self.args.seed, mega_multiplier=tc.length_group_multiplier, group_by_length=not packed)
        return super()._get_train_sampler(train_dataset)

    # ---- optimizer ----------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        tc = self.llava_cfg.train
        lrs = {"llm": tc.learning_rate, "projector": tc.projector_lr or tc.learning_rate,
               "visual_encoder": tc.visual_encoder_lr or tc.learning_rate}
        groups: dict = {}
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            module = LlavaFtModel.module_of(name)
            wd = self.args.weight_decay if name in decay else 0.0
            group = groups.setdefault((module, wd), {"params": [], "weight_decay": wd, "lr": lrs[module],
                                                     "name": f"{module}{'' if wd else '_no_decay'}"})
            group["params"].append(param)
        if not groups:
            from llava_ft.errors import UserError

            raise UserError("no trainable parameters: every weight is frozen. Enable model.llm_lora, set "
                            "model.freeze_llm=false, or (LLaVA) keep the projector trainable")
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        self.optimizer = optimizer_cls(list(groups.values()), **optimizer_kwargs)
        return self.optimizer

    # ---- logging --------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None):
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"]
        self._tokens_since_log += int(mask.sum()) if mask is not None else int(ids.numel())
        ve = getattr(self.accelerator.unwrap_model(model), "visual_encoder", None)
        if ve is not None:  # each <image> placeholder stands for its image's feature vectors
            from llava_ft import IMAGE_TOKEN_INDEX
            from llava_ft.model.anyres import image_token_counter

            n_images = int((ids == IMAGE_TOKEN_INDEX).sum())
            sizes = inputs.get("image_sizes")  # AnyRes: one (height, width) per image, counts differ
            sizes = sizes.tolist() if sizes is not None else [None] * n_images
            count = image_token_counter(ve)
            self._tokens_since_log += sum(count.for_size(hw) for hw in sizes[:n_images]) - n_images
        return super().training_step(model, inputs, num_items_in_batch)

    def log(self, logs, start_time=None):
        if "loss" in logs:
            now = time.time()
            if self._start_time is None:
                self._start_time = self._last_log_time = now
            span = max(now - self._last_log_time, 1e-9)
            # Tokens are counted per process; multiply by world size for the run's throughput.
            logs["tokens_per_s"] = round(self._tokens_since_log * self.args.world_size / span, 2)
            logs["elapsed"] = round(now - self._train_start, 3)
            self._tokens_since_log = 0
            self._last_log_time = now
        super().log(logs, start_time)

    def train(self, *args, **kwargs):
        self._train_start = self._last_log_time = self._start_time = time.time()
        if not (self.is_deepspeed_enabled and self.llava_cfg.model.quantization != "none"):
            return super().train(*args, **kwargs)
        # DeepSpeed resume reloads the whole module strictly; bitsandbytes 4/8-bit layers write their
        # quantisation constants (`...weight.absmax`, `quant_state.*`) into the state dict but do not take
        # them back, so strict loading fails on exactly those keys. Every real weight still loads; the
        # frozen quantised ones are already in place from the base model.
        import transformers.trainer as hf_trainer

        original = hf_trainer.deepspeed_load_checkpoint

        def load_non_strict(engine, path, load_module_strict=True):
            return original(engine, path, load_module_strict=False)

        hf_trainer.deepspeed_load_checkpoint = load_non_strict
        try:
            return super().train(*args, **kwargs)
        finally:
            hf_trainer.deepspeed_load_checkpoint = original

    # ---- checkpoints ------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict:
        """Trainable weights by name on the ranks that save (`args.should_save`), {} on the others; every
        rank must call this (under ZeRO-3 the shards are gathered module by module)."""
        model = self.accelerator.unwrap_model(self.model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if self.is_deepspeed_enabled and any(hasattr(p, "ds_id") for _, p in named):
            from llava_ft.engine.distributed import gather_trainable_state

            return gather_trainable_state(model, keep=self.args.should_save)
        if not self.args.should_save:
            return {}  # every rank holds the weights whole here; only the one that writes copies them
        return {n: p.detach().cpu().clone() for n, p in named}

    def _save(self, output_dir=None, state_dict=None):
        # Model weights live in iter_<step>.pth (trainable only); writing the whole (possibly 4-bit) model
        # into every checkpoint folder would cost disk and time for nothing.
        if output_dir and self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)

    def checkpoint_meta(self) -> dict:
        return {"step": self.state.global_step, "phase": self.llava_cfg.resolved_phase,
                "llava_ft_version": __version__, "config": config_to_dict(self.llava_cfg)}

    def _save_checkpoint(self, model, trial):
        step = self.state.global_step
        sd = self.trainable_state_dict()
        if self.args.should_save:
            save_iter_checkpoint(self.work_dir, step, sd, self.checkpoint_meta())
        super()._save_checkpoint(model, trial)
        if self.best_keeper is not None:
            self.best_keeper.after_save(self, step)  # before rotation: it links the iter file just written
        if self.args.should_save:
            rotate_checkpoints(self.work_dir, self.llava_cfg.train.save_total_limit, keep=step)

    def evaluate(self, *args, **kwargs):
        from llava_ft.engine.callbacks import keep_4bit_training_layout

        # eval mode must not let bitsandbytes repack 4-bit weights for CPU inference (training breaks after)
        keep_4bit_training_layout(self.model)
        metrics = super().evaluate(*args, **kwargs)
        if self.best_keeper is not None:
            self.best_keeper.after_eval(self, metrics)
        return metrics

    # ---- validation loss: token-weighted over the whole eval set (llava_ft.engine.validation) ----------
    def get_eval_dataloader(self, eval_dataset=None):
        dataset = self.eval_dataset if eval_dataset is None else eval_dataset
        if self.args.world_size > 1 and dataset is not None and not isinstance(dataset, (str, dict)):
            from llava_ft.engine.validation import EvenShards

            dataset = EvenShards(dataset, self.args.world_size * self.args.eval_batch_size)
        return super().get_eval_dataloader(dataset)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        totals = getattr(self, "_eval_totals", None)
        if not prediction_loss_only or totals is None or inputs.get("labels") is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
        import torch

        inputs = self._prepare_inputs(inputs)
        labels = inputs["labels"]  # before compute_loss, which may pop it
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)  # the mean over this batch's supervised tokens
        totals.add(loss.detach(), labels)
        return loss.detach(), None, None

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        from llava_ft.engine.validation import EvalTokenTotals

        self._eval_totals = EvalTokenTotals()
        try:
            output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                             metric_key_prefix)
            mean = self._eval_totals.mean(self.accelerator)  # every rank: sums over ranks
        finally:
            self._eval_totals = None
        if mean is not None:
            output.metrics[f"{metric_key_prefix}_loss"] = mean
        return output

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if self.is_deepspeed_enabled:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        m = re.search(r"checkpoint-(\d+)$", str(resume_from_checkpoint).rstrip("/"))
        path = iter_path(Path(resume_from_checkpoint).parent, int(m.group(1)))
        state = load_iter_checkpoint(path)["state_dict"]
        target = self.accelerator.unwrap_model(model if model is not None else self.model)
        target.load_trainable_state_dict(state, source=str(path))
