"""Benchmark sections `padding`, `data_prep` and `generation` of benchmarks/run.py.

    python benchmarks/run.py --only padding,data_prep,generation [--quick]

Each `section_*` function returns a `common.section` dict; run.py calls it in a subprocess of its own.
The padding section reuses benchmarks/bench_sampler.py's length model and waste formula; the data-prep
section reuses bench_data_prep.py's synthetic conversations; the server part reuses bench_serve.py's
port/health helpers and llava_ft.serve.loadtest.run_load. Nothing is downloaded: models are random-init and the
tokenizer is the demo byte-level BPE.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, Timer, figure, median, section

# ----------------------------------------------------------------------------------------------------
# padding


def section_padding(quick: bool = False) -> dict:
    import numpy as np

    from bench_sampler import padding_waste, synthetic_lengths
    from llava_ft.data.packing import plan_bins
    from llava_ft.data.sampler import LengthGroupedSampler

    n = 50_000 if quick else 665_000
    batch, world, max_length = 16, 8, 2048
    lengths = synthetic_lengths(n, seed=0)
    arr = np.asarray(lengths)
    model_note = ("Length model (bench_sampler.synthetic_lengths): 60 % image samples = 576 image tokens + "
                  "lognormal text (median 250, sigma 0.6), 40 % text-only lognormal (median 300, sigma 0.8), "
                  f"capped at 2048; {n:,} samples; measured median length {np.median(np.abs(arr)):.0f}, "
                  f"text-only {np.mean(arr < 0):.1%}.")
    common_kw = dict(batch_size=batch, world_size=world, grad_accum=1, seed=0)
    waste_of = {}
    order = LengthGroupedSampler(lengths, group_by_length=False, **common_kw).indices()
    waste_of["random"] = padding_waste(order, arr, batch)
    times = {}
    for mult in (1, 16):
        with Timer() as t:
            order = LengthGroupedSampler(lengths, mega_multiplier=mult, **common_kw).indices()
        times[mult] = t.seconds
        waste_of[mult] = padding_waste(order, arr, batch)
    with Timer() as t_pack:
        bins = plan_bins([abs(int(v)) for v in lengths], max_length, seed=0)
    packed = 1 - float(np.abs(arr).sum()) / (len(bins) * max_length)
    per_device = f"per-device batch {batch}, right-padded to the batch's longest sample"
    figs = [
        figure("random batching", 100 * waste_of["random"], "% padding",
               f"plain seeded shuffle (LengthGroupedSampler group_by_length=False), {per_device}"),
        figure("length-grouped, megabatch 128", 100 * waste_of[1], "% padding",
               f"LengthGroupedSampler, world 8 x batch {batch} x accum 1 = LLaVA-1.5's global batch 128 "
               f"(mega_multiplier 1: HF Trainer's group_by_length-style sorting within one global batch), "
               f"{per_device}; order built in {times[1]:.1f} s"),
        figure("length-grouped, megabatch 2048 (llava_ft default)", 100 * waste_of[16], "% padding",
               f"same with mega_multiplier 16 (megabatch 2048), the engine's default "
               f"train.length_group_multiplier=16; order built in {times[16]:.1f} s",
               target="<= 2 %", met=100 * waste_of[16] <= 2),
        figure("packed", 100 * packed, "% padding",
               f"llava_ft.data.packing.plan_bins (best-fit decreasing) into {max_length}-token blocks, "
               f"{len(bins):,} blocks; waste = 1 - tokens / (blocks x {max_length}); planned in {t_pack.seconds:.1f} s",
               target="<= 1 %", met=100 * packed <= 1),
    ]
    notes = [model_note,
             "Packing is planned over the same mix (image samples counted with their 576 image tokens), as "
             "data.pack_to_max_length does for LLaVA and text data alike.",
             "Grouped waste falls with the megabatch: at 128 the sorted megabatch still spans the lognormal tails "
             "of 8 batches; llava_ft sorts megabatches of 16 global batches by default (XTuner's sampler uses up to "
             "50), trading a little randomness for padding."]
    return section("padding", "Padding waste on a LLaVA-mix-665K-like length mix", figs, notes)


# ----------------------------------------------------------------------------------------------------
# data preparation


def _write_llava_records(path: str, n: int, seed: int = 0) -> None:
    """LLaVA-json records, ~40 % text-only, 1-3 turns; image paths need not exist for encoding."""
    rng = random.Random(seed)
    words = ("the a cat dog red blue square circle answer question model data image small large why how what "
             "when explain describe list three tips for staying healthy left right top bottom colour shape").split()
    rows = []
    for i in range(n):
        conv = []
        for turn in range(rng.randint(1, 3)):
            q = " ".join(rng.choices(words, k=rng.randint(4, 30)))
            a = " ".join(rng.choices(words, k=int(rng.lognormvariate(3.5, 0.8)) + 1))
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        row = {"id": f"r{i}", "conversations": conv}
        if rng.random() >= 0.4:
            row["image"] = f"coco/train2017/{i:012d}.jpg"
            conv[0]["value"] = "<image>\n" + conv[0]["value"]
        rows.append(row)
    with open(path, "w") as fh:
        json.dump(rows, fh)


def _prep_once(data_cfg, tok, num_image_tokens: int) -> tuple:
    from llava_ft.data.dataset import prepare_dataset

    with Timer() as t:
        prepared = prepare_dataset(data_cfg, tok, num_image_tokens=num_image_tokens)
    return t.seconds, prepared


def _cached_start(source_path: str, fmt: str, image_folder, cache_dir: str, tok_dir: str,
                  num_image_tokens: int) -> float:
    """A fresh interpreter's time from start to a ready dataset on a cache hit (what a user waits for)."""
    code = (
        "import time; t0 = time.perf_counter()\n"
        "from transformers import AutoTokenizer\n"
        "from llava_ft.config import DataConfig, DataSource\n"
        "from llava_ft.data.dataset import prepare_dataset\n"
        f"tok = AutoTokenizer.from_pretrained({tok_dir!r})\n"
        f"cfg = DataConfig(sources=[DataSource(path={source_path!r}, format={fmt!r}, image_folder={image_folder!r})],"
        f" template='qwen_chat', max_length=2048, cache_dir={cache_dir!r})\n"
        f"p = prepare_dataset(cfg, tok, num_image_tokens={num_image_tokens})\n"
        "assert p.stats['cache_hit'], 'expected a cache hit'\n"
        "n = len(p.dataset); _ = p.dataset['modality_length']\n"
        "print('SECONDS', time.perf_counter() - t0)\n"
    )
    with Timer() as t:
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    inner = [float(line.split()[1]) for line in out.stdout.splitlines() if line.startswith("SECONDS")]
    return inner[0] if inner else t.seconds


def _image_check_figures(work: str, n_images: int) -> list:
    """The image check training runs before the model loads (read_sources(check_images=True)), on its first
    run and on a rerun with the files unchanged, which trusts the memo of the first (image_check_memo)."""
    import numpy as np
    from PIL import Image

    from llava_ft.config import DataConfig, DataSource
    from llava_ft.data.read import read_sources

    folder = os.path.join(work, "check_img")
    os.makedirs(folder)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 200, 336, dtype=np.float32)
    rows = []
    for i in range(n_images):  # 336 px photos-like enough for the codecs: a gradient with mild noise
        pixels = (ramp[None, :, None] + rng.normal(0, 12, (336, 336, 3))).clip(0, 255).astype(np.uint8)
        name = f"{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(os.path.join(folder, name), **({} if i % 2 else {"quality": 90}))
        rows.append({"id": f"i{i}", "image": name,
                     "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A."}]})
    path = os.path.join(work, "check.json")
    with open(path, "w") as fh:
        json.dump(rows, fh)
    cfg = DataConfig(sources=[DataSource(path=path, format="llava", image_folder=folder)], template="qwen_chat",
                     cache_dir=os.path.join(work, "cache_check"))
    times = []
    for _ in range(2):
        with Timer() as t:
            read_sources(cfg, check_images=True)
        times.append(t.seconds)
    megabytes = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) / 2**20
    how = (f"read_sources(check_images=True) on {n_images:,} records with one 336 px image each "
           f"(half JPEG, half PNG, {megabytes:.0f} MiB, in the page cache)")
    return [figure("image check before training: first run", n_images / times[0], "images/s", how),
            figure("image check before training: rerun, files unchanged", n_images / times[1], "images/s",
                   how + "; files that passed before and kept their size, mtime, ctime and inode are not read"),
            figure("image check: rerun / first run speed", times[0] / times[1], "x", "ratio of the two above")]


def section_data_prep(quick: bool = False) -> dict:
    from transformers import AutoTokenizer

    from bench_data_prep import synth_rows
    from llava_ft.config import DataConfig, DataSource
    from llava_ft.demo.assets import build_tokenizer

    n = 5_000 if quick else 100_000
    work = tempfile.mkdtemp(prefix="bench_prep_")
    figs, notes = [], []
    try:
        tok_dir = build_tokenizer(os.path.join(work, "tok"))
        tok = AutoTokenizer.from_pretrained(tok_dir)
        llava_path = os.path.join(work, "llava.json")
        _write_llava_records(llava_path, n)
        conv_path = os.path.join(work, "conversations.jsonl")
        with open(conv_path, "w") as fh:
            for row in synth_rows(n):
                fh.write(json.dumps(row) + "\n")
        num_image_tokens = 576  # CLIP-L/336: what LLaVA-1.5 records expand to
        # The image files are never opened while preparing (only training decodes them), but the folder
        # must exist: data preparation checks every image_folder first.
        os.makedirs(os.path.join(work, "img"), exist_ok=True)
        for label, path, fmt, folder, nit in (("LLaVA records", llava_path, "llava", os.path.join(work, "img"), num_image_tokens),
                                              ("conversations", conv_path, "openai", None, 0)):
            cache = os.path.join(work, f"cache_{fmt}")
            cfg = DataConfig(sources=[DataSource(path=path, format=fmt, image_folder=folder)], template="qwen_chat",
                             max_length=2048, cache_dir=cache)
            cold_s, prepared = _prep_once(cfg, tok, nit)
            cached = [_cached_start(path, fmt, folder, cache, tok_dir, nit) for _ in range(3)]
            figs.append(figure(f"{label}: cold", n / cold_s, "records/s",
                               f"prepare_dataset on {n:,} synthetic {fmt} records (qwen_chat, max_length 2048, "
                               f"num_proc 1): read + tokenize + save cache, {cold_s:.1f} s in one process"))
            figs.append(figure(f"{label}: cached start", median(cached), "s",
                               "fresh Python process: imports + tokenizer load + prepare_dataset cache hit + "
                               "reading modality_length; median of 3", target="< 5 s", met=median(cached) < 5))
            notes.append(f"{label}: {prepared.stats['samples']:,} samples, {prepared.stats['tokens']:,} tokens, "
                         f"dropped {prepared.stats.get('dropped_total', 0)}.")
        notes.append("LLaVA records: ~40 % text-only, 1-3 turns, image samples expand to 576 image tokens; "
                     "conversations: bench_data_prep.synth_rows (alpaca-like single turn, openai messages).")
        figs += _image_check_figures(work, 200 if quick else 4_000)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return section("data_prep", "Data preparation (prepare_dataset)", figs, notes)


# ----------------------------------------------------------------------------------------------------
# generation


def _chat_figures(model_dir: str, quick: bool) -> list:
    from llava_ft.inference import load_chat_model
    from llava_ft.inference.chat_model import GenerationSettings

    chat = load_chat_model(model_dir, prompt_template="qwen_chat", device="cpu" if not _gpu() else "auto")
    new_tokens = 16 if quick else 128
    rounds = 2 if quick else 5
    prompt = [{"role": "user", "content": "Describe the picture of a red circle on a grey background. " * 8}]
    settings = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    list(chat.stream_chat(prompt, settings=GenerationSettings(max_new_tokens=4)))  # warm-up
    ttfts, rates = [], []
    prompt_tokens = 0
    for _ in range(rounds):
        start = time.perf_counter()
        first = None
        stream = chat.stream_chat(prompt, settings=settings)
        for delta in stream:
            if first is None and delta:
                first = time.perf_counter() - start
        total = time.perf_counter() - start
        res = stream.result
        prompt_tokens = res.prompt_tokens
        if first is not None and res.completion_tokens > 1:
            ttfts.append(first)
            rates.append((res.completion_tokens - 1) / max(total - first, 1e-9))
    return [
        figure("chat: time to first token", 1000 * median(ttfts), "ms",
               f"ChatModel.stream_chat, greedy, {prompt_tokens}-token prompt, batch 1; time to the first non-empty "
               f"text delta; median of {rounds}"),
        figure("chat: decode speed", median(rates), "tokens/s",
               f"same streams: (completion tokens - 1) / (end - first delta), up to {new_tokens} new tokens "
               "(random weights may stop early at EOS)"),
    ]


def _gpu() -> bool:
    from common import has_gpu

    return has_gpu()


def _load_server(model_dir: str, max_batch: int, clients: int, duration: float, max_tokens: int):
    """Start `llava_ft serve` in its own process, warm it up, run the load, stop it; the LoadReport."""
    from bench_serve import free_port, stop_server, wait_healthy
    from llava_ft.serve.loadtest import run_load

    port = free_port()
    cmd = [sys.executable, "-m", "llava_ft", "serve", model_dir, "--port", str(port), "--model-name", "bench",
           "--max-queue", "16", "--max-batch", str(max_batch), "--log-level", "warning",
           "--prompt-template", "qwen_chat"]
    if not _gpu():
        cmd += ["--device", "cpu"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=240)
        run_load(url, model="bench", clients=1, duration_s=1.0, max_tokens=2)  # warm-up
        return run_load(url, model="bench", clients=clients, duration_s=duration, max_tokens=max_tokens)
    finally:
        stop_server(proc)


def _server_figures(model_dir: str, quick: bool) -> list:
    clients, duration, max_tokens = (2, 4.0, 8) if quick else (8, 20.0, 32)
    how = (f"serve.loadtest.run_load: {clients} loopback clients back to back for {duration:.0f} s (half streaming), "
           f"max_tokens {max_tokens}, greedy, `llava_ft serve` in its own process")
    figs = []
    rates = {}
    for max_batch in (8, 1):  # batched (the default) vs one request at a time
        rep = _load_server(model_dir, max_batch, clients, duration, max_tokens)
        p = rep.percentile
        tag = f"--max-batch {max_batch}"
        rates[max_batch] = rep.ok / max(rep.duration_s, 1e-9)
        figs += [figure(f"server ({tag}): requests/s", rates[max_batch], "req/s",
                        how + f"; status counts {dict(rep.status_counts)}, transport errors {len(rep.errors)}"),
                 figure(f"server ({tag}): completion tokens/s", rep.completion_tokens / max(rep.duration_s, 1e-9),
                        "tokens/s", how)]
        for q in (50, 90, 99):
            figs.append(figure(f"server ({tag}): latency p{q}", 1000 * p(rep.latencies_s, q), "ms",
                               "full answer received, successful requests; " + how))
        figs.append(figure(f"server ({tag}): first token p50 (stream)", 1000 * p(rep.first_token_s, 50), "ms", how))
    figs.append(figure("server: batched / one at a time requests/s", rates[8] / max(rates[1], 1e-9), "x",
                       "ratio of the two requests/s above: requests waiting together with the same sampling "
                       "settings share one generate call"))
    return figs


def section_generation(quick: bool = False) -> dict:
    from llava_ft.demo import assets

    work = tempfile.mkdtemp(prefix="bench_gen_")
    figs, notes = [], []
    errors = []
    try:
        tok = assets.build_tokenizer(os.path.join(work, "tok"))
        if quick:
            model_dir = assets.build_tiny_llm(os.path.join(work, "llm"), tok, arch="qwen2")
            shape = "tiny demo Qwen2 (hidden 64, 2 layers)"
        else:
            model_dir = assets.build_tiny_llm(os.path.join(work, "llm"), tok, arch="qwen2", hidden_size=768,
                                              num_layers=12, num_heads=12, num_kv_heads=4, intermediate_size=2048)
            shape = "random-init Qwen2, hidden 768, 12 layers, 12 heads (4 KV), MLP 2048, demo 512-token vocab"
        notes.append(f"Model: {shape}, fp32 on CPU (bf16 on GPU via dtype auto). Random weights: the figures "
                     "measure the generation path, not answer quality.")
        for part in (_chat_figures, _server_figures):
            try:
                figs += part(model_dir, quick)
            except Exception as err:  # one half failing still reports the other
                errors.append(f"{part.__name__}: {type(err).__name__}: {err}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    status = "ok" if not errors else ("failed" if not figs else "partial")
    return section("generation", "Generation: chat and server", figs, notes, status=status,
                   error="\n".join(errors) or None)
