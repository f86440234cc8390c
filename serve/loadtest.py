"""A bounded load generator for a running serve app (used by tests/test_serve.py and benchmarks/bench_serve.py).

    report = run_load("http://127.0.0.1:8000", model="tiny", clients=16, duration_s=30, max_tokens=16)
    print(report.summary())

`clients` threads each send chat requests back to back until `duration_s` has passed (half of them
streaming, to exercise both paths); a 503 (queue full) makes that client wait its Retry-After, capped at
1 s. Only loopback URLs are accepted: this is for measuring our own server, never someone else's.
"""
from __future__ import annotations

import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlparse

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class LoadReport:
    duration_s: float = 0.0
    ok: int = 0
    status_counts: Counter = field(default_factory=Counter)
    latencies_s: list = field(default_factory=list)  # of successful requests, full answer received
    first_token_s: list = field(default_factory=list)  # streaming requests: time to first content delta
    completion_tokens: int = 0
    errors: list = field(default_factory=list)  # transport errors / malformed answers

    @staticmethod
    def percentile(values: list, q: float) -> float:
        if not values:
            return float("nan")
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]

    def summary(self) -> str:
        lat, ttft = self.latencies_s, self.first_token_s
        p = self.percentile
        return (f"{self.ok} ok in {self.duration_s:.1f} s = {self.ok / max(self.duration_s, 1e-9):.2f} req/s, "
                f"{self.completion_tokens / max(self.duration_s, 1e-9):.1f} completion tok/s; "
                f"status {dict(sorted(self.status_counts.items()))}; "
                f"latency p50 {p(lat, 50) * 1000:.0f} ms, p90 {p(lat, 90) * 1000:.0f} ms, "
                f"p99 {p(lat, 99) * 1000:.0f} ms; first token (stream) p50 {p(ttft, 50) * 1000:.0f} ms, "
                f"p90 {p(ttft, 90) * 1000:.0f} ms; transport errors {len(self.errors)}")


def _one(client, url: str, body: dict, stream: bool, report: LoadReport, lock: threading.Lock) -> float:
    """One request; returns how long the client should wait before the next (Retry-After on 503)."""
    started = time.monotonic()
    first = None
    tokens = 0
    if stream:
        with client.stream("POST", url, json={**body, "stream": True}) as resp:
            status = resp.status_code
            if status == 200:
                for line in resp.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    obj = json.loads(line[6:])
                    if "error" in obj:
                        raise RuntimeError(f"error event in stream: {obj['error']}")
                    if obj["choices"] and obj["choices"][0]["delta"].get("content") and first is None:
                        first = time.monotonic() - started
                    if obj.get("usage"):
                        tokens = obj["usage"]["completion_tokens"]
            else:
                resp.read()
            retry = resp.headers.get("retry-after")
    else:
        resp = client.post(url, json=body)
        status = resp.status_code
        if status == 200:
            tokens = resp.json()["usage"]["completion_tokens"]
        retry = resp.headers.get("retry-after")
    elapsed = time.monotonic() - started
    with lock:
        report.status_counts[status] += 1
        if status == 200:
            report.ok += 1
            report.latencies_s.append(elapsed)
            report.completion_tokens += tokens
            if first is not None:
                report.first_token_s.append(first)
    return min(float(retry or 0.2), 1.0) if status == 503 else 0.0


def run_load(base_url: str, model: str, clients: int = 16, duration_s: float = 30.0, max_tokens: int = 16,
             api_key: str | None = None, prompt: str = "Describe the picture.") -> LoadReport:
    import httpx

    if urlparse(base_url).hostname not in LOOPBACK:
        raise ValueError(f"run_load targets loopback servers only, not {base_url}")
    url = base_url.rstrip("/") + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7}
    report, lock = LoadReport(), threading.Lock()
    deadline = time.monotonic() + duration_s

    def client_loop(i: int) -> None:
        with httpx.Client(headers=headers, timeout=max(60.0, duration_s * 2)) as client:
            while time.monotonic() < deadline:
                try:
                    pause = _one(client, url, body, stream=(i % 2 == 1), report=report, lock=lock)
                except Exception as err:  # noqa: BLE001 - every failure is recorded, none stops the run
                    with lock:
                        report.errors.append(f"{type(err).__name__}: {err}")
                    pause = 0.2
                if pause:
                    time.sleep(pause)

    started = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=duration_s + 120)
    report.duration_s = time.monotonic() - started
    return report
