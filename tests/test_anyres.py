"""AnyRes tiling, token counts and feature packing agree with transformers' LlavaNext for many image sizes."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaNextConfig
from transformers.models.llava_next.modeling_llava_next import LlavaNextModel, image_size_to_num_patches

from llava_ft.errors import UserError
from llava_ft.model.anyres import (anyres_image_processor, anyres_num_tokens, default_grid_pinpoints,
                                   num_tiles, pack_anyres_features, resolve_grid_pinpoints)

TILE, PATCH = 32, 8
SIDE = TILE // PATCH
# (height, width): square, wide, tall, extreme ratios, smaller than a tile, odd sizes.
SIZES = [(32, 32), (48, 48), (30, 90), (90, 30), (64, 200), (200, 64), (17, 5), (5, 17), (100, 101),
         (333, 222), (222, 333), (96, 32), (31, 64), (1, 1), (640, 480), (480, 640)]


@pytest.fixture(scope="module")
def llava_next():
    """A tiny LlavaNextModel (random): the reference for packing and counting."""
    cfg = LlavaNextConfig(
        vision_config=CLIPVisionConfig(image_size=TILE, patch_size=PATCH, hidden_size=16, intermediate_size=32,
                                       num_hidden_layers=1, num_attention_heads=2),
        text_config=LlamaConfig(hidden_size=24, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                num_key_value_heads=1, vocab_size=64),
        image_grid_pinpoints=default_grid_pinpoints(TILE), vision_feature_select_strategy="default")
    torch.manual_seed(0)
    return LlavaNextModel(cfg).eval()


def test_default_pinpoints_are_llava_next_ones_at_336():
    assert default_grid_pinpoints(336) == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@pytest.mark.parametrize("hw", SIZES)
def test_packing_and_count_equal_llava_next(llava_next, hw):
    pinpoints = llava_next.config.image_grid_pinpoints
    views = num_tiles(hw, pinpoints, TILE)
    assert views == image_size_to_num_patches(list(hw), pinpoints, TILE)
    torch.manual_seed(hash(hw) % 1000)
    feats = torch.randn(views, SIDE * SIDE, 24)
    expected, lens = llava_next.pack_image_features([feats], torch.tensor([hw]), "default",
                                                    image_newline=llava_next.image_newline)
    ours = pack_anyres_features(feats, hw, pinpoints, TILE, llava_next.image_newline)
    assert torch.equal(ours, expected[0])
    assert anyres_num_tokens(hw, pinpoints, TILE, SIDE, base_tokens=SIDE * SIDE) == int(lens[0]) == ours.shape[0]


@pytest.mark.parametrize("hw", [(30, 90), (90, 30), (48, 48), (17, 5)])
def test_processor_makes_one_overview_plus_the_grid(hw):
    tower = CLIPImageProcessor(size={"shortest_edge": TILE}, crop_size={"height": TILE, "width": TILE})
    pinpoints = default_grid_pinpoints(TILE)
    proc = anyres_image_processor(tower, pinpoints)
    image = Image.new("RGB", (hw[1], hw[0]), (200, 30, 30))
    out = proc(images=[image], return_tensors="pt")
    assert tuple(out["image_sizes"][0].tolist()) == hw
    assert out["pixel_values"].shape == (1, num_tiles(hw, pinpoints, TILE), 3, TILE, TILE)
    assert list(proc.image_mean) == list(tower.image_mean) and list(proc.image_std) == list(tower.image_std)


def test_pinpoints_are_checked_and_limited():
    assert resolve_grid_pinpoints(TILE, max_tiles=2) == [[32, 64], [64, 32]]
    assert len(resolve_grid_pinpoints(TILE)) == 5
    with pytest.raises(UserError, match="multiple of the vision tower's input size 32"):
        resolve_grid_pinpoints(TILE, [[32, 50]])
    with pytest.raises(UserError, match="max_image_tiles=0"):
        resolve_grid_pinpoints(TILE, max_tiles=0)


def _anyres_data(tmp_path, sizes):
    """A LLaVA json whose images have the given (height, width), each showing a red square."""
    import json

    folder = tmp_path / "images"
    folder.mkdir()
    records = []
    for i, (h, w) in enumerate(sizes):
        img = Image.new("RGB", (w, h), (255, 255, 255))
        img.paste((220, 40, 40), (w // 4, h // 4, w // 2, h // 2))
        img.save(folder / f"{i}.png")
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the square?"}, {"from": "gpt", "value": "red"}]})
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    return str(path), str(folder)


def _anyres_cfg(tiny_llama, tiny_clip, data, folder, tmp_path, **model):
    from llava_ft.config import config_from_dict

    return config_from_dict({
        "name": "anyres", "model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True,
                                    "image_aspect": "anyres", **model},
        "data": {"sources": [{"path": data, "format": "llava", "image_folder": folder}], "template": "qwen_chat",
                 "max_length": 512, "cache_dir": str(tmp_path / "cache")},
        "train": {"learning_rate": 1e-2, "per_device_batch_size": 2, "max_steps": 3, "save_steps": 3,
                  "logging_steps": 1, "warmup_ratio": 0.0, "group_by_length": False},
    })


def test_anyres_lengths_match_the_splice_and_the_newline_trains(tiny_llama, tiny_clip, tmp_path):
    """Data preparation counts each image's tokens from its size alone; the model's splice produces exactly
    that many positions; a pretrain run trains the newline vector and saves it with the projector."""
    from llava_ft.data.dataset import prepare_dataset
    from llava_ft.data.llava_dataset import LlavaDataset
    from llava_ft.data.mm_collate import MultimodalCollator
    from llava_ft.engine import run_training
    from llava_ft.model.anyres import image_token_counter
    from llava_ft.model.builder import build_model

    sizes = [(40, 120), (120, 40), (48, 48), (20, 30)]
    data, folder = _anyres_data(tmp_path, sizes)
    cfg = _anyres_cfg(tiny_llama, tiny_clip, data, folder, tmp_path)
    model, tok = build_model(cfg)
    prepared = prepare_dataset(cfg.data, tok, num_image_tokens=image_token_counter(model.visual_encoder))
    ds = LlavaDataset(prepared.dataset, model.visual_encoder, cfg.data)
    collate = MultimodalCollator(tok, image_shape=model.visual_encoder.image_shape)
    for i in range(len(ds)):
        batch = collate([ds[i]])
        assert batch["image_sizes"].tolist() == [list(sizes[int(ds[i]["id"][1:])])]
        embeds, mask, labels, _ = model.prepare_inputs_embeds(batch["input_ids"], batch["attention_mask"],
                                                              batch["labels"], batch["pixel_values"],
                                                              image_sizes=batch["image_sizes"])
        assert embeds.shape[1] == ds[i]["length"]
    lengths = sorted(ds[i]["length"] for i in range(len(ds)))
    assert len(set(lengths)) >= 3  # wide, tall and small images really get different counts

    start = model.projector.image_newline.detach().clone()
    result = run_training(cfg, work_dir=str(tmp_path / "wd"))
    saved = torch.load(result.last_checkpoint, weights_only=True)["state_dict"]
    assert "projector.image_newline" in saved
    assert not torch.allclose(saved["projector.image_newline"], start)


def test_the_newline_is_read_inside_the_projector_forward(tiny_llama, tiny_clip, tmp_path):
    """ZeRO-3 gathers a module's own parameters around that module's forward; DeepSpeed puts a dict of its
    own in `module._parameters` that fetches a weight read at any other time only as a fallback. Record
    every read of the newline the same way: each one happens while the projector's forward runs."""
    from llava_ft.model.builder import build_model

    cfg = _anyres_cfg(tiny_llama, tiny_clip, str(tmp_path / "unused.json"), str(tmp_path), tmp_path)
    model, _ = build_model(cfg)
    proj, in_forward, reads = model.projector, [False], []

    class RecordingParameters(dict):
        def __getitem__(self, key):
            reads.append((key, in_forward[0]))
            return super().__getitem__(key)

    object.__setattr__(proj, "_parameters", RecordingParameters(proj._parameters))
    proj.register_forward_pre_hook(lambda *_: in_forward.__setitem__(0, True))
    proj.register_forward_hook(lambda *_: in_forward.__setitem__(0, False))
    hw = (40, 120)
    image = Image.new("RGB", (hw[1], hw[0]), (200, 30, 30))
    packed = model.encode_images_per_image(model.visual_encoder.anyres.views(image), torch.tensor([hw]))
    assert len(packed) == 1
    newline_reads = [inside for key, inside in reads if key == "image_newline"]
    assert newline_reads and all(newline_reads), reads


def test_anyres_refuses_pad_to_square_and_open_clip(tiny_llama, tiny_clip, tmp_path):
    from llava_ft.config import config_from_dict

    with pytest.raises(UserError, match="model.llava continues a LLaVA-1.5 style checkpoint"):
        config_from_dict({"model": {"llava": "some/llava", "image_aspect": "anyres"},
                          "data": {"sources": [{"path": "x.json"}]}})
    with pytest.raises(UserError, match="pad_image_to_square' does not apply"):
        config_from_dict({"model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "image_aspect": "anyres"},
                          "data": {"sources": [{"path": "x.json"}], "pad_image_to_square": True}})


@pytest.mark.smoke
@pytest.mark.parametrize("hw", [(40, 120), (120, 40), (48, 48)])
def test_llava_next_export_equals_llava_ft(tmp_path, tiny_llama, tiny_clip, hw):
    """--format llava-hf of an AnyRes run is a LlavaNext folder whose logits equal llava_ft's forward."""
    from transformers import AutoProcessor, LlavaNextForConditionalGeneration

    from llava_ft.convert import pth_to_hf
    from llava_ft.data.encode import encode_prompt
    from llava_ft.inference import build_from_checkpoint
    from llava_ft.testing.checkpoints import write_random_checkpoint

    pth = write_random_checkpoint(tmp_path / "run", {
        "model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "image_aspect": "anyres", "freeze_llm": True,
                  "llm_lora": {"enabled": True, "r": 8, "alpha": 16}},
        "data": {"template": "chatml", "sources": [{"path": "unused.json"}]}})
    out = pth_to_hf(None, pth, tmp_path / "hf", fmt="llava-hf")
    hf = LlavaNextForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out)
    assert hf.config.image_grid_pinpoints == default_grid_pinpoints(TILE)

    image = Image.new("RGB", (hw[1], hw[0]), (255, 255, 255))
    image.paste((30, 200, 30), (hw[1] // 3, hw[0] // 3, hw[1] // 2, hw[0] // 2))
    question = "What colour is the shape?"
    ref, tok, cfg = build_from_checkpoint(pth, quantization="none", dtype="fp32")
    spec = ref.visual_encoder.anyres
    ids = encode_prompt([{"role": "user", "content": question}], tok, cfg.data.template, images=[image])
    with torch.no_grad():
        ref_logits = ref(input_ids=torch.tensor([ids]), pixel_values=spec.views(image),
                         image_sizes=torch.tensor([hw])).logits

    text = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True)
    inputs = processor(images=image, text=text, return_tensors="pt")
    n_image_tokens = int((inputs["input_ids"] == hf.config.image_token_id).sum())
    assert n_image_tokens == anyres_num_tokens(hw, spec.pinpoints, TILE, SIDE, SIDE * SIDE)
    with torch.no_grad():
        hf_logits = hf(**inputs).logits
    vocab = ref_logits.shape[-1]
    assert hf_logits.shape[1] == ref_logits.shape[1]
    assert torch.allclose(hf_logits[..., :vocab], ref_logits, atol=1e-4)


@pytest.mark.smoke
def test_anyres_chat_on_every_artifact_kind(tmp_path, tiny_llama, tiny_clip):
    """An AnyRes run answers the same through its iter file, the XTuner layout and the LlavaNext export,
    with a wide image, a tall one, and a text-only turn."""
    from llava_ft.convert import pth_to_hf
    from llava_ft.inference import GenerationSettings, load_chat_model
    from llava_ft.testing.checkpoints import write_random_checkpoint

    pth = write_random_checkpoint(tmp_path / "run", {
        "model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "image_aspect": "anyres", "freeze_llm": True,
                  "llm_lora": {"enabled": True, "r": 8, "alpha": 16}},
        "data": {"template": "chatml", "sources": [{"path": "unused.json"}]}})
    xtuner = pth_to_hf(None, pth, tmp_path / "xtuner")
    hf = pth_to_hf(None, pth, tmp_path / "hf", fmt="llava-hf")
    greedy = GenerationSettings(max_new_tokens=6, temperature=0.0)
    wide, tall = Image.new("RGB", (120, 40), (200, 30, 30)), Image.new("RGB", (40, 120), (30, 30, 200))
    question = [{"role": "user", "content": "What colour is it?"}]
    answers = {}
    for name, artifact in (("pth", pth), ("xtuner", xtuner), ("llava_hf", hf)):
        cm = load_chat_model(artifact, torch_dtype="fp32")
        assert cm.anyres is not None, name
        prompt = cm.encode(question, [wide])
        assert prompt.length == len(prompt.ids) - 1 + cm.anyres.num_tokens((40, 120))
        answers[name] = (cm.chat(question, [wide], greedy), cm.chat(question, [tall], greedy),
                         cm.chat(question, [], greedy))
    for kind in ("xtuner", "llava_hf"):
        for ours, theirs in zip(answers["pth"], answers[kind]):
            assert ours.text == theirs.text and ours.prompt_tokens == theirs.prompt_tokens, kind
    assert answers["pth"][2].completion_tokens > 0  # the text-only turn is answered


def test_logged_tokens_count_each_anyres_image_at_its_size(tiny_llama, tiny_clip, tmp_path):
    """tokens_per_s counts the feature vectors each AnyRes image really becomes (overview, tiles, newlines),
    not one view's count per image: the tokens counted for a batch equal its samples' expanded lengths."""
    from llava_ft.data.dataset import prepare_dataset
    from llava_ft.data.llava_dataset import LlavaDataset
    from llava_ft.data.mm_collate import MultimodalCollator
    from llava_ft.engine.run import training_arguments
    from llava_ft.engine.trainer import LlavaFtTrainer
    from llava_ft.model.anyres import image_token_counter
    from llava_ft.model.builder import build_model

    data, folder = _anyres_data(tmp_path, [(40, 120), (120, 40), (48, 48)])
    cfg = _anyres_cfg(tiny_llama, tiny_clip, data, folder, tmp_path)
    model, tok = build_model(cfg)
    prepared = prepare_dataset(cfg.data, tok, num_image_tokens=image_token_counter(model.visual_encoder))
    ds = LlavaDataset(prepared.dataset, model.visual_encoder, cfg.data)
    collate = MultimodalCollator(tok, image_shape=model.visual_encoder.image_shape)
    trainer = LlavaFtTrainer(model=model, args=training_arguments(cfg, str(tmp_path), None), llava_cfg=cfg,
                             train_dataset=ds, data_collator=collate)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test does not run
    samples = [ds[i] for i in range(len(ds))]
    trainer.training_step(trainer.model, collate(samples))
    assert trainer._tokens_since_log == sum(s["length"] for s in samples)
    assert sum(s["length"] for s in samples) > sum(len(s["input_ids"]) - 1 + model.visual_encoder.num_image_tokens
                                                 for s in samples)  # more than one view per image
