"""InternLM2 run as Llama, end to end, with no remote code (the fixture's auto_map code raises on import):
conversion (logits equal the source Llama, shards, .bin, bias, cache reuse), exports in both layouts (the
InternLM2 layout bit-equal to the input), the README workflow on the tiny InternLM2 folder (QLoRA SFT ->
pth_to_hf -> merge both layouts -> chat; LLaVA pretrain -> finetune with image eval -> image chat ->
llava-hf loaded by plain transformers), and remote code in general: trust_remote_code off -> one line,
on -> eager fallback for a class without sdpa, loss kwargs not forced on a forward that lacks them, and a
missing import inside a model's code reported as such."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from llava_ft.cli import main
from llava_ft.config import CONFIG_ROOT, ModelConfig
from llava_ft.errors import UserError
from llava_ft.model.internlm2_tokenizer import native_conversion_supported
from llava_ft.model.llm import load_llm

# The tiny InternLM2 folders carry a sentencepiece tokenizer: loading them converts it (transformers >= 5.24).
needs_native_tokenizer = pytest.mark.skipif(not native_conversion_supported(),
                                            reason="native InternLM2 tokenizer conversion needs transformers >= 5.24")

IDS = torch.tensor([[1, 20, 30, 40, 50, 60, 7, 300], [1, 5, 9, 70, 3, 11, 12, 13]])


def _reference(folder: str):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(Path(folder).parent / "llama"), dtype=torch.float32).eval()


def _load(folder: str, **fields):
    model, tok = load_llm(ModelConfig(llm=str(folder), dtype="fp32", **fields), for_training=False)
    return model.eval(), tok


def _weights(folder) -> dict:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@needs_native_tokenizer
@pytest.mark.smoke
def test_internlm2_loads_as_llama_with_equal_logits(tiny_internlm2, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLAVA_FT_CACHE", str(tmp_path / "cache"))
    model, tok = _load(tiny_internlm2)
    out = capsys.readouterr().out
    assert f"InternLM2 checkpoint {tiny_internlm2} is run as Llama (converted weights cached at {tmp_path}" in out
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == "llama"
    assert model.config.rope_parameters["rope_theta"] == 1e6 and model.config.rms_norm_eps == 1e-5
    assert model.name_or_path == tiny_internlm2  # adapters trained on it name the InternLM2 folder as base
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, _reference(tiny_internlm2)(input_ids=IDS).logits,
                              atol=1e-6, rtol=0)
    assert tok.convert_tokens_to_ids("<|im_end|>") < model.config.vocab_size  # chat tokens inside the vocab

    cached = next((tmp_path / "cache" / "models").glob("internlm2-*/model.safetensors"))
    stamp = cached.stat().st_mtime_ns
    _load(tiny_internlm2)  # second run: the cached conversion is reused, not rewritten
    assert cached.stat().st_mtime_ns == stamp


@needs_native_tokenizer
def test_unwritable_cache_is_one_line(tiny_internlm2, tmp_path, monkeypatch):
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("LLAVA_FT_CACHE", str(tmp_path / "a_file" / "cache"))
    with pytest.raises(UserError, match="set LLAVA_FT_CACHE to a writable folder"):
        _load(tiny_internlm2)


@needs_native_tokenizer
@pytest.mark.parametrize("variant", ["sharded_bias_dynamic_rope", "pytorch_bin"])
def test_conversion_variants(tmp_path, monkeypatch, variant):
    from llava_ft.testing.internlm2 import build_tiny_internlm2

    monkeypatch.setenv("LLAVA_FT_CACHE", str(tmp_path / "cache"))
    if variant == "pytorch_bin":
        folder = build_tiny_internlm2(tmp_path / "internlm2", reference_dir=tmp_path / "llama", seed=1)
        state = load_file(str(Path(folder) / "model.safetensors"))
        torch.save(state, Path(folder) / "pytorch_model.bin")
        (Path(folder) / "model.safetensors").unlink()
    else:
        folder = build_tiny_internlm2(tmp_path / "internlm2", reference_dir=tmp_path / "llama", bias=True,
                                      shards=2, rope_scaling={"type": "dynamic", "factor": 2.0}, num_heads=8,
                                      num_kv_heads=2, seed=2)
    model, _ = _load(folder)
    if variant != "pytorch_bin":
        assert model.config.attention_bias and model.config.rope_parameters["rope_type"] == "dynamic"
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, _reference(folder)(input_ids=IDS).logits,
                              atol=1e-6, rtol=0)


def _internlm2_forward(state: dict, cfg: dict, ids: torch.Tensor) -> torch.Tensor:
    """InternLM2's causal LM forward in plain torch, read from its own modeling_internlm2.py (not from
    llava_ft's converter): wqkv rows grouped per kv head as [its query heads..., k, v] (`(h gs d)`,
    gs = queries per kv head + 2), query head h*gs+j attends with kv head h, rotate-half rotary with dynamic
    NTK scaling (base grown when the sequence is longer than max_position_embeddings), RMSNorm,
    w2(silu(w1 x) * w3 x), `output` head."""
    import math

    import torch.nn.functional as F

    hidden, heads, kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d, groups, eps = hidden // heads, heads // kv, cfg["rms_norm_eps"]
    batch, seq = ids.shape
    base, scaling, limit = cfg["rope_theta"], cfg.get("rope_scaling"), cfg["max_position_embeddings"]
    if scaling and scaling["type"] == "dynamic" and seq > limit:
        f = scaling["factor"]
        base = base * ((f * seq / limit) - (f - 1)) ** (d / (d - 2))
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    angles = torch.outer(torch.arange(seq, dtype=torch.float32), inv_freq).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()

    def rope(x):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin

    def rms(x, name):
        return state[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def linear(x, name):
        return F.linear(x, state[f"{name}.weight"], state.get(f"{name}.bias"))

    causal = torch.full((seq, seq), float("-inf")).triu(1)
    h = state["model.tok_embeddings.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        qkv = linear(rms(h, p + "attention_norm.weight"), p + "attention.wqkv").view(batch, seq, kv, groups + 2, d)
        q = rope(qkv[:, :, :, :groups].reshape(batch, seq, heads, d).transpose(1, 2))
        k = rope(qkv[:, :, :, -2].transpose(1, 2)).repeat_interleave(groups, dim=1)
        v = qkv[:, :, :, -1].transpose(1, 2).repeat_interleave(groups, dim=1)
        attn = ((q @ k.transpose(-1, -2)) / math.sqrt(d) + causal).softmax(-1) @ v
        h = h + linear(attn.transpose(1, 2).reshape(batch, seq, hidden), p + "attention.wo")
        x = rms(h, p + "ffn_norm.weight")
        h = h + linear(F.silu(linear(x, p + "feed_forward.w1")) * linear(x, p + "feed_forward.w3"),
                       p + "feed_forward.w2")
    return linear(rms(h, "model.norm.weight"), "output")


@needs_native_tokenizer
def test_converted_internlm2_equals_internlm2s_own_forward(tmp_path, monkeypatch):
    """Random weights made in InternLM2's own layout (no Llama behind them), converted by llava_ft and run
    by transformers' Llama, give the logits of InternLM2's forward written out above, with GQA (8 query
    heads on 2 kv heads), biases, and dynamic RoPE scaling engaged (40 tokens past a 16-position limit)."""
    from transformers import LlamaForCausalLM

    from llava_ft.model.internlm2_convert import convert_to_llama
    from llava_ft.testing.internlm2 import hub_config, save_internlm2_folder
    from llava_ft.testing.internlm2_tokenizer import VOCAB_SIZE

    monkeypatch.setenv("LLAVA_FT_CACHE", str(tmp_path / "cache"))
    hidden, inner, heads, kv, layers = 64, 96, 8, 2, 2
    cfg = hub_config(hidden_size=hidden, intermediate_size=inner, num_layers=layers, num_heads=heads,
                     num_kv_heads=kv, bias=True, rope_theta=10000.0, rope_scaling={"type": "dynamic", "factor": 2.0},
                     max_position_embeddings=16)
    qkv_rows = (heads + 2 * kv) * (hidden // heads)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape, scale=0.1, offset=0.0):
        return offset + scale * torch.randn(*shape, generator=gen)

    state = {"model.tok_embeddings.weight": rand(VOCAB_SIZE, hidden, scale=1.0),
             "model.norm.weight": rand(hidden, offset=1.0), "output.weight": rand(VOCAB_SIZE, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        state.update({
            p + "attention.wqkv.weight": rand(qkv_rows, hidden), p + "attention.wqkv.bias": rand(qkv_rows),
            p + "attention.wo.weight": rand(hidden, hidden), p + "attention.wo.bias": rand(hidden),
            p + "feed_forward.w1.weight": rand(inner, hidden), p + "feed_forward.w3.weight": rand(inner, hidden),
            p + "feed_forward.w2.weight": rand(hidden, inner),
            p + "attention_norm.weight": rand(hidden, offset=1.0), p + "ffn_norm.weight": rand(hidden, offset=1.0)})
    folder = save_internlm2_folder(tmp_path / "internlm2", state, cfg)
    ours = LlamaForCausalLM.from_pretrained(convert_to_llama(folder), dtype=torch.float32,
                                            attn_implementation="eager").eval()
    short = torch.randint(3, VOCAB_SIZE, (2, 12), generator=gen)
    long = torch.randint(3, VOCAB_SIZE, (2, 40), generator=gen)
    with torch.no_grad():
        for ids in (short, long):
            torch.testing.assert_close(ours(input_ids=ids).logits, _internlm2_forward(state, cfg, ids),
                                       atol=1e-5, rtol=1e-4)
        # The scaling changes the long sequence's logits, so the comparison above covers it.
        unscaled = _internlm2_forward(state, dict(cfg, rope_scaling=None), long)
        assert not torch.allclose(unscaled, _internlm2_forward(state, cfg, long), atol=1e-3)


@needs_native_tokenizer
@pytest.mark.parametrize("quantization,layer", [("4bit", "Linear4bit"), ("8bit", "Linear8bitLt")])
def test_quantized_loading_of_converted_weights(tiny_internlm2, quantization, layer):
    model, _ = _load(tiny_internlm2, quantization=quantization)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == layer
    with torch.no_grad():
        got = model(input_ids=IDS).logits.float().flatten()
        want = _reference(tiny_internlm2)(input_ids=IDS).logits.flatten()
    assert torch.nn.functional.cosine_similarity(got, want, dim=0) > 0.95  # quantized, not garbled


@needs_native_tokenizer
def test_full_run_exports_internlm2_layout(tiny_internlm2, tmp_path):
    from llava_ft.convert import pth_to_hf
    from llava_ft.inference import build_from_checkpoint
    from llava_ft.testing.checkpoints import write_random_checkpoint

    raw = {"model": {"llm": tiny_internlm2, "dtype": "fp32"},
           "data": {"template": "internlm2_chat", "sources": [{"path": "unused.json"}]}}
    pth = write_random_checkpoint(tmp_path / "run", raw, scale=0.02)
    with pytest.raises(UserError, match="always written in the Llama layout"):
        pth_to_hf(None, pth, tmp_path / "x", fmt="llava-hf", layout="internlm2")
    out = pth_to_hf(None, pth, tmp_path / "hf", layout="internlm2")
    assert "model.layers.1.attention.wqkv.weight" in _weights(out)
    assert (Path(out) / "modeling_internlm2.py").is_file() and (Path(out) / "tokenizer.model").is_file()
    ref, _, _ = build_from_checkpoint(pth)
    back, _ = _load(out)
    with torch.no_grad():
        assert torch.allclose(back(input_ids=IDS).logits, ref(input_ids=IDS).logits, atol=1e-5)


@needs_native_tokenizer
@pytest.mark.smoke
def test_export_in_internlm2_layout_is_bit_equal(tiny_internlm2, tmp_path):
    """A zero-effect LoRA (fresh adapter, B = 0) merged with --layout internlm2 gives back the input exactly."""
    from peft import LoraConfig, get_peft_model

    model, _ = _load(tiny_internlm2)
    get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"])) \
        .save_pretrained(str(tmp_path / "adapter"))
    out = tmp_path / "merged"
    assert main(["convert", "merge", tiny_internlm2, str(tmp_path / "adapter"), str(out), "--layout", "internlm2"]) == 0
    src, got = _weights(tiny_internlm2), _weights(out)
    assert sorted(got) == sorted(src)
    assert all(torch.equal(got[k], src[k]) for k in src)
    config = json.loads((out / "config.json").read_text())
    base = json.loads((Path(tiny_internlm2) / "config.json").read_text())
    assert config == base
    for name in ("modeling_internlm2.py", "configuration_internlm2.py", "tokenization_internlm2.py",
                 "tokenizer.model", "tokenizer_config.json"):
        assert (out / name).read_bytes() == (Path(tiny_internlm2) / name).read_bytes(), name
    assert json.loads((out / "llava_ft.json").read_text())["llm_layout"] == "internlm2"


def _recipe(name: str, tmp_path: Path, **sections) -> str:
    raw = yaml.safe_load((CONFIG_ROOT / "demo" / f"{name}.yaml").read_text())
    for section, values in sections.items():
        raw[section].update(values)
    raw["data"]["cache_dir"] = str(tmp_path / "data_cache")
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


FAST = {"max_steps": 2, "per_device_batch_size": 2, "logging_steps": 1, "save_steps": 2}


@needs_native_tokenizer
def test_text_workflow_on_internlm2(tiny_internlm2, demo_data, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    cfg = _recipe("tiny_text_sft_qlora", tmp_path,
                  model={"llm": tiny_internlm2, "llm_lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
                                                             "target_modules": "all-linear"}},
                  data={"sources": [{"path": demo_data["self_cognition"], "format": "openai"}],
                        "template": "internlm2_chat"},
                  train=FAST, evaluation={"every_n_steps": 1000, "max_new_tokens": 4})
    wd = tmp_path / "sft"
    assert main(["train", cfg, "--work-dir", str(wd)]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[llava_ft]")]
    assert "is run as Llama" in lines[0] and tiny_internlm2 in lines[0]
    state = torch.load(wd / "iter_2.pth", weights_only=True)["state_dict"]
    assert state and all(torch.isfinite(v).all() for v in state.values())
    assert any("q_proj" in k for k in state)  # LoRA on the Llama modules
    assert (wd / "eval_outputs_iter_2.txt").read_text().strip()  # eval-chat during training
    assert main(["log-dataset", cfg, "--show", "text", "-n", "1"]) == 0
    assert "<|im_start|>user" in capsys.readouterr().out

    adapter = tmp_path / "adapter"
    assert main(["convert", "pth_to_hf", cfg, str(wd / "iter_2.pth"), str(adapter)]) == 0
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_internlm2
    meta = json.loads((adapter / "llava_ft.json").read_text())
    assert meta["llm_layout"] == "llama" and meta["llm_architecture"] == "internlm2"

    merged, merged_i2 = tmp_path / "merged", tmp_path / "merged_internlm2"
    assert main(["convert", "merge", tiny_internlm2, str(adapter), str(merged)]) == 0
    assert main(["convert", "merge", tiny_internlm2, str(adapter), str(merged_i2), "--layout", "internlm2"]) == 0
    plain = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()  # plain transformers
    assert type(plain).__name__ == "LlamaForCausalLM"
    assert "model.layers.0.attention.wqkv.weight" in _weights(merged_i2)
    assert json.loads((merged_i2 / "config.json").read_text())["model_type"] == "internlm2"
    from llava_ft.inference import build_from_checkpoint

    ref, _, _ = build_from_checkpoint(str(wd / "iter_2.pth"), quantization="none", dtype="fp32")
    with torch.no_grad():
        want = ref(input_ids=IDS).logits
        assert torch.allclose(plain(input_ids=IDS).logits, want, atol=1e-4)
        back, _ = _load(str(merged_i2))  # the InternLM2-layout export loads back through the conversion
        assert torch.allclose(back(input_ids=IDS).logits, want, atol=1e-4)

    capsys.readouterr()
    answers = []
    for model in (str(merged), str(merged_i2)):
        assert main(["chat", model, "--prompt", "Who are you?", "--max-new-tokens", "6", "--temperature", "0",
                     "--no-streamer"]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] and answers[0].strip()


@needs_native_tokenizer
def test_adapter_for_internlm2_layout_is_refused(tiny_internlm2, tmp_path):
    from llava_ft.inference import load_chat_model

    adapter = tmp_path / "xtuner_adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "base_model_name_or_path": tiny_internlm2,
        "target_modules": ["wqkv", "wo", "w1", "w2", "w3"], "task_type": "CAUSAL_LM"}))
    with pytest.raises(UserError, match="targets InternLM2's own layout"):
        load_chat_model(tiny_internlm2, adapter=str(adapter), prompt_template="internlm2_chat")
    with pytest.raises(UserError, match="targets InternLM2's own layout"):
        from llava_ft.convert import merge_adapter

        merge_adapter(tiny_internlm2, adapter, tmp_path / "out")


@needs_native_tokenizer
def test_llava_workflow_on_internlm2(tiny_internlm2, tiny_clip, demo_data, tmp_path, capsys):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    image = str(Path(demo_data["image_folder"]) / "eval" / "eval_00000.png")
    common = {"llm": tiny_internlm2, "visual_encoder": tiny_clip}
    data = {"template": "internlm2_chat", "max_length": 128}
    evaluation = {"images": [image], "every_n_steps": 1000, "max_new_tokens": 4}
    pre = _recipe("tiny_llava_pretrain", tmp_path, model=common,
                  data={**data, "sources": [{"path": demo_data["pretrain"], "format": "llava",
                                             "image_folder": demo_data["image_folder"]}]},
                  train=FAST, evaluation=evaluation)
    assert main(["pretrain", pre, "--work-dir", str(tmp_path / "pre")]) == 0
    fin = _recipe("tiny_llava_finetune_qlora", tmp_path,
                  model={**common, "pretrained_pth": str(tmp_path / "pre" / "iter_2.pth"),
                         "llm_lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0,
                                      "target_modules": "all-linear"}},
                  data={**data, "sources": [{"path": demo_data["finetune"], "format": "llava",
                                             "image_folder": demo_data["image_folder"]}]},
                  train=FAST, evaluation=evaluation)
    assert main(["finetune", fin, "--work-dir", str(tmp_path / "fin")]) == 0
    assert (tmp_path / "fin" / "eval_outputs_iter_2.txt").read_text().strip()  # image eval during training
    capsys.readouterr()

    assert main(["chat", str(tmp_path / "fin"), "--image", image, "--prompt", "What colour is the shape?",
                 "--max-new-tokens", "4", "--temperature", "0", "--no-streamer"]) == 0
    answer = capsys.readouterr().out.splitlines()[-1]  # after the run's [llava_ft] loading lines
    assert answer.strip()
    xtuner = tmp_path / "xtuner"  # XTuner layout: projector/ + llm_adapter/ (+ tower adapter), LLM from the run
    assert main(["convert", "pth_to_hf", fin, str(tmp_path / "fin" / "iter_2.pth"), str(xtuner)]) == 0
    capsys.readouterr()
    assert main(["chat", str(xtuner), "--image", image, "--prompt", "What colour is the shape?", "--bits", "4",
                 "--max-new-tokens", "4", "--temperature", "0", "--no-streamer"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == answer
    predictions = tmp_path / "predictions.jsonl"
    assert main(["eval", str(tmp_path / "fin"), "--data", demo_data["eval"], "--image-folder",
                 demo_data["image_folder"], "--max-new-tokens", "3", "--output", str(predictions)]) == 0
    assert len(predictions.read_text().splitlines()) == 15

    out = tmp_path / "llava_hf"
    assert main(["convert", "pth_to_hf", fin, str(tmp_path / "fin" / "iter_2.pth"), str(out),
                 "--format", "llava-hf"]) == 0
    hf = LlavaForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.config.text_config.model_type == "llama"
    processor = AutoProcessor.from_pretrained(str(out))
    from PIL import Image

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}],
        add_generation_prompt=True)
    inputs = processor(images=Image.open(image).convert("RGB"), text=text, return_tensors="pt")
    generated = hf.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]


# ---- remote code in general ------------------------------------------------------------------------

_REMOTE_CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "tinyremote"
'''
# A model class as older remote code writes it: no sdpa support, and a forward without **kwargs.
_REMOTE_MODEL = '''{extra_import}from transformers import LlamaForCausalLM

from .configuration_tinyremote import TinyRemoteConfig


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
    _supports_sdpa = False
    _supports_flash_attn = False

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                logits_to_keep=0):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               cache=cache, inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                               logits_to_keep=logits_to_keep)
'''


def _remote_folder(tiny_llama: str, out: Path, extra_import: str = "") -> str:
    shutil.copytree(tiny_llama, out)
    config = json.loads((out / "config.json").read_text())
    config.update(model_type="tinyremote", architectures=["TinyRemoteForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
                            "AutoModelForCausalLM": "modeling_tinyremote.TinyRemoteForCausalLM"})
    (out / "config.json").write_text(json.dumps(config))
    (out / "configuration_tinyremote.py").write_text(_REMOTE_CONFIG)
    (out / "modeling_tinyremote.py").write_text(_REMOTE_MODEL.format(extra_import=extra_import))
    return str(out)


def _sft_cfg(tmp_path: Path, llm: str, demo_data, **model) -> str:
    return _recipe("tiny_text_sft_qlora", tmp_path,
                   model={"llm": llm, "quantization": "none", "attn_implementation": "auto", **model},
                   data={"sources": [{"path": demo_data["self_cognition"], "format": "openai"}]},
                   train={**FAST, "gradient_accumulation_steps": 2}, evaluation={"every_n_steps": 1000})


def test_remote_code_needs_the_setting_then_runs_eager_without_loss_kwargs(tiny_llama, demo_data, tmp_path, capsys):
    folder = _remote_folder(tiny_llama, tmp_path / "remote")
    cfg = _sft_cfg(tmp_path, folder, demo_data)
    assert main(["train", cfg, "--work-dir", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.trust_remote_code=true" in err[0] and "tinyremote" in err[0]

    # Allowed: the class lacks sdpa -> eager, said so; its forward lacks num_items_in_batch -> not passed.
    assert main(["train", cfg, "--work-dir", str(tmp_path / "b"), "model.trust_remote_code=true"]) == 0
    out = capsys.readouterr().out
    assert "attention eager (TinyRemoteForCausalLM does not support sdpa" in out
    state = torch.load(tmp_path / "b" / "iter_2.pth", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())
    # chat/eval/serve load the run with the trust setting and attention it recorded
    from llava_ft.inference import load_chat_model

    cm = load_chat_model(str(tmp_path / "b"))
    assert type(cm.model.llm.get_base_model()).__name__ == "TinyRemoteForCausalLM"
    assert cm.model.llm.get_base_model().config._attn_implementation == "eager"
    # and answers: stop words reach generate as a stopping criterion, never as a `tokenizer` keyword that
    # would land in a forward without **kwargs
    from llava_ft.inference import GenerationSettings

    answer = cm.chat([{"role": "user", "content": "Who are you?"}], settings=GenerationSettings(max_new_tokens=4))
    assert answer.completion_tokens > 0


def test_loss_kwargs_reach_only_a_forward_that_takes_them(tiny_llama, tmp_path):
    from llava_ft.model.llava import LlavaFtModel

    folder = _remote_folder(tiny_llama, tmp_path / "remote")
    old, _ = _load(folder, trust_remote_code=True)
    new, _ = _load(tiny_llama)
    assert not LlavaFtModel(old).accepts_loss_kwargs and LlavaFtModel(new).accepts_loss_kwargs
    labels = IDS.clone()
    out = LlavaFtModel(old)(input_ids=IDS, labels=labels, num_items_in_batch=torch.tensor(7))
    assert torch.isfinite(out.loss)
    plain = LlavaFtModel(new)(input_ids=IDS, labels=labels).loss
    summed = LlavaFtModel(new)(input_ids=IDS, labels=labels, num_items_in_batch=torch.tensor(7)).loss
    assert not torch.allclose(plain, summed)  # Llama does use it: the loss is a sum over 7 items


def test_missing_import_inside_model_code_is_named(tiny_llama, tmp_path):
    folder = _remote_folder(tiny_llama, tmp_path / "remote",
                            extra_import="from transformers.modeling_gone_utils import AttentionMaskConverter\n")
    with pytest.raises(UserError) as info:
        _load(folder, trust_remote_code=True)
    message = str(info.value)
    assert "modeling_tinyremote.py imports 'transformers.modeling_gone_utils'" in message
    assert "missing package" not in message and "\n" not in message


@needs_native_tokenizer
def test_data_stats_counts_with_the_native_internlm2_tokenizer(tiny_internlm2, tmp_path):
    """`data stats --tokenizer <InternLM2 folder>` tokenizes as training does (the converted tokenizer; the
    folder's remote tokenizer code raises if imported)."""
    import json

    from llava_ft.cli import main
    from llava_ft.model.internlm2_tokenizer import load_internlm2_tokenizer

    data = tmp_path / "d.jsonl"
    text = "你好, world 123 🙂"
    data.write_text(json.dumps({"text": text}) + "\n")
    out = tmp_path / "stats.json"
    assert main(["data", "stats", "--data", str(data), "--format", "text", "--tokenizer", tiny_internlm2,
                 "--json", str(out), "--plot", str(tmp_path / "p.png")]) == 0
    figures = json.loads(out.read_text())
    from llava_ft.data.encode import encode_record

    sample = encode_record({"id": "0", "text": text}, load_internlm2_tokenizer(tiny_internlm2), "default", 2048).sample
    assert figures["text_length"]["p100"] == len(sample["input_ids"]), figures
