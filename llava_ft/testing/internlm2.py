"""A tiny model folder in InternLM2's hub layout, built offline for tests.

    folder = build_tiny_internlm2("ws/internlm2", reference_dir="ws/llama")   # -> str path

A random-init LlamaForCausalLM (vocabulary = the tiny InternLM2 tokenizer's pieces) is saved at
`reference_dir` (when given) and fused into InternLM2's layout by this module's own code, written
independently of `llava_ft.model.internlm2_convert` so a test comparing the two checks the converter against a
second reading of the layout: `model.tok_embeddings`, `attention.wqkv` (per kv head: its query heads,
then k, then v), `attention.wo`, `feed_forward.w1/w3/w2`, `attention_norm`, `ffn_norm`, `model.norm`,
`output`. config.json is InternLM2's (`model_type: internlm2`, `bias`, `rope_theta`, `rope_scaling`,
`auto_map`). The auto_map's configuration/modeling files and the tokenizer's code raise when imported:
loading this folder proves no remote code runs. `shards=2` splits the weights over two safetensors files
with an index, as hub checkpoints are.

`save_internlm2_folder(out_dir, state, hub_config(...))` writes any InternLM2-named state dict in the same
hub layout (tests that build InternLM2 weights directly, with no Llama behind them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, os.PathLike]

_RAISING = '''"""Stand-in for InternLM2's remote {what}: llava_ft must never import it."""
raise ImportError("InternLM2 remote {what} was executed: llava_ft must run InternLM2 natively")
'''
AUTO_MAP = {
    "AutoConfig": "configuration_internlm2.InternLM2Config",
    "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
    "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM",
}


def _fused_state(llama_state: dict, heads: int, kv: int, head_dim: int) -> dict:
    """Llama weights -> InternLM2 names; wqkv assembled head by head (per kv head: queries, k, v)."""
    import torch

    group = heads // kv
    out = {}
    layers = sorted({int(k.split(".")[2]) for k in llama_state if k.startswith("model.layers.")})
    for i in layers:
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        for param in ("weight", "bias"):
            q = llama_state.get(f"{src}self_attn.q_proj.{param}")
            if q is None:
                continue
            k = llama_state[f"{src}self_attn.k_proj.{param}"]
            v = llama_state[f"{src}self_attn.v_proj.{param}"]
            rows = []
            for h in range(kv):
                for j in range(group):
                    qh = h * group + j
                    rows.append(q[qh * head_dim:(qh + 1) * head_dim])
                rows.append(k[h * head_dim:(h + 1) * head_dim])
                rows.append(v[h * head_dim:(h + 1) * head_dim])
            out[f"{dst}attention.wqkv.{param}"] = torch.cat(rows, dim=0).clone()
            o = llama_state.get(f"{src}self_attn.o_proj.{param}")
            if o is not None:
                out[f"{dst}attention.wo.{param}"] = o.clone()
        for ours, theirs in (("mlp.gate_proj", "feed_forward.w1"), ("mlp.up_proj", "feed_forward.w3"),
                             ("mlp.down_proj", "feed_forward.w2"), ("input_layernorm", "attention_norm"),
                             ("post_attention_layernorm", "ffn_norm")):
            out[f"{dst}{theirs}.weight"] = llama_state[f"{src}{ours}.weight"].clone()
    out["model.tok_embeddings.weight"] = llama_state["model.embed_tokens.weight"].clone()
    out["model.norm.weight"] = llama_state["model.norm.weight"].clone()
    if "lm_head.weight" in llama_state:
        out["output.weight"] = llama_state["lm_head.weight"].clone()
    return out


def build_tiny_internlm2(out_dir: PathLike, reference_dir: Optional[PathLike] = None, hidden_size: int = 64,
                         num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2,
                         intermediate_size: int = 128, bias: bool = False, rope_theta: float = 1e6,
                         rope_scaling: Optional[dict] = None, shards: int = 1, seed: int = 0) -> str:
    """Build the InternLM2-layout folder at `out_dir` (and the source Llama at `reference_dir`)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from llava_ft.fileio import publish_dir, staging_dir
    from llava_ft.testing.internlm2_tokenizer import VOCAB_SIZE

    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope.update(rope_type=rope_scaling["type"], factor=float(rope_scaling["factor"]))
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=hidden_size, intermediate_size=intermediate_size,
                         num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, max_position_embeddings=2048, rms_norm_eps=1e-5,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=False,
                         attention_bias=bias, rope_parameters=rope)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # norms start at 1 and biases at 0: randomise them so a swap would show
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    generation = GenerationConfig(bos_token_id=1, eos_token_id=[2, VOCAB_SIZE - 2], pad_token_id=2)
    if reference_dir is not None:
        model.generation_config = generation
        ref = staging_dir(reference_dir)
        model.save_pretrained(str(ref))
        publish_dir(ref, reference_dir)

    head_dim = hidden_size // num_heads
    state = _fused_state({k: v.detach() for k, v in model.state_dict().items()}, num_heads, num_kv_heads, head_dim)
    return save_internlm2_folder(out_dir, state, hub_config(
        hidden_size=hidden_size, intermediate_size=intermediate_size, num_layers=num_layers, num_heads=num_heads,
        num_kv_heads=num_kv_heads, bias=bias, rope_theta=rope_theta, rope_scaling=rope_scaling),
        shards=shards, seed=seed)


def hub_config(hidden_size: int, intermediate_size: int, num_layers: int, num_heads: int, num_kv_heads: int,
               bias: bool = False, rope_theta: float = 1e6, rope_scaling: Optional[dict] = None,
               max_position_embeddings: int = 2048) -> dict:
    """InternLM2's config.json for these sizes (vocabulary: the tiny InternLM2 tokenizer's)."""
    from llava_ft.testing.internlm2_tokenizer import VOCAB_SIZE

    return {
        "architectures": ["InternLM2ForCausalLM"], "attn_implementation": "eager", "auto_map": AUTO_MAP,
        "bias": bias, "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu", "hidden_size": hidden_size,
        "initializer_range": 0.02, "intermediate_size": intermediate_size,
        "max_position_embeddings": max_position_embeddings, "model_type": "internlm2",
        "num_attention_heads": num_heads, "num_hidden_layers": num_layers, "num_key_value_heads": num_kv_heads,
        "pad_token_id": 2, "rms_norm_eps": 1e-5, "rope_scaling": rope_scaling, "rope_theta": rope_theta,
        "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.41.0",
        "use_cache": True, "vocab_size": VOCAB_SIZE,
    }


def save_internlm2_folder(out_dir: PathLike, state: dict, config: dict, shards: int = 1, seed: int = 0) -> str:
    """Write InternLM2-named tensors `state` and `config` (see `hub_config`) at `out_dir` in the hub layout:
    safetensors shards (+ index), config.json, generation config, raising auto_map code, tokenizer files."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from llava_ft.fileio import publish_dir, staging_dir
    from llava_ft.testing.internlm2_tokenizer import VOCAB_SIZE, write_internlm2_tokenizer_files

    tmp = staging_dir(out_dir)
    keys = sorted(state)
    chunks = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        name = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: state[k].contiguous() for k in chunk}, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in chunk})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    GenerationConfig(bos_token_id=1, eos_token_id=[2, VOCAB_SIZE - 2], pad_token_id=2).save_pretrained(str(tmp))
    for module, what in (("configuration_internlm2.py", "configuration code"),
                         ("modeling_internlm2.py", "modeling code")):
        (Path(tmp) / module).write_text(_RAISING.format(what=what))
    write_internlm2_tokenizer_files(tmp, seed=seed)
    return publish_dir(tmp, out_dir)
