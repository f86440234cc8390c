"""convert: pth_to_hf (PEFT adapter, full model, XTuner LLaVA layout, llava-hf) and merge, checked against
the model llava_ft itself runs (logits within 1e-4 in fp32, identical greedy answers)."""
from __future__ import annotations

import json
import random

import pytest
import torch

from llava_ft.convert import merge_adapter, pth_to_hf
from llava_ft.demo.assets import draw_shape
from llava_ft.errors import UserError
from llava_ft.inference import GenerationSettings, build_from_checkpoint, load_chat_model
from llava_ft.testing.checkpoints import write_random_checkpoint

QUESTION = [{"role": "user", "content": "What colour is the shape?"}]
GREEDY = GenerationSettings(max_new_tokens=8, temperature=0.0)


def _raw(llm, template="chatml", **model):
    return {"model": {"llm": llm, **model}, "data": {"template": template, "sources": [{"path": "unused.json"}]}}


def _image():
    return draw_shape("red", "circle", random.Random(0), 48)


@pytest.mark.smoke
@pytest.mark.parametrize("tower,quant", [("clip", "none"), ("siglip", "4bit")])
def test_llava_hf_export_equals_llava_ft(tmp_path, request, tiny_llama, tower, quant):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    ve = request.getfixturevalue(f"tiny_{tower}")
    pth = write_random_checkpoint(tmp_path / "run", _raw(
        tiny_llama, visual_encoder=ve, quantization=quant, freeze_llm=True,
        llm_lora={"enabled": True, "r": 8, "alpha": 16}, visual_encoder_lora={"enabled": True, "r": 4, "alpha": 8}))
    out = pth_to_hf(None, pth, tmp_path / "hf", fmt="llava-hf")

    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    cfg = hf.config
    assert cfg.vision_feature_select_strategy == ("default" if tower == "clip" else "full")
    assert cfg.vision_feature_layer == -2
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == cfg.image_token_id

    # Reference: the run rebuilt by llava_ft, LLM unquantized (LoRA applied, not merged).
    ref, tok, _ = build_from_checkpoint(pth, quantization="none", dtype="fp32")
    cm = load_chat_model(pth, bits=None, torch_dtype="fp32")
    cm.model = ref  # same weights; fp32 unquantized base even for the 4-bit run
    prompt = cm.encode(QUESTION, [_image()])
    with torch.no_grad():
        ref_logits = ref(input_ids=torch.tensor([prompt.ids]), pixel_values=prompt.pixel_values).logits

    # transformers' own path: chat template + processor expand <image> to the right count.
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION[0]["content"]}]}],
        add_generation_prompt=True)
    inputs = processor(images=_image(), text=text, return_tensors="pt")
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == ref.visual_encoder.num_image_tokens
    with torch.no_grad():
        hf_logits = hf(**inputs).logits
    vocab = ref_logits.shape[-1]
    assert hf_logits.shape[1] == ref_logits.shape[1]
    assert torch.allclose(hf_logits[..., :vocab], ref_logits, atol=1e-4)

    ours = cm.chat(QUESTION, [_image()], GREEDY)
    generated = hf.generate(**inputs, max_new_tokens=GREEDY.max_new_tokens, do_sample=False)
    theirs = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert ours.completion_tokens > 0 and theirs == ours.text
    # and the export loads back into llava_ft's chat with the same answer
    assert load_chat_model(out).chat(QUESTION, [_image()], GREEDY).text == ours.text


def test_llava_hf_refuses_what_transformers_cannot_hold(tmp_path, tiny_llama, tiny_clip):
    deep = write_random_checkpoint(tmp_path / "deep", _raw(tiny_llama, visual_encoder=tiny_clip, freeze_llm=True,
                                                           projector_depth=3))
    with pytest.raises(UserError, match="projector_depth=2"):
        pth_to_hf(None, deep, tmp_path / "x", fmt="llava-hf")
    text = write_random_checkpoint(tmp_path / "text", _raw(tiny_llama, llm_lora={"enabled": True, "r": 4}))
    with pytest.raises(UserError, match="LLaVA run"):
        pth_to_hf(None, text, tmp_path / "y", fmt="llava-hf")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.smoke
def test_text_lora_adapter_loads_alone_and_merges(tmp_path, tiny_llama):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llava_ft.model.llm import peft_quiet

    pth = write_random_checkpoint(tmp_path / "run", _raw(tiny_llama, template="qwen_chat",
                                                         llm_lora={"enabled": True, "r": 8, "alpha": 16}))
    adapter = pth_to_hf(None, pth, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "adapter_config.json").read_text())["base_model_name_or_path"] == tiny_llama

    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    ref, _, _ = build_from_checkpoint(pth)
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        with peft_quiet():
            peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter).eval()
        got = peft(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(base, want, atol=1e-3)  # the adapter really changes the model

    merged = merge_adapter(tiny_llama, adapter, tmp_path / "merged")
    with torch.no_grad():
        merged_logits = AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits
    assert torch.allclose(merged_logits, want, atol=1e-4)

    # every form of the run answers the same in chat, prompted with the run's template (read from disk)
    answers = {load_chat_model(src).chat(QUESTION, settings=GREEDY).text for src in (pth, adapter, merged)}
    answers.add(load_chat_model(tiny_llama, adapter=adapter).chat(QUESTION, settings=GREEDY).text)
    assert len(answers) == 1
    assert load_chat_model(merged).template.name == "qwen_chat"


def test_full_text_run_exports_a_full_model(tmp_path, tiny_qwen2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pth = write_random_checkpoint(tmp_path / "run", _raw(tiny_qwen2), scale=0.02)
    out = pth_to_hf(None, pth, tmp_path / "hf", fp32=True)
    ids = torch.tensor([[1, 5, 9, 70, 3]])
    ref, _, _ = build_from_checkpoint(pth)
    with torch.no_grad():
        assert torch.allclose(AutoModelForCausalLM.from_pretrained(out)(input_ids=ids).logits,
                              ref(input_ids=ids).logits, atol=1e-5)
    assert AutoTokenizer.from_pretrained(out).eos_token == "</s>"


@pytest.mark.smoke
def test_xtuner_layout_and_vision_merge(tmp_path, tiny_llama, tiny_clip):
    from transformers import CLIPVisionModel

    pth = write_random_checkpoint(tmp_path / "run", _raw(
        tiny_llama, visual_encoder=tiny_clip, freeze_llm=True,
        llm_lora={"enabled": True, "r": 8, "alpha": 16}, visual_encoder_lora={"enabled": True, "r": 4, "alpha": 8}))
    out = tmp_path / "xt"
    pth_to_hf(None, pth, out)
    for name in ("projector/config.json", "projector/model.safetensors", "llm_adapter/adapter_config.json",
                 "visual_encoder_adapter/adapter_config.json", "config.yaml", "llava_ft.json"):
        assert (out / name).is_file(), name
    assert not (out / "llm").exists() and not (out / "visual_encoder").exists()

    want = load_chat_model(pth).chat(QUESTION, [_image()], GREEDY).text
    assert load_chat_model(str(out)).chat(QUESTION, [_image()], GREEDY).text == want
    assert load_chat_model(tiny_llama, llava=str(out), visual_encoder=tiny_clip).chat(
        QUESTION, [_image()], GREEDY).text == want

    merged = merge_adapter(tiny_clip, out / "visual_encoder_adapter", tmp_path / "ve", is_clip=True)
    ref, _, _ = build_from_checkpoint(pth)
    pixels = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        a = ref.visual_encoder.model(pixel_values=pixels).last_hidden_state
        b = CLIPVisionModel.from_pretrained(merged)(pixel_values=pixels).last_hidden_state
    assert torch.allclose(a, b, atol=1e-4)
    assert (tmp_path / "ve" / "preprocessor_config.json").is_file()


def test_pretrain_checkpoint_exports_projector_only(tmp_path, tiny_llama, tiny_siglip):
    pth = write_random_checkpoint(tmp_path / "run", _raw(tiny_llama, visual_encoder=tiny_siglip, freeze_llm=True))
    out = tmp_path / "xt"
    pth_to_hf(None, pth, out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.yaml", "llava_ft.json", "projector"]


@pytest.mark.parametrize("tower", ["tiny_clip", "tiny_siglip"])
def test_llava_hf_export_pads_to_square_like_training(tmp_path, tiny_llama, tower, request):
    """A run trained with pad_image_to_square exports a processor that pads too: same logits on a wide image."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    raw = _raw(tiny_llama, visual_encoder=request.getfixturevalue(tower), freeze_llm=True,
               llm_lora={"enabled": True, "r": 8, "alpha": 16})
    raw["data"]["pad_image_to_square"] = True
    pth = write_random_checkpoint(tmp_path / "run", raw)
    out = pth_to_hf(None, pth, tmp_path / "hf", fmt="llava-hf")
    wide = _image().crop((0, 8, 48, 32))  # 48 x 24: padding changes what the tower sees

    ref, _, _ = build_from_checkpoint(pth, quantization="none", dtype="fp32")
    cm = load_chat_model(pth, bits=None, torch_dtype="fp32")
    cm.model = ref
    prompt = cm.encode(QUESTION, [wide])
    hf = LlavaForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION[0]["content"]}]}],
        add_generation_prompt=True)
    inputs = processor(images=wide, text=text, return_tensors="pt")
    assert torch.allclose(inputs["pixel_values"], prompt.pixel_values.to(inputs["pixel_values"].dtype), atol=1e-5)
    with torch.no_grad():
        ref_logits = ref(input_ids=torch.tensor([prompt.ids]), pixel_values=prompt.pixel_values).logits
        hf_logits = hf(**inputs).logits
    assert torch.allclose(hf_logits[..., :ref_logits.shape[-1]], ref_logits, atol=1e-4)
