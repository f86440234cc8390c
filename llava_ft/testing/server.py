"""Run a serve app on a loopback port inside this process (tests, benchmarks, notebooks).

    with serve_in_thread(create_app(chat_model, "tiny")) as base_url:   # "http://127.0.0.1:PORT"
        openai.OpenAI(base_url=base_url + "/v1", api_key="x").chat.completions.create(...)

The socket is bound before uvicorn starts (port 0: the OS picks a free one, no race with other processes),
always on 127.0.0.1; leaving the block shuts the server down and joins its thread.
"""
from __future__ import annotations

import contextlib
import socket
import threading
import time
from typing import Iterator


@contextlib.contextmanager
def serve_in_thread(app, host: str = "127.0.0.1", startup_timeout_s: float = 60.0) -> Iterator[str]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
