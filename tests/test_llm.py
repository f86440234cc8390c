"""LLM loading: auto dtype/attention on CPU, 4-bit NF4 double-quant layers, LoRA on every linear but lm_head,
and one-sentence UserErrors for missing model paths."""
from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from llava_ft.config import LoraSettings, ModelConfig
from llava_ft.errors import UserError
from llava_ft.model.llm import apply_lora, load_llm, resolve_attn_implementation, resolve_dtype


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choices")
def test_auto_choices_on_cpu(tiny_llama, capsys):
    assert resolve_dtype("auto") == torch.float32
    assert resolve_attn_implementation("auto")[0] == "sdpa"
    model, tok = load_llm(ModelConfig(llm=tiny_llama))
    line = capsys.readouterr().out
    assert "dtype float32" in line and "attention sdpa" in line and "no CUDA GPU" in line
    assert model.dtype == torch.float32 and model.config._attn_implementation == "sdpa"
    assert tok.pad_token is not None


def test_qlora_4bit_nf4_and_lora_targets(tiny_qwen2):
    m = ModelConfig(llm=tiny_qwen2, quantization="4bit", llm_lora=LoraSettings(enabled=True, r=4, alpha=8))
    model, _ = load_llm(m)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit)
    assert q_proj.weight.quant_type == "nf4" and q_proj.weight.quant_state.nested  # double quantization
    peft_model = apply_lora(model, m.llm_lora)
    targets = set(peft_model.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    ids = torch.tensor([[1, 5, 6, 7]])
    out = peft_model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_4bit_load_reads_shards_one_tensor_at_a_time(tiny_qwen2, tmp_path, monkeypatch):
    """A sharded checkpoint loads in 4 bits with no shard left memory-mapped while tensors are quantized,
    and the quantized weights are exactly those of transformers' own (mmap) load."""
    import os

    import bitsandbytes.functional as bf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(tiny_qwen2).save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(tiny_qwen2).save_pretrained(sharded)
    n_shards = len([f for f in os.listdir(sharded) if f.endswith(".safetensors")])
    assert n_shards >= 3
    mapped_during_quantization = []
    quantize = bf.quantize_4bit

    def watching(*args, **kwargs):  # counts the shard files mapped into this process right now
        with open("/proc/self/maps") as fh:
            mapped_during_quantization.append(len({line.split()[-1] for line in fh if line.rstrip().endswith(".safetensors")}))
        return quantize(*args, **kwargs)

    monkeypatch.setattr(bf, "quantize_4bit", watching)
    cfg = ModelConfig(llm=str(sharded), quantization="4bit")
    ours, _ = load_llm(cfg, for_training=False, verbose=False)
    ours_mapped = list(mapped_during_quantization)
    mapped_during_quantization.clear()
    monkeypatch.setenv("LLAVA_FT_TRANSFORMERS_LOAD", "1")
    theirs, _ = load_llm(cfg, for_training=False, verbose=False)
    assert ours_mapped and max(ours_mapped) == 0
    assert max(mapped_during_quantization) == n_shards  # the watch can see mapped shards
    a, b = dict(ours.named_parameters()), dict(theirs.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_8bit_loads(tiny_llama):
    model, _ = load_llm(ModelConfig(llm=tiny_llama, quantization="8bit", freeze_llm=True), for_training=False)
    assert isinstance(model.model.layers[0].mlp.up_proj, bnb.nn.Linear8bitLt)


@pytest.mark.parametrize("path", ["/no/such/model", "./missing_model", "~/nothing/here/at/all"])
def test_missing_model_path_is_one_sentence(path):
    with pytest.raises(UserError) as err:
        load_llm(ModelConfig(llm=path))
    msg = str(err.value)
    assert "does not exist" in msg and path in msg and "\n" not in msg


def test_folder_without_config_json(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        load_llm(ModelConfig(llm=str(tmp_path)))


def test_tokenizer_only_folder_is_accepted(tiny_llama, tiny_tokenizer):
    from pathlib import Path

    assert not (Path(tiny_tokenizer) / "config.json").exists()  # tokenizer files only
    model, tok = load_llm(ModelConfig(llm=tiny_llama, tokenizer=tiny_tokenizer), for_training=False)
    assert tok.name_or_path == tiny_tokenizer and tok("red")["input_ids"]


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_checkpointing_and_lora_raise_no_future_warning(tiny_llama, quantization):
    """transformers 5 deprecated gradient_checkpointing_enable / is_gradient_checkpointing (gone in v6)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model, _ = load_llm(ModelConfig(llm=tiny_llama, quantization=quantization, gradient_checkpointing=True))
        model = apply_lora(model, LoraSettings(enabled=True, r=4, alpha=8))
    assert model.base_model.model.model.gradient_checkpointing


def test_vision_lora_raises_no_future_warning(tiny_clip):
    import warnings

    from llava_ft.model.vision import apply_vision_lora, load_visual_encoder

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        ve = apply_vision_lora(load_visual_encoder(ModelConfig(llm="unused", visual_encoder=tiny_clip)),
                               LoraSettings(enabled=True, r=4, alpha=8, target_modules="all-linear"))
    assert any("lora_" in n for n, _ in ve.named_parameters())


@pytest.mark.parametrize("zero3_storage", [False, True])
def test_summary_counts_4bit_weights_as_the_values_they_hold(tiny_llama, monkeypatch, zero3_storage):
    """The start-of-run line reports the model's real size for 4-bit weights, in uint8 or (ZeRO-3) fp32 storage."""
    from llava_ft.model.builder import trainable_summary

    full, _ = load_llm(ModelConfig(llm=tiny_llama, freeze_llm=True), for_training=False)
    expected = sum(p.numel() for p in full.parameters())
    if zero3_storage:
        monkeypatch.setenv("LLAVA_FT_ZERO_STAGE", "3")
    quant, _ = load_llm(ModelConfig(llm=tiny_llama, quantization="4bit", dtype="fp32", freeze_llm=True),
                        for_training=False)
    storage = {p.dtype for p in quant.parameters() if type(p).__name__ == "Params4bit"}
    assert storage == ({torch.float32} if zero3_storage else {torch.uint8})
    assert f"/ {expected:,} params" in trainable_summary(quant)


@pytest.mark.smoke
@pytest.mark.skipif(__import__("llava_ft.model.internlm2_tokenizer", fromlist=["x"]).native_conversion_supported(),
                    reason="this transformers converts sentencepiece natively (tests/test_internlm2_tokenizer.py)")
def test_old_transformers_names_the_version_for_internlm2_tokenizers(tmp_path):
    """On transformers < 5.24 an InternLM2 tokenizer folder is one line naming the version to install."""
    from types import SimpleNamespace

    from llava_ft.errors import UserError
    from llava_ft.model.llm import load_tokenizer
    from llava_ft.testing.internlm2_tokenizer import build_internlm2_tokenizer

    folder = build_internlm2_tokenizer(tmp_path / "tok")
    with pytest.raises(UserError, match=r"needs transformers >= 5.24 .*pip install -U 'transformers>=5.24,<6'"):
        load_tokenizer(SimpleNamespace(llm=folder, tokenizer=None, trust_remote_code=False))
