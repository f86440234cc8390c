"""Throughput and latency of `llava_ft serve` under concurrent clients (prints figures; asserts nothing).

    python benchmarks/bench_serve.py                                  # tiny random Llama, 16 clients, 30 s
    python benchmarks/bench_serve.py --clients 4 --duration 10 --max-tokens 64
    python benchmarks/bench_serve.py --model ./merged --prompt-template qwen_chat

Starts `python -m llava_ft serve MODEL` as a subprocess on a free loopback port (so the load generator and
the server do not share one Python interpreter), waits for /health, runs `llava_ft.serve.loadtest.run_load`
(half the clients stream), prints requests/s, completion tokens/s, latency percentiles and the status
counts (503 = queue full, expected when clients > max queue + 1), then stops the server.
Without --model it builds the tiny demo Llama in a temp dir (random weights: answers are gibberish, the
figures measure the serving path, not a real model).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the server did not become healthy in time")


def stop_server(proc: subprocess.Popen) -> None:
    """Ask `llava_ft serve` to shut down (SIGINT, as Ctrl-C would); kill it if it has not left in 30 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model to serve (default: build the tiny demo Llama)")
    ap.add_argument("--prompt-template")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=8)
    args = ap.parse_args()

    from llava_ft.serve.loadtest import run_load

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from llava_ft.demo import assets

            model = assets.build_tiny_llm(os.path.join(tmp, "llm"), assets.build_tokenizer(os.path.join(tmp, "tok")))
        port = free_port()
        cmd = [sys.executable, "-m", "llava_ft", "serve", model, "--port", str(port), "--model-name", "bench",
               "--max-queue", str(args.max_queue), "--log-level", "warning", "--device", "cpu"]
        if args.prompt_template:
            cmd += ["--prompt-template", args.prompt_template]
        proc = subprocess.Popen(cmd, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, proc)
            print(f"bench_serve: {args.clients} clients x {args.duration:.0f} s, max_tokens {args.max_tokens}, "
                  f"max_queue {args.max_queue}, model {args.model or 'tiny demo Llama'}", flush=True)
            report = run_load(url, model="bench", clients=args.clients, duration_s=args.duration,
                              max_tokens=args.max_tokens)
            print("bench_serve: " + report.summary())
            import httpx

            print("bench_serve: health after:", httpx.get(url + "/health", timeout=5).json())
        finally:
            stop_server(proc)


if __name__ == "__main__":
    main()
