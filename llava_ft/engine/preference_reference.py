"""The reference policy of a preference run, held without a second model: `Reference` and precomputed log-probs.

    reference = Reference.build(model, cfg)          # None for orpo / simpo and for reference=precompute
    ref = reference.logps(model, batch, engine)      # SequenceLogps of the starting policy, no grad
    train, held = attach_precomputed_reference(cfg, model, work_dir, train, held)   # reference=precompute
    fill_precomputed_reference(trainer)              # at train begin (PreferenceTrainer does it)

What the reference is (`preference.reference`; `auto` = adapter with LoRA, copy for a full fine-tune):
- adapter from a fresh adapter with nothing else training: peft's disable_adapter for the reference
  forward -- the base model, which is the starting policy; nothing is copied.
- adapter from trained weights (an SFT iter_N.pth / work dir in model.pretrained_pth, loaded into the
  adapter), or training more than the adapter (a LLaVA projector), and copy (full fine-tune): the starting
  values of the trainable weights are kept once and swapped in (pointer swap of `.data`, no copy per step)
  for the reference forward. The frozen (possibly 4-bit) base is shared; the extra memory is one copy of the
  trainable weights. Under ZeRO-3 each rank keeps only its own shard of that copy (1/N of it) and swaps it
  into the weights' DeepSpeed partitions (`ds_tensor`); every gathered weight is released before and after
  the reference forward (the engine's `empty_partition_cache`), so that forward gathers the reference's
  values and the policy's next gather its own. Hand-written because neither DeepSpeed nor peft has a
  "run this forward with other values for these sharded weights"; TRL instead builds a second model.
- precompute: the reference log-probs of every train / validation pair are computed once, with the starting
  weights, when training begins (through the prepared model, so under ZeRO-3 DeepSpeed gathers the shards, and
  in the run's mixed precision), then served with each pair (`ref_chosen_logps` / `ref_rejected_logps`); no
  reference is held. They are cached in <data cache>/reference_logps/<hash of every starting weight + attention,
  dtype, quantization>-<dataset fingerprint>.pt and copied into the work dir, so reruns and resumes (which
  start from trained weights) read them instead of computing them from the wrong weights.
The reference forward runs in the policy's train/eval mode, as TRL's does, so LoRA dropout > 0 on an SFT
adapter makes step 0 differ slightly from log 2 (precompute runs in eval mode: no dropout).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from llava_ft.engine.preference_loss import needs_reference
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


def model_inputs(inputs: dict) -> dict:
    """A preference batch without the precomputed reference columns (what the model's forward takes)."""
    return {k: v for k, v in inputs.items() if k not in REF_KEYS}


def _is_zero3(param) -> bool:
    return getattr(param, "ds_tensor", None) is not None


def _starting_value(param) -> torch.Tensor:
    """A copy of what this process holds of a weight now: all of it, or under ZeRO-3 its own shard."""
    return (param.ds_tensor if _is_zero3(param) else param).detach().clone()


def _gathered(param) -> contextlib.AbstractContextManager:
    """Within: `param.data` is the whole weight (gathered from every rank under ZeRO-3; a no-op otherwise)."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


def _own_shard(full: torch.Tensor, param) -> torch.Tensor:
    """This rank's ZeRO-3 partition of `full` (a whole value of `param`), laid out as DeepSpeed partitions
    the weight itself: the flattened weight cut into equal parts of `ds_tensor`'s size, the last one
    zero-padded, part k on rank k of the weight's process group."""
    import torch.distributed as tdist

    part = param.ds_tensor.numel()
    start = part * tdist.get_rank(group=param.ds_process_group)
    flat = full.reshape(-1)
    shard = torch.zeros(part, dtype=param.ds_tensor.dtype, device=param.ds_tensor.device)
    n = max(0, min(part, flat.numel() - start))
    shard[:n] = flat[start:start + n].to(shard.dtype)
    return shard


def _deepspeed_engine(*candidates):
    """The first DeepSpeed engine among `candidates` (and what they wrap), or None."""
    for model in candidates:
        while model is not None:
            if hasattr(model, "empty_partition_cache"):
                return model
            model = getattr(model, "module", None)
    return None


class Reference:
    """The reference policy of a running model: `logps(model, inputs, engine)` -> SequenceLogps (no grad)."""

    def __init__(self, kind: str, snapshot: Optional[dict] = None):
        self.kind = kind  # "disable_adapter" | "swap"
        self.snapshot = snapshot  # name -> starting value of each trainable weight ("swap"); a shard under ZeRO-3
        self._shards_ready = False  # ZeRO-3: snapshot laid out as the engine's partitions (done at first use)

    @classmethod
    def build(cls, model, cfg) -> Optional["Reference"]:
        kind = resolved_reference(cfg)
        if kind in ("none", "precompute"):
            return None
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if cfg.model.llm_lora.enabled and all(".lora_" in n for n, _ in trainable):
            fresh = True
            for name, p in trainable:
                if ".lora_B." in name:
                    with _gathered(p):
                        fresh = fresh and not bool(p.detach().any())
            if fresh:
                return cls("disable_adapter")
        return cls("swap", {n: _starting_value(p) for n, p in trainable})

    @contextlib.contextmanager
    def active(self, model, engine=None):
        """Within: `model` computes as the reference policy. `engine`: the DeepSpeed engine when the model is
        under one (found inside `model` otherwise)."""
        unwrapped = model
        while hasattr(unwrapped, "module"):  # DDP / DeepSpeed engine
            unwrapped = unwrapped.module
        if self.kind == "disable_adapter":
            with unwrapped.llm.disable_adapter():
                yield
            return
        params = dict(unwrapped.named_parameters())
        if not any(_is_zero3(params[name]) for name in self.snapshot):
            self._swap(params)
            try:
                yield
            finally:
                self._swap(params)
            return
        engine = _deepspeed_engine(engine, model)
        if engine is None:
            raise UserError("the preference reference runs on ZeRO-3 weights outside their DeepSpeed engine")
        self._to_own_shards(params)
        release = getattr(engine.optimizer, "empty_partition_cache", None) or engine.empty_partition_cache

        def release_all():
            release()
            held = [n for n in self.snapshot if getattr(params[n].ds_status, "name", "") != "NOT_AVAILABLE"]
            if held:  # a gathered weight would run with the other policy's values
                raise RuntimeError(f"DeepSpeed kept {held[0]} gathered after empty_partition_cache")

        release_all()  # nothing gathered may keep the policy's values into the reference forward ...
        self._swap_shards(params)
        try:
            yield
        finally:
            release_all()  # ... nor the reference's into the policy's
            self._swap_shards(params)

    def _swap(self, params: dict) -> None:
        for name, value in self.snapshot.items():
            p = params[name]
            p.data, self.snapshot[name] = value, p.data

    def _to_own_shards(self, params: dict) -> None:
        """Whole starting values (kept before DeepSpeed partitioned the weights) -> this rank's shards, once: the
        engine has partitioned and cast every weight before the first step, so later steps only swap."""
        if self._shards_ready:
            return
        self._shards_ready = True
        for name, value in self.snapshot.items():
            p = params[name]
            if "nvme" in str(getattr(p.ds_tensor, "final_location", "")).lower():
                raise UserError(f"{name} is offloaded to NVMe (offload_param.device nvme), where the preference "
                                "reference cannot swap in its starting values; offload to cpu, or set "
                                "preference.reference=precompute")
            if value.numel() != p.ds_tensor.numel() or value.shape != p.ds_tensor.shape:
                self.snapshot[name] = _own_shard(value, p)
            elif value.dtype != p.ds_tensor.dtype or value.device != p.ds_tensor.device:
                # a shard kept before the engine cast the partitions (fp32 masters -> bf16/fp16) or moved them
                # (offload_param): the swap must hand DeepSpeed what its own partition holds
                self.snapshot[name] = value.to(device=p.ds_tensor.device, dtype=p.ds_tensor.dtype)

    def _swap_shards(self, params: dict) -> None:
        for name, value in self.snapshot.items():
            shard = params[name].ds_tensor
            shard.data, self.snapshot[name] = value, shard.data

    @torch.no_grad()
    def logps(self, model, inputs: dict, engine=None) -> SequenceLogps:
        with self.active(model, engine):
            return SequenceLogps(**model(**inputs))


# ---- precompute ------------------------------------------------------------------------------------------

class WithReferenceLogps(torch.utils.data.Dataset):
    """A pair dataset whose items also carry the pair's reference log-probs (filled once before training).

    Everything else (column access for the length-grouped sampler, `column_names`, `num_bad_images`, ...)
    is the wrapped dataset's."""

    def __init__(self, dataset, name: str, cache_files: list):
        self.dataset = dataset
        self.name = name  # "train" | "validation"
        self.cache_files = cache_files  # where the values are read from / written to, in that order
        self.chosen: Optional[list] = None
        self.rejected: Optional[list] = None

    @property
    def filled(self) -> bool:
        return self.chosen is not None

    def fill(self, chosen: list, rejected: list) -> None:
        if len(chosen) != len(self.dataset) or len(rejected) != len(self.dataset):
            raise UserError(f"{len(chosen)} reference log-probs for {len(self.dataset)} {self.name} pairs; delete "
                            f"{self.cache_files[0]} and rerun")
        self.chosen, self.rejected = list(chosen), list(rejected)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, str):  # a column, e.g. modality_length for the sampler
            return self.dataset[index]
        if not self.filled:
            raise RuntimeError(f"the {self.name} pairs' reference log-probs are read before they were computed")
        item = dict(self.dataset[index])
        item["ref_chosen_logps"], item["ref_rejected_logps"] = self.chosen[index], self.rejected[index]
        return item

    def __getattr__(self, name):
        # not `dataset` (unset while unpickling: no recursion), nor dunders: the DataLoader would take the
        # wrapped dataset's batched `__getitems__` and skip the reference columns
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def reference_weights_key(model, cfg) -> str:
    """Hash of what the reference log-probs depend on besides the data: every weight's values (the starting
    policy, base and adapter; ZeRO-3 shards are gathered one weight at a time, so the key is the one a single
    process computes), the attention path and the compute dtype. Under ZeRO-3 every rank must call it."""
    import hashlib

    digest = hashlib.sha256(f"{cfg.model.attn_implementation}|{cfg.model.dtype}|{cfg.model.quantization}".encode())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            param = params.get(name)
            with _gathered(param) if param is not None else contextlib.nullcontext():
                value = param.data if param is not None and hasattr(param, "ds_id") else tensor
                digest.update(name.encode())
                digest.update(value.detach().contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:20]


def _cache_files(cfg, work_dir: str, weights_key: str, name: str, dataset) -> list:
    """[<data cache>/reference_logps/<weights key>-<fingerprint>.pt, <work dir>/reference_logps/<name>-...pt]"""
    from llava_ft.data.read import data_cache_dir

    hf = dataset
    while not hasattr(hf, "_fingerprint") and hasattr(hf, "data"):  # PreferenceLlavaDataset -> datasets.Dataset
        hf = hf.data
    file = f"{weights_key}-{hf._fingerprint}.pt"
    return [Path(data_cache_dir(cfg.data)) / "reference_logps" / file,
            Path(work_dir) / "reference_logps" / f"{name}-{file}"]


def attach_precomputed_reference(cfg, model, work_dir: str, train, held):
    """reference=precompute: -> (train, held) wrapped in WithReferenceLogps, filled from the cache when the
    same starting weights and pairs were seen before; otherwise PreferenceTrainer fills them when training
    begins. Other references: (train, held) unchanged. Every process calls it (the key gathers ZeRO-3 shards)."""
    if resolved_reference(cfg) != "precompute":
        return train, held
    key = reference_weights_key(model, cfg)
    out = []
    for name, part in (("train", train), ("validation", held)):
        if part is None:
            out.append(None)
            continue
        wrapped = WithReferenceLogps(part, name, _cache_files(cfg, work_dir, key, name, part))
        for cache in wrapped.cache_files:
            if cache.is_file():
                wrapped.fill(*torch.load(cache, weights_only=True))
                print(f"[llava_ft] reference log-probs of the {name} pairs from {cache}", flush=True)
                break
        out.append(wrapped)
    return out[0], out[1]


def precompute_reference(model, dataset, collator, batch_size: int, device,
                         lockstep: bool = False) -> tuple[list, list]:
    """Reference log-probs of every pair of `dataset` with `model`'s current weights, in eval mode (no
    dropout); -> (chosen, rejected) lists in dataset order, the same on every process.

    With several processes each computes its share and the shares are gathered. `lockstep` (ZeRO-3: each
    forward is a collective) gives every process the same number of batches, padding with pair 0."""
    import torch.distributed as tdist
    from torch.utils.data import DataLoader, Subset

    from llava_ft.engine.callbacks import keep_4bit_training_layout

    world = tdist.get_world_size() if tdist.is_available() and tdist.is_initialized() else 1
    rank = tdist.get_rank() if world > 1 else 0
    indices = list(range(rank, len(dataset), world))
    if lockstep:
        per_rank = -(-len(dataset) // world)
        indices += [0] * (per_rank - len(indices))
    loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, shuffle=False, collate_fn=collator)
    chosen, rejected = [], []
    was_training = model.training
    keep_4bit_training_layout(model)  # eval mode must not repack 4-bit weights that train afterwards
    model.eval()
    try:
        with torch.no_grad():
            for batch in loader:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                out = model(**model_inputs(batch))
                chosen += out["chosen"].float().cpu().tolist()
                rejected += out["rejected"].float().cpu().tolist()
    finally:
        model.train(was_training)
    shares = [(indices, chosen, rejected)]
    if world > 1:
        shares = [None] * world
        tdist.all_gather_object(shares, (indices, chosen, rejected))
    full_chosen, full_rejected = [None] * len(dataset), [None] * len(dataset)
    for idx, c, r in shares:
        for i, cv, rv in zip(idx, c, r):
            full_chosen[i], full_rejected[i] = cv, rv
    return full_chosen, full_rejected


def fill_precomputed_reference(trainer) -> None:
    """Compute the reference log-probs of the trainer's WithReferenceLogps datasets that the cache did not
    fill, with the prepared model (DeepSpeed gathers ZeRO-3 shards; the run's autocast applies), then cache
    them. Called when training begins: the weights are still the starting ones unless the run resumed."""
    from llava_ft.engine.distributed import is_main_process
    from llava_ft.fileio import torch_save

    pending = [d for d in (trainer.train_dataset, trainer.eval_dataset)
               if isinstance(d, WithReferenceLogps) and not d.filled]
    if not pending:
        return
    if trainer.state.global_step > 0:
        raise UserError(f"preference.reference=precompute: this run resumes at step {trainer.state.global_step}, "
                        f"but the reference log-probs it computed at step 0 are gone ({pending[0].cache_files[1]} "
                        f"and {pending[0].cache_files[0]}); they must come from the starting weights, so start "
                        "the run again without --resume")
    engine = _deepspeed_engine(trainer.model_wrapped)
    model = engine if engine is not None else trainer.model  # accelerate patched its forward with the autocast
    device = trainer.args.device
    for part in pending:
        chosen, rejected = precompute_reference(model, part.dataset, trainer.data_collator,
                                                trainer.args.per_device_train_batch_size, device,
                                                lockstep=engine is not None)
        part.fill(chosen, rejected)
        if is_main_process():
            for cache in part.cache_files:
                cache.parent.mkdir(parents=True, exist_ok=True)
                torch_save((chosen, rejected), cache)
            print(f"[llava_ft] preference.reference=precompute: reference log-probs of {len(chosen)} {part.name} "
                  f"pair(s) computed with the starting weights (cached in {part.cache_files[0]}); no reference "
                  "is held during training", flush=True)
