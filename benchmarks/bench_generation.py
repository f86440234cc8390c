"""Generation speed through llava_ft.inference: time to first token and decode tokens/s.

    python benchmarks/bench_generation.py                 # tiny demo model + ~0.5B random model, fp32 and 4-bit
    python benchmarks/bench_generation.py --skip-large --new-tokens 64

Models are random-init (nothing downloaded), built once under --cache (default /tmp/llava_ft_bench_gen).
Figures depend on the machine and on whoever else shares its cores: compare runs on the same machine.
TTFT = time of a 1-token answer (prompt encoding + prefill + first step); tokens/s = (N - 1) / (time of an
N-token answer - TTFT); greedy; medians of --repeats runs.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path


def build_large(out: Path, tokenizer_dir: str) -> str:
    """~0.5B-parameter Qwen2-shaped model (26 layers, hidden 1024, GQA) with the demo tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if (out / "config.json").is_file():
        return str(out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # vocab = the tokenizer's, so every generated id decodes to text (streamed deltas are measurable).
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=1024, intermediate_size=4608, num_hidden_layers=26,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg)
    print(f"built random model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return str(out)


def measure(path: str, bits, new_tokens: int, repeats: int) -> dict:
    """Median TTFT (a 1-token answer: prompt encoding + prefill + one step) and decode rate
    ((N - 1) / (time for N tokens - time for 1 token)); token counts, not text deltas, since the streamer
    holds text back until a word ends and random weights rarely end words."""
    from llava_ft.inference import GenerationSettings, load_chat_model

    cm = load_chat_model(path, bits=bits, prompt_template="chatml")
    msgs = [{"role": "user", "content": "Describe a red circle on a grey background in detail."}]
    one = GenerationSettings(max_new_tokens=1, temperature=0.0)
    full = GenerationSettings(max_new_tokens=new_tokens, temperature=0.0)
    cm.chat(msgs, settings=one)  # warm-up

    def timed(settings):
        start = time.perf_counter()
        res = cm.chat(msgs, settings=settings)
        return time.perf_counter() - start, res.completion_tokens

    ttft = sorted(timed(one)[0] for _ in range(repeats))[repeats // 2]
    runs = sorted(timed(full) for _ in range(repeats))
    total, n = runs[repeats // 2]
    rate = (n - 1) / (total - ttft) if n > 1 and total > ttft else float("nan")
    return {"ttft_ms": 1000 * ttft, "tok_s": rate, "tokens": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", default="/tmp/llava_ft_bench_gen")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-large", action="store_true")
    args = ap.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    from llava_ft.demo.assets import build_demo_workspace

    ws = build_demo_workspace(Path(args.cache) / "demo")
    models = [("tiny demo (qwen2, hidden 64)", ws["llm"])]
    if not args.skip_large:
        models.append(("random ~0.5B (qwen2)", build_large(Path(args.cache) / "large", ws["tokenizer"])))
    print(f"{'model':32} {'precision':9} {'TTFT ms':>9} {'tok/s':>8} {'tokens':>6}")
    for name, path in models:
        for bits in (None, 4):
            r = measure(path, bits, args.new_tokens, args.repeats)
            print(f"{name:32} {'nf4' if bits else 'fp32':9} {r['ttft_ms']:9.1f} {r['tok_s']:8.1f} {r['tokens']:6d}",
                  flush=True)


if __name__ == "__main__":
    main()
