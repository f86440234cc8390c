"""Multimodal packing (`data.pack_to_max_length: true` on LLaVA data): blocks of whole samples, several
images per sample and text-only samples mixed in, positions restarting per sample after image expansion.

    python -m pytest -x -q tests/test_mm_packing.py -m "not slow"   # equality / isolation / ZeRO rule, ~1 min
    python -m pytest -x -q tests/test_mm_packing.py                  # + two-phase run and exact resume, ~3 min

What a user relies on: a packed batch gives the same loss as the same samples unpacked (fp32, 1e-5, for a
projector-only pretrain model and a LoRA finetune model), with the same count of supervised tokens
(Trainer's `num_items_in_batch`); no sample sees another sample of its block; a block without images still
runs the vision path (the ZeRO-3 rule); training with packing learns and resumes exactly.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from llava_ft import IMAGE_TOKEN_INDEX
from llava_ft.config import Config, DataConfig, DataSource, LoraSettings, ModelConfig, TrainConfig
from llava_ft.data.dataset import prepare_dataset
from llava_ft.data.llava_dataset import LlavaDataset
from llava_ft.data.mm_collate import MultimodalCollator
from llava_ft.errors import UserError
from llava_ft.model.builder import build_model

WORDS = "the cat sat on a red blue green square circle shape image answer question what colour is it".split()
MAX_LENGTH = 320  # tiny CLIP: 16 tokens an image; samples are 40-140 positions, so blocks hold 2-5 of them


@pytest.fixture(scope="module")
def mixed_data(tmp_path_factory, demo_data) -> dict:
    """LLaVA records with 0, 1 or 2 images each (text-only rows mixed in), over the demo images."""
    rng = random.Random(3)
    folder = Path(demo_data["image_folder"])
    images = sorted(str(p.relative_to(folder)) for p in (folder / "finetune").glob("*.png"))[:12]
    rows = []
    for i in range(18):
        n_images = (0, 1, 2)[i % 3]
        turns = []
        for t in range(rng.randint(1, 2)):
            q = " ".join(rng.choices(WORDS, k=rng.randint(2, 12)))
            if t == 0 and n_images:
                q = "<image>\n" * n_images + q
            turns += [{"from": "human", "value": q}, {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=rng.randint(1, 14)))}]
        row = {"id": f"m{i}", "conversations": turns}
        if n_images:
            row["image"] = [images[(i + k) % len(images)] for k in range(n_images)]
        rows.append(row)
    out = tmp_path_factory.mktemp("mm_pack")
    path = out / "mixed.json"
    path.write_text(json.dumps(rows))
    text_only = out / "text_only.json"
    text_only.write_text(json.dumps([r for r in rows if "image" not in r]))
    return {"mixed": str(path), "text_only": str(text_only), "image_folder": str(folder), "cache": str(out / "cache")}


def make_cfg(tiny_llama, tiny_clip, data: dict, phase: str, source: str = "mixed") -> Config:
    lora = LoraSettings(enabled=phase == "finetune", r=8, alpha=16, dropout=0.0)
    return Config(
        name=f"mm_pack_{phase}", phase=phase,
        model=ModelConfig(llm=tiny_llama, visual_encoder=tiny_clip, dtype="fp32", attn_implementation="sdpa",
                          freeze_llm=True, llm_lora=lora),
        data=DataConfig(sources=[DataSource(path=data[source], format="llava", image_folder=data["image_folder"])],
                        template="qwen_chat", max_length=MAX_LENGTH, cache_dir=data["cache"]),
        train=TrainConfig(seed=0))


def build(cfg: Config):
    """The model in eval mode with every trainable weight randomised (LoRA B is 0 at init: made non-zero)."""
    torch.manual_seed(0)
    model, tok = build_model(cfg, for_training=True)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return model.eval(), tok


def datasets_for(cfg: Config, model, tok) -> tuple:
    """(packed LlavaDataset, {sample id: unpacked item}) over the same encoded samples."""
    from llava_ft.model.anyres import image_token_counter

    n = image_token_counter(model.visual_encoder)  # an int, or per image size with AnyRes
    cfg.data.pack_to_max_length = False
    plain = LlavaDataset(prepare_dataset(cfg.data, tok, num_image_tokens=n, seed=0).dataset, model.visual_encoder,
                         cfg.data)
    cfg.data.pack_to_max_length = True
    packed = prepare_dataset(cfg.data, tok, num_image_tokens=n, seed=0)
    by_id = {plain[i]["id"]: plain[i] for i in range(len(plain))}
    return LlavaDataset(packed.dataset, model.visual_encoder, cfg.data), by_id, packed.stats


def supervised(batch) -> int:
    """What Trainer counts as num_items_in_batch for a causal LM: labels[..., 1:] != -100."""
    return int((batch["labels"][..., 1:] != -100).sum())


@pytest.mark.smoke
@pytest.mark.parametrize("phase", ["pretrain", "finetune"])
def test_packed_loss_equals_unpacked(tiny_llama, tiny_clip, mixed_data, phase):
    cfg = make_cfg(tiny_llama, tiny_clip, mixed_data, phase)
    model, tok = build(cfg)
    trains = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trains == ({"projector"} if phase == "pretrain" else {"projector", "llm"})
    packed, by_id, stats = datasets_for(cfg, model, tok)
    assert stats["packing"]["samples"] == len(by_id) and stats["packing"]["blocks"] < len(by_id)
    collate = MultimodalCollator(tok, image_shape=model.visual_encoder.image_shape)
    blocks = [packed[i] for i in range(len(packed))]
    # The blocks mix samples with 2 images, 1 image and none; every sample is in exactly one block.
    members = [sid for b in blocks for sid in b["id"].split(",")]
    assert sorted(members) == sorted(by_id)
    mixed_block = [b for b in blocks if {by_id[s]["pixel_values"] is None for s in b["id"].split(",")} == {True, False}]
    assert mixed_block and any(by_id[s]["pixel_values"] is not None and by_id[s]["pixel_values"].shape[0] == 2
                               for b in blocks for s in b["id"].split(","))
    for rows in (blocks[:2], blocks[2:5]):  # 2 and 3 blocks a batch: rows of different lengths, right-padded
        batch = collate(rows)
        assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
        ref_batch = collate([by_id[s] for b in rows for s in b["id"].split(",")])
        n_items = supervised(batch)
        assert n_items == supervised(ref_batch) > 0  # same normaliser as Trainer computes it
        with torch.no_grad():
            loss = model(**batch).loss
            ref = model(**ref_batch).loss
            # As Trainer calls it (loss summed over the accumulated micro-batches / num_items_in_batch).
            loss_n = model(**batch, num_items_in_batch=torch.tensor(n_items)).loss
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(loss_n, ref, atol=1e-5, rtol=1e-5)
    # The chunked head (default) against transformers' full logits: loss and gradients of a packed batch.
    model.train()
    batch = collate(blocks[:3])
    n_items = torch.tensor(supervised(batch))
    results = []
    for chunk in (0, 5):
        model.loss_chunk_tokens = chunk
        model.zero_grad()
        loss = model(**batch, num_items_in_batch=n_items).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys() and grads
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], atol=1e-5, rtol=1e-5, msg=n)


def test_packed_batch_shape_errors(tiny_llama, tiny_clip, mixed_data):
    cfg = make_cfg(tiny_llama, tiny_clip, mixed_data, "pretrain")
    model, tok = build(cfg)
    packed, by_id, _ = datasets_for(cfg, model, tok)
    collate = MultimodalCollator(tok, image_shape=model.visual_encoder.image_shape)
    with pytest.raises(UserError, match="mixes packed blocks and unpacked samples"):
        collate([packed[0], next(iter(by_id.values()))])
    batch = collate([packed[0]])
    with pytest.raises(UserError, match="without attention_mask"):
        model.prepare_inputs_embeds(batch["input_ids"], torch.ones_like(batch["input_ids"]), batch["labels"],
                                    batch["pixel_values"], position_ids=batch["position_ids"])


def expanded_segments(model, batch) -> torch.Tensor:
    """Sample index of every expanded position (from the packed positions the splice produces)."""
    _, mask, _, pos = model.prepare_inputs_embeds(batch["input_ids"], None, batch["labels"], batch["pixel_values"],
                                                  position_ids=batch["position_ids"])
    assert mask is None
    return (pos == 0).long().cumsum(-1)


def test_block_never_leaks_attention_across_samples(tiny_llama, tiny_clip, mixed_data):
    cfg = make_cfg(tiny_llama, tiny_clip, mixed_data, "finetune")
    model, tok = build(cfg)
    packed, by_id, _ = datasets_for(cfg, model, tok)
    collate = MultimodalCollator(tok, image_shape=model.visual_encoder.image_shape)
    # A block whose first sample has an image and which holds at least 3 samples.
    block = next(packed[i] for i in range(len(packed)) if len(packed[i]["id"].split(",")) >= 3
                 and by_id[packed[i]["id"].split(",")[0]]["pixel_values"] is not None)
    first = by_id[block["id"].split(",")[0]]
    batch = collate([block])
    seg = expanded_segments(model, batch)[0]
    n_first = int(first["pixel_values"].shape[0])
    # The expanded layout: each sample's positions run 0..length-1 (its images counted), then restart.
    lengths = [by_id[s]["length"] for s in block["id"].split(",")]
    assert torch.bincount(seg)[1:].tolist() == lengths
    # Change the first sample: its text tokens (not the placeholders) and its images.
    changed = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()}
    n_ids = len(first["input_ids"])
    ids = changed["input_ids"][0, :n_ids]
    text = ids != IMAGE_TOKEN_INDEX
    ids[text] = (ids[text] + 7) % 200 + 5
    changed["pixel_values"][:n_first] = torch.randn_like(changed["pixel_values"][:n_first])
    for b in (batch, changed):
        b.pop("labels")  # logits at every position (with labels the head runs only where a label is)
    with torch.no_grad():
        logits = model(**batch).logits[0]
        logits_changed = model(**changed).logits[0]
    others = seg > 1
    assert not torch.allclose(logits[~others], logits_changed[~others], atol=1e-3)  # the change is visible
    torch.testing.assert_close(logits[others], logits_changed[others], atol=1e-5, rtol=1e-5)
    # Sanity (the test can fail): with one plain causal mask over the row, the others do see the change.
    with torch.no_grad():
        leaky = model(**{**batch, "attention_mask": torch.ones_like(batch["input_ids"])}).logits[0]
        leaky_changed = model(**{**changed, "attention_mask": torch.ones_like(batch["input_ids"])}).logits[0]
    assert not torch.allclose(leaky[others], leaky_changed[others], atol=1e-3)


def test_text_only_block_still_runs_the_vision_path(tiny_llama, tiny_clip, mixed_data):
    """ZeRO-3: a packed block without images gets the dummy image, so tower and projector run on every rank."""
    cfg = make_cfg(tiny_llama, tiny_clip, mixed_data, "finetune", source="text_only")
    model, tok = build(cfg)
    packed, by_id, _ = datasets_for(cfg, model, tok)
    collate = MultimodalCollator(tok, image_shape=model.visual_encoder.image_shape)
    block = packed[0]
    assert len(block["id"].split(",")) > 1 and block["pixel_values"] is None
    batch = collate([block])
    assert batch["pixel_values"].shape == (1, *model.visual_encoder.image_shape)
    model.train()
    out = model(**batch)
    ref = collate([by_id[s] for s in block["id"].split(",")])
    with torch.no_grad():
        ref_loss = model.eval()(**ref).loss
    torch.testing.assert_close(out.loss.detach(), ref_loss, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    grads = [p.grad for p in model.projector.parameters()]
    assert all(g is not None for g in grads)  # in the graph: every rank reduces the same parameters
    assert all(torch.count_nonzero(g) == 0 for g in grads)  # with zero effect


def test_packing_keeps_whole_samples_and_their_images(tiny_llama, tiny_clip, mixed_data):
    cfg = make_cfg(tiny_llama, tiny_clip, mixed_data, "pretrain")
    n = 16
    _, tok = build_model(cfg, for_training=False)
    cfg.data.pack_to_max_length = False
    plain = {r["id"]: r for r in prepare_dataset(cfg.data, tok, num_image_tokens=n, seed=0).dataset}
    cfg.data.pack_to_max_length = True
    packed = prepare_dataset(cfg.data, tok, num_image_tokens=n, seed=0)
    for block in packed.dataset:
        sids = block["id"].split(",")
        assert block["length"] == sum(plain[s]["length"] for s in sids) <= MAX_LENGTH
        assert block["images"] == [p for s in sids for p in plain[s]["images"]]  # placeholder order
        assert (block["modality_length"] > 0) == bool(block["images"])
        start = 0
        for s in sids:
            k = len(plain[s]["input_ids"])
            assert block["input_ids"][start:start + k] == plain[s]["input_ids"]
            assert block["position_ids"][start:start + k] == list(range(k))
            # The first label is never a target unpacked; packed it is masked so it is not one either.
            assert block["labels"][start:start + k] == [-100] + plain[s]["labels"][1:]
            start += k
        assert start == len(block["input_ids"])
    assert 0 < packed.stats["packing"]["image_blocks"] <= packed.stats["packing"]["blocks"]


# ---- training with packing (slow: real runs through the engine) ------------------------------------------

def packed_stats(output: str) -> dict:
    line = next(ln for ln in output.splitlines() if "[llava_ft] data:" in ln and "packed:" in ln)
    return json.loads(line.split("packed:", 1)[1].split("; from cache")[0])


@pytest.mark.slow
def test_two_phase_run_with_packing_learns(tmp_path, capsys):
    """Pretrain (projector only) then finetune (QLoRA + projector), both packed, on image + text-only data."""
    import yaml

    from llava_ft.config import load_config
    from llava_ft.demo.assets import build_demo_workspace
    from llava_ft.engine.run import run_training

    p = build_demo_workspace(tmp_path / "ws")
    text = {"path": p["self_cognition"], "format": "openai"}
    common = {"template": "qwen_chat", "max_length": 256, "pack_to_max_length": True, "cache_dir": str(tmp_path / "c")}
    train = {"per_device_batch_size": 2, "max_steps": 10, "logging_steps": 1, "save_steps": 10, "warmup_ratio": 0.0,
             "lr_scheduler": "constant", "seed": 0}
    model = {"llm": p["llm"], "visual_encoder": p["visual_encoder"], "freeze_llm": True, "dtype": "fp32"}
    phases = {
        "pretrain": {"model": model, "train": dict(train, learning_rate=1e-2),
                     "data": dict(common, sources=[{"path": p["pretrain"], "format": "llava",
                                                    "image_folder": p["image_folder"]}, text])},
        "finetune": {"model": dict(model, quantization="4bit", llm_lora={"enabled": True, "r": 8, "alpha": 16}),
                     "train": dict(train, learning_rate=2e-3),
                     "data": dict(common, sources=[{"path": p["finetune"], "format": "llava",
                                                    "image_folder": p["image_folder"]}, text])},
    }
    results = {}
    for phase, body in phases.items():
        if phase == "finetune":
            body["model"]["pretrained_pth"] = results["pretrain"].last_checkpoint
        path = tmp_path / f"{phase}.yaml"
        path.write_text(yaml.safe_dump(dict(body, name=phase)))
        results[phase] = run_training(load_config(str(path)), work_dir=str(tmp_path / phase), command=phase)
        out = capsys.readouterr().out
        stats = packed_stats(out)
        assert stats["padding_ratio"] < 0.15 and 0 < stats["image_blocks"] <= stats["blocks"] < stats["samples"]
        assert "train.group_by_length does not apply" in out
        curve = [h["loss"] for h in results[phase].log_history if "loss" in h]
        assert len(curve) == 10
        assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3, (phase, curve)
    state = torch.load(results["pretrain"].last_checkpoint, weights_only=True)["state_dict"]
    assert state and all(k.startswith("projector.") for k in state)


@pytest.mark.slow
def test_resume_mid_epoch_with_packing_is_exact(tmp_path):
    """SIGKILL at step 10, resume from the step-8 checkpoint in the middle of an epoch of packed blocks."""
    from test_distributed import ONE_PROCESS, SAVE, assert_same_weights, iter_state, losses, run_cli, write_configs
    from test_resume_exact import run_killed

    configs = write_configs(tmp_path / "cfg")
    steps = 16  # 27 blocks, batch 1 x accumulation 2: 13 steps an epoch, so the run crosses into epoch 2
    overrides = [ONE_PROCESS, "model.llm_lora.dropout=0.1", "data.pack_to_max_length=true",
                 "train.per_device_batch_size=1", f"train.max_steps={steps}"]
    ref, work = str(tmp_path / "ref"), str(tmp_path / "work")
    proc = run_cli(["finetune", configs["llava"], *overrides, "--work-dir", ref])
    stats = packed_stats(proc.stdout + proc.stderr)
    steps_per_epoch = stats["blocks"] // 2  # batch 1 x accumulation 2
    assert SAVE * 2 < steps_per_epoch < steps  # resumes mid-epoch, and the run crosses into the next epoch
    run_killed(tmp_path, configs["llava"], work, "none", overrides)
    proc = run_cli(["finetune", configs["llava"], *overrides, "--work-dir", work, "--resume", "auto"])
    assert f"resuming from {work}/checkpoint-{SAVE * 2}" in proc.stdout + proc.stderr
    assert losses(work) == pytest.approx(losses(ref), rel=1e-6)
    assert len(losses(ref)) == steps
    assert_same_weights(iter_state(work, steps), iter_state(ref, steps), atol=1e-6)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_packed_llava_matches_single_process(tmp_path):
    """2 processes under ZeRO-3 on packed blocks, some of them text-only, while the other rank's block has
    images: no hang (the text-only block runs the tower on its dummy image), same losses and weights as one
    process with the same global batch."""
    import yaml
    from transformers import AutoTokenizer

    from llava_ft.config import load_config
    from llava_ft.data.sampler import LengthGroupedSampler
    from test_distributed import ONE_PROCESS, assert_same_weights, iter_state, losses, run_cli, write_configs

    configs = write_configs(tmp_path / "cfg")
    body = yaml.safe_load(Path(configs["llava"]).read_text())
    body["data"]["sources"][1]["repeat"] = 8  # more text-only samples than the image blocks' gaps hold
    body["data"]["pack_to_max_length"] = True
    body["train"].update(per_device_batch_size=1, max_steps=6, save_steps=6, seed=0)  # seed 0: mixed steps early
    config = tmp_path / "packed.yaml"
    config.write_text(yaml.safe_dump(body))
    # Which blocks each rank gets at each step: the plain seeded shuffle, batch j on rank j % 2.
    cfg = load_config(str(config))
    packed = prepare_dataset(cfg.data, AutoTokenizer.from_pretrained(cfg.model.llm), num_image_tokens=16,
                             seed=cfg.train.seed).dataset
    has_image = [v > 0 for v in packed["modality_length"]]
    order = LengthGroupedSampler(packed["modality_length"], batch_size=1, world_size=2, seed=cfg.train.seed,
                                 group_by_length=False).indices(epoch=0)
    steps = [(has_image[order[2 * k]], has_image[order[2 * k + 1]]) for k in range(6)]
    assert any(a != b for a, b in steps), steps  # some step: one rank text-only, the other with images
    ref, work = str(tmp_path / "ref"), str(tmp_path / "zero3")
    run_cli(["finetune", str(config), ONE_PROCESS, "--work-dir", ref])
    run_cli(["finetune", str(config), "--work-dir", work, "--deepspeed", "zero3"], nproc=2)
    assert losses(work) == pytest.approx(losses(ref), rel=1e-5)
    assert_same_weights(iter_state(work, 6), iter_state(ref, 6))


@pytest.mark.parametrize("truncation", ["drop", "cut_text"])
def test_samples_longer_than_max_length_follow_truncation(tiny_llama, tiny_clip, mixed_data, truncation):
    cfg = make_cfg(tiny_llama, tiny_clip, mixed_data, "pretrain")
    cfg.data.max_length, cfg.data.truncation = 90, truncation
    _, tok = build_model(cfg, for_training=False)
    cfg.data.pack_to_max_length = False
    plain = prepare_dataset(cfg.data, tok, num_image_tokens=16, seed=0)
    cfg.data.pack_to_max_length = True
    packed = prepare_dataset(cfg.data, tok, num_image_tokens=16, seed=0)
    assert packed.stats["dropped"] == plain.stats["dropped"]
    if truncation == "drop":
        assert packed.stats["dropped"].get("too_long_with_images", 0) > 0
    assert packed.stats["packing"]["samples"] == plain.stats["samples"]
    assert max(packed.dataset["length"]) <= 90
    assert sorted(s for b in packed.dataset["id"] for s in b.split(",")) == sorted(plain.dataset["id"])


def test_logged_tokens_count_image_features(tiny_llama, tiny_clip, mixed_data, tmp_path):
    """train_log.jsonl's tokens_per_s counts what the model runs over: text tokens + every image feature."""
    from llava_ft.engine.run import training_arguments
    from llava_ft.engine.trainer import LlavaFtTrainer

    cfg = make_cfg(tiny_llama, tiny_clip, mixed_data, "pretrain")
    model, tok = build(cfg)
    packed, by_id, _ = datasets_for(cfg, model, tok)
    collate = MultimodalCollator(tok, image_shape=model.visual_encoder.image_shape)
    trainer = LlavaFtTrainer(model=model, args=training_arguments(cfg, str(tmp_path), None), llava_cfg=cfg,
                             train_dataset=packed, data_collator=collate)
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this test does not run
    block = packed[0]
    trainer.training_step(trainer.model, collate([block]))
    assert trainer._tokens_since_log == block["length"]  # a lone block: exactly its samples' positions
    trainer._tokens_since_log = 0
    samples = [by_id[s] for s in block["id"].split(",")]
    trainer.training_step(trainer.model, collate(samples))  # unpacked and padded: padding not counted
    assert trainer._tokens_since_log == sum(s["length"] for s in samples)
    trainer._tokens_since_log = 0
    blocks = [packed[i] for i in range(3)]  # several blocks of different lengths: flattened, no padding
    assert len({b["length"] for b in blocks}) > 1
    trainer.training_step(trainer.model, collate(blocks))
    assert trainer._tokens_since_log == sum(b["length"] for b in blocks)


def test_anyres_packed_loss_equals_unpacked(tiny_llama, tiny_clip, mixed_data):
    """AnyRes samples (overview + tiles, size-dependent token counts) pack like any other: same loss."""
    cfg = make_cfg(tiny_llama, tiny_clip, mixed_data, "finetune")
    cfg.model.image_aspect = "anyres"
    cfg.data.max_length = 1024  # 48 px demo images become 2x2 tiles: 88 positions each
    model, tok = build(cfg)
    packed, by_id, stats = datasets_for(cfg, model, tok)
    assert stats["packing"]["samples"] == len(by_id) and stats["packing"]["blocks"] < len(by_id)
    collate = MultimodalCollator(tok, image_shape=model.visual_encoder.image_shape)
    rows = [packed[i] for i in range(min(3, len(packed)))]
    batch = collate(rows)
    ref_batch = collate([by_id[s] for b in rows for s in b["id"].split(",")])
    assert batch["image_sizes"].shape[0] == ref_batch["image_sizes"].shape[0] > 0
    with torch.no_grad():
        loss, ref = model(**batch).loss, model(**ref_batch).loss
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
