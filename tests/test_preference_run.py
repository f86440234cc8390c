"""Preference runs end to end on tiny models (CPU, fp32): `run_training` on pair data logs the DPO metrics,
the step-0 DPO loss is exactly log 2 from every starting point (base, SFT work dir, SFT iter_N.pth),
the reference is the SFT policy (not the bare base), reference-free losses build no reference, the
config refuses wrong combinations, the output converts and chats like an SFT run's, pairs pack into rows,
precomputed log-probs survive a resume, and 2 processes (DDP, ZeRO-3 with every reference kind) equal one.

Run: python -m pytest tests/test_preference_run.py -x -q      (-m "not multiprocess": without the ~5 min of
     2-process runs)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from llava_ft.config import apply_override, config_from_dict
from llava_ft.engine import run_training
from llava_ft.engine.callbacks import read_train_log
from llava_ft.errors import UserError

PAIRS = [("Who are you?", "I am TinyBot.", "I am a cat."),
         ("What colour is the sky?", "Blue.", "Green, with stripes."),
         ("Say hi.", "Hi!", "No."),
         ("Count to three.", "One, two, three.", "Five."),
         ("Name a shape.", "A circle.", "A colour."),
         ("Is fire hot?", "Yes, fire is hot.", "No, it is cold.")]


def write_rlaif_v_pairs(path, demo_data, n: int = 6):
    """RLAIF-V-shaped pairs (image, question, chosen, rejected) from the demo's held-out images: the right
    answer is chosen, a shape that is not there is rejected."""
    rows = [json.loads(line) for line in open(demo_data["eval"])][:n]
    with open(path, "w") as fh:
        for r in rows:
            fh.write(json.dumps({"image": r["image"], "question": r["question"], "chosen": r["answer"],
                                 "rejected": "A green hexagon with stripes."}) + "\n")
    return path


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    with open(path, "w") as fh:
        for q, good, bad in PAIRS:
            fh.write(json.dumps({"prompt": [{"role": "user", "content": q}],
                                 "chosen": [{"role": "assistant", "content": good}],
                                 "rejected": [{"role": "assistant", "content": bad}]}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "sft.jsonl"
    with open(path, "w") as fh:
        for q, good, _ in PAIRS:
            fh.write(json.dumps({"messages": [{"role": "user", "content": q},
                                              {"role": "assistant", "content": good}]}) + "\n")
    return str(path)


def make_cfg(llm, data_path, tmp_path, preference=None, **overrides):
    raw = {
        "name": "tiny_dpo",
        "model": {"llm": llm, "dtype": "fp32", "attn_implementation": "sdpa",
                  "llm_lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}},
        "data": {"sources": [{"path": data_path}], "template": "qwen_chat", "max_length": 128,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"learning_rate": 5e-3, "per_device_batch_size": 3, "max_steps": 2, "save_steps": 2,
                  "save_total_limit": 2, "logging_steps": 1, "warmup_ratio": 0.0},
    }
    if preference is not None:
        raw["preference"] = preference
    for dotted, value in overrides.items():  # model__pretrained_pth=x -> model.pretrained_pth=x
        apply_override(raw, f"{dotted.replace('__', '.')}={json.dumps(value)}")
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def sft_run(tiny_qwen2, sft_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sft_run")
    cfg = make_cfg(tiny_qwen2, sft_file, tmp, train__max_steps=3, train__save_steps=3, train__learning_rate=2e-2)
    return run_training(cfg, work_dir=str(tmp / "wd"))


def test_dpo_run_logs_metrics_and_starts_at_log2(tiny_qwen2, pair_file, tmp_path):
    cfg = make_cfg(tiny_qwen2, pair_file, tmp_path, preference={"loss": "dpo", "beta": 0.5},
                   data__val_split=0.34, evaluation__every_n_steps=2)
    assert cfg.resolved_phase == "preference" and cfg.preference.loss == "sigmoid"
    result = run_training(cfg, work_dir=str(tmp_path / "wd"))
    log = read_train_log(tmp_path / "wd")
    train_rows = [r for r in log if "loss" in r]
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # fresh adapter: policy == reference
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected"):
        assert all(key in r for r in train_rows), key
    assert train_rows[0]["rewards/margins"] == 0.0
    assert train_rows[1]["rewards/margins"] != 0.0  # the policy moved away from the reference
    evals = [r for r in result.log_history if "eval_loss" in r]
    assert evals and "eval_rewards/accuracies" in evals[-1]
    saved = torch.load(tmp_path / "wd" / "iter_2.pth", weights_only=True)
    assert saved["meta"]["phase"] == "preference"
    assert (tmp_path / "wd" / "loss.png").is_file()

    # convert + chat load on the DPO iter file work as on an SFT one
    from llava_ft.convert import pth_to_hf
    from llava_ft.inference import load_chat_model

    out = tmp_path / "hf"
    pth_to_hf(None, str(tmp_path / "wd" / "iter_2.pth"), str(out))
    chat = load_chat_model(tiny_qwen2, adapter=str(out), device="cpu")
    from llava_ft.inference.chat_model import GenerationSettings

    assert chat.chat([{"role": "user", "content": "Who are you?"}],
                     settings=GenerationSettings(max_new_tokens=3)).completion_tokens > 0


@pytest.mark.parametrize("start", ["work_dir", "iter_file"])
def test_reference_is_the_sft_policy(tiny_qwen2, pair_file, sft_run, tmp_path, start):
    from llava_ft.engine.preference import Reference
    from llava_ft.model.builder import build_model

    pretrained = sft_run.work_dir if start == "work_dir" else sft_run.last_checkpoint
    cfg = make_cfg(tiny_qwen2, pair_file, tmp_path, preference={"loss": "sigmoid"}, model__pretrained_pth=pretrained)
    result = run_training(cfg, work_dir=str(tmp_path / "wd"))
    first = [r for r in read_train_log(tmp_path / "wd") if "loss" in r][0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    # ... and that reference is the SFT policy: its log-probs differ from the bare base model's.
    from llava_ft.engine.preference import build_preference_data

    model, tok = build_model(cfg)
    reference = Reference.build(model, cfg)
    assert reference.kind == "swap"
    dataset, collator, _, _ = build_preference_data(cfg, model, tok)
    batch = collator([dataset[i] for i in range(3)])
    with torch.no_grad():
        model.load_trainable_state_dict(result.model.trainable_state_dict())  # the policy after 2 DPO steps
        ref = reference.logps(model, batch)
        base_cfg = make_cfg(tiny_qwen2, pair_file, tmp_path, preference={"loss": "sigmoid"})
        base, _ = build_model(base_cfg)
        base_logps = base(**batch)["chosen"]
        sft, _ = build_model(make_cfg(tiny_qwen2, pair_file, tmp_path, model__pretrained_pth=pretrained))
        sft_logps = sft(**batch)["chosen"]
    torch.testing.assert_close(ref.chosen, sft_logps)  # the reference is the SFT policy ...
    assert not torch.allclose(ref.chosen, base_logps, atol=1e-3)  # ... not the bare base model
    assert result.global_step == 2


def test_orpo_and_simpo_build_no_reference(tiny_qwen2, pair_file, tmp_path, monkeypatch):
    from llava_ft.engine import preference

    built = []
    original = preference.Reference.build.__func__

    def spy(cls, model, cfg):
        ref = original(cls, model, cfg)
        built.append(ref)
        return ref

    monkeypatch.setattr(preference.Reference, "build", classmethod(spy))
    for loss in ("orpo", "simpo"):
        cfg = make_cfg(tiny_qwen2, pair_file, tmp_path / loss, preference={"loss": loss}, train__max_steps=1)
        run_training(cfg, work_dir=str(tmp_path / loss / "wd"))
    assert built == [None, None]


@pytest.mark.parametrize("preference,extra,match", [
    ({"loss": "orpo", "reference": "adapter"}, {}, "uses no reference"),
    ({"loss": "sigmoid", "reference": "none"}, {}, "needs a reference"),
    ({"loss": "sigmoid", "reference": "adapter"}, {"model__llm_lora__enabled": False}, "needs LoRA"),
    ({"loss": "sigmoid", "label_smoothing": 0.1}, {}, "robust only"),
    ({"loss": "robust", "label_smoothing": 0.5}, {}, r"\[0, 0.5\)"),
    ({"loss": "sigmoid", "beta": 0}, {}, "beta"),
    ({"loss": "kto"}, {}, "preference.loss"),
])
def test_config_refuses_bad_combinations(tiny_qwen2, pair_file, tmp_path, preference, extra, match):
    with pytest.raises(UserError, match=match):
        make_cfg(tiny_qwen2, pair_file, tmp_path, preference=preference, **extra)


# ---- LLaVA: RLAIF-V-style pairs, starting from a finetune work dir / a llava-hf folder ---------------

@pytest.fixture(scope="module")
def llava_start(tmp_path_factory, tiny_llama, tiny_clip, demo_data):
    from llava_ft.convert import pth_to_hf
    from llava_ft.testing.checkpoints import write_random_checkpoint

    root = tmp_path_factory.mktemp("llava_dpo")
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    raw = {"model": {"llm": tiny_llama, "visual_encoder": tiny_clip, "freeze_llm": True, "llm_lora": lora,
                     "dtype": "fp32"},
           "data": {"template": "chatml", "sources": [{"path": "unused.json"}]}}
    pth = write_random_checkpoint(root / "finetune", raw)
    pairs = write_rlaif_v_pairs(root / "rlaif_v.jsonl", demo_data)
    return {"raw": raw, "work_dir": str(root / "finetune"), "pairs": str(pairs),
            "image_folder": demo_data["image_folder"], "llava_hf": pth_to_hf(None, pth, root / "hf", fmt="llava-hf")}


def llava_cfg(start, tmp_path, **model):
    raw = json.loads(json.dumps(start["raw"]))
    raw["model"].update(model)
    raw.update(name="tiny_llava_dpo", preference={"loss": "sigmoid", "beta": 0.2})
    raw["data"] = {"template": "chatml", "max_length": 256, "cache_dir": str(tmp_path / "cache"),
                   "sources": [{"path": start["pairs"], "image_folder": start["image_folder"]}]}
    raw["train"] = {"learning_rate": 5e-3, "per_device_batch_size": 3, "max_steps": 2, "save_steps": 2,
                    "logging_steps": 1, "warmup_ratio": 0.0}
    return config_from_dict(raw)


@pytest.mark.parametrize("start", ["finetune_work_dir", "llava_hf"])
def test_llava_dpo_starts_at_log2(llava_start, tmp_path, start):
    if start == "finetune_work_dir":
        cfg = llava_cfg(llava_start, tmp_path, pretrained_pth=llava_start["work_dir"])
    else:
        cfg = llava_cfg(llava_start, tmp_path, llava=llava_start["llava_hf"], llm=None, visual_encoder=None)
    result = run_training(cfg, work_dir=str(tmp_path / "wd"))
    rows = [r for r in read_train_log(tmp_path / "wd") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["rewards/margins"] != 0.0
    assert result.global_step == 2
    if start == "finetune_work_dir":  # chat loads the DPO iter file like a finetune one, and answers on an image
        from llava_ft.inference import load_chat_model
        from llava_ft.inference.chat_model import GenerationSettings

        chat = load_chat_model(result.last_checkpoint, device="cpu")
        image = next(iter(sorted(Path(llava_start["image_folder"]).rglob("*.png"))))
        answer = chat.chat([{"role": "user", "content": "<image>\nWhat colour is it?"}], images=[str(image)],
                           settings=GenerationSettings(max_new_tokens=3))
        assert answer.completion_tokens > 0 and answer.prompt_tokens > 16  # the image's features are in the prompt
        # ... and exports to llava-hf like a finetune's, which transformers' own class loads
        from transformers import LlavaForConditionalGeneration

        from llava_ft.convert import pth_to_hf

        exported = pth_to_hf(None, result.last_checkpoint, str(tmp_path / "llava_hf"), fmt="llava-hf")
        hf = LlavaForConditionalGeneration.from_pretrained(exported)
        trained = result.model.trainable_state_dict()
        assert torch.equal(hf.model.multi_modal_projector.linear_1.weight.float(),
                           trained["projector.layers.0.weight"].float())


@pytest.mark.multiprocess
@pytest.mark.slow
def test_llava_dpo_from_finetune_work_dir_zero3_equals_one_process(llava_start, tmp_path):
    """The LLaVA recipe's shape under ZeRO-3 (~60 s): DPO from a finetune work dir (trained projector + LLM
    LoRA, so the reference is the swapped-in finetune weights, sharded), RLAIF-V-style image pairs; 2 processes
    with every weight partitioned vs 1 process x accum 2: same losses, margins and weights."""
    from test_distributed import assert_same_weights, iter_state, losses, run_cli, zero3_config

    from llava_ft.config import save_config

    config = tmp_path / "dpo.yaml"
    cfg = llava_cfg(llava_start, tmp_path, pretrained_pth=llava_start["work_dir"])
    cfg.train.per_device_batch_size = 1  # 6 pairs: 3 steps of 2 pairs either way
    cfg.train.max_steps = 3
    cfg.train.save_steps = 3
    save_config(cfg, str(config))
    ds_path = zero3_config(tmp_path, persistence=0)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_cli(["train", str(config), "train.gradient_accumulation_steps=2", "--work-dir", one])
    run_cli(["train", str(config), "--work-dir", two, "--deepspeed", ds_path], nproc=2)
    single, multi = read_train_log(one), read_train_log(two)
    assert single[0]["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(single[1]["rewards/margins"]) > 1e-5
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    for a, b in zip(single, multi):
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-4, abs=1e-6)
    assert_same_weights(iter_state(two, 3), iter_state(one, 3))


def test_merged_sft_model_start_and_precompute(tiny_qwen2, pair_file, sft_run, tmp_path, capsys):
    """From a merged SFT model with reference=precompute: step 0 is log 2; a rerun takes the reference
    log-probs from the cache (keyed by the weights and the pairs) and trains the same."""
    from llava_ft.convert import merge_adapter, pth_to_hf

    adapter = pth_to_hf(None, sft_run.last_checkpoint, str(tmp_path / "adapter"))
    merged = merge_adapter(tiny_qwen2, adapter, str(tmp_path / "merged"), fp32=True)
    cfg = make_cfg(merged, pair_file, tmp_path, preference={"loss": "sigmoid", "reference": "precompute"})
    result = run_training(cfg, work_dir=str(tmp_path / "wd"))
    rows = [r for r in read_train_log(tmp_path / "wd") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["rewards/margins"] == 0.0 and rows[1]["rewards/margins"] != 0.0
    assert result.global_step == 2
    assert "reference log-probs of the train pairs from" not in capsys.readouterr().out
    run_training(cfg, work_dir=str(tmp_path / "again"))
    assert "reference log-probs of the train pairs from" in capsys.readouterr().out
    again = [r for r in read_train_log(tmp_path / "again") if "loss" in r]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


def cut_after_step_2(full: Path, cut: Path) -> Path:
    """A copy of a finished 4-step work dir as a run killed right after its step-2 save would leave it."""
    import shutil

    shutil.copytree(full, cut)
    for name in ("iter_4.pth", "checkpoint-4"):
        path = cut / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (cut / "last_checkpoint").write_text(str((cut / "iter_2.pth").resolve()))
    logged = read_train_log(cut)[:2]
    (cut / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    return cut


def test_resume_reproduces_uninterrupted_dpo_run(tiny_qwen2, pair_file, sft_run, tmp_path):
    """Kill after the step-2 save, resume: same losses and weights as the run that was never stopped (the
    reference stays the SFT start, not the resumed weights)."""
    def cfg():
        return make_cfg(tiny_qwen2, pair_file, tmp_path, preference={"loss": "sigmoid", "sft_weight": 0.1},
                        model__pretrained_pth=sft_run.last_checkpoint, train__max_steps=4,
                        train__per_device_batch_size=2, train__group_by_length=True,
                        model__llm_lora={"enabled": True, "r": 8, "alpha": 16, "dropout": 0.1})

    full = tmp_path / "full"
    run_training(cfg(), work_dir=str(full))
    reference = read_train_log(full)
    cut = cut_after_step_2(full, tmp_path / "cut")
    result = run_training(cfg(), work_dir=str(cut), resume="auto")
    assert result.global_step == 4
    resumed = read_train_log(cut)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(reference, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), (a, b)
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4, abs=1e-6)
    end_full = torch.load(full / "iter_4.pth", weights_only=True)["state_dict"]
    end_cut = torch.load(cut / "iter_4.pth", weights_only=True)["state_dict"]
    for k in end_full:
        torch.testing.assert_close(end_full[k], end_cut[k], rtol=1e-5, atol=1e-6)


def test_pack_to_max_length_packs_pairs_into_rows_and_trains_the_same(tiny_qwen2, pair_file, tmp_path):
    """data.pack_to_max_length in a preference run: a micro-batch's pairs share rows of up to max_length
    positions (never attending across pairs), the batch still holds the same pairs, and training equals the
    unpacked run (losses, DPO metrics, weights)."""
    from llava_ft.engine.preference import build_preference_data
    from llava_ft.model.builder import build_model

    def cfg(packed):
        return make_cfg(tiny_qwen2, pair_file, tmp_path, preference={"loss": "sigmoid", "sft_weight": 0.1},
                        data__pack_to_max_length=packed, train__max_steps=2)

    model, tok = build_model(cfg(True))
    dataset, collator, _, _ = build_preference_data(cfg(True), model, tok)
    pairs = [dataset[i] for i in range(3)]
    batch = collator(pairs)
    sizes = [abs(p["modality_length"]) for p in pairs]
    assert sizes[0] + sizes[1] <= 128  # the first two fit one row of max_length
    assert batch["input_ids"].shape[0] < 3 and batch["pair_index"].max().item() == 2  # 3 pairs, fewer rows
    assert batch["input_ids"].shape[1] <= 128
    plain = run_training(cfg(False), work_dir=str(tmp_path / "plain"))
    packed = run_training(cfg(True), work_dir=str(tmp_path / "packed"))
    a, b = read_train_log(plain.work_dir), read_train_log(packed.work_dir)
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-5)
    assert [r["rewards/margins"] for r in b] == pytest.approx([r["rewards/margins"] for r in a], abs=1e-5)
    end_a = torch.load(plain.last_checkpoint, weights_only=True)["state_dict"]
    end_b = torch.load(packed.last_checkpoint, weights_only=True)["state_dict"]
    for k in end_a:  # Adam makes a ~1e-7 gradient difference on a near-zero element a ~1e-5 step (lr 5e-3)
        torch.testing.assert_close(end_b[k], end_a[k], rtol=1e-4, atol=5e-5)


def test_precompute_resume_reads_the_work_dir_copy_or_refuses(tiny_qwen2, pair_file, tmp_path):
    """A resumed run starts from trained weights, so it must not recompute the reference: it reads the copy in
    the work dir when the data cache is gone, and stops with what to do when both are gone."""
    import shutil

    cfg = make_cfg(tiny_qwen2, pair_file, tmp_path, preference={"loss": "sigmoid", "reference": "precompute"},
                   train__max_steps=4, train__per_device_batch_size=2)
    full = tmp_path / "full"
    reference = [r["loss"] for r in read_train_log(run_training(cfg, work_dir=str(full)).work_dir)]
    copies = sorted((full / "reference_logps").glob("train-*.pt"))
    assert len(copies) == 1
    shutil.rmtree(tmp_path / "cache" / "reference_logps")
    cut = cut_after_step_2(full, tmp_path / "cut")
    shutil.rmtree(tmp_path / "cache" / "reference_logps", ignore_errors=True)
    run_training(cfg, work_dir=str(cut), resume="auto")
    assert [r["loss"] for r in read_train_log(cut)] == pytest.approx(reference, rel=1e-5)
    shutil.rmtree(tmp_path / "cache" / "reference_logps", ignore_errors=True)
    shutil.rmtree(cut / "reference_logps")
    with pytest.raises(UserError, match="without --resume"):
        run_training(cfg, work_dir=str(cut), resume=str(cut / "checkpoint-2"))


def write_cli_dpo_config(llm, tmp_path) -> str:
    """A DPO recipe file over 12 text pairs (global batch 6, 2 steps) for the `llava_ft train` subprocess runs."""
    import yaml

    pairs = tmp_path / "pairs.jsonl"
    with open(pairs, "w") as fh:
        for k in range(2):
            for q, good, bad in PAIRS:
                fh.write(json.dumps({"prompt": f"{q} ({k})", "chosen": good, "rejected": bad}) + "\n")
    raw = {"name": "dpo_cli", "model": {"llm": llm, "dtype": "fp32", "attn_implementation": "sdpa",
                                        "llm_lora": {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}},
           "data": {"sources": [{"path": str(pairs)}], "template": "qwen_chat", "max_length": 128,
                    "cache_dir": str(tmp_path / "cache")},
           "preference": {"loss": "sigmoid", "beta": 0.5, "sft_weight": 0.1},
           "train": {"learning_rate": 5e-3, "per_device_batch_size": 3, "max_steps": 2, "save_steps": 2,
                     "logging_steps": 1, "warmup_ratio": 0.0}}
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return str(cfg)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_dpo_equals_one_process(tiny_qwen2, tmp_path):
    """torchrun 2 processes (gloo DDP) x 3 pairs vs 1 process x 3 pairs x accumulation 2: same losses and
    DPO metrics at every step, same adapter at the end (global batch 6 both ways)."""
    from test_distributed import assert_same_weights, iter_state, losses, run_cli

    cfg = write_cli_dpo_config(tiny_qwen2, tmp_path)
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_cli(["train", cfg, "train.gradient_accumulation_steps=2", "--work-dir", one])
    run_cli(["train", cfg, "--work-dir", two], nproc=2)
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    for a, b in zip(read_train_log(one), read_train_log(two)):
        assert a["rewards/margins"] == pytest.approx(b["rewards/margins"], rel=1e-4, abs=1e-7)
    assert_same_weights(iter_state(two, 2), iter_state(one, 2))


# ZeRO-3 starting points: LoRA from an SFT iter file (zero.Init-built, weight-swap reference), the same on a
# 4-bit LLM (sharded only when the engine starts), a full fine-tune (frozen copy) and precomputed log-probs.
ZERO3_CASES = {
    "lora_sft_start": ["model.pretrained_pth={sft}"],
    "qlora_sft_start": ["model.pretrained_pth={sft}", "model.quantization=4bit"],
    "full_copy": ["model.llm_lora.enabled=false", "train.learning_rate=1e-3"],
    "full_precompute": ["model.llm_lora.enabled=false", "train.learning_rate=1e-3", "preference.reference=precompute"],
}


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(ZERO3_CASES))
def test_zero3_dpo_reference_equals_one_process(tiny_qwen2, sft_run, tmp_path, case):
    """2 processes under ZeRO-3 (every weight partitioned: persistence threshold 0) vs 1 process x accum 2 (~60 s
    each): same DPO losses and reward margins at every step and the same weights. A reference that read the
    policy's values (or another rank's shard) would keep the margins at 0 or off from one process."""
    from test_distributed import assert_same_weights, iter_state, losses, run_cli, zero3_config

    cfg = write_cli_dpo_config(tiny_qwen2, tmp_path)
    ds_path = zero3_config(tmp_path, persistence=0)
    overrides = [o.format(sft=sft_run.last_checkpoint) for o in ZERO3_CASES[case]]
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    run_cli(["train", cfg, *overrides, "train.gradient_accumulation_steps=2", "--work-dir", one])
    run_cli(["train", cfg, *overrides, "--work-dir", two, "--deepspeed", ds_path], nproc=2)
    single, multi = read_train_log(one), read_train_log(two)
    # reference = the start (precomputed ones come from other batches: padding moves the last digit)
    assert single[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5) and abs(single[1]["rewards/margins"]) > 1e-4
    assert losses(two) == pytest.approx(losses(one), rel=1e-5)
    for a, b in zip(single, multi):
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], rel=1e-4, abs=1e-5)
    # Precomputed log-probs come from other batch shapes on each side (~1e-6 apart), which Adam can turn into a
    # 1e-5 step on an element whose gradient is near zero (seen: 1 of 8,192).
    assert_same_weights(iter_state(two, 2), iter_state(one, 2), atol=5e-5 if "precompute" in case else 1e-5)


# bf16 runs everywhere (CPU autocast here); the gpu-marked ids are what `pytest -m gpu` (benchmarks/gpu_check.sh) runs.
@pytest.mark.parametrize("dtype", ["bf16", pytest.param("bf16", marks=pytest.mark.gpu, id="bf16-cuda"),
                                   pytest.param("fp16", marks=pytest.mark.gpu, id="fp16-cuda")])
def test_qlora_dpo_in_half_precision(tiny_qwen2, pair_file, tmp_path, dtype):
    """QLoRA DPO under mixed precision, on the CPU (bf16 autocast) here and on CUDA where there is one (bf16,
    and fp16 with accelerate's GradScaler): the 4D block mask under half-precision sdpa, the reference (adapter
    switched off) and the policy agree at step 0 (log 2), every loss is finite, the LoRA weights train and stay
    fp32 masters."""
    if dtype == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():  # e.g. a T4
        pytest.skip("this GPU has no bf16")
    cfg = make_cfg(tiny_qwen2, pair_file, tmp_path, preference={"loss": "sigmoid"}, model__dtype=dtype,
                   model__quantization="4bit", train__max_steps=4, train__save_steps=4)
    result = run_training(cfg, work_dir=str(tmp_path / "wd"))
    rows = [r for r in read_train_log(tmp_path / "wd") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    assert all(math.isfinite(r["loss"]) for r in rows) and any(r["rewards/margins"] != 0 for r in rows[1:])
    trained = result.model.trainable_state_dict()
    assert trained and all(v.dtype == torch.float32 for v in trained.values())
    assert any(bool(v.abs().sum()) for k, v in trained.items() if ".lora_B." in k)  # B starts at zero


def test_nan_guard_stops_a_diverging_dpo_run(tiny_qwen2, pair_file, tmp_path, capsys):
    """lr 1e30: the first update sends the adapter to ~1e30, the next preference loss is NaN -> stop, no save."""
    from llava_ft.cli import main
    from llava_ft.config import save_config

    cfg = make_cfg(tiny_qwen2, pair_file, tmp_path, preference={"loss": "sigmoid"}, train__learning_rate=1e30,
                   train__max_nonfinite_steps=1, train__max_steps=4, train__per_device_batch_size=2)
    path = tmp_path / "nan.yaml"
    save_config(cfg, path)
    assert main(["train", str(path), "--work-dir", str(tmp_path / "wd")]) == 2
    assert "training stopped at step 2" in capsys.readouterr().err
    assert not list((tmp_path / "wd").glob("iter_*.pth"))


@pytest.fixture(scope="module")
def onevision_start(tmp_path_factory, tiny_tokenizer, demo_data):
    from llava_ft.testing.llava_next import build_tiny_llava_onevision

    root = tmp_path_factory.mktemp("llava_ov_dpo")
    pairs = write_rlaif_v_pairs(root / "rlaif_v.jsonl", demo_data)
    return {"folder": build_tiny_llava_onevision(root / "ov", tiny_tokenizer, max_tiles=4), "pairs": str(pairs),
            "image_folder": demo_data["image_folder"]}


def test_llava_onevision_dpo_starts_at_log2_and_trains(onevision_start, tmp_path):
    """DPO from a released LLaVA-OneVision (model.llava + preference): image pairs through the checkpoint's
    own AnyRes rules; the step-0 loss is log 2 (policy == reference) and the step trains."""
    lora = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0}
    cfg = config_from_dict({
        "name": "tiny_ov_dpo",
        "model": {"llava": onevision_start["folder"], "freeze_llm": True, "llm_lora": lora, "dtype": "fp32"},
        "preference": {"loss": "sigmoid", "beta": 0.2},
        "data": {"template": "hf", "max_length": 512, "cache_dir": str(tmp_path / "cache"),
                 "sources": [{"path": onevision_start["pairs"], "image_folder": onevision_start["image_folder"]}]},
        "train": {"learning_rate": 5e-3, "per_device_batch_size": 3, "max_steps": 2, "save_steps": 2,
                  "logging_steps": 1, "warmup_ratio": 0.0}})
    result = run_training(cfg, work_dir=str(tmp_path / "wd"))
    rows = [r for r in read_train_log(tmp_path / "wd") if "loss" in r]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[1]["rewards/margins"] != 0.0
    assert result.global_step == 2
