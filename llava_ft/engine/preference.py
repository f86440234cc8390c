"""Preference training (DPO family, ORPO, SimPO): the reference without a second model, and the trainer.

    reference = Reference.build(model, cfg)     # None for orpo / simpo: none is ever built
    trainer = PreferenceTrainer(model=..., reference=reference, llava_cfg=cfg, ...)   # built by engine.run

The policy's log-probs come from the model's forward on a shared-prefix batch (llava_ft.model.preference:
each pair's prompt and images run once); the loss from llava_ft.engine.preference_loss.

The reference (`preference.reference`; `auto` picks adapter with LoRA, copy for a full fine-tune):
- adapter, starting from a fresh adapter with nothing else training: peft's disable_adapter for the
  reference forward -- the base model, i.e. the starting policy, with nothing copied;
- adapter when the run starts from trained weights (an SFT iter_N.pth / work dir in model.pretrained_pth,
  whose LoRA weights are loaded into the adapter) or trains more than the adapter (a LLaVA projector), and
  copy (full fine-tune): the starting values of the trainable weights are kept once, and swapped in
  (pointer swap of `.data`, no copy per step) for the reference forward. So the reference is the SFT
  policy, not the bare base, and the frozen (possibly 4-bit) base weights are shared; the extra memory is
  one copy of the trainable weights (small with LoRA). Not under ZeRO-3 (sharded weights): a UserError;
- precompute: the reference log-probs of every train / validation pair are computed once before training
  with the starting weights and stored in the dataset (`ref_chosen_logps` / `ref_rejected_logps`); no
  reference is held while training. Not under ZeRO-3 yet (a UserError).
The reference forward runs in the policy's train/eval mode, as TRL's does, so LoRA dropout > 0 on an SFT
adapter makes step 0 differ slightly from log 2.

Logged every `logging_steps` (train_log.jsonl, loss.png): loss, rewards/chosen, rewards/rejected,
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (+ sft_loss), averaged over the pairs
since the last log; validation logs the same with the `eval_` prefix.
"""
from __future__ import annotations

import contextlib
from collections import defaultdict
from typing import Optional

import torch

from llava_ft.engine.preference_loss import needs_reference, preference_loss
from llava_ft.engine.trainer import LlavaFtTrainer
from llava_ft.errors import UserError
from llava_ft.model.preference import SequenceLogps

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


def resolved_reference(cfg) -> str:
    """none | adapter | copy | precompute for this config (auto resolved)."""
    p = cfg.preference
    if not needs_reference(p.loss):
        return "none"
    if p.reference == "auto":
        return "adapter" if cfg.model.llm_lora.enabled else "copy"
    return p.reference


class Reference:
    """The reference policy of a running model: `logps(model, inputs)` -> SequenceLogps (no grad)."""

    def __init__(self, kind: str, snapshot: Optional[dict] = None):
        self.kind = kind  # "disable_adapter" | "swap"
        self.snapshot = snapshot  # name -> starting value of each trainable weight ("swap")

    @classmethod
    def build(cls, model, cfg) -> Optional["Reference"]:
        kind = resolved_reference(cfg)
        if kind in ("none", "precompute"):
            return None
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if any(hasattr(p, "ds_id") for _, p in trainable):
            raise UserError("preference.reference=adapter/copy cannot keep the starting weights under ZeRO-3 "
                            "(they are sharded); use ZeRO-2, or start LoRA from a fresh adapter")
        fresh_adapter = (cfg.model.llm_lora.enabled and all(".lora_" in n for n, _ in trainable)
                         and all(not bool(p.detach().any()) for n, p in trainable if ".lora_B." in n))
        if fresh_adapter:
            return cls("disable_adapter")
        return cls("swap", {n: p.detach().clone() for n, p in trainable})

    @contextlib.contextmanager
    def active(self, model):
        """Within: `model` computes as the reference policy."""
        unwrapped = model
        while hasattr(unwrapped, "module"):  # DDP / DeepSpeed engine
            unwrapped = unwrapped.module
        if self.kind == "disable_adapter":
            with unwrapped.llm.disable_adapter():
                yield
            return
        params = dict(unwrapped.named_parameters())
        self._swap(params)
        try:
            yield
        finally:
            self._swap(params)

    def _swap(self, params: dict) -> None:
        for name, value in self.snapshot.items():
            p = params[name]
            p.data, self.snapshot[name] = value, p.data

    @torch.no_grad()
    def logps(self, model, inputs: dict) -> SequenceLogps:
        with self.active(model):
            return SequenceLogps(**model(**inputs))


def _model_inputs(inputs: dict) -> dict:
    return {k: v for k, v in inputs.items() if k not in REF_KEYS}


class PreferenceTrainer(LlavaFtTrainer):
    """LlavaFtTrainer whose loss is a preference loss on shared-prefix batches (PreferenceCollator)."""

    def __init__(self, *args, reference: Optional[Reference] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.reference = reference
        self._pref_metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        # The loss is a mean over the micro-batch's pairs: Trainer divides it by the accumulation steps.
        self.model_accepts_loss_kwargs = False

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
                reference = self.reference.logps(model, _model_inputs(inputs))
            else:
                raise UserError("this batch has no precomputed reference log-probs and the run holds no reference")
        policy = SequenceLogps(**model(**_model_inputs(inputs)))
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


def precompute_reference(model, dataset, collator, batch_size: int, device) -> tuple[list, list]:
    """Reference log-probs of every pair of `dataset` (a torch/HF dataset of pairs) with the model's
    current weights; -> (ref_chosen_logps, ref_rejected_logps) lists in dataset order."""
    from torch.utils.data import DataLoader

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    from llava_ft.engine.callbacks import keep_4bit_training_layout

    chosen, rejected = [], []
    was_training = model.training
    keep_4bit_training_layout(model)  # eval mode must not repack 4-bit weights that train afterwards
    model.eval()  # the reference is deterministic (no dropout)
    with torch.no_grad():
        for batch in loader:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model(**_model_inputs(batch))
            chosen += out["chosen"].float().cpu().tolist()
            rejected += out["rejected"].float().cpu().tolist()
    model.train(was_training)
    return chosen, rejected


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
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id,
                                  image_shape=model.visual_encoder.image_shape if cfg.is_llava else None)
    if cfg.is_llava:
        wrap = lambda ds: None if ds is None else PreferenceLlavaDataset(ds, model.visual_encoder, cfg.data)  # noqa: E731
    else:
        wrap = lambda ds: ds  # noqa: E731
    if resolved_reference(cfg) == "precompute":
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            # the forward runs before the DeepSpeed engine exists, on weights it has already sharded
            raise UserError("preference.reference=precompute does not run under ZeRO-3 yet; use ZeRO-2, or LoRA "
                            "with preference.reference=adapter")
        device = model.get_input_embeddings().weight.device
        weights_key = reference_weights_key(model, cfg)
        for name, part in (("train", train), ("validation", held)):
            if part is None:
                continue
            cache = _reference_cache_file(cfg, weights_key, part)
            if cache.is_file():
                chosen, rejected = torch.load(cache, weights_only=True)
                print(f"[llava_ft] reference log-probs of the {name} pairs from {cache}", flush=True)
            else:
                chosen, rejected = precompute_reference(model, wrap(part), collator,
                                                        cfg.train.per_device_batch_size, device)
                from llava_ft.engine.distributed import is_main_process
                from llava_ft.fileio import torch_save

                if is_main_process():
                    cache.parent.mkdir(parents=True, exist_ok=True)
                    torch_save((chosen, rejected), cache)
            part = part.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)
            if name == "train":
                train = part
            else:
                held = part
        print(f"[llava_ft] preference.reference=precompute: reference log-probs of {len(train)} pair(s) computed "
              "with the starting weights; no reference is held during training", flush=True)
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


def reference_weights_key(model, cfg) -> str:
    """Hash of what the reference log-probs depend on besides the data: every weight's values (the starting
    policy, base and adapter), the attention path and the compute dtype."""
    import hashlib

    digest = hashlib.sha256(f"{cfg.model.attn_implementation}|{cfg.model.dtype}|{cfg.model.quantization}".encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def _reference_cache_file(cfg, weights_key: str, dataset):
    """<data cache>/reference_logps/<weights key>-<dataset fingerprint>.pt (the pairs' tokens and order)."""
    from pathlib import Path

    from llava_ft.data.dataset import default_cache_dir

    folder = Path(cfg.data.cache_dir or default_cache_dir()) / "reference_logps"
    return folder / f"{weights_key}-{dataset._fingerprint}.pt"
