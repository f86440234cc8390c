"""Preference training: the shared-prefix layout equals the duplicated computation; the losses equal TRL's
DPOTrainer (sigmoid, hinge, ipo, robust) and the ORPO / SimPO papers' formulas.

Run: python -m pytest tests/test_preference.py -x -q
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from llava_ft import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.config import LoraSettings
from llava_ft.data.preference_collate import PreferenceCollator
from llava_ft.model.preference import sequence_logps
from llava_ft.engine.preference_loss import preference_loss
from llava_ft.model.preference import SequenceLogps
from llava_ft.model.llava import LlavaFtModel


@pytest.fixture()
def llm(tiny_llama):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa")


@pytest.fixture()
def llava(llm, make_llava):
    return make_llava(llm)


def make_pair(gen, n_images=0, prompt_len=6, chosen_len=4, rejected_len=5, unsupervised=0):
    def ids(n):
        return torch.randint(5, 400, (n,), generator=gen).tolist()

    prompt = ids(prompt_len)
    for k in range(n_images):
        prompt.insert(1 + 2 * k, IMAGE_TOKEN_INDEX)
    chosen, rejected = ids(chosen_len), ids(rejected_len)
    pair = {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected,
            "chosen_labels": [IGNORE_INDEX] * unsupervised + chosen[unsupervised:],
            "rejected_labels": [IGNORE_INDEX] * unsupervised + rejected[unsupervised:]}
    if n_images:
        pair["pixel_values"] = torch.randn((n_images, 3, 32, 32), generator=gen)
    return pair


def duplicated_logps(model, pairs):
    """Each answer as its own sequence prompt + answer, through the model's ordinary forward."""
    chosen, rejected, nc, nr = [], [], [], []
    for p in pairs:
        for answer, labels, out, counts in ((p["chosen_ids"], p["chosen_labels"], chosen, nc),
                                            (p["rejected_ids"], p["rejected_labels"], rejected, nr)):
            ids = torch.tensor([p["prompt_ids"] + answer])
            lab = torch.tensor([[IGNORE_INDEX] * len(p["prompt_ids"]) + labels])
            kwargs = {k: p[k] for k in ("pixel_values", "image_sizes") if k in p}
            if getattr(model, "visual_encoder", None) is not None:
                _, _, lab, _ = model.prepare_inputs_embeds(ids, torch.ones_like(ids), lab, kwargs.get("pixel_values"),
                                                           image_sizes=kwargs.get("image_sizes"))
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs).logits.float()
            target = lab[:, 1:]
            logp = torch.log_softmax(logits[:, :-1], -1)
            keep = target != IGNORE_INDEX
            out.append(logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][keep].sum())
            counts.append(int(keep.sum()))
    return SequenceLogps(torch.stack(chosen), torch.stack(rejected), torch.tensor(nc), torch.tensor(nr))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def check_equal_to_duplicated(model, pairs, pack_length=None, image_shape=None):
    settings = SimpleNamespace(loss="sigmoid", beta=0.1, sft_weight=0.5, label_smoothing=0.0, simpo_gamma=0.5)
    gen = torch.Generator().manual_seed(5)
    n = len(pairs)
    ref = SequenceLogps(torch.randn(n, generator=gen), torch.randn(n, generator=gen), None, None)

    model.zero_grad()
    dup = duplicated_logps(model, pairs)
    preference_loss(settings, dup, ref).loss.backward()
    dup_grads = _grads(model)

    model.zero_grad()
    batch = PreferenceCollator(pad_token_id=0, image_shape=image_shape, pack_length=pack_length)(pairs)
    shared = sequence_logps(model, batch)
    preference_loss(settings, shared, ref).loss.backward()
    shared_grads = _grads(model)

    torch.testing.assert_close(shared.chosen, dup.chosen, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.rejected, dup.rejected, atol=1e-5, rtol=1e-5)
    assert shared.chosen_tokens.tolist() == dup.chosen_tokens.tolist()
    assert shared.rejected_tokens.tolist() == dup.rejected_tokens.tolist()
    assert dup_grads
    for name in dup_grads.keys() | shared_grads.keys():  # absent = zero (the dummy image's path)
        ours = shared_grads.get(name, torch.zeros_like(dup_grads.get(name, shared_grads.get(name))))
        theirs = dup_grads.get(name, torch.zeros_like(ours))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4, msg=name)
    return batch


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_text_pairs_equal_duplicated(tiny_llama, attn):
    torch.manual_seed(0)
    llm = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation=attn)
    gen = torch.Generator().manual_seed(0)
    model = LlavaFtModel(llm)
    pairs = [make_pair(gen, prompt_len=7, chosen_len=3, rejected_len=6),
             make_pair(gen, prompt_len=4, chosen_len=6, rejected_len=2, unsupervised=1)]
    check_equal_to_duplicated(model, pairs)


def test_packed_rows_equal_duplicated(llm):
    gen = torch.Generator().manual_seed(1)
    model = LlavaFtModel(llm)
    pairs = [make_pair(gen, prompt_len=5 + k, chosen_len=2 + k, rejected_len=4) for k in range(4)]
    batch = check_equal_to_duplicated(model, pairs, pack_length=40)
    assert batch["input_ids"].shape[0] < len(pairs)  # several pairs really share a row


def test_packed_rows_with_lora_equal_duplicated(llm):
    from llava_ft.model.llm import apply_lora

    gen = torch.Generator().manual_seed(2)
    peft_llm = apply_lora(llm, LoraSettings(enabled=True, r=4, alpha=8, dropout=0.0,
                                            target_modules=["q_proj", "v_proj"]))
    for n, p in peft_llm.named_parameters():  # B = 0 at init would leave A without gradient
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=gen)
    pairs = [make_pair(gen, prompt_len=5, chosen_len=3, rejected_len=4) for _ in range(3)]
    check_equal_to_duplicated(LlavaFtModel(peft_llm), pairs, pack_length=64)


@pytest.mark.parametrize("images", [(1,), (2,), (1, 0, 2)])
def test_image_pairs_equal_duplicated(llava, images):
    gen = torch.Generator().manual_seed(3)
    pairs = [make_pair(gen, n_images=n, prompt_len=5, chosen_len=3, rejected_len=4) for n in images]
    batch = check_equal_to_duplicated(llava, pairs, image_shape=llava.visual_encoder.image_shape)
    assert batch["pixel_values"].shape[0] == sum(images)  # each pair's images once


def test_image_pairs_packed_equal_duplicated(llava):
    gen = torch.Generator().manual_seed(4)
    pairs = [make_pair(gen, n_images=n, prompt_len=4, chosen_len=3, rejected_len=3) for n in (1, 0, 2)]
    batch = check_equal_to_duplicated(llava, pairs, image_shape=llava.visual_encoder.image_shape,
                                      pack_length=200)
    assert batch["input_ids"].shape[0] == 1


def test_text_only_batch_through_llava_runs_vision_path(llava):
    gen = torch.Generator().manual_seed(6)
    pairs = [make_pair(gen, prompt_len=5, chosen_len=3, rejected_len=4) for _ in range(2)]
    batch = check_equal_to_duplicated(llava, pairs, image_shape=llava.visual_encoder.image_shape)
    assert batch["pixel_values"].shape[0] == 1  # the dummy image
    assert any(p.grad is not None for p in llava.projector.parameters())  # in the graph, times zero


def test_anyres_pairs_equal_duplicated(tiny_llama, tiny_clip, tmp_path):
    """AnyRes images (overview + tiles, a different feature count per image size) in the shared prefix."""
    from PIL import Image

    from llava_ft.config import config_from_dict
    from llava_ft.model.builder import build_model

    cfg = config_from_dict({"model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "image_aspect": "anyres",
                                      "dtype": "fp32", "attn_implementation": "sdpa"},
                            "data": {"sources": [{"path": "unused.json"}], "template": "qwen_chat"}})
    model, _ = build_model(cfg)
    spec = model.visual_encoder.anyres
    gen = torch.Generator().manual_seed(7)
    pairs = []
    for sizes in ([(40, 120)], [(120, 40), (48, 48)]):
        pair = make_pair(gen, n_images=len(sizes), prompt_len=5, chosen_len=3, rejected_len=4)
        pair["pixel_values"] = torch.cat([spec.views(Image.new("RGB", (w, h), (200, 30, 30))) for h, w in sizes])
        pair["image_sizes"] = torch.tensor(sizes)
        pairs.append(pair)
    check_equal_to_duplicated(model, pairs, image_shape=model.visual_encoder.image_shape, pack_length=4000)


# ---- losses: the papers' formulas ------------------------------------------------------------------

def _random_logps(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lens_c, lens_r = torch.randint(1, 9, (n,), generator=gen), torch.randint(1, 9, (n,), generator=gen)
    # per-token log-probs in (-3, 0) so that average probabilities stay below 1 (ORPO's log odds)
    chosen = -(torch.rand(n, generator=gen) * 3 + 0.05) * lens_c
    rejected = -(torch.rand(n, generator=gen) * 3 + 0.05) * lens_r
    return SequenceLogps(chosen.requires_grad_(), rejected.requires_grad_(), lens_c, lens_r)


def test_orpo_equals_paper_formula():
    logps = _random_logps()
    beta = 0.25
    out = preference_loss(SimpleNamespace(loss="orpo", beta=beta, sft_weight=0.0), logps)
    pc = torch.exp(logps.chosen / logps.chosen_tokens)
    pr = torch.exp(logps.rejected / logps.rejected_tokens)
    odds_ratio = (pc / (1 - pc)) / (pr / (1 - pr))
    paper = (-torch.log(pc) - beta * torch.log(torch.sigmoid(torch.log(odds_ratio)))).mean()
    torch.testing.assert_close(out.loss, paper)
    g_ours = torch.autograd.grad(out.loss, [logps.chosen, logps.rejected], retain_graph=True)
    g_paper = torch.autograd.grad(paper, [logps.chosen, logps.rejected])
    for a, b in zip(g_ours, g_paper):
        torch.testing.assert_close(a, b)


def test_simpo_equals_paper_formula():
    logps = _random_logps(seed=1)
    beta, gamma = 2.0, 0.8
    out = preference_loss(SimpleNamespace(loss="simpo", beta=beta, simpo_gamma=gamma, sft_weight=0.0), logps)
    margin = beta / logps.chosen_tokens * logps.chosen - beta / logps.rejected_tokens * logps.rejected - gamma
    paper = (-torch.log(torch.sigmoid(margin))).mean()
    torch.testing.assert_close(out.loss, paper)
    torch.testing.assert_close(torch.autograd.grad(out.loss, logps.chosen)[0],
                               torch.autograd.grad(paper, logps.chosen)[0])


def test_sft_weight_adds_chosen_token_mean_nll():
    logps = _random_logps(seed=2)
    ref = SequenceLogps(torch.zeros(6), torch.zeros(6), None, None)
    base = preference_loss(SimpleNamespace(loss="sigmoid", beta=0.1, sft_weight=0.0), logps, ref).loss
    with_sft = preference_loss(SimpleNamespace(loss="sigmoid", beta=0.1, sft_weight=0.3), logps, ref).loss
    nll = -logps.chosen.sum() / logps.chosen_tokens.sum()
    torch.testing.assert_close(with_sft, base + 0.3 * nll)


def test_dpo_equal_policy_and_reference_is_log2():
    logps = _random_logps(seed=3)
    out = preference_loss(SimpleNamespace(loss="sigmoid", beta=0.1, sft_weight=0.0), logps, logps.detach())
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert out.metrics["rewards/margins"].abs().max().item() == 0.0


# ---- losses: TRL's DPOTrainer on the same batch and weights -----------------------------------------

@pytest.fixture(scope="module")
def trl_setup(tiny_llama, tmp_path_factory):
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rows = {"prompt": ["a red circle is", "the blue square", "what colour is the sky? "],
            "chosen": [" red and round", " is blue", "blue, mostly"],
            "rejected": [" green", " is a yellow triangle", "purple"]}
    return tok, Dataset.from_dict(rows), tmp_path_factory.mktemp("trl")


def _policy_and_reference(tiny_llama):
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa")
    policy = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # the policy has moved away from the reference, so the loss is not log 2
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return policy, ref


@pytest.mark.parametrize("kind,smoothing", [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2)])
def test_dpo_family_equals_trl(tiny_llama, trl_setup, kind, smoothing):
    from trl import DPOConfig, DPOTrainer

    tok, rows, tmp = trl_setup
    beta = 0.3
    policy, ref = _policy_and_reference(tiny_llama)
    args = DPOConfig(output_dir=str(tmp / kind), loss_type=[kind], beta=beta, label_smoothing=smoothing,
                     report_to="none", use_cpu=True, max_length=None, per_device_train_batch_size=3,
                     dataset_num_proc=None, disable_dropout=True, bf16=False,
                     gradient_checkpointing=False)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=rows, processing_class=tok)
    examples = [trainer.train_dataset[i] for i in range(len(rows))]
    trl_batch = trainer.data_collator(examples)
    policy.zero_grad()
    policy.train()  # TRL files its metrics under the model's mode
    trl_loss = trainer.compute_loss(trainer.model, trl_batch)
    trl_loss.backward()
    trl_grads = _grads(policy)
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    ours_model = LlavaFtModel(policy)
    pairs = [{"prompt_ids": e["prompt_ids"], "chosen_ids": e["chosen_ids"], "rejected_ids": e["rejected_ids"],
              "chosen_labels": e["chosen_ids"], "rejected_labels": e["rejected_ids"]} for e in examples]
    batch = PreferenceCollator(pad_token_id=tok.pad_token_id)(pairs)
    with torch.no_grad():
        reference = sequence_logps(LlavaFtModel(ref), batch)
    policy.zero_grad()
    settings = SimpleNamespace(loss=kind, beta=beta, label_smoothing=smoothing, sft_weight=0.0)
    out = preference_loss(settings, sequence_logps(ours_model, batch), reference)
    out.loss.backward()
    ours_grads = _grads(policy)

    torch.testing.assert_close(out.loss, trl_loss.detach(), atol=1e-5, rtol=1e-5)
    assert trl_loss.item() != pytest.approx(math.log(2), abs=1e-3)  # a real difference between the models
    assert ours_grads.keys() == trl_grads.keys()
    for name, g in trl_grads.items():
        torch.testing.assert_close(ours_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                "logps/chosen", "logps/rejected"):
        assert out.metrics[key].mean().item() == pytest.approx(metrics[key], abs=1e-5), key


def test_llava_dpo_equals_trl_via_llava_hf_export(tiny_llama, tiny_clip, tmp_path):
    """TRL's DPOTrainer on the llava-hf export (its processor expands each <image>, its collator runs prompt
    and image twice) vs llava_ft's shared prefix on the same weights and pixels: loss and every gradient
    (LLM, vision tower, projector)."""
    pytest.importorskip("trl")
    import shutil

    from datasets import Dataset
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    from trl import DPOConfig, DPOTrainer

    from llava_ft.config import config_from_dict
    from llava_ft.convert import pth_to_hf
    from llava_ft.model.builder import build_model
    from llava_ft.testing.checkpoints import write_random_checkpoint

    raw = {"model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True, "dtype": "fp32",
                     "llm_lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}},
           "data": {"template": "chatml", "sources": [{"path": "unused.json"}]}}
    hf = pth_to_hf(None, write_random_checkpoint(tmp_path / "wd", raw), tmp_path / "hf", fmt="llava-hf")
    processor = AutoProcessor.from_pretrained(hf)
    policy = LlavaForConditionalGeneration.from_pretrained(hf, dtype=torch.float32)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the policy moved away from the reference
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    policy_dir = tmp_path / "policy"
    shutil.copytree(hf, policy_dir)
    policy.save_pretrained(policy_dir)

    images = [Image.new("RGB", (32, 32), c) for c in [(200, 20, 20), (20, 200, 20)]]
    rows = Dataset.from_dict({"prompt": ["<image>\nWhat colour is it?", "<image>\nDescribe the picture."],
                              "chosen": [" red", " a green square"], "rejected": [" blue, striped", " nothing"],
                              "images": [[images[0]], [images[1]]]})
    args = DPOConfig(output_dir=str(tmp_path / "trl"), loss_type=["sigmoid"], beta=0.3, report_to="none",
                     use_cpu=True, max_length=None, per_device_train_batch_size=2, bf16=False,
                     gradient_checkpointing=False, disable_dropout=True)
    reference = LlavaForConditionalGeneration.from_pretrained(hf, dtype=torch.float32)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=rows, processing_class=processor)
    trl_batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    policy.train()
    for p in policy.parameters():
        p.requires_grad_(True)
    trl_loss = trainer.compute_loss(policy, trl_batch)
    trl_loss.backward()

    # The same pairs in llava_ft's layout: TRL's expanded image tokens back to one placeholder each.
    image_id, n = policy.config.image_token_index, len(rows)
    pairs = []
    for i in range(n):
        parts = []
        for r in (i, i + n):
            keep = trl_batch["attention_mask"][r].bool()
            ids, completion = trl_batch["input_ids"][r][keep].tolist(), trl_batch["completion_mask"][r][keep].tolist()
            start = completion.index(1)
            parts.append((ids[:start], ids[start:]))
        assert parts[0][0] == parts[1][0]
        prompt = []
        for t in parts[0][0]:
            if not (t == image_id and prompt and prompt[-1] == IMAGE_TOKEN_INDEX):
                prompt.append(IMAGE_TOKEN_INDEX if t == image_id else t)
        pairs.append({"prompt_ids": prompt, "chosen_ids": parts[0][1], "rejected_ids": parts[1][1],
                      "chosen_labels": parts[0][1], "rejected_labels": parts[1][1],
                      "pixel_values": trl_batch["pixel_values"][i:i + 1]})

    def ours(folder):
        cfg = config_from_dict({"model": {"llava": str(folder), "dtype": "fp32", "attn_implementation": "sdpa",
                                          "freeze_visual_encoder": False},
                                "data": {"template": "chatml", "sources": [{"path": "unused.json"}]}})
        return build_model(cfg)[0]

    ours_policy, ours_reference = ours(policy_dir), ours(hf)
    batch = PreferenceCollator(pad_token_id=processor.tokenizer.pad_token_id, image_shape=(3, 32, 32))(pairs)
    with torch.no_grad():
        ref_logps = sequence_logps(ours_reference, batch)
    ours_policy.train()
    out = preference_loss(SimpleNamespace(loss="sigmoid", beta=0.3, sft_weight=0.0),
                          sequence_logps(ours_policy, batch), ref_logps)
    out.loss.backward()
    torch.testing.assert_close(out.loss, trl_loss.detach(), atol=1e-5, rtol=1e-5)

    theirs = {n: p.grad for n, p in policy.named_parameters() if p.grad is not None}
    renames = (("llm.model.", "model.language_model."), ("llm.lm_head.", "lm_head."),
               ("projector.layers.0.", "model.multi_modal_projector.linear_1."),
               ("projector.layers.2.", "model.multi_modal_projector.linear_2."),
               ("visual_encoder.model.", "model.vision_tower."))
    compared = 0
    for name, p in ours_policy.named_parameters():
        if p.grad is None:
            continue
        for a, b in renames:
            name = name.replace(a, b)
        torch.testing.assert_close(p.grad, theirs[name], atol=1e-5, rtol=1e-4, msg=name)
        compared += 1
    assert compared == len(theirs)
