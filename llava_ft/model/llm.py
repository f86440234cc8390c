"""Load any AutoModelForCausalLM for training or inference, and wrap it with LoRA.

    model, tokenizer = load_llm(cfg.model)                       # dtype/quantization/attention from config
    model = apply_lora(model, cfg.model.llm_lora)                # every Linear but lm_head by default

`load_llm` resolves the three "auto" settings and prints one line saying what it chose and why:
dtype (bf16 on a GPU that supports it, fp32 on CPU), attention implementation (flash_attention_2 when the
package imports and a GPU is present, else sdpa) and quantization (4-bit NF4 with double quantization =
QLoRA, or 8-bit, both via bitsandbytes). A path that does not exist, or a hub id that cannot be fetched,
raises `UserError` with one sentence instead of a stack trace.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any, Optional

import torch

from llava_ft.errors import UserError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def resolve_dtype(name: str) -> torch.dtype:
    """`auto` -> bf16 on a CUDA device that supports it, else fp32 (CPU half-precision matmuls are slow)."""
    if name != "auto":
        return _DTYPES[name]
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_attn_implementation(name: str) -> tuple[str, str]:
    """(implementation, why) for `model.attn_implementation`."""
    if name != "auto":
        return name, "set in the config"
    if not torch.cuda.is_available():
        return "sdpa", "no CUDA GPU, so flash_attention_2 cannot run"
    try:
        import flash_attn  # noqa: F401  (imported only to test that it is installed)
    except Exception:  # ImportError, or a broken build raising anything at import
        return "sdpa", "flash-attn is not installed (pip install llava_ft[flash])"
    return "flash_attention_2", "flash-attn is installed and a CUDA GPU is present"


def _looks_like_path(name: str) -> bool:
    # A hub id is `name` or `org/name`; anything else (absolute, ./, ~, deeper nesting) is meant as a folder.
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


def check_model_source(name: str, what: str = "model.llm") -> str:
    """Return `name` if it is an existing folder or plausibly a hub id; UserError for a missing path."""
    if not name:
        raise UserError(f"'{what}' is empty; set it to a Hugging Face hub id or a local model folder")
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        # A tokenizer-only folder (no config.json) is fine for model.tokenizer: AutoTokenizer loads it.
        if what != "model.tokenizer" and not os.path.isfile(os.path.join(expanded, "config.json")):
            raise UserError(f"'{what}' folder {expanded} has no config.json; point it at a Hugging Face model folder")
        return expanded
    if os.path.exists(expanded) or _looks_like_path(name):
        raise UserError(f"'{what}' path {name} does not exist; check the path or use a hub id like Qwen/Qwen2.5-0.5B-Instruct")
    return name


def _quantization_config(quantization: str, compute_dtype: torch.dtype):
    if quantization == "none":
        return None
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        # QLoRA (Dettmers et al.): NF4 storage, double-quantized constants, matmuls in the compute dtype.
        extra = {}
        if os.environ.get("LLAVA_FT_ZERO_STAGE") == "3":
            # ZeRO-3 shards parameters of float dtypes: packing the 4-bit values into the compute dtype
            # (same bytes as uint8) lets it shard them like every other weight (set by run_training).
            extra["bnb_4bit_quant_storage"] = compute_dtype
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, **extra)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_tokenizer(model_cfg: Any):
    """The tokenizer of `model.tokenizer` (default `model.llm`), with a pad token guaranteed."""
    from transformers import AutoTokenizer

    source = check_model_source(model_cfg.tokenizer or model_cfg.llm,
                                "model.tokenizer" if model_cfg.tokenizer else "model.llm")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=True)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the tokenizer from '{source}': {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked (labels -100, attention 0), so reusing EOS/UNK is harmless.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_llm(model_cfg: Any, device_map: Optional[Any] = None, for_training: bool = True, verbose: bool = True):
    """Load `model_cfg.llm` as a causal LM -> (model, tokenizer), ready for LoRA/full training.

    `for_training` with quantization prepares the k-bit model for training (fp32 norms, input grads).
    Gradient checkpointing is enabled here when `model_cfg.gradient_checkpointing` (non-reentrant, so it
    works with frozen inputs and LoRA).
    """
    from transformers import AutoModelForCausalLM

    source = check_model_source(model_cfg.llm)
    tokenizer = load_tokenizer(model_cfg)
    dtype = resolve_dtype(model_cfg.dtype)
    attn, why = resolve_attn_implementation(model_cfg.attn_implementation)
    quant = _quantization_config(model_cfg.quantization, dtype)
    if quant is not None and device_map is None:
        # bitsandbytes quantizes while placing weights: give it the device explicitly.
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
    if verbose and int(os.environ.get("RANK", "0")) == 0:  # one line per job, not one per process
        print(f"[llava_ft] LLM {model_cfg.llm}: dtype {str(dtype).replace('torch.', '')}, "
              f"quantization {model_cfg.quantization}, attention {attn} ({why})", flush=True)
    kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=True)
    if quant is not None:
        kwargs["quantization_config"] = quant
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        raise UserError(f"could not load model '{source}': {str(err).splitlines()[0]} "
                        "(no such local folder, and not downloadable from the hub)") from None
    except ImportError as err:
        raise UserError(f"loading '{source}' with quantization={model_cfg.quantization} needs a missing "
                        f"package: {str(err).splitlines()[0]}") from None
    # Padding id for generation; the data pipeline pads with tokenizer.pad_token_id.
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if for_training:
        model.config.use_cache = False  # the KV cache is useless in training and breaks checkpointing
        if quant is not None:
            from peft import prepare_model_for_kbit_training

            # Checkpointing is enabled below under its current name (peft would call the deprecated one).
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        if model_cfg.gradient_checkpointing:
            enable_checkpointing(model)
    return model, tokenizer


def enable_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant activation checkpointing (transformers 5 name, falling back to the 4.x one)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_lora(module: torch.nn.Module, lora_settings: Any, exclude: tuple = ("lm_head",),
               task_type: Optional[str] = "CAUSAL_LM"):
    """Wrap `module` in a PEFT LoRA model; base weights are frozen, only adapters train.

    `target_modules: all-linear` means every nn.Linear (and bnb Linear4bit/8bitLt) except those whose
    name ends in one of `exclude` (lm_head by default: XTuner and QLoRA leave the output layer alone).
    """
    from peft import LoraConfig

    targets = lora_settings.target_modules
    if targets == "all-linear":
        targets = find_linear_names(module, exclude)
        if not targets:
            raise UserError("model has no Linear layers for LoRA; set target_modules to a list of module names")
    elif isinstance(targets, str):
        targets = [targets]
    config = LoraConfig(r=lora_settings.r, lora_alpha=lora_settings.alpha, lora_dropout=lora_settings.dropout,
                        target_modules=targets, bias="none", task_type=task_type)
    try:
        return peft_wrap(module, config)
    except ValueError as err:
        raise UserError(f"LoRA target_modules {targets}: {str(err).splitlines()[0]}") from None


@contextlib.contextmanager
def peft_quiet():
    """Around `get_peft_model` / `PeftModel.from_pretrained`: peft 0.21's PeftModel.__init__ reads
    `is_gradient_checkpointing`, deprecated in transformers 5 (FutureWarning). Not a call of ours to rename,
    so only that one warning is silenced, only inside the block."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def peft_wrap(module: torch.nn.Module, config):
    """`peft.get_peft_model` inside `peft_quiet()` (the LLM and the vision tower alike)."""
    from peft import get_peft_model

    with peft_quiet():
        return get_peft_model(module, config)


def find_linear_names(module: torch.nn.Module, exclude: tuple = ("lm_head",)) -> list[str]:
    """Short names (last path component) of every Linear-like layer, minus `exclude`."""
    linear_types: tuple = (torch.nn.Linear,)
    try:
        import bitsandbytes as bnb

        linear_types += (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except Exception:  # bitsandbytes missing or unusable: plain Linear only
        pass
    names = set()
    for name, child in module.named_modules():
        if isinstance(child, linear_types):
            short = name.rsplit(".", 1)[-1]
            if not any(name == e or name.endswith("." + e) for e in exclude):
                names.add(short)
    return sorted(names - set(exclude))
