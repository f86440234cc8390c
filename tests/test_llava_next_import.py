"""Continue from released LLaVA-NeXT / LLaVA-OneVision checkpoints (`model.llava`): tiny models built with
transformers' own classes (llava_ft.testing.llava_next) load into llava_ft with LoRA applied, and before any
training step give transformers' logits (fp32, 1e-5) on transformers' own inputs (processor + chat template)
for a square, a wide, a tall and a tiny image, two images in one prompt and a text-only prompt. The token
counts data preparation computes from image headers equal what the checkpoint's processor expands."""
from __future__ import annotations

import random

import pytest
import torch

from llava_ft import IMAGE_TOKEN_INDEX
from llava_ft.config import config_from_dict
from llava_ft.errors import UserError
from llava_ft.model.builder import build_model
from llava_ft.model.llava_hf_import import CLASSES
from llava_ft.demo.assets import draw_shape
from llava_ft.testing.llava_next import build_tiny_llava_next, build_tiny_llava_onevision

LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
# (width, height): square, wide, tall, tiny; 90x90 needs 3x3 tiles, more than OneVision's anyres_max_4 here.
SIZES = {"square": (90, 90), "wide": (96, 30), "tall": (30, 80), "tiny": (7, 5)}


@pytest.fixture(scope="module")
def families(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("released_next")
    return {
        "llava_next": build_tiny_llava_next(root / "next", tiny_tokenizer),
        "llava_onevision": build_tiny_llava_onevision(root / "ov", tiny_tokenizer, max_tiles=4),
    }


def _image(size, seed=1):
    return draw_shape("red", "circle", random.Random(seed), 96).resize(size)


def _cfg(folder, tmp_path, template):
    return config_from_dict({
        "name": "continued", "model": {"llava": folder, "freeze_llm": True, "llm_lora": LORA, "dtype": "fp32"},
        "data": {"sources": [{"path": "unused.json"}], "template": template, "cache_dir": str(tmp_path / "c")},
    })


def _hf_model(folder):
    from transformers import AutoConfig, LlavaNextForConditionalGeneration, LlavaOnevisionForConditionalGeneration

    cls = {"llava_next": LlavaNextForConditionalGeneration,
           "llava_onevision": LlavaOnevisionForConditionalGeneration}[AutoConfig.from_pretrained(folder).model_type]
    return cls.from_pretrained(folder, dtype=torch.float32).eval()


def _collapse(ids, image_token_id):
    """transformers' expanded prompt -> llava_ft's: each run of image tokens becomes one IMAGE_TOKEN_INDEX."""
    out = []
    for t in ids:
        if t != image_token_id:
            out.append(t)
        elif not out or out[-1] != IMAGE_TOKEN_INDEX:
            out.append(IMAGE_TOKEN_INDEX)
    return out


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_logits_equal_transformers_before_training(families, family, tmp_path, capsys):
    from transformers import AutoProcessor

    folder = families[family]
    hf = _hf_model(folder)
    processor = AutoProcessor.from_pretrained(folder)
    model, _ = build_model(_cfg(folder, tmp_path, "hf"))
    assert f"{CLASSES[family]} -> LLM" in capsys.readouterr().out
    model.eval()
    spec = model.visual_encoder.anyres
    image_id = hf.config.image_token_id
    cases = {name: [_image(size)] for name, size in SIZES.items()}
    cases["two images"] = [_image(SIZES["wide"], 2), _image(SIZES["square"], 3)]
    cases["text only"] = []
    for name, images in cases.items():
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What is the shape?"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        # One nested list = one sample's images (OneVision's processor applies its multi-image rule to them).
        inputs = processor(images=[images] if images else None, text=text, return_tensors="pt")
        with torch.no_grad():
            want = hf(**inputs).logits
        ids = _collapse(inputs["input_ids"][0].tolist(), image_id)
        kwargs = {}
        if images:
            pixel_values, sizes = spec.sample_views(images)
            kwargs = {"pixel_values": pixel_values, "image_sizes": sizes}
            # data preparation's count (image headers only) = the processor's expansion
            n_hf = int((inputs["input_ids"] == image_id).sum())
            assert spec.count_sample(images) == n_hf, name
        with torch.no_grad():
            got = model(input_ids=torch.tensor([ids]), **kwargs).logits
        assert got.shape == want.shape, name
        assert torch.allclose(got, want, atol=1e-5), f"{family} {name}: {(got - want).abs().max()}"


def test_onevision_multi_image_and_shrink_rules(families, tmp_path):
    """OneVision's own rules are in play in the tiny model: two images are single views (base + newline),
    and the 90x90 image's 3x3-tile grid is shrunk to anyres_max_4 (fewer tokens than unshrunk)."""
    model, _ = build_model(_cfg(families["llava_onevision"], tmp_path, "hf"))
    spec = model.visual_encoder.anyres
    assert spec.count_sample([_image(SIZES["wide"]), _image(SIZES["square"])]) == 2 * (spec.base_tokens + 1)
    side = spec.patches_per_side
    unshrunk = spec.base_tokens + 3 * side * (3 * side + 1)
    assert spec.max_tiles == 4 and spec.num_tokens((90, 90)) < unshrunk


def test_refuses_other_model_types(tiny_llama, tmp_path):
    with pytest.raises(UserError, match="model_type is 'llama'.*LlavaNextForConditionalGeneration"):
        build_model(_cfg(tiny_llama, tmp_path, "vicuna"))


def test_current_key_layout_loads_the_same(families, tmp_path):
    """A OneVision checkpoint saved with transformers' current names (model.language_model.*, model.image_newline,
    ...) loads like the older layout save_pretrained writes (language_model.model.*, image_newline)."""
    import shutil

    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "current"
    shutil.copytree(families["llava_onevision"], renamed)
    for file in renamed.glob("*.safetensors"):
        state = load_file(str(file))
        assert "image_newline" in state and any(k.startswith("language_model.model.") for k in state)
        moved = {}
        for k, v in state.items():
            k = k.replace("language_model.model.", "model.language_model.", 1).replace("language_model.lm_head.",
                                                                                       "lm_head.", 1)
            if k.startswith(("vision_tower.", "multi_modal_projector.", "image_newline")):
                k = "model." + k
            moved[k] = v
        save_file(moved, str(file), metadata={"format": "pt"})
    old, _ = build_model(_cfg(families["llava_onevision"], tmp_path, "hf"))
    new, _ = build_model(_cfg(str(renamed), tmp_path, "hf"))
    a, b = old.state_dict(), new.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a if "lora_" not in k)


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_training_tokens_equal_the_checkpoints_processor(families, family, tmp_path):
    """With data.template=hf a run trains on exactly the ids the checkpoint's processor + chat template make
    for the conversation (LLaVA-NeXT's tokenizer adds BOS itself; OneVision's ChatML has none), and only
    the answers (with their end-of-turn token) are supervised."""
    from transformers import AutoProcessor

    from llava_ft import IGNORE_INDEX
    from llava_ft.data.encode import encode_record

    folder = families[family]
    processor = AutoProcessor.from_pretrained(folder)
    model, tokenizer = build_model(_cfg(folder, tmp_path, "hf"), for_training=False)
    path = tmp_path / "img.png"
    _image(SIZES["wide"]).save(path)
    record = {"id": "s1", "images": [str(path)], "messages": [
        {"role": "user", "content": "<image>\nWhat is the shape?"}, {"role": "assistant", "content": "A circle."},
        {"role": "user", "content": "And its colour?"}, {"role": "assistant", "content": "Red."}]}
    sample = encode_record(record, tokenizer, "hf", max_length=4096,
                           num_image_tokens=model.visual_encoder.anyres.token_counter()).sample
    chat = [{"role": m["role"], "content": ([{"type": "image"}] if i == 0 else []) + [
        {"type": "text", "text": m["content"].replace("<image>\n", "")}]} for i, m in enumerate(record["messages"])]
    text = processor.apply_chat_template(chat)
    want = processor(images=[[_image(SIZES["wide"])]], text=text, return_tensors="pt")["input_ids"][0].tolist()
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert sample["input_ids"] == _collapse(want, image_id)
    assert sample["length"] == len(want)  # the image's feature count was known from its header
    if family == "llava_next":
        assert sample["input_ids"][0] == tokenizer.bos_token_id
    supervised = tokenizer.decode([t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab != IGNORE_INDEX])
    end = tokenizer.eos_token if family == "llava_next" else "<|im_end|>"
    assert supervised.replace(" ", "").replace("\n", "") == f"Acircle.{end}Red.{end}".replace(" ", "")


def _train_cfg(folder, demo_data, tmp_path, **data):
    return config_from_dict({
        "name": "continued",
        "model": {"llava": folder, "quantization": "4bit", "llm_lora": LORA, "visual_encoder_lora": LORA,
                  "dtype": "fp32"},
        "data": {"sources": [{"path": demo_data["finetune"], "format": "llava",
                              "image_folder": demo_data["image_folder"]}],
                 "template": "hf", "max_length": 512, "cache_dir": str(tmp_path / "cache"), **data},
        "train": {"learning_rate": 1e-2, "per_device_batch_size": 2, "max_steps": 2, "save_steps": 2,
                  "logging_steps": 1, "warmup_ratio": 0.0, "seed": 0, "group_by_length": True},
    })


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_log_dataset_shows_a_model_llava_config(families, family, demo_data, tmp_path, capsys):
    import json

    import yaml

    from llava_ft.cli import main

    path = tmp_path / "cfg.yaml"
    raw = {"model": {"llava": families[family]}, "data": {
        "sources": [{"path": demo_data["finetune"], "format": "llava", "image_folder": demo_data["image_folder"]}],
        "template": "hf", "max_length": 512, "cache_dir": str(tmp_path / "cache")}}
    path.write_text(yaml.safe_dump(raw))
    assert main(["log-dataset", str(path), "--json", "-n", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert rows and IMAGE_TOKEN_INDEX in rows[0]["input_ids"]


@pytest.mark.parametrize("family", ["llava_next", "llava_onevision"])
def test_qlora_run_exports_back_to_the_same_class(families, family, demo_data, tmp_path):
    """QLoRA on the LLM, LoRA on the tower, projector and newline trainable, packed rows: two steps change
    exactly those weights; `--format llava-hf` writes the checkpoint's class with its processor, chat
    template and end-of-turn stop ids, and transformers' logits on it equal llava_ft's (LoRA merged, fp32)."""
    from transformers import AutoConfig, AutoProcessor

    from llava_ft.checkpoint import load_iter_checkpoint
    from llava_ft.convert import pth_to_hf
    from llava_ft.engine import run_training
    from llava_ft.inference.loader import build_from_checkpoint

    folder = families[family]
    cfg = _train_cfg(folder, demo_data, tmp_path, pack_to_max_length=True)
    model, _ = build_model(cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "projector.image_newline" in trainable
    assert any(n.startswith("visual_encoder.") and "lora_" in n for n in trainable)
    assert all("lora_" in n for n in trainable if n.startswith("llm."))
    result = run_training(cfg, work_dir=str(tmp_path / "wd"))
    assert result.global_step == 2
    state = load_iter_checkpoint(result.last_checkpoint)["state_dict"]
    assert set(state) == trainable
    assert not torch.equal(state["projector.image_newline"], model.projector.image_newline.detach())

    out = pth_to_hf(None, result.last_checkpoint, tmp_path / "hf", fmt="llava-hf")
    assert AutoConfig.from_pretrained(out).model_type == family
    processor = AutoProcessor.from_pretrained(out)
    assert type(processor).__name__ == type(AutoProcessor.from_pretrained(folder)).__name__
    assert processor.chat_template == AutoProcessor.from_pretrained(folder).chat_template
    hf = _hf_model(out)
    end = processor.tokenizer.eos_token_id if family == "llava_next" else \
        processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in list(hf.generation_config.eos_token_id if isinstance(hf.generation_config.eos_token_id, list)
                       else [hf.generation_config.eos_token_id])
    ours, _, _ = build_from_checkpoint(str(result.last_checkpoint), quantization="none", dtype="fp32")
    ours.eval()
    for images in ([_image(SIZES["wide"])], [_image(SIZES["tall"]), _image(SIZES["square"])]):
        content = [{"type": "image"} for _ in images] + [{"type": "text", "text": "What is the shape?"}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=[images], text=text, return_tensors="pt")
        pixel_values, sizes = ours.visual_encoder.anyres.sample_views(images)
        with torch.no_grad():
            want = hf(**inputs).logits
            got = ours(input_ids=torch.tensor([_collapse(inputs["input_ids"][0].tolist(), hf.config.image_token_id)]),
                       pixel_values=pixel_values, image_sizes=sizes).logits
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_a_named_template_must_reproduce_the_checkpoints_format(families, tmp_path):
    """A named template that encodes a probe conversation differently from the checkpoint's own chat template
    is refused before the LLM loads, showing where they differ and naming data.template: hf."""
    from transformers import AutoTokenizer

    from llava_ft.data.checkpoint_template import template_mismatch

    with pytest.raises(UserError, match="data.template='vicuna' does not give the prompt format.*data.template: hf"):
        build_model(_cfg(families["llava_onevision"], tmp_path, "vicuna"))
    next_tok = AutoTokenizer.from_pretrained(families["llava_next"])
    assert template_mismatch("hf", None, next_tok) is None
    # the released mistral format puts a space before the answer; XTuner's mistral template does not
    problem = template_mismatch("mistral", None, next_tok)
    assert "[/INST]A cat.</s>" in problem and "[/INST] A cat.</s>" in problem, problem


def test_chat_on_the_run_and_its_export(families, tmp_path):
    """A OneVision run answers the same through its iter file and its LlavaOnevision export (transformers'
    model behind llava_ft chat): one wide image, two images (single views), a text-only turn."""
    from llava_ft.inference import GenerationSettings, load_chat_model
    from llava_ft.convert import pth_to_hf
    from llava_ft.testing.checkpoints import write_random_checkpoint

    pth = write_random_checkpoint(tmp_path / "run", {
        "model": {"llava": families["llava_onevision"], "freeze_llm": True, "llm_lora": LORA, "dtype": "fp32"},
        "data": {"template": "hf", "sources": [{"path": "unused.json"}]}})
    hf = pth_to_hf(None, pth, tmp_path / "hf", fmt="llava-hf")
    greedy = GenerationSettings(max_new_tokens=5, temperature=0.0)
    question = [{"role": "user", "content": "What colour is it?"}]
    turns = ([_image(SIZES["wide"])], [_image(SIZES["tall"]), _image(SIZES["square"])], [])
    answers = {}
    for name, artifact in (("pth", pth), ("llava_hf", hf)):
        cm = load_chat_model(artifact, torch_dtype="fp32")
        assert type(cm.anyres).__name__ == "ReleasedAnyResSpec", name
        answers[name] = [cm.chat(question, images, greedy) for images in turns]
        two = cm.encode(question, turns[1])  # OneVision's multi-image rule: one view each, base + newline
        assert two.image_tokens == (cm.anyres.base_tokens + 1,) * 2 and two.image_sizes.tolist() == [[0, 0]] * 2
        assert two.length == len(two.ids) - 2 + 2 * (cm.anyres.base_tokens + 1)
    for ours, theirs in zip(answers["pth"], answers["llava_hf"]):
        assert ours.text == theirs.text and ours.prompt_tokens == theirs.prompt_tokens
    assert answers["pth"][2].completion_tokens > 0


def test_chat_takes_a_video_clip_like_transformers(families, tmp_path):
    """A clip in a chat prompt (OneVision): the export's greedy answer equals transformers'
    LlavaOnevisionForConditionalGeneration.generate on the processor's video inputs for the same frames, the
    iter_N.pth run answers the same, and a clip next to an image, a `<video>` marker and the refusals work."""
    from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

    from llava_ft.convert import pth_to_hf
    from llava_ft.data.videos import load_video_frames
    from llava_ft.inference import GenerationSettings, load_chat_model
    from llava_ft.testing.checkpoints import write_random_checkpoint
    from llava_ft.testing.llava_next import write_test_video

    pth = write_random_checkpoint(tmp_path / "run", {
        "model": {"llava": families["llava_onevision"], "freeze_llm": True, "llm_lora": LORA, "dtype": "fp32"},
        "data": {"template": "hf", "video_frames": 4, "sources": [{"path": "unused.json"}]}})
    export = pth_to_hf(None, pth, tmp_path / "hf", fmt="llava-hf")
    clip = write_test_video(tmp_path / "clip.mp4", frames=10)
    greedy = GenerationSettings(max_new_tokens=6, temperature=0.0)
    question = "What moves?"

    hf = LlavaOnevisionForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(export)
    frames = load_video_frames(clip, 4)  # the run's data.video_frames, carried into the export
    content = [{"type": "video"}, {"type": "text", "text": question}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(videos=[frames], text=text, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=6, do_sample=False)
    want = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

    answers, models = {}, {}
    for name, artifact in (("llava_hf", export), ("pth", pth)):
        cm = models[name] = load_chat_model(artifact, torch_dtype="fp32")
        assert cm.supports_video, name
        answers[name] = cm.chat([{"role": "user", "content": f"<video>\n{question}"}], [clip], greedy)
        assert answers[name].prompt_tokens == inputs["input_ids"].shape[1], name
        mixed = cm.chat([{"role": "user", "content": f"<image>\n<video>\n{question}"}],
                        [_image(SIZES["wide"]), clip], greedy)
        answers[name + " mixed"] = mixed
    assert want and answers["llava_hf"].completion_tokens == 6
    assert answers["llava_hf"].text == want and answers["pth"].text == want
    assert answers["llava_hf mixed"].text == answers["pth mixed"].text
    assert answers["llava_hf mixed"].prompt_tokens == answers["pth mixed"].prompt_tokens

    # `llava_ft chat --video` and `llava_ft eval` with "video" records (batched with an image+clip row)
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "llava_ft", "chat", export, "--video", clip, "--prompt", question,
                           "--temperature", "0", "--max-new-tokens", "6", "--no-streamer", "--torch-dtype", "fp32"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith(want + "\n"), (proc.stdout, want)
    picture = tmp_path / "wide.png"
    _image(SIZES["wide"]).save(picture)
    rows = [{"id": "v", "video": "clip.mp4", "question": f"<video>\n{question}", "answer": want},
            {"id": "iv", "image": "wide.png", "video": "clip.mp4", "question": f"<image>\n<video>\n{question}",
             "answer": answers["llava_hf mixed"].text}]
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = subprocess.run([sys.executable, "-m", "llava_ft", "eval", export, "--data", str(data), "--image-folder",
                           str(tmp_path), "--batch-size", "2", "--max-new-tokens", "6", "--output",
                           str(tmp_path / "preds.jsonl"), "--torch-dtype", "fp32"], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["exact_match"] == 1.0

    short = write_test_video(tmp_path / "short.mp4", frames=2)
    with pytest.raises(UserError, match="too short"):
        cm.chat([{"role": "user", "content": "<video>\nHi"}], [short], greedy)
    plain = write_random_checkpoint(tmp_path / "next_run", {
        "model": {"llava": families["llava_next"], "freeze_llm": True, "llm_lora": LORA, "dtype": "fp32"},
        "data": {"template": "hf", "sources": [{"path": "unused.json"}]}})
    next_model = load_chat_model(plain, torch_dtype="fp32")
    with pytest.raises(UserError, match="only runs and exports of a released LLaVA-OneVision"):
        next_model.chat([{"role": "user", "content": "<video>\nHi"}], [clip], greedy)

    # serve: vLLM's `video_url` content part: a path under --image-dir, a base64 data: URL, or an http(s) URL
    # the server fetches when remote media are allowed
    pytest.importorskip("fastapi")
    import base64
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import httpx

    from llava_ft.serve.app import create_app
    from llava_ft.testing.server import serve_in_thread

    def ask(url, ref, model="ov"):
        body = {"model": model, "max_tokens": 6, "temperature": 0, "messages": [{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": ref}}, {"type": "text", "text": question}]}]}
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)

    as_data = "data:video/mp4;base64," + base64.b64encode(open(clip, "rb").read()).decode()
    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(SimpleHTTPRequestHandler, directory=str(tmp_path)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{files.server_address[1]}/clip.mp4"
    try:
        with serve_in_thread(create_app(models["llava_hf"], "ov", allow_remote_images=True)) as url:
            for ref in (as_data, remote):
                resp = ask(url, ref)
                assert resp.status_code == 200, resp.text
                assert resp.json()["choices"][0]["message"]["content"] == want
            resp = ask(url, remote.replace("clip.mp4", "missing.mp4"))
            assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_video", resp.text
    finally:
        files.shutdown()
    with serve_in_thread(create_app(models["llava_hf"], "ov", image_dir=str(tmp_path))) as url:
        resp = ask(url, "clip.mp4")
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == want
        resp = ask(url, remote)
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "remote_images_disabled", resp.text
        for ref, status, code in (("wide.png", 400, "invalid_video"), ("../outside.mp4", 403, "path_forbidden"),
                                  ("data:video/mp4;base64,AAAA", 400, "invalid_video"),
                                  ("short.mp4", 400, "invalid_request")):
            resp = ask(url, ref)
            assert resp.status_code == status and resp.json()["error"]["code"] == code, (ref, resp.text)
    with serve_in_thread(create_app(next_model, "next", image_dir=str(tmp_path))) as url:
        resp = ask(url, "clip.mp4", "next")
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "videos_not_supported", resp.text


@pytest.mark.parametrize("name", ["llava_next_mistral_7b_qlora_finetune", "llava_onevision_qwen2_0_5b_qlora_finetune",
                                  "llava_onevision_qwen2_7b_qlora_finetune",
                                  "llava_onevision_qwen2_0_5b_qlora_video_finetune"])
def test_released_llava_recipes(name):
    from llava_ft.config import list_configs, load_config

    assert name in list_configs()
    cfg = load_config(name)
    assert cfg.model.llava and cfg.data.template == "hf" and cfg.resolved_phase == "finetune"
    assert cfg.model.quantization == "4bit" and cfg.model.llm_lora.enabled and cfg.model.visual_encoder_lora.enabled
    from pathlib import Path

    import llava_ft

    text = (Path(llava_ft.__file__).parent / "recipes" / "llava" / f"{name}.yaml").read_text()
    # line 1 says what the recipe is, line 2 the command that runs it (the layout of the llava recipes)
    assert text.splitlines()[1] == f"#   llava_ft finetune configs/llava/{name}.yaml"


def test_onevision_video_logits_equal_transformers(families, tmp_path):
    """A clip decoded with PyAV (frames sampled uniformly) gives transformers' LlavaOnevision logits on its
    own video inputs: frames pooled bilinearly 2x2, one newline after the clip; the count is known up front."""
    from transformers import AutoProcessor

    from llava_ft.data.videos import load_video_frames
    from llava_ft.testing.llava_next import write_test_video

    folder = families["llava_onevision"]
    hf = _hf_model(folder)
    processor = AutoProcessor.from_pretrained(folder)
    model, _ = build_model(_cfg(folder, tmp_path, "hf"))
    model.eval()
    spec = model.visual_encoder.anyres
    clip = write_test_video(tmp_path / "clip.mp4", frames=12)
    frames = load_video_frames(clip, spec.video_frames)
    assert frames.shape[0] == spec.video_frames == 8
    content = [{"type": "video"}, {"type": "text", "text": "What moves?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(videos=[frames], text=text, return_tensors="pt")
    with torch.no_grad():
        want = hf(**inputs).logits
    video_id = hf.config.video_token_id
    assert spec.count_sample([clip]) == int((inputs["input_ids"] == video_id).sum())
    pixel_values, sizes = spec.sample_views([frames])
    ids = _collapse(inputs["input_ids"][0].tolist(), video_id)
    with torch.no_grad():
        got = model(input_ids=torch.tensor([ids]), pixel_values=pixel_values, image_sizes=sizes).logits
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_video_samples_train_and_bad_clips_are_bad_samples(families, tmp_path):
    """`"video": "clip.mp4"` records (LLaVA-NeXT's key, <video> marker) are prepared with their token count
    and loaded as frames; an unreadable and a too-short clip are named, and under skip_bad_samples skipped
    and counted."""
    import json

    from llava_ft.data.images import BadImageError, verify_images
    from llava_ft.data.llava_dataset import LlavaDataset
    from llava_ft.data.dataset import prepare_dataset
    from llava_ft.testing.llava_next import write_test_video

    folder = tmp_path / "media"
    folder.mkdir()
    write_test_video(folder / "good.mp4", frames=10)
    write_test_video(folder / "short.mp4", frames=3)
    (folder / "broken.mp4").write_bytes(b"not a video at all")
    rows = [{"id": f"v{i}", "video": name, "conversations": [
        {"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A red square."}]}
        for i, name in enumerate(["good.mp4", "short.mp4", "broken.mp4"])]
    data = tmp_path / "videos.json"
    data.write_text(json.dumps(rows))
    cfg = _train_cfg(families["llava_onevision"], {"finetune": str(data), "image_folder": str(folder)}, tmp_path,
                     video_frames=4, skip_bad_samples=True)
    model, tokenizer = build_model(cfg, for_training=False)
    spec = model.visual_encoder.anyres
    prepared = prepare_dataset(cfg.data, tokenizer, num_image_tokens=spec.token_counter(), seed=0)
    ds = prepared.dataset
    assert ds["length"][0] == len(ds[0]["input_ids"]) - 1 + 4 * 4 + 1  # 4 frames x 2x2 pooled + newline
    problems = {p.path.rsplit("/", 1)[-1]: p.reason for p in verify_images(ds)}
    assert set(problems) == {"broken.mp4"} and "cannot decode video" in problems["broken.mp4"]
    strict = LlavaDataset(ds, model.visual_encoder, cfg.data, skip_bad_samples=False)
    item = strict[0]
    assert item["pixel_values"].shape[0] == 4 and item["image_sizes"].tolist() == [[-4, -1]]
    with pytest.raises(BadImageError, match="v1.*short.mp4.*too short: 3 frame"):
        strict[1]
    lenient = LlavaDataset(ds, model.visual_encoder, cfg.data)
    assert lenient[1]["id"] != "v1" and lenient[2]["id"] == "v0" and lenient.num_bad_images == 2


@pytest.mark.slow
def test_a_run_trains_on_clips_and_images_together(families, demo_data, tmp_path):
    """Clips and images in one packed, length-grouped QLoRA run: two steps, the loss is finite."""
    import json
    import math

    from llava_ft.engine import run_training
    from llava_ft.testing.llava_next import write_test_video

    rows = json.loads(open(demo_data["finetune"]).read())[:4]
    for i in range(2):
        write_test_video(tmp_path / f"clip{i}.mp4", frames=6, seed=i)
        rows.append({"id": f"clip{i}", "video": str(tmp_path / f"clip{i}.mp4"), "conversations": [
            {"from": "human", "value": "<video>\nWhat moves?"}, {"from": "gpt", "value": "A red square."}]})
    data = tmp_path / "mixed.json"
    data.write_text(json.dumps(rows))
    cfg = _train_cfg(families["llava_onevision"], {"finetune": str(data), "image_folder": demo_data["image_folder"]},
                     tmp_path, video_frames=4, pack_to_max_length=True)
    result = run_training(cfg, work_dir=str(tmp_path / "wd"))
    assert result.global_step == 2 and math.isfinite(result.train_loss)


def test_load_message_names_the_checkpoints_rules(families, tmp_path, capsys):
    build_model(_cfg(families["llava_onevision"], tmp_path, "hf"), for_training=False)
    out = capsys.readouterr().out
    assert "AnyRes with the checkpoint's image processor and 9 grid pinpoints, anyres_max_4" in out
    assert "pads images to square" not in out
