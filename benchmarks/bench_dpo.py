"""Preference (DPO) training throughput and memory: llava_ft's shared prefix vs the duplicated layout vs TRL.

    python benchmarks/run.py --only dpo [--quick]          # via the suite (report + JSON)
    python benchmarks/bench_dpo.py [--quick] [--repeats N]  # this section alone, prints its dict as JSON

What is compared:
- Model: a random-init Qwen2 LLM + CLIP tower + 2-layer projector built by llava_ft (`build_model`), its
  trainable weights saved as `iter_0.pth` (LoRA B = 0) and exported with llava_ft's converter to a
  `LlavaForConditionalGeneration` folder that TRL loads: every side starts from the same weights. Every side
  trains LoRA (same r / alpha / dropout on every LLM Linear but lm_head) + the projector, tower frozen,
  DPO sigmoid loss with beta 0.1, the reference = the starting policy with the adapter switched off (no
  weight copy on any side), same precision (fp32 on CPU, bf16 on GPU), batch, accumulation, learning rate
  and steps, no gradient checkpointing.
- Data: an image-heavy pair mix shaped like RLAIF-V-Dataset (one image a pair, a short question, two
  answers of a few dozen tokens: the prompt with its image features is several times longer than each
  answer), TRL format, written once; both frameworks read the same file.
- Sides: `llava_ft` (shared prefix: each pair's image and prompt run once, the answers attend to it through
  a block mask), `llava_ft_dup` (the same engine with each pair laid out twice, prompt + chosen and prompt
  + rejected: the tower and the prompt run twice, as TRL, LLaMA-Factory and XTuner do) and `trl`
  (DPOTrainer with its vision collator). shared / duplicated is the part of the gain the shared prefix
  brings; duplicated / TRL is the rest of the engine (LM head only at answer positions, no processor in
  the training loop, ...).
- Figures: pairs/s over the whole run (data loading, collation and step 1 included), peak RSS of the
  run's own process and its peak above the RSS after loading the model, and positions the LLM ran per pair
  (real: text + image features; run: with the padding of its batches).
- Runs alternate llava_ft, llava_ft_dup, trl, llava_ft, ... each in a fresh process; medians.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time

from common import alternating_runs, comparison_main, current_rss_mb, figure, has_gpu, median, peak_rss_mb, section

SIDES = {"llava_ft": "llava_ft (shared prefix)", "llava_ft_dup": "llava_ft (duplicated prompt)",
         "trl": "TRL DPOTrainer"}


def settings(quick: bool) -> dict:
    if quick:
        return dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=None, vis_hidden=32, vis_layers=2,
                    image_size=32, patch=8, question=(4, 10), answer=(3, 8), pairs=8, batch=2, accum=1, steps=4,
                    repeats=1, lora_r=8, lora_alpha=16, image_px=48, max_length=256)
    # 144 image tokens (576 / 4, as bench_train), questions of 8-24 tokens, answers of 16-40: the prompt
    # (image + question + template) is ~4-8x each answer, as in RLAIF-V (576 features, answers ~100 tokens).
    return dict(hidden=256, layers=4, heads=4, kv_heads=2, inter=768, vocab=32000, vis_hidden=192, vis_layers=3,
                image_size=168, patch=14, question=(8, 24), answer=(16, 40), pairs=32, batch=4, accum=1, steps=8,
                repeats=2, lora_r=16, lora_alpha=32, image_px=336, max_length=512)


# ----------------------------------------------------------------------------------------------------
# assets: tokenizer, model, llava-hf export, pairs


def _words(tok, rng: random.Random, n_tokens: int) -> str:
    from bench_train import _text

    return _text(tok, rng, n_tokens)


def write_pairs(tok, s: dict, images: str, path: str, seed: int = 0) -> int:
    """RLAIF-V-shaped pairs in TRL's format (one image each; chosen and rejected differ in their words)."""
    from llava_ft.demo import assets as demo

    rng = random.Random(seed)
    os.makedirs(images, exist_ok=True)
    colours = list(demo.COLOURS)
    n_images = max(4, s["pairs"] // 2)
    for i in range(n_images):
        demo.draw_shape(colours[i % len(colours)], demo.SHAPES[i % 3], rng, size=s["image_px"]).save(
            os.path.join(images, f"img_{i:03d}.png"))
    rows = []
    for i in range(s["pairs"]):
        chosen = _words(tok, rng, rng.randint(*s["answer"]))
        rejected = _words(tok, rng, rng.randint(*s["answer"]))
        while rejected == chosen:
            rejected = _words(tok, rng, rng.randint(*s["answer"]))
        rows.append({"id": f"p{i}", "images": [f"img_{i % n_images:03d}.png"],
                     "prompt": "<image>\n" + _words(tok, rng, rng.randint(*s["question"])),
                     "chosen": chosen, "rejected": rejected})
    with open(path, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")
    return len(rows)


def llava_ft_config(assets: dict, s: dict, work: str):
    """The preference run's config (the finetune model of bench_train, pairs as data, DPO sigmoid)."""
    from bench_train import llava_ft_config as finetune_config

    from llava_ft.config import DataSource, PreferenceConfig

    cfg = finetune_config(assets, s, work)
    cfg.name, cfg.phase = "bench_dpo", "preference"
    cfg.data.sources = [DataSource(path=assets["data"], format="trl", image_folder=assets["images"])]
    cfg.data.max_length = s["max_length"]
    cfg.preference = PreferenceConfig(loss="sigmoid", beta=0.1)
    cfg.train.learning_rate = 5e-5
    cfg.train.logging_steps = s["steps"]
    return cfg


def make_assets(work: str, quick: bool) -> dict:
    import torch

    from bench_train import _build_llm
    from llava_ft import __version__
    from llava_ft.checkpoint import save_iter_checkpoint
    from llava_ft.config import config_to_dict
    from llava_ft.convert.pth_to_hf import export_llava_hf
    from llava_ft.model.builder import build_model
    from llava_ft.demo import assets as demo
    from transformers import AutoTokenizer

    s = settings(quick)
    out: dict = {"settings": s, "images": os.path.join(work, "images"), "data": os.path.join(work, "pairs.jsonl")}
    out["tokenizer"] = demo.build_tokenizer(os.path.join(work, "tok"))
    out["llm"] = _build_llm(os.path.join(work, "llm"), out["tokenizer"], s)
    out["clip"] = demo.build_tiny_clip(os.path.join(work, "clip"), image_size=s["image_size"], patch_size=s["patch"],
                                       hidden_size=s["vis_hidden"], num_layers=s["vis_layers"])
    out["num_image_tokens"] = (s["image_size"] // s["patch"]) ** 2
    out["pairs"] = write_pairs(AutoTokenizer.from_pretrained(out["tokenizer"]), s, out["images"], out["data"])
    cfg = llava_ft_config(out, s, work)
    torch.manual_seed(42)
    model, _ = build_model(cfg, for_training=True)
    meta = {"step": 0, "phase": "finetune", "llava_ft_version": __version__, "config": config_to_dict(cfg)}
    out["init_pth"] = str(save_iter_checkpoint(os.path.join(work, "init"), 0, model.trainable_state_dict(), meta))
    out["n_params"] = sum(p.numel() for p in model.parameters())
    del model
    out["hf"] = export_llava_hf(cfg, out["init_pth"], os.path.join(work, "llava_hf"), fp32=True)
    return out


# ----------------------------------------------------------------------------------------------------
# measurement


class Positions:
    """Wraps a collator: positions the LLM runs per batch (real: text + image features; run: + padding)."""

    def __init__(self, inner, count):
        self.inner, self.count, self.batches = inner, count, []

    def __call__(self, features):
        batch = self.inner(features)
        real, run, pairs = self.count(features, batch)
        self.batches.append({"real": real, "run": run, "pairs": pairs, "t": time.perf_counter()})
        return batch


def summarize(timer, positions: Positions, side: str, rss_loaded: float) -> dict:
    ends = [timer.begin] + timer.ends
    secs = ends[-1] - ends[0]
    total = {k: sum(b[k] for b in positions.batches) for k in ("real", "run", "pairs")}
    out = {"side": side, "steps": len(timer.ends), "seconds": secs, "pairs": total["pairs"],
           "pairs_per_s": total["pairs"] / secs, "real_positions_per_pair": total["real"] / total["pairs"],
           "run_positions_per_pair": total["run"] / total["pairs"], "peak_rss_mb": peak_rss_mb(),
           "rss_after_load_mb": rss_loaded, "step_seconds": [round(b - a, 3) for a, b in zip(ends, ends[1:])]}
    if has_gpu():
        import torch

        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _llava_ft_positions(num_image_tokens: int):
    def count(features, batch):
        per_row = batch["attention_mask"].sum(dim=1)
        n_img = (batch["input_ids"] == -200).sum(dim=1)
        rows = per_row + n_img * (num_image_tokens - 1)
        return int(rows.sum()), int(rows.max()) * rows.numel(), len(features)

    return count


def _duplicate_layout(collator):
    """The duplicated layout on llava_ft's own engine: each pair becomes two sequences, prompt + chosen and
    prompt + rejected (its image and prompt run twice, as in TRL, LLaMA-Factory and XTuner); the model's
    per-sequence log-probs are put back together per pair. Returns the collator to use."""
    import llava_ft.model.preference as shared
    from llava_ft.engine.preference_loss import SequenceLogps

    one_pass = shared.sequence_logps

    def logps(model, batch):  # sequences 2i (chosen only) and 2i+1 (rejected only) -> pair i
        out = one_pass(model, batch)
        return SequenceLogps(out.chosen[0::2], out.rejected[1::2], out.chosen_tokens[0::2], out.rejected_tokens[1::2])

    shared.sequence_logps = logps  # LlavaFtModel.forward looks it up at each call

    def split(pairs):
        twice = []
        for p in pairs:
            twice += [dict(p, rejected_ids=[], rejected_labels=[]), dict(p, chosen_ids=[], chosen_labels=[])]
        return collator(twice)

    return split


def run_llava_ft(assets: dict, work: str, side: str) -> dict:
    """side llava_ft: shared prefix; llava_ft_dup: every pair laid out as two sequences (prompt run twice)."""
    from bench_train import make_timer_callback
    from transformers import set_seed

    from llava_ft.engine.preference import PreferenceTrainer, Reference, build_preference_data
    from llava_ft.engine.run import training_arguments
    from llava_ft.model.builder import build_model

    s = assets["settings"]
    cfg = llava_ft_config(assets, s, work)
    cfg.model.pretrained_pth = assets["init_pth"]
    set_seed(cfg.train.seed)
    model, tok = build_model(cfg, for_training=True)
    rss_loaded = current_rss_mb()
    dataset, collator, _, _ = build_preference_data(cfg, model, tok)
    if side == "llava_ft_dup":
        collator = _duplicate_layout(collator)
    positions = Positions(collator, _llava_ft_positions(assets["num_image_tokens"]))
    timer = make_timer_callback()
    args = training_arguments(cfg, os.path.join(work, "run"), None)
    args.disable_tqdm = True
    trainer = PreferenceTrainer(model=model, args=args, train_dataset=dataset, data_collator=positions,
                                callbacks=[timer], llava_cfg=cfg, work_dir=os.path.join(work, "run"),
                                reference=Reference.build(model, cfg))
    trainer.train()
    return summarize(timer, positions, side, rss_loaded)


def _trl_positions(features, batch):
    pairs = batch["input_ids"].shape[0] // 2
    return int(batch["attention_mask"].sum()), int(batch["input_ids"].numel()), pairs


def run_trl(assets: dict, work: str) -> dict:
    import datasets
    import torch
    from bench_train import TRL_CHAT_TEMPLATE, make_timer_callback, trl_lora_and_args
    from transformers import AutoProcessor, LlavaForConditionalGeneration, set_seed
    from trl import DPOConfig, DPOTrainer

    s = assets["settings"]
    gpu = has_gpu()
    set_seed(42)
    model = LlavaForConditionalGeneration.from_pretrained(assets["hf"], dtype=torch.bfloat16 if gpu else torch.float32)
    rss_loaded = current_rss_mb()
    processor = AutoProcessor.from_pretrained(assets["hf"])
    processor.chat_template = processor.tokenizer.chat_template = TRL_CHAT_TEMPLATE
    rows = []
    with open(assets["data"]) as fh:
        for line in fh:
            r = json.loads(line)
            question = r["prompt"].replace("<image>\n", "")
            rows.append({"images": [os.path.join(assets["images"], im) for im in r["images"]],
                         "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
                         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": r["chosen"]}]}],
                         "rejected": [{"role": "assistant", "content": [{"type": "text", "text": r["rejected"]}]}]})
    ds = datasets.Dataset.from_list(rows).cast_column("images", datasets.Sequence(datasets.Image()))
    peft_config, common = trl_lora_and_args(s, work, learning_rate=5e-5)
    args = DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], max_length=None, precompute_ref_log_probs=False)
    timer = make_timer_callback()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=processor,
                         peft_config=peft_config, callbacks=[timer])
    positions = Positions(trainer.data_collator, _trl_positions)
    trainer.data_collator = positions
    trainer.train()
    return summarize(timer, positions, "trl", rss_loaded)


def _child(which: str, assets_file: str, out: str) -> None:
    with open(assets_file) as fh:
        assets = json.load(fh)
    work = tempfile.mkdtemp(prefix=f"bench_dpo_{which}_", dir=os.path.dirname(assets_file))
    result = run_trl(assets, work) if which == "trl" else run_llava_ft(assets, work, which)
    with open(out, "w") as fh:
        json.dump(result, fh)


def section_dpo(quick: bool = False, repeats: int | None = None, sides: tuple = tuple(SIDES)) -> dict:
    s = settings(quick)
    repeats = repeats or s["repeats"]
    assets, runs = alternating_runs("bench_dpo.py", make_assets, quick, [w for w in SIDES if w in sides], repeats,
                                    300 if quick else 900, "bench_dpo_")
    return report(assets, runs, s, repeats)


def report(assets: dict, runs: dict, s: dict, repeats: int) -> dict:
    """The section from every side's run results ({side: [child result, ...]})."""
    keys = ("pairs_per_s", "peak_rss_mb", "rss_after_load_mb", "real_positions_per_pair", "run_positions_per_pair",
            "seconds")
    med = {w: {k: median([r[k] for r in rs]) for k in keys} for w, rs in runs.items()}
    for w in med:
        med[w]["train_rss_mb"] = median([r["peak_rss_mb"] - r["rss_after_load_mb"] for r in runs[w]])
        # Steady state: pairs of a step / the run's median step time (a load spike of a shared machine in one
        # or two steps moves the whole-run rate, not this).
        med[w]["steady_pairs_per_s"] = median([r["pairs"] / r["steps"] / median(r["step_seconds"]) for r in runs[w]])
    dev = "GPU, bf16" if has_gpu() else "CPU, fp32"
    common = (f"{dev}; {s['steps']} steps of batch {s['batch']} x accum {s['accum']} pairs, the same "
              f"{assets['pairs']} RLAIF-V-shaped pairs, whole-run wall time incl. data loading and step 1; "
              f"median of {repeats} alternating runs, each in its own process")
    figs = []
    for w in runs:
        label = SIDES[w]
        figs += [figure(f"{label}: pairs/s", med[w]["pairs_per_s"], "pairs/s", common),
                 figure(f"{label}: pairs/s at the median step", med[w]["steady_pairs_per_s"], "pairs/s",
                        "pairs per step / the run's median step seconds; median over runs"),
                 figure(f"{label}: peak RSS", med[w]["peak_rss_mb"], "MiB",
                        "peak RSS (VmHWM) of the run's process, model load included"),
                 figure(f"{label}: peak RSS above the loaded model", med[w]["train_rss_mb"], "MiB",
                        "peak RSS (VmHWM) minus the RSS right after the model was loaded: what training adds"),
                 figure(f"{label}: positions per pair (real)", med[w]["real_positions_per_pair"], "positions",
                        "text tokens + image features the LLM ran per pair, padding excluded"),
                 figure(f"{label}: positions per pair (run, with padding)", med[w]["run_positions_per_pair"],
                        "positions", "rows x longest row of every batch, per pair")]
    if {"llava_ft", "trl"} <= set(med):
        speed = med["llava_ft"]["pairs_per_s"] / med["trl"]["pairs_per_s"]
        mem = med["llava_ft"]["peak_rss_mb"] / med["trl"]["peak_rss_mb"]
        figs += [figure("llava_ft / TRL pairs/s", speed, "x", "ratio of the medians above", ">= 1.5 x", speed >= 1.5),
                 figure("llava_ft / TRL peak RSS", mem, "x", "ratio of the medians above", "<= 0.6 x", mem <= 0.6),
                 figure("llava_ft / TRL peak RSS above the loaded model",
                        med["llava_ft"]["train_rss_mb"] / med["trl"]["train_rss_mb"], "x", "ratio of the medians above")]
    if {"llava_ft", "trl"} <= set(med):
        figs.append(figure("llava_ft / TRL pairs/s at the median step",
                           med["llava_ft"]["steady_pairs_per_s"] / med["trl"]["steady_pairs_per_s"], "x",
                           "ratio of the steady-state medians above"))
    if {"llava_ft", "llava_ft_dup"} <= set(med):
        figs.append(figure("shared prefix / duplicated pairs/s at the median step",
                           med["llava_ft"]["steady_pairs_per_s"] / med["llava_ft_dup"]["steady_pairs_per_s"], "x",
                           "ratio of the steady-state medians above"))
        figs.append(figure("shared prefix / duplicated pairs/s (the shared prefix's part)",
                           med["llava_ft"]["pairs_per_s"] / med["llava_ft_dup"]["pairs_per_s"], "x",
                           "the same engine, each pair laid out once vs twice"))
    if {"llava_ft_dup", "trl"} <= set(med):
        figs.append(figure("llava_ft duplicated / TRL pairs/s (the rest of the engine)",
                           med["llava_ft_dup"]["pairs_per_s"] / med["trl"]["pairs_per_s"], "x",
                           "ratio of the medians above"))
    notes = [
        f"Model: random-init Qwen2 (hidden {s['hidden']}, {s['layers']} layers, vocab {s['vocab'] or 'demo'}) + CLIP "
        f"({s['vis_hidden']} wide, {s['vis_layers']} layers, {s['image_size']} px / patch {s['patch']} = "
        f"{assets['num_image_tokens']} image tokens) + projector: {assets['n_params'] / 1e6:.1f} M parameters; TRL "
        "loads llava_ft's llava-hf export of the same weights.",
        f"Pairs: one {s['image_px']} px image, a question of {s['question'][0]}-{s['question'][1]} tokens, answers of "
        f"{s['answer'][0]}-{s['answer'][1]} tokens (RLAIF-V shape: the prompt with its image is several times each "
        "answer).",
        "Per-run step seconds: " + "; ".join(f"{r['side']} {r['step_seconds']}" for rs in zip(*runs.values())
                                             for r in rs),
    ]
    return section("dpo", "Preference training: shared prefix vs duplicated vs TRL DPOTrainer", figs, notes)


def main() -> None:
    comparison_main(__doc__, SIDES, _child, section_dpo)


if __name__ == "__main__":
    main()
