"""build_model(cfg): the one place that turns a Config's `model` section into a trainable LlavaFtModel.

    model, tokenizer = build_model(cfg)                 # training: freezing / LoRA applied per config
    model, tokenizer = build_model(cfg, for_training=False)

Text runs: LlavaFtModel(llm) with LoRA (`model.llm_lora.enabled`), a frozen LLM (`model.freeze_llm`) or
full training. LLaVA runs (`model.visual_encoder` set): LlavaFtModel(llm, visual_encoder, projector);
the vision tower is frozen unless `freeze_visual_encoder: false` or `visual_encoder_lora.enabled`;
the projector always trains; `model.pretrained_pth` (a pretrain run's iter_N.pth, or its work dir: the
newest checkpoint, as chat/eval/convert resolve it) is loaded by name, and the file and tensor count are printed.
`model.llava` (a released LlavaForConditionalGeneration) supplies LLM, tokenizer, tower and projector
weights instead (llava_ft.model.llava_hf_import); freezing and LoRA then apply as configured.
"""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from llava_ft.errors import UserError
from llava_ft.model.llm import apply_lora, load_llm, resolve_dtype


def _freeze(module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def build_model(cfg, for_training: bool = True):
    """-> (LlavaFtModel, tokenizer) per `cfg.model` (see module docstring)."""
    from llava_ft.model.llava import LlavaFtModel

    m = cfg.model
    dtype = resolve_dtype(m.dtype)
    released = None
    if m.llava:  # a released LlavaForConditionalGeneration brings LLM, tower, projector and tokenizer
        from llava_ft.model.llava_hf_import import load_released_llava

        released = load_released_llava(cfg, for_training=for_training)
        llm, tokenizer = released.llm, released.tokenizer
    else:
        llm, tokenizer = load_llm(m, for_training=for_training)
    if m.llm_lora.enabled:
        _seed_new_weights(cfg, 0)
        llm = apply_lora(llm, m.llm_lora)
    elif m.freeze_llm or not for_training:
        _freeze(llm)
    visual_encoder = projector = None
    if cfg.is_llava:
        from llava_ft.model.projector import Projector
        from llava_ft.model.vision import apply_vision_lora, load_visual_encoder

        visual_encoder = released.visual_encoder if released else load_visual_encoder(m, dtype=dtype)
        anyres = getattr(visual_encoder, "anyres", None) is not None
        if m.freeze_visual_encoder or m.visual_encoder_lora.enabled or not for_training:
            _freeze(visual_encoder)
        if m.visual_encoder_lora.enabled:
            _seed_new_weights(cfg, 1)
            visual_encoder = apply_vision_lora(visual_encoder, m.visual_encoder_lora)
        llm_hidden = llm.config.get_text_config().hidden_size
        _seed_new_weights(cfg, 2)
        # Created in fp32 (a training run's master weights; see training_dtypes); load_state_dict copies a
        # released projector's weights into it in whatever dtype they were saved.
        projector = Projector(visual_encoder.hidden_size, llm_hidden, m.projector_depth, image_newline=anyres)
        if released:
            projector.load_state_dict(released.projector_state)
        if not for_training:
            projector.to(dtype)
            _freeze(projector)
    model = LlavaFtModel(llm, visual_encoder, projector)
    model.loss_chunk_tokens = cfg.train.loss_chunk_tokens
    if m.pretrained_pth:
        _load_pretrained(model, m.pretrained_pth)
    if for_training and not any(p.requires_grad for p in model.parameters()):
        raise UserError("no trainable parameters: every weight is frozen. Enable model.llm_lora.enabled, set "
                        "model.freeze_llm=false, or add a visual encoder (its projector trains)")
    if for_training:
        training_dtypes(model, dtype)
    return model, tokenizer


def training_dtypes(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Make every trainable floating-point weight an fp32 master; frozen weights keep the compute dtype.

    Mixed precision (Trainer's fp16/bf16 = torch.autocast) runs the forward in the compute dtype whatever the
    weights' dtype, but the optimizer updates the weights themselves: fp16 trainable weights make GradScaler
    stop ("Attempting to unscale FP16 gradients"), bf16 ones round AdamW's small updates away (at lr 2e-5 most
    of a full fine-tune's updates are below half a bf16 ulp). peft already does this for LoRA adapters
    (get_peft_model's autocast_adapter_dtype); the projector, AnyRes newline and any unfrozen LLM or tower
    weights are cast here. The cast reassigns `p.data`, so tied weights (one Parameter) stay tied.

    DeepSpeed keeps its own fp32 master copies (in its optimizer) for bf16/fp16 runs and wants the module's
    weights in its compute dtype. Without zero.Init its engine casts the weights it is given itself, so fp32
    here changes nothing for it. A model built sharded by ZeRO-3 (zero.Init: parameters carry `ds_id`) is not
    recast by the engine, so there the trainable weights created after loading (projector, LoRA: peft made them
    fp32) are given the compute dtype of the sharded ones, as DeepSpeed expects (one dtype per gather).
    Returns how many tensors were cast."""
    params = list(model.parameters())
    target = compute_dtype if any(hasattr(p, "ds_id") for p in params) else torch.float32
    cast = 0
    for p in params:
        if p.requires_grad and p.is_floating_point() and p.dtype != target and not hasattr(p, "ds_id"):
            p.data = p.data.to(target)
            cast += 1
    return cast


def resolve_pretrained_pth(path: str) -> Path:
    """`model.pretrained_pth` as a file: an iter_N.pth as given, a work dir -> its newest checkpoint."""
    from llava_ft.checkpoint import newest_iter_file

    p = Path(path).expanduser()
    if p.is_dir():
        newest = newest_iter_file(p)
        if newest is None:
            raise UserError(f"model.pretrained_pth {p} is a folder without last_checkpoint or iter_N.pth; point "
                            "it at the pretrain run's work dir or one of its iter_N.pth files")
        return newest
    if not p.is_file():
        raise UserError(f"model.pretrained_pth {p} does not exist; give the pretrain run's work dir or its "
                        "iter_N.pth")
    return p


def _load_pretrained(model, path: str) -> None:
    from llava_ft.checkpoint import load_iter_checkpoint

    file = resolve_pretrained_pth(path)
    state = load_iter_checkpoint(file)["state_dict"]
    # strict=False: a pretrain checkpoint holds the projector only; LoRA weights start fresh.
    names = model.load_trainable_state_dict(state, strict=False, source=f"model.pretrained_pth {file}")
    if int(os.environ.get("RANK", "0")) == 0:
        parts = ", ".join(f"{module} {n}" for module, n in sorted(Counter(map(model.module_of, names)).items()))
        via = f" (newest checkpoint of work dir {path})" if Path(path).expanduser().is_dir() else ""
        print(f"[llava_ft] model.pretrained_pth: loaded {len(names)} tensor(s) ({parts}) from {file}{via}",
              flush=True)


def _seed_new_weights(cfg, part: int) -> None:
    """Seed the RNG right before creating new weights (LLM LoRA, vision LoRA, projector), so their init
    depends on train.seed only, not on how much randomness loading consumed before: under ZeRO-3,
    from_pretrained builds the model in deepspeed.zero.Init and runs the random init it otherwise skips."""
    torch.manual_seed(int(cfg.train.seed) + part)


def _logical_numel(p) -> int:
    """Values a parameter holds. bnb 4-bit weights pack two values per byte of storage, whatever the storage
    dtype (uint8 by default; bf16 under ZeRO-3, where bnb_4bit_quant_storage lets the weights shard);
    a DeepSpeed ZeRO-3 shard reports its full size in ds_numel."""
    numel = getattr(p, "ds_numel", None) or p.numel()
    if type(p).__name__ == "Params4bit":  # checked by name: bitsandbytes need not be importable here
        return numel * p.element_size() * 2
    return numel


def trainable_summary(model) -> str:
    """'trainable 16,384 / 155,968 params (10.50%): llm 16,384, projector 0' for the start-of-run print."""
    total = trainable = 0
    per_module: dict = {}
    for name, p in model.named_parameters():
        n = _logical_numel(p)
        total += n
        if p.requires_grad:
            trainable += n
            head = name.split(".", 1)[0]
            per_module[head] = per_module.get(head, 0) + n
    parts = ", ".join(f"{k} {v:,}" for k, v in per_module.items())
    return f"trainable {trainable:,} / {total:,} params ({100.0 * trainable / max(total, 1):.2f}%): {parts}"
