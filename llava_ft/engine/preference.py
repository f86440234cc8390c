"""Preference training (DPO family, ORPO, SimPO): the trainer and the pair data it trains on.

    train, collator, stats, held = build_preference_data(cfg, model, tokenizer)
    reference = Reference.build(model, cfg)     # None for orpo / simpo: none is ever built
    trainer = PreferenceTrainer(model=..., reference=reference, llava_cfg=cfg, ...)   # built by engine.run

The policy's log-probs come from the model's forward on a shared-prefix batch (llava_ft.model.preference:
each pair's prompt and images run once); the loss from llava_ft.engine.preference_loss; the reference
(adapter switched off, starting weights swapped in, or log-probs precomputed) from
llava_ft.engine.preference_reference.

Logged every `logging_steps` (train_log.jsonl, loss.png): loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (+ sft_loss), averaged over the pairs
since the last log; validation logs the same with the `eval_` prefix.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import torch
from transformers import TrainerCallback

from llava_ft.engine.preference_loss import needs_reference, preference_loss
from llava_ft.engine.preference_reference import Reference, fill_precomputed_reference, model_inputs
from llava_ft.engine.trainer import LlavaFtTrainer
from llava_ft.errors import UserError
from llava_ft.model.preference import SequenceLogps

class PreferenceTrainer(LlavaFtTrainer):
    """LlavaFtTrainer whose loss is a preference loss on shared-prefix batches (PreferenceCollator)."""

    def __init__(self, *args, reference: Optional[Reference] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference
        self._pref_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # The loss is a mean over the micro-batch's pairs: Trainer divides it by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.add_callback(_PrecomputeWhenTrainingBegins(self))

    def _nonfinite_guard(self):
        from llava_ft.engine.nonfinite import NonFiniteGuard

        return next((cb for cb in self.callback_handler.callbacks if isinstance(cb, NonFiniteGuard)), None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        settings = self.llava_cfg.preference
        reference = None
        if needs_reference(settings.loss):
            if "ref_chosen_logps" in inputs:
                reference = SequenceLogps(inputs["ref_chosen_logps"], inputs["ref_rejected_logps"], None, None)
            elif self.reference is not None:
                reference = self.reference.logps(model, model_inputs(inputs), engine=self.model_wrapped)
            else:
                raise UserError("this batch has no precomputed reference log-probs and the run holds no reference")
        policy = SequenceLogps(**model(**model_inputs(inputs)))
        out = preference_loss(settings, policy, reference)
        mode = "train" if model.training else "eval"
        for key, value in out.metrics.items():
            self._pref_metrics[mode][key].append(value.detach().float().cpu())
        guard = self._nonfinite_guard()
        if guard is not None and model.training:
            guard._on_forward(model, None, {"loss": out.loss})  # the forward hook sees no loss here
        return (out.loss, {"per_pair": out.per_pair}) if return_outputs else out.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs, start_time=None):
        mode = "train" if "loss" in logs else "eval" if "eval_loss" in logs else None
        if mode is not None and self._pref_metrics[mode]:
            prefix = "" if mode == "train" else "eval_"
            for key, values in self._pref_metrics[mode].items():
                local = torch.cat(values)
                if self.args.world_size > 1:  # mean over every rank's pairs
                    local = self.accelerator.gather_for_metrics(local.to(self.args.device))
                logs[prefix + key] = round(float(local.float().mean()), 6)
            self._pref_metrics[mode].clear()
        super().log(logs, start_time)


class _PrecomputeWhenTrainingBegins(TrainerCallback):
    """reference=precompute: the pairs' reference log-probs, computed once the model is prepared (a DeepSpeed
    engine gathers ZeRO-3 shards) and before the first step (preference_reference.fill_precomputed_reference)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        fill_precomputed_reference(self.trainer)


def build_preference_data(cfg, model, tokenizer):
    """-> (train dataset, collator, stats, eval dataset or None) for a preference run.

    Pairs come from data.preference_dataset (formats, bad pairs, truncation, cache); validation from
    data.val_sources (encoded the same way) or data.val_split (held out of the training pairs). LLaVA runs
    wrap them in PreferenceLlavaDataset (images decoded lazily, once per pair)."""
    from llava_ft.data.preference_collate import PreferenceCollator, PreferenceLlavaDataset
    from llava_ft.data.preference_dataset import build_preference_dataset
    from llava_ft.engine.validation import hold_out
    from llava_ft.model.anyres import image_token_counter

    num_image_tokens = image_token_counter(model.visual_encoder) if cfg.is_llava else 0
    prepared = build_preference_dataset(cfg, tokenizer, num_image_tokens=num_image_tokens, seed=cfg.train.seed)
    stats = dict(prepared.stats)
    stats.setdefault("samples", stats.get("pairs", len(prepared.dataset)))
    stats.setdefault("tokens", int(sum(abs(n) for n in prepared.dataset["modality_length"])))
    stats.setdefault("dropped_total", sum((stats.get("dropped") or {}).values()))
    stats.setdefault("skipped_total", sum((stats.get("skipped") or {}).values()))
    train, held = prepared.dataset, None
    if len(train) == 0:
        raise UserError("no preference pairs left after encoding; see the dropped counts above")
    if cfg.data.val_sources:
        held = build_preference_dataset(cfg, tokenizer, num_image_tokens=num_image_tokens,
                                        sources=list(cfg.data.val_sources)).dataset
        stats["validation"] = {"samples": len(held), "from": "val_sources"}
    elif cfg.data.val_split:
        train, held = hold_out(train, cfg.data.val_split, cfg.train.seed)
        stats["validation"] = {"samples": len(held), "from": f"val_split {cfg.data.val_split} (seed {cfg.train.seed})"}
    if not cfg.is_llava:
        with_images = sum(1 for n in train["num_images"] if n)
        if with_images:
            raise UserError(f"{with_images} pair(s) carry images but model.visual_encoder is not set; set it "
                            "for a LLaVA run, or use pairs without images")
    # data.pack_to_max_length: a micro-batch's pairs share rows of up to max_length positions (less padding);
    # the batch is still train.per_device_batch_size pairs, so the loss (a mean over pairs) means the same.
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id,
                                  image_shape=model.visual_encoder.image_shape if cfg.is_llava else None,
                                  pack_length=cfg.data.max_length if cfg.data.pack_to_max_length else None)
    if cfg.is_llava:
        wrap = lambda ds: None if ds is None else PreferenceLlavaDataset(ds, model.visual_encoder, cfg.data)  # noqa: E731
    else:
        wrap = lambda ds: ds  # noqa: E731
    return wrap(train), collator, stats, wrap(held)


def prepare_preference_config(cfg):
    """The config a preference run trains with: sdpa where flash-attention would be chosen (it cannot take
    the pairs' 4D block mask), said in one line."""
    import dataclasses

    attn = cfg.model.attn_implementation
    if attn == "eager" or attn == "sdpa":
        return cfg
    if attn == "flash_attention_2":
        print("[llava_ft] preference: model.attn_implementation=flash_attention_2 cannot take the shared-prefix "
              "block mask; using sdpa", flush=True)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attn_implementation="sdpa"))
