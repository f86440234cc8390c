"""Load any AutoModelForCausalLM for training or inference, and wrap it with LoRA.

    model, tokenizer = load_llm(cfg.model)                       # dtype/quantization/attention from config
    model = apply_lora(model, cfg.model.llm_lora)                # every Linear but lm_head by default

`load_llm` resolves the three "auto" settings and prints one line saying what it chose and why:
dtype (bf16 on a GPU that supports it, fp16 on an older GPU, fp32 on CPU), attention implementation (flash_attention_2 when the
package imports and a GPU is present, else sdpa) and quantization (4-bit NF4 with double quantization =
QLoRA, or 8-bit, both via bitsandbytes). A path that does not exist, or a hub id that cannot be fetched,
raises `UserError` with one sentence instead of a stack trace.

An InternLM2 checkpoint (config.json `model_type: internlm2`) is converted once to a Llama folder in the
llava_ft cache (`llava_ft.model.internlm2_convert`) and loaded as LlamaForCausalLM, its tokenizer natively
(`llava_ft.model.internlm2_tokenizer`): no remote code. Other models' own code (config.json `auto_map`
with a model_type transformers does not know) runs only with `model.trust_remote_code: true`; attention
`auto` falls back to eager for a model class without sdpa support. `load_causal_lm` is the one
from_pretrained call every workflow (train, merge, chat, eval, serve) goes through.
"""
from __future__ import annotations

import contextlib
import os
import sys
import traceback
import warnings
from typing import Any, Optional

import torch

from llava_ft.config import looks_like_path
from llava_ft.errors import UserError

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dtype_choice(name: str, cuda_available: Optional[bool] = None,
                 bf16_supported: Optional[bool] = None) -> tuple[torch.dtype, str]:
    """(compute dtype, why) for `model.dtype`; the one place `auto` is decided.

    `auto`: bf16 on a CUDA GPU that supports it (Ampere and newer); fp16 on one that does not (T4, V100:
    their tensor cores run fp16, and fp32 would double QLoRA's compute memory and halve its speed; training is
    safe because trainable weights are fp32 masters, see builder.keep_trainable_fp32); fp32 on the CPU
    (half-precision matmuls are slow there). The device facts default to this machine's; a test passes them
    to ask about another device."""
    if name != "auto":
        return _DTYPES[name], "set in the config"
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if not cuda_available:
        return torch.float32, "auto: no CUDA GPU, and half precision is slow on the CPU"
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    if bf16_supported:
        return torch.bfloat16, "auto: the GPU supports bf16"
    return torch.float16, "auto: the GPU has no bf16 (pre-Ampere), so fp16 with fp32 trainable weights"


def resolve_dtype(name: str, cuda_available: Optional[bool] = None,
                  bf16_supported: Optional[bool] = None) -> torch.dtype:
    """The compute dtype for `model.dtype` (see `dtype_choice` for what `auto` picks and why)."""
    return dtype_choice(name, cuda_available, bf16_supported)[0]


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
    if os.path.exists(expanded) or looks_like_path(name):
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


def _trust(model_cfg: Any) -> bool:
    return bool(getattr(model_cfg, "trust_remote_code", False))


def _say(message: str, verbose: bool) -> None:
    """A start-of-run line: stdout for training (rank 0 only), stderr for chat/serve/merge (stdout is theirs)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(message, file=sys.stdout if verbose else sys.stderr, flush=True)


def _hub_internlm2(name: str) -> Optional[str]:
    """A local snapshot of hub id `name` when it is an InternLM2 model (its files are needed to convert)."""
    try:
        import json

        from huggingface_hub import hf_hub_download, snapshot_download

        from llava_ft.model.internlm2_detect import is_internlm2_config

        with open(hf_hub_download(name, "config.json"), encoding="utf-8") as fh:
            if not is_internlm2_config(json.load(fh)):
                return None
        return snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.model", "*.py"])
    except Exception:  # offline, unknown id, ...: from_pretrained reports it in its own words
        return None


def resolve_llm_source(name: str, what: str = "model.llm", verbose: bool = True) -> str:
    """The folder/hub id to load for `name`: an InternLM2 checkpoint -> its converted Llama folder (cached),
    announced with one line; anything else unchanged."""
    from llava_ft.model.internlm2_convert import convert_to_llama, quiet_config_type_warning
    from llava_ft.model.internlm2_detect import is_internlm2

    source = check_model_source(name, what)
    folder = source if os.path.isdir(source) else _hub_internlm2(source)
    if folder is None or not is_internlm2(folder):
        return source
    converted = convert_to_llama(folder)
    quiet_config_type_warning()
    _say(f"[llava_ft] InternLM2 checkpoint {name} is run as Llama (converted weights cached at {converted})",
         verbose)
    return converted


def check_remote_code(source: str, trust_remote_code: bool, what: str = "model.llm") -> None:
    """UserError (one line, naming the setting) when `source` needs its own code and that is not allowed."""
    if trust_remote_code or not os.path.isdir(source):
        return  # hub ids: AutoConfig's ValueError is translated by `explain_load_error`
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from llava_ft.model.internlm2_detect import is_internlm2_config, read_config

    cfg = read_config(source)
    model_type = cfg.get("model_type")
    if cfg.get("auto_map") and model_type not in CONFIG_MAPPING and not is_internlm2_config(cfg):
        raise UserError(_remote_code_message(source, model_type, what))


def _remote_code_message(source: str, model_type, what: str) -> str:
    kind = f"model_type {model_type!r} is not one transformers knows and its" if model_type else "its"
    return (f"{what} {source}: {kind} config maps to the model's own Python code (auto_map); llava_ft runs such "
            "code only with model.trust_remote_code=true (chat/eval/serve/merge: --trust-remote-code); "
            "set it only for code you trust")


def _model_code_frame(err: BaseException) -> Optional[str]:
    """The file of a model's own code (transformers runs it from its module cache) where `err` was raised."""
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        name = frame.filename.replace(os.sep, "/")
        if "/transformers_modules/" in name:
            return frame.filename
    return None


def explain_load_error(err: BaseException, source: str, what: str = "model.llm",
                       quantization: Optional[str] = "none") -> Optional[UserError]:
    """A one-line UserError for the ways loading a model fails that are the user's to fix, else None.
    `quantization=None`: a missing package is not blamed on quantization (tokenizers)."""
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    if isinstance(err, ValueError) and "trust_remote_code" in str(err):
        return UserError(_remote_code_message(source, None, what))
    if isinstance(err, ModuleNotFoundError):
        where = _model_code_frame(err)
        if where is not None:
            # transformers copies the model's own code into its module cache (transformers_modules) and
            # runs it there; a failing import inside it is that code's problem, not a missing package.
            return UserError(f"{what} {source}: the model's own code {where} imports '{err.name}', which does not "
                             "exist in this environment; that code was written for another transformers version "
                             "(use a revision made for this one, or a model transformers supports natively)")
    if isinstance(err, ImportError) and quantization is not None:
        how = f" with quantization={quantization}" if quantization != "none" else ""
        return UserError(f"loading '{source}'{how} needs a missing package: {first}")
    if isinstance(err, OSError):
        return UserError(f"could not load model '{source}': {first} "
                         "(no such local folder, and not downloadable from the hub)")
    return None


def model_class(source: str, trust_remote_code: bool):
    """The class AutoModelForCausalLM would build for `source` (None when it cannot be told)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code and "AutoModelForCausalLM" in auto_map:
        from transformers.dynamic_module_utils import get_class_from_dynamic_module

        return get_class_from_dynamic_module(auto_map["AutoModelForCausalLM"], source)
    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return None


def choose_attention(setting: str, cls) -> tuple[str, str]:
    """(implementation, why) for `model.attn_implementation` given the model class: `auto` steps down to
    what the class supports (flash_attention_2 -> sdpa -> eager)."""
    attn, why = resolve_attn_implementation(setting)
    if setting != "auto" or cls is None:
        return attn, why
    if attn == "flash_attention_2" and not (getattr(cls, "_supports_flash_attn", False)
                                            or getattr(cls, "_supports_flash_attn_2", False)):
        attn, why = "sdpa", f"{cls.__name__} does not support flash_attention_2"
    if attn == "sdpa" and not getattr(cls, "_supports_sdpa", False):
        attn, why = "eager", f"{cls.__name__} does not support sdpa, so auto falls back to eager"
    return attn, why


class _ShardReader:
    """Stands in for the `safe_open` handle transformers keeps open on every shard during a load: each
    tensor is read by opening its file, copying the tensor out and closing it again, so no shard stays
    memory-mapped (resident pages of a mapped file count in RSS until it is closed)."""

    def __init__(self, filename, framework, device="cpu", **kwargs):
        from safetensors import safe_open

        self._open = lambda: safe_open(filename, framework=framework, device=device, **kwargs)
        with self._open() as f:
            self._keys = list(f.keys())
            self._metadata = f.metadata()

    def keys(self):
        return list(self._keys)

    def metadata(self):
        return self._metadata

    def get_slice(self, key):
        return _LazySlice(self, key)

    def get_tensor(self, key):
        with self._open() as f:
            return f.get_tensor(key).clone()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _LazySlice:
    def __init__(self, reader: _ShardReader, key: str):
        self._reader, self._key = reader, key

    def __getitem__(self, index):
        # A tensor read from a mapped file can be a view of the mapping, which would keep the whole shard
        # mapped for as long as the weight lives: copy it out.
        with self._reader._open() as f:
            return f.get_slice(self._key)[index].clone()

    def __getattr__(self, name):  # get_shape, get_dtype, ...: answered by a briefly opened slice
        def call(*args, **kwargs):
            with self._reader._open() as f:
                return getattr(f.get_slice(self._key), name)(*args, **kwargs)
        return call


@contextlib.contextmanager
def _read_shards_one_tensor_at_a_time(active: bool):
    """While a quantized model loads, transformers' shard handles read one tensor at a time (`_ShardReader`).

    transformers 5 opens every shard memory-mapped at once and quantizes tensor by tensor; each tensor
    read leaves its file pages resident (and counted in RSS) until the last shard is closed, so a 4-bit
    load peaked at the 4-bit model + the whole 16-bit checkpoint. Read tensor by tensor, the peak is the
    4-bit model + about one tensor in 16 and 32 bits. transformers chooses how to open the shards inside
    `_load_pretrained_model`, so the `safe_open` it calls is wrapped for the duration of the load (only
    plain CPU mmap opens; anything else passes through). `LLAVA_FT_TRANSFORMERS_LOAD=1` keeps
    transformers' own reading (the benchmark's "before").
    """
    import transformers.modeling_utils as mu

    original = getattr(mu, "safe_open", None)
    if not active or original is None or os.environ.get("LLAVA_FT_TRANSFORMERS_LOAD") == "1":
        yield
        return

    def safe_open_lazily(filename, framework, device="cpu", backend=None, **kwargs):
        if backend not in (None, "mmap") or device != "cpu" or kwargs:
            return original(filename, framework=framework, device=device,
                            **({"backend": backend} if backend is not None else {}), **kwargs)
        return _ShardReader(filename, framework, device)

    mu.safe_open = safe_open_lazily
    try:
        yield
    finally:
        mu.safe_open = original


def load_causal_lm(source: str, *, dtype, attn_implementation: str = "auto", quantization_config=None,
                   device_map=None, trust_remote_code: bool = False, what: str = "model.llm",
                   quantization: str = "none", verbose: bool = True, describe=None,
                   load_kwargs: Optional[dict] = None):
    """AutoModelForCausalLM.from_pretrained for every workflow -> (model, attention used).

    `source` is a folder or hub id (InternLM2 is converted and loaded as Llama). Errors the user can fix
    become one-line UserErrors. `load_kwargs` go to from_pretrained too (model.llava: config, key_mapping). `describe(attn, why)`, when given, is called before loading (the
    start-of-run line)."""
    from transformers import AutoModelForCausalLM

    original = source
    source = resolve_llm_source(source, what, verbose=verbose)
    check_remote_code(source, trust_remote_code, what)
    try:
        attn, why = choose_attention(attn_implementation, model_class(source, trust_remote_code))
        if describe is not None:
            describe(attn, why)
        kwargs = dict(dtype=dtype, attn_implementation=attn, trust_remote_code=trust_remote_code)
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if device_map is not None:
            kwargs["device_map"] = device_map
        kwargs.update(load_kwargs or {})
        with _read_shards_one_tensor_at_a_time(quantization_config is not None):
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (ValueError, ImportError, OSError) as err:
        explained = explain_load_error(err, original, what, quantization)
        if explained is None:
            raise
        raise explained from None
    if source != original and os.path.isdir(os.path.expanduser(original)):
        # A converted InternLM2 model: adapters saved from it name the original folder as their base
        # (PEFT reads name_or_path), so they load wherever the original is, through the same conversion.
        model.name_or_path = os.path.expanduser(original)
        model.config._name_or_path = os.path.expanduser(original)
    return model, attn


def load_tokenizer(model_cfg: Any):
    """The tokenizer of `model.tokenizer` (default `model.llm`), with a pad token guaranteed.

    InternLM2's sentencepiece tokenizer is converted natively (its remote code never runs)."""
    from transformers import AutoTokenizer

    from llava_ft.model.internlm2_convert import source_of_converted

    what = "model.tokenizer" if model_cfg.tokenizer else "model.llm"
    name = os.path.expanduser(model_cfg.tokenizer or model_cfg.llm)
    # A tokenizer folder needs no config.json (e.g. an adapter folder holding its tokenizer).
    source = name if os.path.isdir(name) else check_model_source(name, what)
    source = source_of_converted(source) or source  # a converted cache folder: the original's tokenizer
    if not os.path.isdir(source):
        source = _hub_internlm2(source) or source  # an InternLM2 hub id: its local snapshot
    tokenizer = None
    if os.path.isdir(source):
        from llava_ft.model.internlm2_tokenizer import is_internlm2_tokenizer, load_internlm2_tokenizer

        if is_internlm2_tokenizer(source):
            tokenizer = load_internlm2_tokenizer(source)
    if tokenizer is None:
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=_trust(model_cfg))
        except (OSError, ValueError, ImportError) as err:
            explained = explain_load_error(err, source, what, quantization=None)
            if explained is not None and not isinstance(err, OSError):
                raise explained from None
            raise UserError(f"could not load the tokenizer from '{source}': {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        # Padding positions are masked (labels -100, attention 0), so reusing EOS/UNK is harmless.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_llm(model_cfg: Any, device_map: Optional[Any] = None, for_training: bool = True, verbose: bool = True,
             load_kwargs: Optional[dict] = None):
    """Load `model_cfg.llm` as a causal LM -> (model, tokenizer), ready for LoRA/full training.

    `for_training` with quantization prepares the k-bit model for training (fp32 norms, input grads).
    Gradient checkpointing is enabled here when `model_cfg.gradient_checkpointing` (non-reentrant, so it
    works with frozen inputs and LoRA). `load_kwargs` go to `from_pretrained` as well (e.g. `config` and
    `key_mapping` to read the LLM out of a LlavaForConditionalGeneration checkpoint).
    """
    check_model_source(model_cfg.llm)
    tokenizer = load_tokenizer(model_cfg)
    dtype, dtype_why = dtype_choice(model_cfg.dtype)
    quant = _quantization_config(model_cfg.quantization, dtype)
    if quant is not None and device_map is None:
        # bitsandbytes quantizes while placing weights: give it the device explicitly.
        device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}

    def describe(attn: str, why: str) -> None:
        if verbose and int(os.environ.get("RANK", "0")) == 0:  # one line per job, not one per process
            print(f"[llava_ft] LLM {model_cfg.llm}: dtype {str(dtype).replace('torch.', '')} ({dtype_why}), "
                  f"quantization {model_cfg.quantization}, attention {attn} ({why})", flush=True)

    model, _ = load_causal_lm(model_cfg.llm, dtype=dtype, attn_implementation=model_cfg.attn_implementation,
                              quantization_config=quant, device_map=device_map, trust_remote_code=_trust(model_cfg),
                              quantization=model_cfg.quantization, verbose=verbose, describe=describe,
                              load_kwargs=load_kwargs)
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
