"""Tests for llava_ft.model.llava.LlavaFtModel: text-only pass-through, the image splice, generate,
trainable-weights save/load, freezing under training.

Run: python -m pytest tests/test_llava_model.py -x -q
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from llava_ft import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.errors import UserError
from llava_ft.model.llava import LlavaFtModel


@pytest.fixture()
def llm(tiny_llama):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)


def test_text_only_forward_matches_llm(llm):
    model = LlavaFtModel(llm)
    ids = torch.randint(5, 100, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    ref = llm(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.allclose(out.loss, ref.loss)
    assert out.logits is None  # with labels the head runs only at supervised positions (model.lm_loss)
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (2, 7, llm.config.vocab_size)
    assert model.config is llm.config
    with pytest.raises(UserError, match="text-only"):
        model(input_ids=ids, pixel_values=torch.zeros(1, 3, 32, 32))


def test_text_only_generate_returns_new_tokens(llm):
    model = LlavaFtModel(llm).eval()
    ids = torch.randint(5, 100, (1, 6))
    new = model.generate(ids, max_new_tokens=4, do_sample=False)
    full = llm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
    assert torch.equal(new, full[:, 6:])


def test_trainable_state_dict_roundtrip_and_errors(llm):
    from llava_ft.config import LoraSettings
    from llava_ft.model.llm import apply_lora

    peft_llm = apply_lora(llm, LoraSettings(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    model = LlavaFtModel(peft_llm)
    sd = model.trainable_state_dict()
    assert sd and all(".lora_" in k for k in sd)
    assert all(k.startswith("llm.base_model.model.") for k in sd)
    changed = {k: torch.randn_like(v) for k, v in sd.items()}
    assert model.load_trainable_state_dict(changed) == sorted(changed)
    for k, v in model.trainable_state_dict().items():
        assert torch.equal(v, changed[k])

    partial = dict(list(changed.items())[1:])
    with pytest.raises(UserError, match="missing keys"):
        model.load_trainable_state_dict(partial)
    with pytest.raises(UserError, match="unexpected keys.*projector.layers.0.weight"):
        model.load_trainable_state_dict({**changed, "projector.layers.0.weight": torch.zeros(2)})
    first = next(iter(changed))
    with pytest.raises(UserError, match="shape mismatch"):
        model.load_trainable_state_dict({**changed, first: torch.zeros(3, 3)})


def test_gradient_checkpointing_delegates(llm):
    model = LlavaFtModel(llm)
    model.activation_checkpointing_enable()
    assert llm.model.gradient_checkpointing
    model.train()
    ids = torch.randint(5, 100, (2, 5))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert llm.lm_head.weight.grad is not None


# ---- LLaVA path ------------------------------------------------------------------------------------

@pytest.fixture()
def llava(llm, make_llava):
    return make_llava(llm)


IMG = IMAGE_TOKEN_INDEX


def test_features_land_at_placeholders_without_loss(llava):
    n = llava.visual_encoder.num_image_tokens  # 16
    # Row 0: text, image, text, image, text (2 images). Row 1: text only, right-padded.
    ids = torch.tensor([[7, 8, IMG, 9, 10, IMG, 11], [12, 13, 14, 15, 0, 0, 0]])
    mask = torch.tensor([[1] * 7, [1, 1, 1, 1, 0, 0, 0]])
    labels = torch.tensor([[-100, -100, -100, 9, 10, -100, 11], [-100, 13, 14, 15, -100, -100, -100]])
    pixel = torch.randn(2, 3, 32, 32)
    embeds, new_mask, new_labels, pos = llava.prepare_inputs_embeds(ids, mask, labels, pixel)
    feats = llava.encode_images(pixel)
    tok = llava.llm.get_input_embeddings()
    assert embeds.shape == (2, 5 + 2 * n, llava.llm.config.hidden_size)
    row = embeds[0]
    assert torch.allclose(row[:2], tok(torch.tensor([7, 8])))
    assert torch.allclose(row[2:2 + n], feats[0])
    assert torch.allclose(row[2 + n:4 + n], tok(torch.tensor([9, 10])))
    assert torch.allclose(row[4 + n:4 + 2 * n], feats[1])
    assert torch.allclose(row[4 + 2 * n], tok(torch.tensor(11)))
    assert (new_labels[0, 2:2 + n] == IGNORE_INDEX).all() and (new_labels[0, 4 + n:4 + 2 * n] == IGNORE_INDEX).all()
    assert new_labels[0, 2 + n:4 + n].tolist() == [9, 10] and new_labels[0, -1] == 11
    # The text-only row keeps its tokens and is right-padded to the new width.
    assert torch.allclose(embeds[1, :4], tok(torch.tensor([12, 13, 14, 15])))
    assert new_mask[1].tolist() == [1] * 4 + [0] * (embeds.shape[1] - 4)
    assert new_labels[1, :4].tolist() == [-100, 13, 14, 15] and (new_labels[1, 4:] == IGNORE_INDEX).all()
    assert pos[0].tolist() == list(range(5 + 2 * n)) and pos[1, :4].tolist() == [0, 1, 2, 3]
    # Loss counts only the real text labels: the same as the LLM run on the spliced embeddings.
    out = llava(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixel)
    ref = llava.llm(inputs_embeds=embeds, attention_mask=new_mask, labels=new_labels, position_ids=pos)
    assert torch.allclose(out.loss, ref.loss)


def test_placeholder_count_mismatch_is_an_error(llava):
    ids = torch.tensor([[5, IMG, 6, IMG]])
    with pytest.raises(UserError, match="2 <image> placeholders but 1 images"):
        llava(input_ids=ids, pixel_values=torch.randn(1, 3, 32, 32))
    with pytest.raises(UserError, match="no pixel_values"):
        llava(input_ids=ids)


def test_dummy_image_runs_vision_path_with_zero_effect(llava):
    ids = torch.randint(5, 100, (2, 6))
    labels = ids.clone()
    out = llava(input_ids=ids, labels=labels, pixel_values=torch.randn(1, 3, 32, 32))
    ref = llava.llm(input_ids=ids, labels=labels)
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)
    out.loss.backward()
    # The projector is in the graph (gradient exists, all zero): every rank reduces the same params.
    grads = [p.grad for p in llava.projector.parameters()]
    assert all(g is not None and torch.count_nonzero(g) == 0 for g in grads)
    # A dummy of the wrong size (collator built without image_shape) is replaced, not a crash.
    out = llava(input_ids=ids, labels=labels, pixel_values=torch.zeros(1, 3, 336, 336))
    assert torch.allclose(out.loss, ref.loss, atol=1e-6)


@pytest.mark.smoke
def test_frozen_tower_stays_projector_learns(llava):
    for p in llava.llm.parameters():
        p.requires_grad_(False)
    for p in llava.visual_encoder.parameters():
        p.requires_grad_(False)
    ve_before = {k: v.clone() for k, v in llava.visual_encoder.state_dict().items()}
    proj_before = {k: v.clone() for k, v in llava.projector.state_dict().items()}
    opt = torch.optim.AdamW([p for p in llava.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([[IMG, 5, 6, 7, 8], [9, IMG, 10, 11, 12]])
    pixel = torch.randn(2, 3, 32, 32)
    for _ in range(2):
        loss = llava(input_ids=ids, labels=ids.masked_fill(ids == IMG, IGNORE_INDEX), pixel_values=pixel).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, llava.visual_encoder.state_dict()[k]) for k, v in ve_before.items())
    assert any(not torch.equal(v, llava.projector.state_dict()[k]) for k, v in proj_before.items())
    sd = llava.trainable_state_dict()
    assert sorted(sd) == ["projector.layers.0.bias", "projector.layers.0.weight",
                          "projector.layers.2.bias", "projector.layers.2.weight"]
    assert {LlavaFtModel.module_of(n) for n, _ in llava.named_parameters()} == {"llm", "visual_encoder", "projector"}


def test_generate_with_image_matches_manual_greedy(llava):
    llava.eval()
    ids = torch.tensor([[5, IMG, 6, 7]])
    pixel = torch.randn(1, 3, 32, 32)
    new = llava.generate(ids, pixel_values=pixel, max_new_tokens=3, do_sample=False)
    assert new.shape == (1, 3)
    # Greedy by hand through forward: the first generated token is the argmax of the last logits.
    logits = llava(input_ids=ids, pixel_values=pixel).logits
    assert new[0, 0] == logits[0, -1].argmax()
    # Batched, left-padded prompts give the same first token for the same row.
    ids2 = torch.tensor([[0, 0, 5, IMG, 6, 7], [8, 9, 5, IMG, 6, 7]])
    mask2 = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6])
    new2 = llava.generate(ids2, attention_mask=mask2, pixel_values=pixel.repeat(2, 1, 1, 1), max_new_tokens=3,
                          do_sample=False, pad_token_id=0)
    assert new2[0, 0] == new[0, 0]


def test_llava_recipes_load_and_match_xtuner_numbers():
    from llava_ft.config import CONFIG_ROOT, load_config

    recipes = sorted((CONFIG_ROOT / "llava").glob("*.yaml"))
    assert len(recipes) >= 14
    for path in recipes:
        assert path.read_text().splitlines()[1].strip().startswith("#   llava_ft ")  # command on top
        cfg = load_config(str(path))
        assert cfg.is_llava and cfg.train.warmup_ratio == 0.03 and cfg.train.save_steps == 500
        if cfg.resolved_phase == "pretrain":
            assert cfg.train.learning_rate == 1e-3
            assert cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps * 8 == 256
        elif cfg.resolved_phase == "preference":  # DPO from a finetune run: same model section, its work dir
            assert cfg.preference.loss == "sigmoid" and cfg.preference.beta == 0.1 and cfg.model.pretrained_pth
            assert "finetune" in cfg.model.pretrained_pth and (cfg.model.llm_lora.r, cfg.model.llm_lora.alpha) == (512, 256)
        elif cfg.model.llava:  # continues a released LLaVA-NeXT / OneVision: its own prompt format, no pretrain
            assert cfg.resolved_phase == "finetune" and cfg.train.learning_rate == 2e-4
            assert cfg.data.template == "hf" and not cfg.model.pretrained_pth and cfg.model.llm_lora.enabled
        else:
            assert cfg.resolved_phase == "finetune" and cfg.train.learning_rate == 2e-4
            assert (cfg.model.llm_lora.r, cfg.model.llm_lora.alpha) == (512, 256)
            assert (cfg.model.visual_encoder_lora.r, cfg.model.visual_encoder_lora.alpha) == (64, 16)
            # LLaVA-1.5 pads to square; AnyRes (LLaVA-NeXT) tiles instead.
            assert cfg.data.pad_image_to_square == (cfg.model.image_aspect == "pad") and cfg.model.pretrained_pth


@pytest.mark.parametrize("lora_targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_llava_chunked_loss_and_grads_equal_full_logits(llava, lora_targets):
    """The loss at supervised positions in chunks (default) equals transformers' full-logits loss
    (loss_chunk_tokens 0): LLaVA splice, padding, num_items_in_batch, LoRA on the head or not."""
    from llava_ft.config import LoraSettings
    from llava_ft.model.llm import apply_lora

    llava.llm = apply_lora(llava.llm, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0,
                                                           target_modules=lora_targets))
    torch.manual_seed(2)
    for name, p in llava.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)  # B is 0 at init: make LoRA change the output
    ids = torch.tensor([[7, 8, IMG, 9, 10, IMG, 11, 12], [12, 13, 14, 15, 16, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    labels = torch.tensor([[-100, -100, -100, 9, 10, -100, 11, 12], [-100, 13, 14, 15, 16, -100, -100, -100]])
    pixel = torch.randn(2, 3, 32, 32)
    results = []
    for chunk in (0, 3):
        llava.loss_chunk_tokens = chunk
        llava.zero_grad()
        loss = llava(input_ids=ids, attention_mask=mask, labels=labels, pixel_values=pixel,
                     num_items_in_batch=torch.tensor(9)).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in llava.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (ref, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    assert any("lm_head" in n for n in grads) == ("lm_head" in lora_targets)
    assert any(n.startswith("projector") for n in grads)
    for n in grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-5, msg=n)
