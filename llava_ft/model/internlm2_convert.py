"""Convert InternLM2 checkpoints to Llama (cached, locked) and Llama weights back to InternLM2 names.

    llama_dir = convert_to_llama(folder)          # cached under the llava_ft cache, reused
    to_internlm2_state(state, llama_cfg, pending) # the reverse, shard by shard (used by internlm2_export)

InternLM2 *is* the Llama architecture with fused and renamed weights: `attention.wqkv` holds, for each kv
head, that group's query heads, then its key head, then its value head (the layout its remote code splits
with `(h gs d)`, gs = queries per kv head + 2); `tok_embeddings`, `attention.wo`, `feed_forward.w1/w3/w2`,
`attention_norm`, `ffn_norm` and `output` are Llama's embed_tokens, o_proj, gate/up/down_proj, the two
RMSNorms and lm_head. Running it through transformers' native LlamaForCausalLM means no remote code,
sdpa/flash attention, a working KV cache, 4-bit/8-bit loading and LoRA target names every tool knows.

Conversion goes shard by shard (safetensors or .bin): at most one source shard is in memory at a time.
The converted folder lives under `<cache>/models/internlm2-<name>-<key>` where `<cache>` is
$LLAVA_FT_CACHE or ~/.cache/llava_ft and `<key>` hashes the source files' names, sizes and mtimes (plus
the converter version), so the second run starts at once and a changed checkpoint is converted anew.
It is built in a temp folder and renamed into place (a killed run leaves no half folder), under a file
lock so that the processes of one distributed job convert once.

The reverse (`to_internlm2_state`) fuses q/k/v back bit for bit. Hand-written because neither
transformers nor any library we use converts this layout (transformers has no InternLM2 model).
"""
from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from llava_ft import fileio
from llava_ft.errors import UserError
from llava_ft.model.internlm2_detect import read_config

# Bump when the converted folder's content changes, so old caches are not reused.
CONVERTER_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin")
MARKER = "llava_ft_internlm2.json"
# Errors that mean "the cache cannot be written here" (not a broken checkpoint).
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}

# Per-layer renames (InternLM2 name after `model.layers.N.` -> Llama name); wqkv is split separately.
_LAYER_RENAMES = {
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w3": "mlp.up_proj",
    "feed_forward.w2": "mlp.down_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_RENAMES = {"model.tok_embeddings": "model.embed_tokens", "model.norm": "model.norm", "output": "lm_head"}


# ---- config ------------------------------------------------------------------------------------------

def _geometry(cfg: dict) -> tuple[int, int, int]:
    heads = int(cfg["num_attention_heads"])
    kv = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // heads)
    if heads % kv:
        raise UserError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    return heads, kv, head_dim


def llama_config_from_internlm2(cfg: dict, where: str = "config.json") -> dict:
    """An InternLM2 config.json dict -> the LlamaConfig keyword arguments of the same model."""
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                           "vocab_size") if k not in cfg]
    if missing:
        raise UserError(f"{where}: InternLM2 config lacks {', '.join(missing)}")
    heads, kv, head_dim = _geometry(cfg)
    rope = {"rope_type": "default", "rope_theta": float(cfg.get("rope_theta", 10000))}
    scaling = cfg.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        # InternLM2's two scalings are transformers' `linear` (positions / factor) and `dynamic` (NTK base
        # growth past max_position_embeddings, the same formula).
        if kind not in ("linear", "dynamic"):
            raise UserError(f"{where}: rope_scaling type {kind!r} is not one InternLM2 defines (linear, dynamic)")
        rope.update(rope_type=kind, factor=float(scaling["factor"]))
    out = {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": int(cfg["vocab_size"]),
        "hidden_size": int(cfg["hidden_size"]),
        "intermediate_size": int(cfg["intermediate_size"]),
        "num_hidden_layers": int(cfg["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "hidden_act": cfg.get("hidden_act", "silu"),
        "max_position_embeddings": int(cfg.get("max_position_embeddings", 2048)),
        "initializer_range": float(cfg.get("initializer_range", 0.02)),
        "rms_norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        # InternLM2Config's `bias` (default True) puts biases on wqkv and wo only: Llama's attention_bias.
        "attention_bias": bool(cfg.get("bias", True)),
        "mlp_bias": False,
        "rope_parameters": rope,
        "bos_token_id": cfg.get("bos_token_id", 1),
        "eos_token_id": cfg.get("eos_token_id", 2),
        "pad_token_id": cfg.get("pad_token_id"),
        "use_cache": True,
    }
    dtype = cfg.get("torch_dtype") or cfg.get("dtype")
    if dtype:
        out["dtype"] = dtype
    return out


# ---- weights -----------------------------------------------------------------------------------------

def split_wqkv(w: torch.Tensor, heads: int, kv: int, head_dim: int) -> tuple[torch.Tensor, ...]:
    """Fused wqkv weight [(heads + 2 kv) * d, hidden] (or its bias) -> q, k, v in Llama's head order."""
    group = heads // kv
    tail = w.shape[1:]
    grouped = w.reshape(kv, group + 2, head_dim, *tail)
    q = grouped[:, :group].reshape(heads * head_dim, *tail)
    k = grouped[:, group].reshape(kv * head_dim, *tail)
    v = grouped[:, group + 1].reshape(kv * head_dim, *tail)
    return q.contiguous(), k.contiguous(), v.contiguous()


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, kv: int, head_dim: int) -> torch.Tensor:
    """Inverse of `split_wqkv` (exact: only reshapes and concatenation)."""
    group = heads // kv
    tail = q.shape[1:]
    parts = [q.reshape(kv, group, head_dim, *tail), k.reshape(kv, 1, head_dim, *tail),
             v.reshape(kv, 1, head_dim, *tail)]
    return torch.cat(parts, dim=1).reshape(kv * (group + 2) * head_dim, *tail).contiguous()


def _split_layer_key(key: str) -> Optional[tuple[str, str, str]]:
    """'model.layers.3.attention.wo.weight' -> ('model.layers.3.', 'attention.wo', 'weight')."""
    if not key.startswith("model.layers."):
        return None
    idx, rest = key[len("model.layers."):].split(".", 1)
    module, _, param = rest.rpartition(".")
    return f"model.layers.{idx}.", module, param


def _renamed(key: str, layer_map: dict, top_map: dict) -> Optional[str]:
    """`key` with its module renamed per the maps (per-layer or top-level), or None when not in them."""
    parts = _split_layer_key(key)
    if parts is not None:
        prefix, module, param = parts
        return f"{prefix}{layer_map[module]}.{param}" if module in layer_map else None
    module, _, param = key.rpartition(".")
    return f"{top_map[module]}.{param}" if module in top_map else None


def to_llama_state(state: dict, cfg: dict) -> dict:
    """InternLM2-named tensors (any subset, e.g. one shard) -> Llama-named tensors. Unknown keys: UserError."""
    heads, kv, head_dim = _geometry(cfg)
    out: dict = {}
    for key, t in state.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved; Llama recomputes it
        parts = _split_layer_key(key)
        if parts is not None and parts[1] == "attention.wqkv":
            prefix, _, param = parts
            for name, part in zip(("q_proj", "k_proj", "v_proj"), split_wqkv(t, heads, kv, head_dim)):
                out[f"{prefix}self_attn.{name}.{param}"] = part
            continue
        new = _renamed(key, _LAYER_RENAMES, _TOP_RENAMES)
        if new is None:
            raise UserError(f"InternLM2 weight {key!r} has no Llama equivalent; is this a plain InternLM2 causal "
                            "LM (not a multimodal or reward variant)?")
        out[new] = t
    return out


def to_internlm2_state(state: dict, cfg: dict, pending: Optional[dict] = None) -> dict:
    """Llama-named tensors -> InternLM2 names. q/k/v of one layer are fused when all three are present;
    with `pending` (a dict kept across shards) parts whose partners are in a later shard wait there."""
    heads, kv, head_dim = _geometry(cfg)
    inverse = {v: k for k, v in _LAYER_RENAMES.items()}
    top = {v: k for k, v in _TOP_RENAMES.items()}
    pending = {} if pending is None else pending
    out: dict = {}
    for key, t in state.items():
        parts = _split_layer_key(key)
        if parts is not None and parts[1] in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            prefix, module, param = parts
            group = pending.setdefault((prefix, param), {})
            group[module[len("self_attn.")]] = t
            if len(group) == 3:
                del pending[(prefix, param)]
                out[f"{prefix}attention.wqkv.{param}"] = fuse_qkv(group["q"], group["k"], group["v"],
                                                                  heads, kv, head_dim)
            continue
        new = _renamed(key, inverse, top)
        if new is None:
            raise UserError(f"weight {key!r} has no InternLM2 equivalent; --layout internlm2 needs a plain Llama "
                            "causal LM converted from an InternLM2 base")
        out[new] = t
    return out


def weight_files(folder: Path) -> tuple[list, Optional[str]]:
    """(shard files in order, index file name or None) of a transformers checkpoint folder."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
            return sorted(set(weight_map.values())), index_name
        if (folder / single).is_file():
            return [single], None
    raise UserError(f"{folder}: no model.safetensors / pytorch_model.bin (nor their .index.json) to convert")


def _read_shard(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)


def convert_shards(src: Path, dst: Path, files: list, convert: Callable[[dict], dict]) -> None:
    """Convert each shard of `src` into a safetensors shard of `dst` (one shard in memory at a time)."""
    from safetensors.torch import save_file

    n = len(files)
    weight_map, total = {}, 0
    for i, name in enumerate(files):
        state = convert(_read_shard(src / name))
        out_name = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        # save_file refuses tensors sharing storage; clone views (split q/k/v are already contiguous copies).
        save_file({k: v.contiguous() for k, v in state.items()}, str(dst / out_name), metadata={"format": "pt"})
        for key, t in state.items():
            weight_map[key] = out_name
            total += t.numel() * t.element_size()
        del state
    if n > 1:
        fileio.write_json(dst / "model.safetensors.index.json",
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


# ---- cache -------------------------------------------------------------------------------------------

def cache_root() -> Path:
    base = os.environ.get("LLAVA_FT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llava_ft")
    return Path(base) / "models"


def source_key(folder) -> str:
    """Hash of the files the conversion reads (name, size, mtime) and the converter version."""
    folder = Path(folder)
    entries = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and (p.name == "config.json" or p.name.endswith(WEIGHT_SUFFIXES + (".index.json",))):
            st = p.stat()
            entries.append([p.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"version": CONVERTER_VERSION, "files": entries}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def converted_path(folder) -> Path:
    folder = Path(folder).resolve()
    return cache_root() / f"internlm2-{folder.name}-{source_key(folder)}"


def convert_to_llama(folder, out_dir=None) -> str:
    """The Llama folder of InternLM2 checkpoint `folder` (converted once, then reused from the cache)."""
    src = Path(folder).resolve()
    dst = Path(out_dir) if out_dir is not None else converted_path(src)
    if (dst / MARKER).is_file():
        return str(dst)
    try:
        return _convert_locked(src, dst)
    except OSError as err:
        if err.errno not in _UNWRITABLE:
            raise
        need = sum(p.stat().st_size for p in src.iterdir() if p.name.endswith(WEIGHT_SUFFIXES)) / 1e9
        raise UserError(f"cannot write the converted InternLM2 weights under {dst.parent} ({err.strerror or err}); "
                        f"they need about {need:.1f} GB: set LLAVA_FT_CACHE to a writable folder with room") from None


def _convert_locked(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(dst) + ".lock"):
        if (dst / MARKER).is_file():  # another process converted it while we waited
            return str(dst)
        cfg = read_config(src)
        llama_kwargs = llama_config_from_internlm2(cfg, where=str(src / "config.json"))
        files, _ = weight_files(src)
        tmp = fileio.staging_dir(dst)
        try:
            from transformers import LlamaConfig

            LlamaConfig(**llama_kwargs).save_pretrained(str(tmp))
            if (src / "generation_config.json").is_file():
                shutil.copyfile(src / "generation_config.json", tmp / "generation_config.json")
            convert_shards(src, tmp, files, lambda state: to_llama_state(state, cfg))
            fileio.write_json(tmp / MARKER, {"source": str(src), "key": source_key(src),
                                        "converter_version": CONVERTER_VERSION})
            fileio.publish_dir(tmp, dst)  # content and folder follow the umask (safetensors writes 0600)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(dst)


class _DropTypeWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "model of type `internlm2` to instantiate a model of type `llama`" not in record.getMessage()


def quiet_config_type_warning() -> None:
    """Silence transformers' "model of type internlm2 to instantiate llama" warning: PEFT reads the base
    folder's config with LlamaConfig when saving an adapter (to compare vocab sizes), which is expected here."""
    log = logging.getLogger("transformers.configuration_utils")
    if not any(isinstance(f, _DropTypeWarning) for f in log.filters):
        log.addFilter(_DropTypeWarning())


def source_of_converted(folder) -> Optional[str]:
    """The InternLM2 folder a converted cache folder came from (None for any other folder)."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    return json.loads(marker.read_text(encoding="utf-8")).get("source")
