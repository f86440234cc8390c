"""Training throughput: a llava_ft LLaVA finetune vs Hugging Face TRL's SFTTrainer on the same model and data.

    python benchmarks/run.py --only train [--quick]      # via the suite (report + JSON)
    python benchmarks/bench_train.py [--quick]           # this section alone, prints its dict as JSON

What is compared (docs: benchmarks/results/*.md repeat this in each figure's method):
- Model: a random-init Qwen2 LLM + CLIP vision tower + 2-layer projector, built once by llava_ft
  (`build_model`), saved as an `iter_0.pth` (LoRA B = 0, so merged weights = base weights) and exported with
  llava_ft's own converter (`export_llava_hf`) to a `LlavaForConditionalGeneration` folder that TRL loads:
  both sides start from identical weights. Both train LoRA (same r/alpha/dropout, every LLM Linear but
  lm_head) + the projector, vision tower frozen, same precision (fp32 on CPU, bf16 on GPU), no gradient
  checkpointing, same per-device batch, gradient accumulation, learning rate and number of steps.
- Data: LLaVA-mix-665K-like synthetic records: lengths drawn from bench_sampler's model (60 % image samples,
  40 % text-only, lognormal text), scaled by `scale` (1/4 on the full run so a CPU can train on it:
  image = 144 tokens instead of 576, cap 512 instead of 2048 -- padding ratios are scale-free), 1-3 turns,
  qwen_chat layout. One epoch = exactly the run's steps x batch x accumulation samples, so both sides see
  the same samples; the supervised-token totals over the epoch are reported to show they count the same.
- llava_ft: `LlavaFtTrainer` exactly as `run_training` builds it (modality-aware length-grouped sampler);
  TRL: `SFTTrainer` with its default random order and its VLM collator, `assistant_only_loss=True` with a
  chat template equivalent to qwen_chat carrying `{% generation %}` markers.
- Timing: the whole epoch's wall time, from train begin to the last step's end (data loading, collation and
  the first step included on both sides: see `summarize`). Tokens are counted by wrapping each side's
  collator: real tokens (image tokens included, padding not), supervised tokens (labels != -100), padded
  positions. Both sides train the same samples, so the token totals are equal and the rates' ratio is the
  ratio of epoch times.
- A third side, llava_ft with length grouping off (random order, as TRL), splits the gain into the part
  grouping brings and the part the rest of the engine brings.
- A fourth side, llava_ft packed (`data.pack_to_max_length: true`): the same samples packed best-fit into
  `max_length` blocks (image features counted), per-device batch 1 (blocks are ~max_length; grouped
  micro-batches hold about as many positions), same accumulation, one epoch over all blocks -- so the same
  samples and supervised tokens as the other sides, in fewer, fuller steps.
- Runs alternate llava_ft, TRL, llava_ft random, llava_ft packed, llava_ft, ..., each in a fresh process
  (peak RSS per run); medians. `python benchmarks/bench_train.py --repeats 1 --sides llava_ft,llava_ft_packed`
  runs a subset (a reduced run on a busy machine).
"""
from __future__ import annotations

import json
import os
import random
import tempfile
import time

from common import alternating_runs, comparison_main, figure, has_gpu, measured_matmul_peak, median, peak_rss_mb, section

IMAGE_SIZE_FULL, PATCH = 168, 14  # 12 x 12 = 144 image tokens (576 / 4)


def settings(quick: bool) -> dict:
    if quick:
        return dict(hidden=64, layers=2, heads=4, kv_heads=2, inter=128, vocab=None, vis_hidden=32, vis_layers=2,
                    image_size=32, patch=8, scale=1 / 16, max_length=160, batch=2, accum=2, steps=3, repeats=1,
                    lora_r=8, lora_alpha=16)
    return dict(hidden=512, layers=8, heads=8, kv_heads=2, inter=1536, vocab=32000, vis_hidden=384, vis_layers=6,
                image_size=IMAGE_SIZE_FULL, patch=PATCH, scale=1 / 4, max_length=512, batch=4, accum=4, steps=6,
                repeats=3, lora_r=64, lora_alpha=16)


# ----------------------------------------------------------------------------------------------------
# assets: model, data, llava-hf export

_WORDS = ("the a red green blue yellow purple circle square triangle shape image picture grey background small "
          "large left right top bottom colour what is in describe answer question there are two three one of "
          "and on with it this that").split()

# qwen_chat as llava_ft encodes it (BOS once, <image>\n at the turn start, answer + <|im_end|> supervised,
# SEP "\n"), with {% generation %} markers so TRL's assistant_only_loss supervises the same spans.
TRL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set ns = namespace(images='', text='') %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{% set ns.images = ns.images + '<image>\n' %}"
    "{% elif part['type'] == 'text' %}{% set ns.text = ns.text + part['text'] %}{% endif %}{% endfor %}"
    "{% set text = ns.images + ns.text %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '<|im_start|>user\n' + text + '<|im_end|>\n<|im_start|>assistant\n' }}"
    "{% elif message['role'] == 'assistant' %}{% generation %}{{ text + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% endif %}{% endfor %}"
)


def _text(tok, rng: random.Random, n_tokens: int) -> str:
    """Words from the demo vocabulary cut to `n_tokens` tokens of `tok`."""
    n_tokens = max(1, n_tokens)
    text = " ".join(rng.choices(_WORDS, k=n_tokens))
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"][:n_tokens]
    return text[: offsets[-1][1]].strip() or "a"


def make_records(tok, n: int, scale: float, num_image_tokens: int, max_length: int, n_images: int, seed: int = 0):
    """LLaVA-json records whose encoded lengths follow bench_sampler's LLaVA-mix model scaled by `scale`."""
    from bench_sampler import synthetic_lengths

    rng = random.Random(seed)
    rows = []
    for i, ml in enumerate(synthetic_lengths(n, seed=seed)):
        has_image = ml > 0
        text_len = (abs(ml) - 576) if has_image else abs(ml)
        text_len = max(8, int(text_len * scale))
        turns = rng.choice((1, 1, 2, 2, 3))
        budget = max_length - (num_image_tokens if has_image else 0) - 12 * turns - 4
        text_len = min(text_len, budget)
        per_turn = max(4, text_len // turns - 10)  # ~10 template tokens per turn
        conv = []
        for t in range(turns):
            q_len = max(2, per_turn // 5)
            conv.append({"from": "human", "value": _text(tok, rng, q_len)})
            conv.append({"from": "gpt", "value": _text(tok, rng, max(1, per_turn - q_len))})
        row = {"id": f"s{i}", "conversations": conv}
        if has_image:
            conv[0]["value"] = "<image>\n" + conv[0]["value"]
            row["image"] = f"img_{i % n_images:03d}.png"
        rows.append(row)
    return rows


def _build_llm(out: str, tok_dir: str, s: dict) -> str:
    """Random-init Qwen2 with a realistic vocabulary size (the demo tokenizer uses only its first rows)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    ids = {k: tok.convert_tokens_to_ids(getattr(tok, k)) for k in ("bos_token", "eos_token", "pad_token")}
    cfg = Qwen2Config(vocab_size=max(s["vocab"] or 0, len(tok) + 1), hidden_size=s["hidden"],
                      intermediate_size=s["inter"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                      num_key_value_heads=s["kv_heads"], max_position_embeddings=2048, tie_word_embeddings=False,
                      bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"])
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).to(torch.float32)
    model.generation_config = GenerationConfig(**ids_as_gen(ids))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def ids_as_gen(ids: dict) -> dict:
    return {"bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"], "pad_token_id": ids["pad_token"]}


def llava_ft_config(assets: dict, s: dict, work_dir: str):
    from llava_ft.config import Config, DataConfig, DataSource, LoraSettings, ModelConfig, TrainConfig

    return Config(
        name="bench_train", phase="finetune",
        model=ModelConfig(llm=assets["llm"], visual_encoder=assets["clip"], projector_depth=2,
                          freeze_visual_encoder=True,
                          llm_lora=LoraSettings(enabled=True, r=s["lora_r"], alpha=s["lora_alpha"], dropout=0.05)),
        data=DataConfig(sources=[DataSource(path=assets["data"], format="llava", image_folder=assets["images"])],
                        template="qwen_chat", max_length=s["max_length"], cache_dir=os.path.join(work_dir, "cache")),
        train=TrainConfig(learning_rate=2e-4, per_device_batch_size=s["batch"],
                          gradient_accumulation_steps=s["accum"], max_steps=s["steps"], warmup_ratio=0.03,
                          save_steps=100_000, logging_steps=s["steps"], seed=42, group_by_length=True,
                          dataloader_num_workers=0),
    )


def make_assets(work: str, quick: bool) -> dict:
    import torch
    from transformers import AutoTokenizer

    from llava_ft import __version__
    from llava_ft.checkpoint import save_iter_checkpoint
    from llava_ft.config import config_to_dict
    from llava_ft.demo import assets as demo
    from llava_ft.model.builder import build_model

    s = settings(quick)
    out = {"settings": s}
    out["tokenizer"] = demo.build_tokenizer(os.path.join(work, "tok"))
    tok = AutoTokenizer.from_pretrained(out["tokenizer"])
    out["llm"] = _build_llm(os.path.join(work, "llm"), out["tokenizer"], s)
    s["model_vocab"] = max(s["vocab"] or 0, len(tok) + 1)  # as _build_llm sizes it (for the model FLOPs)
    out["clip"] = demo.build_tiny_clip(os.path.join(work, "clip"), image_size=s["image_size"], patch_size=s["patch"],
                                       hidden_size=s["vis_hidden"], num_layers=s["vis_layers"])
    num_image_tokens = (s["image_size"] // s["patch"]) ** 2
    images = os.path.join(work, "images")
    os.makedirs(images)
    rng = random.Random(0)
    n_images = 16 if quick else 64
    colours = list(demo.COLOURS)
    for i in range(n_images):  # photo-sized PNGs so decoding + resizing costs what it costs in real runs
        demo.draw_shape(colours[i % len(colours)], demo.SHAPES[i % 3], rng, size=64 if quick else 384).save(
            os.path.join(images, f"img_{i:03d}.png"))
    n = s["steps"] * s["batch"] * s["accum"]
    rows = make_records(tok, n, s["scale"], num_image_tokens, s["max_length"], n_images)
    out["data"] = os.path.join(work, "data.json")
    with open(out["data"], "w") as fh:
        json.dump(rows, fh)
    out["images"] = images
    out["num_image_tokens"] = num_image_tokens
    out["samples"] = n
    # One init for both sides: llava_ft builds the model (seeded), its trainable weights go to iter_0.pth and
    # the converter exports base + merged (zero) LoRA + projector as llava-hf.
    cfg = llava_ft_config(out, s, work)
    torch.manual_seed(42)
    model, _ = build_model(cfg, for_training=True)
    meta = {"step": 0, "phase": "finetune", "llava_ft_version": __version__, "config": config_to_dict(cfg)}
    pth = save_iter_checkpoint(os.path.join(work, "init"), 0, model.trainable_state_dict(), meta)
    out["init_pth"] = str(pth)
    out["n_params"] = sum(p.numel() for p in model.parameters())
    del model
    from llava_ft.convert.pth_to_hf import export_llava_hf

    out["hf"] = export_llava_hf(cfg, pth, os.path.join(work, "llava_hf"), fp32=True)
    out["hf_how"] = "exported with llava_ft.convert.pth_to_hf.export_llava_hf (--format llava-hf)"
    return out


# ----------------------------------------------------------------------------------------------------
# measurement helpers shared by both sides


class CountingCollator:
    """Wraps a collator; records real / supervised / padded token counts of every batch it builds."""

    def __init__(self, inner, num_image_tokens: int, expands_images: bool):
        self.inner = inner
        self.num_image_tokens = num_image_tokens
        self.expands_images = expands_images  # llava_ft: one placeholder per image, expanded in the model
        self.batches: list = []

    def __call__(self, features):
        import torch

        from llava_ft import IMAGE_TOKEN_INDEX

        batch = self.inner(features)
        ids, labels = batch["input_ids"], batch["labels"]
        if self.expands_images:
            # From the rows themselves: packed batches carry position_ids, no attention_mask. A row (sample or
            # packed block) runs over its ids with each placeholder expanded; samples pad to the longest,
            # packed blocks are flattened into one row without padding.
            real_rows = torch.tensor([len(f["input_ids"]) + (self.num_image_tokens - 1) * sum(
                1 for t in f["input_ids"] if t == IMAGE_TOKEN_INDEX) for f in features])
            if "position_ids" in batch:  # packed blocks, flattened into one row: attention stays in each block
                padded = int(real_rows.sum())
                attn_sq = int((real_rows ** 2).sum())
            else:
                padded = int(real_rows.max()) * ids.shape[0]
                attn_sq = int(real_rows.max()) ** 2 * ids.shape[0]
        else:
            real_rows = batch["attention_mask"].sum(dim=1)
            padded = ids.numel()
            attn_sq = ids.shape[1] ** 2 * ids.shape[0]
        pixels = batch.get("pixel_values")
        # A packed row holds several samples; its id lists them ("a,b,c").
        samples = sum(1 + str(f.get("id", "")).count(",") for f in features) if self.expands_images else ids.shape[0]
        self.batches.append({"real": int(real_rows.sum()), "supervised": int((labels != -100).sum()),
                             "padded": int(padded), "samples": int(samples), "t": time.perf_counter(),
                             # for model FLOPs: attention runs over row_len^2 per row; every image (dummy too) is encoded
                             "attn_sq": int(attn_sq),
                             "images": int(pixels.shape[0]) if pixels is not None else 0})
        return batch


def make_timer_callback():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends: list = []

        def on_train_begin(self, args, state, control, **kw):
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.ends.append(time.perf_counter())

    return StepTimer()


def summarize(timer, counter: CountingCollator, framework: str) -> dict:
    """Whole-epoch rates: both sides train the same samples, so the one that finishes first is faster.

    Every step counts, the first included: timing only steps 2..N would drop a different batch on each side
    (llava_ft's sampler puts the longest megabatch first, TRL's order is random), and the supervised share
    of the remaining tokens would then differ too. One-time costs inside step 1 (optimizer state, first
    kernels) are the same work on both sides. A batch collated between the ends of steps k-1 and k belongs
    to step k (for the per-step seconds and padding)."""
    ends = [timer.begin] + timer.ends
    secs = ends[-1] - ends[0]
    epoch = {key: sum(b[key] for b in counter.batches)
             for key in ("real", "supervised", "padded", "samples", "attn_sq", "images")}
    steps = [round(ends[k] - ends[k - 1], 3) for k in range(1, len(ends))]
    out = {"framework": framework, "steps": len(steps), "epoch_seconds": secs,
           "tokens_per_s": epoch["real"] / secs, "samples_per_s": epoch["samples"] / secs,
           "supervised_tokens_per_s": epoch["supervised"] / secs, "padded_positions_per_s": epoch["padded"] / secs,
           "padding_waste": 1 - epoch["real"] / max(epoch["padded"], 1), "epoch_totals": epoch,
           "step_seconds": steps, "peak_rss_mb": peak_rss_mb()}
    if has_gpu():
        import torch

        out["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


# ----------------------------------------------------------------------------------------------------
# the two sides (each runs in a fresh process: `bench_train.py --child llava_ft|trl --assets FILE --out FILE`)


def run_llava_ft(assets: dict, work: str, side: str = "llava_ft") -> dict:
    """side: llava_ft (length-grouped), llava_ft_random (grouping off) or llava_ft_packed."""
    from transformers import set_seed

    from llava_ft.engine.run import build_train_data, training_arguments
    from llava_ft.engine.trainer import LlavaFtTrainer
    from llava_ft.model.builder import build_model

    s = assets["settings"]
    cfg = llava_ft_config(assets, s, work)
    cfg.model.pretrained_pth = assets["init_pth"]  # same projector/LoRA init as the exported model
    cfg.train.group_by_length = side == "llava_ft"  # random order: splits grouping's gain from the rest
    if side == "llava_ft_packed":
        # One epoch over every block (the same samples as the other sides), one ~max_length block per micro-batch.
        cfg.data.pack_to_max_length = True
        cfg.train.per_device_batch_size = 1
        cfg.train.max_steps, cfg.train.num_epochs = -1, 1.0
    set_seed(cfg.train.seed)
    model, tok = build_model(cfg, for_training=True)
    dataset, collator, stats = build_train_data(cfg, model, tok)
    counter = CountingCollator(collator, assets["num_image_tokens"], expands_images=True)
    timer = make_timer_callback()
    # The engine's own pieces, as run_training composes them (plus our timer; no log/plot/eval callbacks,
    # which only act every logging_steps/eval steps and would add nothing here).
    args = training_arguments(cfg, os.path.join(work, "run_llava_ft"), None)
    args.disable_tqdm = True
    trainer = LlavaFtTrainer(model=model, args=args, train_dataset=dataset, data_collator=counter,
                             callbacks=[timer], llava_cfg=cfg, work_dir=os.path.join(work, "run_llava_ft"))
    trainer.train()
    out = summarize(timer, counter, side)
    if stats.get("packing"):
        out["packing"] = stats["packing"]
    return out


def trl_lora_and_args(s: dict, work: str, learning_rate: float) -> tuple:
    """TRL's side of a comparison: LoRA on the LLM's Linears + the projector trained (as llava_ft's runs), and
    the TrainingArguments fields every TRL trainer config here shares (batch, steps, schedule, precision)."""
    from peft import LoraConfig

    gpu = has_gpu()
    targets = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
    peft_config = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], lora_dropout=0.05, target_modules=targets,
                             modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM")
    common = dict(
        output_dir=os.path.join(work, "run_trl"), per_device_train_batch_size=s["batch"],
        gradient_accumulation_steps=s["accum"], max_steps=s["steps"], learning_rate=learning_rate,
        lr_scheduler_type="cosine", warmup_steps=0.03, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        seed=42, data_seed=42, gradient_checkpointing=False, bf16=gpu, fp16=False, report_to="none",
        save_strategy="no", logging_steps=s["steps"], dataloader_num_workers=0, use_cpu=not gpu, disable_tqdm=True)
    return peft_config, common


def run_trl(assets: dict, work: str) -> dict:
    import datasets
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration, set_seed
    from trl import SFTConfig, SFTTrainer

    s = assets["settings"]
    gpu = has_gpu()
    set_seed(42)
    dtype = torch.bfloat16 if gpu else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(assets["hf"], dtype=dtype)
    processor = AutoProcessor.from_pretrained(assets["hf"])
    processor.chat_template = TRL_CHAT_TEMPLATE
    processor.tokenizer.chat_template = TRL_CHAT_TEMPLATE
    with open(assets["data"]) as fh:
        rows = json.load(fh)
    role = {"human": "user", "gpt": "assistant"}
    records = []
    for r in rows:
        msgs = [{"role": role[t["from"]], "content": t["value"].replace("<image>\n", "")} for t in r["conversations"]]
        records.append({"messages": msgs,
                        "images": [os.path.join(assets["images"], r["image"])] if "image" in r else []})
    ds = datasets.Dataset.from_list(records).cast_column("images", datasets.Sequence(datasets.Image()))
    peft_config, common = trl_lora_and_args(s, work, learning_rate=2e-4)
    args = SFTConfig(**common, max_length=None, assistant_only_loss=True)
    timer = make_timer_callback()
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=processor,
                         peft_config=peft_config, callbacks=[timer])
    counter = CountingCollator(trainer.data_collator, assets["num_image_tokens"], expands_images=False)
    trainer.data_collator = counter
    trainer.train()
    return summarize(timer, counter, "trl")


def _child(which: str, assets_file: str, out: str) -> None:
    with open(assets_file) as fh:
        assets = json.load(fh)
    work = tempfile.mkdtemp(prefix=f"bench_train_{which}_", dir=os.path.dirname(assets_file))
    if which == "trl":
        result = run_trl(assets, work)
    else:
        result = run_llava_ft(assets, work, side=which)
    with open(out, "w") as fh:
        json.dump(result, fh)


SIDES = {"llava_ft": "llava_ft (length-grouped)", "trl": "TRL SFTTrainer (random)",
         "llava_ft_random": "llava_ft (random order)", "llava_ft_packed": "llava_ft (packed)"}


def _ratio_figures(med: dict) -> list:
    """The ratios between sides, for the sides that ran."""
    def rate(w):
        return med[w]["tokens_per_s"]

    figs = []
    if {"llava_ft_random", "trl"} <= set(med):
        figs.append(figure("llava_ft random order / TRL tokens/s", rate("llava_ft_random") / rate("trl"), "x",
                           "the same ratio with llava_ft's length grouping off (train.group_by_length=false): the "
                           "part of the gain that does not come from grouping"))
    if {"llava_ft", "trl"} <= set(med):
        ratio = rate("llava_ft") / rate("trl")
        figs.append(figure("llava_ft / TRL tokens/s", ratio, "x",
                           "ratio of the medians above (same model weights, data, batch, precision, steps; equal token "
                           "totals, so this is TRL's epoch time / llava_ft's)", target=">= 1.5 x", met=ratio >= 1.5))
    if {"llava_ft_packed", "llava_ft"} <= set(med):
        ratio = rate("llava_ft_packed") / rate("llava_ft")
        figs.append(figure("llava_ft packed / grouped tokens/s", ratio, "x",
                           "ratio of the medians above: the same samples and supervised tokens, one epoch each; "
                           "packed = best-fit blocks of max_length, batch 1 x the same accumulation",
                           target=">= 1.3 x", met=ratio >= 1.3))
    if {"llava_ft_packed", "llava_ft_random"} <= set(med):
        figs.append(figure("llava_ft packed / random order tokens/s", rate("llava_ft_packed") / rate("llava_ft_random"),
                           "x", "ratio of the medians above: packing against unsorted padded batches (what packing "
                           "gains where no length grouping is done)"))
    if {"llava_ft_packed", "trl"} <= set(med):
        figs.append(figure("llava_ft packed / TRL tokens/s", rate("llava_ft_packed") / rate("trl"), "x",
                           "ratio of the medians above"))
    if "llava_ft_packed" in med:
        waste = 100 * med["llava_ft_packed"]["padding_waste"]
        figs.append(figure("llava_ft packed: padding", waste, "%",
                           "1 - real tokens / positions the model ran over, whole epoch (blocks are not padded to "
                           "max_length: a block's row is as long as its samples)", target="<= 0.5 %", met=waste <= 0.5))
    return figs


def epoch_model_flops(s: dict, totals: dict, side: str) -> float:
    """Model FLOPs of one side's epoch: forward + backward of what that side computes (fp32, no checkpointing).

    LLM Linear layers (frozen base): forward 2 x P x positions, backward the input gradient only 2 x P x
    positions; LoRA adapters 6 x P_lora x positions; attention 4 x L x hidden x row_len^2 forward (QK^T and
    AV over every padded row), twice that backward; LM head (frozen): 4 x hidden x vocab x its rows -- every
    position for TRL, only supervised positions for llava_ft (llava_ft.model.lm_loss); vision tower (frozen,
    no backward) 2 x P_vis x (patches + 1) per encoded image (the dummy image of text-only batches counted);
    projector (trained) 6 x P_proj x image tokens. Positions are those the model ran over (padding counted)."""
    h, inter, layers, vocab = s["hidden"], s["inter"], s["layers"], s.get("model_vocab") or s["vocab"]
    head_dim = h // s["heads"]
    kv = s["kv_heads"] * head_dim
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, inter), (h, inter), (inter, h)]
    p_lin = layers * sum(i * o for i, o in linears)
    p_lora = layers * sum(s["lora_r"] * (i + o) for i, o in linears)
    vh = s["vis_hidden"]
    p_vis = s["vis_layers"] * (4 * vh * vh + 2 * vh * 2 * vh)  # attention + MLP (intermediate 2 x hidden)
    p_proj = vh * h + h * h
    patches = (s["image_size"] // s["patch"]) ** 2
    positions = totals["padded"]
    head_rows = totals["supervised"] if side.startswith("llava_ft") else positions
    return (4 * p_lin * positions + 6 * p_lora * positions + 12 * layers * h * totals["attn_sq"]
            + 4 * h * vocab * head_rows + totals["images"] * (2 * p_vis * (patches + 1) + 6 * p_proj * patches))


def _mfu_figures(s: dict, runs: dict, peak: float, how: str) -> list:
    figs = []
    for w, rs in runs.items():
        mfus = [epoch_model_flops(s, r["epoch_totals"], w) / r["epoch_seconds"] / peak for r in rs]
        figs.append(figure(f"{SIDES[w]}: MFU", 100 * median(mfus), "%",
                           f"model FLOPs of the epoch (epoch_model_flops: forward + backward of what this side "
                           f"computes) / epoch seconds / measured matmul peak {peak / 1e9:.1f} GFLOP/s ({how}, "
                           "taken in this run); median over runs"))
    return figs


def section_train(quick: bool = False, repeats: int | None = None, sides: tuple = tuple(SIDES)) -> dict:
    s = settings(quick)
    repeats = repeats or s["repeats"]
    peaks = [measured_matmul_peak()]  # before and after the runs: the machine's best of the two
    assets, runs = alternating_runs("bench_train.py", make_assets, quick, [w for w in SIDES if w in sides], repeats,
                                    240 if quick else 900, "bench_train_")
    peaks.append(measured_matmul_peak())
    med = {w: {k: median([r[k] for r in rs]) for k in ("tokens_per_s", "samples_per_s", "supervised_tokens_per_s",
                                                       "padding_waste", "peak_rss_mb", "epoch_seconds")}
           for w, rs in runs.items()}
    dev = "GPU, bf16" if has_gpu() else "CPU, fp32"
    common = (f"{dev}; batch {s['batch']} x accum {s['accum']} (packed: 1 block x accum {s['accum']}), one epoch of "
              f"the same {assets['samples']} samples per run, whole-epoch wall time incl. data loading and step 1; "
              f"median of {repeats} alternating runs")
    figs = []
    for w in runs:
        label = SIDES[w]
        figs += [
            figure(f"{label}: tokens/s", med[w]["tokens_per_s"], "tokens/s",
                   "real tokens (text + image features, no padding) / epoch seconds; " + common),
            figure(f"{label}: supervised tokens/s", med[w]["supervised_tokens_per_s"], "tokens/s",
                   "tokens with a label (assistant answers + <|im_end|>) / epoch seconds; " + common),
            figure(f"{label}: samples/s", med[w]["samples_per_s"], "samples/s", common),
            figure(f"{label}: epoch time", med[w]["epoch_seconds"], "s", common),
            figure(f"{label}: padding in its batches", 100 * med[w]["padding_waste"], "%",
                   "1 - real tokens / padded positions the model ran over, whole epoch"),
            figure(f"{label}: peak memory", med[w]["peak_rss_mb"] if not has_gpu()
                   else median([r.get("peak_gpu_mb") for r in runs[w]]), "MiB",
                   "peak RSS of the run's own process (VmHWM), model load included" if not has_gpu()
                   else "torch.cuda.max_memory_allocated of the run's process"),
        ]
    figs += _ratio_figures(med)
    figs += _mfu_figures(assets["settings"], runs, *max(peaks))
    epoch = {w: {k: [r["epoch_totals"][k] for r in rs] for k in ("supervised", "real", "padded", "samples")}
             for w, rs in runs.items()}
    notes = [
        f"Model: random-init Qwen2 (hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads / {s['kv_heads']} KV, "
        f"MLP {s['inter']}, vocab {s['vocab'] or 'demo'}) + CLIP ({s['vis_hidden']} wide, {s['vis_layers']} layers, "
        f"{s['image_size']} px / patch {s['patch']} = {assets['num_image_tokens']} image tokens) + 2-layer projector: "
        f"{assets['n_params'] / 1e6:.1f} M parameters ({assets['n_params'] * 4 / 2**20:.0f} MiB fp32). "
        f"TRL's copy {assets['hf_how']}.",
        f"LoRA r={s['lora_r']} alpha={s['lora_alpha']} dropout 0.05 on every LLM Linear but lm_head, projector trained, "
        "tower frozen, on every side.",
        f"Data: {assets['samples']} LLaVA-mix-like samples (one epoch), lengths = bench_sampler's model scaled by "
        f"{s['scale']:g}, cap {s['max_length']}; 1-3 turns; qwen_chat layout.",
        "Same work check, whole epoch: " + "; ".join(
            f"{w}: supervised tokens {e['supervised']}, real tokens {e['real']}, samples {e['samples']}"
            for w, e in epoch.items())
        + " (TRL differs slightly: it tokenizes the chat template as one string, llava_ft/XTuner per segment).",
        "Positions the model ran over per epoch (real + padding): " + ", ".join(
            f"{w} {median(e['padded']):,.0f}" for w, e in epoch.items())
        + ". llava_ft in random order pads as much as TRL, so its ratio to TRL is the part not due to grouping "
        "(per-step work: TRL's processor collator preprocesses images in the training process and it computes "
        "entropy/accuracy of every batch); grouped / random order is grouping's part; packed / grouped is what "
        "packing adds on top (no padding at all, fewer and fuller steps).",
    ]
    if "llava_ft_packed" in runs:
        pk = runs["llava_ft_packed"][0].get("packing", {})
        notes.append(f"Packing plan (llava_ft.data.packing, best-fit decreasing into {s['max_length']}-position blocks): "
                     f"{pk.get('samples')} samples -> {pk.get('blocks')} blocks ({pk.get('image_blocks')} with images), "
                     f"{100 * pk.get('padding_ratio', 0):.2f} % of blocks x max_length unused; "
                     f"{len(runs['llava_ft_packed'][0]['step_seconds'])} optimizer steps an epoch.")
    notes.append("Per-run step seconds: " + "; ".join(f"{r['framework']} {r['step_seconds']}"
                                                      for rs in zip(*runs.values()) for r in rs))
    return section("train", "Training throughput: llava_ft vs TRL SFTTrainer", figs, notes)


def main() -> None:
    comparison_main(__doc__, SIDES, _child, section_train)


if __name__ == "__main__":
    main()
