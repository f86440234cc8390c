"""Tests for `serve/`: the OpenAI-compatible API against live servers on loopback.

Real tiny models (tests/conftest.py fixtures) loaded with `llava_ft.inference.load_chat_model`, a real
uvicorn server in a thread (`llava_ft.testing.server.serve_in_thread`) and the official `openai` client.
Each server answer is compared with what the same ChatModel says when called directly (greedy), so the tests check
that the API returns the model's answer, not just something shaped like one.

    python -m pytest tests/test_serve.py -x -q            # the slow load test too: add -m slow or nothing
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from PIL import Image  # noqa: E402

from llava_ft.inference import GenerationSettings, load_chat_model  # noqa: E402
from llava_ft.serve.app import create_app  # noqa: E402
from llava_ft.testing.server import serve_in_thread  # noqa: E402

KEY = "sk-test-key"
# A prompt the tiny random Llama answers greedily without emitting EOS (checked for 1000 tokens in
# `endless_model`; it ran 12000 when measured), so a request with a huge max_tokens keeps the generation
# thread busy until it is cancelled.
LONG_PROMPT = "Count to ten."


# ------------------------------------------------------------------------------------------------
# fixtures: models (loaded once) and servers around them


@pytest.fixture(scope="module")
def text_model(tiny_llama):
    return load_chat_model(tiny_llama, device="cpu")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, tiny_llama, tiny_clip):
    """An XTuner-layout LLaVA folder (projector/) over the tiny Llama and CLIP: what `convert pth_to_hf` writes."""
    import torch
    from transformers import AutoConfig

    from llava_ft.model.projector import Projector

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("llava")
    vis = AutoConfig.from_pretrained(tiny_clip)
    vis_hidden = getattr(vis, "vision_config", vis).hidden_size
    Projector(vis_hidden, AutoConfig.from_pretrained(tiny_llama).hidden_size, depth=2).save_pretrained(out / "projector")
    return str(out)


@pytest.fixture(scope="module")
def llava_model(tiny_llama, tiny_clip, llava_dir):
    return load_chat_model(tiny_llama, llava=llava_dir, visual_encoder=tiny_clip, device="cpu")


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, demo_data):
    """image_dir/ with a real image, a symlink pointing outside it, and a secret image outside it."""
    root = tmp_path_factory.mktemp("serve_images")
    inside = root / "allowed"
    inside.mkdir()
    Image.open(os.path.join(demo_data["image_folder"], "eval", "eval_00000.png")).save(inside / "shape.png")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "secret.png")
    os.symlink(root / "secret.png", inside / "link_out.png")
    return {"dir": str(inside), "image": str(inside / "shape.png"), "outside": str(root / "secret.png")}


@pytest.fixture(scope="module")
def text_server(text_model):
    with serve_in_thread(create_app(text_model, "tiny-text", max_queue=4, max_body_bytes=64 * 1024)) as url:
        yield url


@pytest.fixture(scope="module")
def vision_server(llava_model, image_dir):
    app = create_app(llava_model, "tiny-llava", api_key=KEY, max_queue=4, image_dir=image_dir["dir"],
                     max_body_bytes=2 * 1024 * 1024, max_image_bytes=512 * 1024, max_image_pixels=1_000_000)
    with serve_in_thread(app) as url:
        yield url


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def image_message(url: str, text: str = "What colour is the shape?") -> list:
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def post(url: str, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(url + "/v1/chat/completions", content=content,
                      headers={**headers, "Content-Type": "application/json"}, timeout=120, **kw)


def assert_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert "type" in err and "code" in err and "param" in err
    return err


# ------------------------------------------------------------------------------------------------
# the OpenAI client: text, images, streaming


def test_text_completion_matches_model_and_reports_usage(text_server, text_model):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
    resp = client(text_server).chat.completions.create(model="tiny-text", messages=messages, max_tokens=12,
                                                       temperature=0)
    direct = text_model.chat(messages, settings=GenerationSettings(max_new_tokens=12, temperature=0))
    assert resp.object == "chat.completion" and resp.model == "tiny-text"
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == direct.text
    assert choice.finish_reason == direct.finish_reason
    assert resp.usage.prompt_tokens == direct.prompt_tokens > 0
    assert resp.usage.completion_tokens == direct.completion_tokens
    assert 0 < resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


def test_streaming_deltas_add_up_to_the_answer(text_server, text_model):
    messages = [{"role": "user", "content": "Tell me about circles."}]
    stream = client(text_server).chat.completions.create(model="tiny-text", messages=messages, max_tokens=20,
                                                         temperature=0, stream=True,
                                                         stream_options={"include_usage": True})
    chunks = list(stream)
    direct = text_model.chat(messages, settings=GenerationSettings(max_new_tokens=20, temperature=0))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == direct.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == direct.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == direct.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_raw_sse_ends_with_done(text_server):
    body = {"model": "tiny-text", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", text_server + "/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["choices"][0]["finish_reason"] in ("stop", "length") and last["usage"]["total_tokens"] > 0


def test_sse_event_stays_one_line_for_line_splitting_clients():
    """A sampled token may decode to U+2028, U+2029 or U+0085: JSON keeps them raw, but httpx's iter_lines (like
    str.splitlines) ends a line there, and the load test once read a cut event (JSONDecodeError). Each event must
    reach such a client as one `data:` line that parses back to the same text."""
    from llava_ft.serve.app import sse_data

    text = "a\u2028b\u2029c\x85d\x1ce\u00e9\u4e2d"
    received = httpx.Response(200, content=sse_data({"content": text}).encode())  # what a client reads
    lines = [line for line in received.iter_lines() if line]
    assert len(lines) == 1 and lines[0].startswith("data: ")
    assert json.loads(lines[0][6:]) == {"content": text}
    assert "\u4e2d" in lines[0]  # other text stays readable UTF-8


def test_seed_makes_sampling_repeatable(text_server):
    c = client(text_server)
    kw = dict(model="tiny-text", messages=[{"role": "user", "content": "Say something."}], max_tokens=10,
              temperature=1.0, top_p=0.95, seed=1234)
    first = c.chat.completions.create(**kw).choices[0].message.content
    assert c.chat.completions.create(**kw).choices[0].message.content == first
    others = {c.chat.completions.create(**{**kw, "seed": s}).choices[0].message.content for s in (1, 2, 3)}
    assert others - {first}, "different seeds never changed the sampled answer"


def test_stop_sequence_cuts_the_answer(text_server, text_model):
    messages = [{"role": "user", "content": "Tell me about circles."}]
    full = text_model.chat(messages, settings=GenerationSettings(max_new_tokens=20, temperature=0)).text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), f"need a visible stop string from {full!r}"
    resp = client(text_server).chat.completions.create(model="tiny-text", messages=messages, max_tokens=20,
                                                       temperature=0, stop=[stop])
    assert resp.choices[0].message.content == full[: full.find(stop)]
    assert resp.choices[0].finish_reason == "stop"


def test_image_as_data_url_stream_and_not(vision_server, llava_model, image_dir):
    raw = open(image_dir["image"], "rb").read()
    messages = image_message(data_url(raw))
    c = client(vision_server, KEY)
    resp = c.chat.completions.create(model="tiny-llava", messages=messages, max_tokens=10, temperature=0)
    direct = llava_model.chat([{"role": "user", "content": "<image>\nWhat colour is the shape?"}],
                              images=[Image.open(image_dir["image"]).convert("RGB")],
                              settings=GenerationSettings(max_new_tokens=10, temperature=0))
    assert resp.choices[0].message.content == direct.text
    # the image's features are in the prompt: many more positions than the text alone
    text_only = llava_model.chat([{"role": "user", "content": "What colour is the shape?"}],
                                 settings=GenerationSettings(max_new_tokens=1, temperature=0))
    assert resp.usage.prompt_tokens == direct.prompt_tokens > text_only.prompt_tokens
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny-llava", messages=messages, max_tokens=10, temperature=0, stream=True) if ch.choices)
    assert streamed == direct.text


def test_multi_turn_with_image_in_first_turn(vision_server, llava_model, image_dir):
    raw = open(image_dir["image"], "rb").read()
    messages = image_message(data_url(raw)) + [{"role": "assistant", "content": "It is red."},
                                               {"role": "user", "content": "And its shape?"}]
    resp = client(vision_server, KEY).chat.completions.create(model="tiny-llava", messages=messages,
                                                              max_tokens=8, temperature=0)
    direct = llava_model.chat([{"role": "user", "content": "<image>\nWhat colour is the shape?"},
                               {"role": "assistant", "content": "It is red."},
                               {"role": "user", "content": "And its shape?"}],
                              images=[Image.open(image_dir["image"]).convert("RGB")],
                              settings=GenerationSettings(max_new_tokens=8, temperature=0))
    assert resp.choices[0].message.content == direct.text


def test_models_and_health(vision_server):
    models = client(vision_server, KEY).models.list()
    assert [m.id for m in models.data] == ["tiny-llava"]
    assert client(vision_server, KEY).models.retrieve("tiny-llava").id == "tiny-llava"
    health = httpx.get(vision_server + "/health").json()  # no key needed: load balancers probe it
    assert health["status"] == "ok" and health["supports_images"] is True and health["auth_required"] is True


# ------------------------------------------------------------------------------------------------
# local and remote image references


def test_local_image_inside_image_dir_is_served(vision_server, llava_model, image_dir):
    direct = llava_model.chat([{"role": "user", "content": "<image>\nWhat colour is the shape?"}],
                              images=[Image.open(image_dir["image"]).convert("RGB")],
                              settings=GenerationSettings(max_new_tokens=6, temperature=0))
    for ref in ("shape.png", image_dir["image"], "file://" + image_dir["image"]):
        resp = post(vision_server, {"model": "tiny-llava", "messages": image_message(ref), "max_tokens": 6,
                                    "temperature": 0})
        assert resp.status_code == 200, (ref, resp.text)
        assert resp.json()["choices"][0]["message"]["content"] == direct.text


@pytest.mark.parametrize("ref", ["../secret.png", "link_out.png", "ABS_OUTSIDE", "file:///etc/passwd",
                                 "sub/../../secret.png"])
def test_paths_outside_image_dir_are_forbidden(vision_server, image_dir, ref):
    ref = image_dir["outside"] if ref == "ABS_OUTSIDE" else ref
    err = assert_error(post(vision_server, {"model": "tiny-llava", "messages": image_message(ref)}), 403)
    assert err["code"] == "path_forbidden"


def test_local_paths_refused_without_image_dir(llava_model, image_dir):
    with serve_in_thread(create_app(llava_model, "m")) as url:
        err = assert_error(post(url, {"model": "m", "messages": image_message(image_dir["image"])}, key=None), 403)
        assert "--image-dir" in err["message"]


class _OneImage(BaseHTTPRequestHandler):
    payload = b""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.send_response(200 if self.path == "/img.png" else 404)
        self.send_header("Content-Type", "image/png")
        self.end_headers()
        self.wfile.write(self.payload if self.path == "/img.png" else b"")

    def log_message(self, *args):
        pass


def test_remote_images_only_when_allowed(vision_server, llava_model, image_dir):
    _OneImage.payload = open(image_dir["image"], "rb").read()
    http = ThreadingHTTPServer(("127.0.0.1", 0), _OneImage)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    remote = f"http://127.0.0.1:{http.server_address[1]}/img.png"
    try:
        err = assert_error(post(vision_server, {"model": "tiny-llava", "messages": image_message(remote)}), 403)
        assert "--allow-remote-images" in err["message"]
        with serve_in_thread(create_app(llava_model, "m", allow_remote_images=True)) as url:
            ok = post(url, {"model": "m", "messages": image_message(remote), "max_tokens": 6, "temperature": 0},
                      key=None)
            direct = llava_model.chat([{"role": "user", "content": "<image>\nWhat colour is the shape?"}],
                                      images=[Image.open(image_dir["image"]).convert("RGB")],
                                      settings=GenerationSettings(max_new_tokens=6, temperature=0))
            assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == direct.text
            missing = post(url, {"model": "m", "messages": image_message(remote.replace("img", "nope"))}, key=None)
            assert_error(missing, 400)
    finally:
        http.shutdown()


# ------------------------------------------------------------------------------------------------
# bad input: every case answers with the right status and an OpenAI-style error body


def test_auth_missing_or_wrong_key(vision_server):
    body = {"model": "tiny-llava", "messages": [{"role": "user", "content": "hi"}]}
    assert_error(post(vision_server, body, key=None), 401)
    assert_error(post(vision_server, body, key="sk-wrong"), 401)
    with pytest.raises(openai.AuthenticationError):
        client(vision_server, "sk-wrong").models.list()
    assert httpx.get(vision_server + "/v1/models").status_code == 401


def test_unknown_model_is_404(text_server):
    with pytest.raises(openai.NotFoundError) as info:
        client(text_server).chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert "tiny-text" in str(info.value)
    assert httpx.get(text_server + "/v1/models/gpt-4o").status_code == 404


@pytest.mark.parametrize("body", [
    b"{not json",
    b"\xff\xfe\x00garbage",
    b"[1, 2, 3]",
    {"messages": [{"role": "user", "content": "hi"}]},                           # no model
    {"model": "tiny-text", "messages": []},
    {"model": "tiny-text", "messages": [{"role": "wizard", "content": "hi"}]},
    {"model": "tiny-text", "messages": [{"role": "user", "content": 42}]},
    {"model": "tiny-text", "messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]},
    {"model": "tiny-text", "messages": [{"role": "user", "content": "hi"}], "temperature": 7},
    {"model": "tiny-text", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0},
    {"model": "tiny-text", "messages": [{"role": "user", "content": "hi"}], "top_p": 0},
    {"model": "tiny-text", "messages": [{"role": "user", "content": "hi"}], "n": 3},
    {"model": "tiny-text", "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]},
    {"model": "tiny-text", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"model": "tiny-text", "messages": [{"role": "system", "content": "only a system message"}]},
    {"model": "tiny-text", "messages": [{"role": "tool", "content": "42"}]},
    {"model": "tiny-text", "messages": [{"role": "user", "content": [{"type": "text"}]}]},
    b'{"model": "tiny-text", "messages": [{"role": "user", "content": "\\ud800 lone surrogate"}]}',
    b"[" * 50_000,
])
def test_malformed_requests_are_400(text_server, body):
    assert_error(post(text_server, body, key=None), 400)


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_context_is_400(text_server, text_model, stream):
    words = "circle square triangle " * (text_model.context_length // 2)
    messages = [{"role": "user", "content": words}]
    with pytest.raises(openai.BadRequestError) as info:
        client(text_server).chat.completions.create(model="tiny-text", stream=stream, max_tokens=4,
                                                    messages=messages)
    err = info.value.body  # OpenAI's shape: code context_length_exceeded, both numbers in the message
    n_prompt = text_model.encode(messages).length
    assert err["code"] == "context_length_exceeded" and err["param"] == "messages"
    assert f"maximum context length is {text_model.context_length} tokens" in err["message"]
    assert f"resulted in {n_prompt} tokens" in err["message"]


@pytest.fixture(scope="module")
def short_model(tiny_llama, tmp_path_factory):
    from llava_ft.testing.variants import with_context

    return load_chat_model(with_context(tiny_llama, tmp_path_factory.mktemp("short") / "llm", 64), device="cpu")


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_past_the_context_is_capped(short_model, stream):
    """max_tokens 1e12 on a 64-token model: context - prompt tokens, finish_reason "length" (not 1e12 tokens,
    and not an error); the same answer the model gives with exactly that budget."""
    messages = [{"role": "user", "content": LONG_PROMPT}]
    room = short_model.context_length - short_model.encode(messages).length
    expected = short_model.chat(messages, settings=GenerationSettings(max_new_tokens=room, temperature=0))
    assert expected.finish_reason == "length"  # the tiny model runs on without EOS for this prompt
    with serve_in_thread(create_app(short_model, "short")) as url:
        resp = client(url).chat.completions.create(
            model="short", messages=messages, max_tokens=10**12, temperature=0, stream=stream,
            **({"stream_options": {"include_usage": True}} if stream else {}))
        if stream:
            chunks = list(resp)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            usage = chunks[-1].usage
        else:
            text, finish, usage = resp.choices[0].message.content, [resp.choices[0].finish_reason], resp.usage
    assert text == expected.text and finish == ["length"]
    assert usage.completion_tokens == room and usage.prompt_tokens + usage.completion_tokens == 64


def test_openai_client_raises_bad_request(text_server):
    with pytest.raises(openai.BadRequestError):
        client(text_server).chat.completions.create(model="tiny-text", messages=[{"role": "user", "content": "x"}],
                                                    temperature=9)


def test_image_sent_to_text_model_is_400(text_server, image_dir):
    raw = open(image_dir["image"], "rb").read()
    err = assert_error(post(text_server, {"model": "tiny-text", "messages": image_message(data_url(raw))},
                            key=None), 400)
    assert err["code"] == "images_not_supported"


def test_body_over_limit_is_413(text_server):
    big = {"model": "tiny-text", "messages": [{"role": "user", "content": "x" * 100_000}]}
    assert_error(post(text_server, big, key=None), 413)

    def chunks():  # no Content-Length: the limit must hold while the body streams in
        for _ in range(20):
            yield b" " * 8192

    resp = httpx.post(text_server + "/v1/chat/completions", content=chunks(), timeout=60)
    assert_error(resp, 413)


def test_image_over_byte_limit_is_413(vision_server):
    noisy = Image.frombytes("RGB", (600, 600), os.urandom(600 * 600 * 3))  # incompressible: ~1 MiB PNG
    err = assert_error(post(vision_server, {"model": "tiny-llava", "messages": image_message(data_url(png_bytes(noisy)))}),
                       413)
    assert err["code"] in ("image_too_large", "request_too_large")


def test_decompression_bomb_is_413(vision_server):
    bomb = png_bytes(Image.new("1", (20_000, 20_000)))  # 400 megapixels that compress to a few tens of KiB
    assert len(bomb) < 512 * 1024
    err = assert_error(post(vision_server, {"model": "tiny-llava", "messages": image_message(data_url(bomb))}), 413)
    assert "pixels" in err["message"]


@pytest.mark.parametrize("url", [
    data_url(b"this is not an image at all"),
    data_url(png_bytes(Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)))[:2000]),  # cut PNG
    "data:image/png;base64,@@@not-base64@@@",
    "data:image/png,rawbytes",
    "ftp://example.invalid/x.png",
])
def test_undecodable_images_are_400(vision_server, url):
    assert_error(post(vision_server, {"model": "tiny-llava", "messages": image_message(url)}), 400)


def test_server_survives_all_of_it(text_server, vision_server):
    for url in (text_server, vision_server):
        assert httpx.get(url + "/health").json()["status"] == "ok"
    resp = client(text_server).chat.completions.create(model="tiny-text", max_tokens=3,
                                                       messages=[{"role": "user", "content": "still there?"}])
    assert resp.choices[0].message.content is not None
    assert_error(httpx.get(text_server + "/no/such/route"), 404)


# ------------------------------------------------------------------------------------------------
# the queue: bounded, 503 + Retry-After when full, disconnects free their slot


def _open_stream(url: str, max_tokens: int = 100_000, wait_head: bool = True, stream: bool = True):
    """Start a long streaming request on a raw socket; returns (socket, status head or "" if not waited).

    A streaming answer's status line comes with its first token, so a request still waiting in line
    has none yet: callers watch /health for those instead."""
    host, port = url.replace("http://", "").split(":")
    body = json.dumps({"model": "q", "messages": [{"role": "user", "content": LONG_PROMPT}],
                       "max_tokens": max_tokens, "temperature": 0, "stream": stream}).encode()
    sock = socket.create_connection((host, int(port)), timeout=60)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    head = sock.recv(4096).decode(errors="replace") if wait_head else ""
    return sock, head


def _wait_for(predicate, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def endless_model(tiny_llama, tmp_path_factory):
    """tiny_llama with a context of 1M positions: with max_tokens 100000 and a prompt it never ends with EOS,
    a request holds the generation thread until its client goes away (the queue test needs that)."""
    import shutil

    folder = tmp_path_factory.mktemp("endless") / "llm"
    shutil.copytree(tiny_llama, folder)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        cfg = json.loads((folder / name).read_text())
        cfg[key] = 1 << 20
        (folder / name).write_text(json.dumps(cfg))
    model = load_chat_model(str(folder), device="cpu")
    assert model.context_length == 1 << 20
    probe = model.chat([{"role": "user", "content": LONG_PROMPT}],
                       settings=GenerationSettings(max_new_tokens=1000, temperature=0))
    assert probe.finish_reason == "length", "the probe prompt now ends with EOS; pick another LONG_PROMPT"
    return model


def test_full_queue_is_503_and_disconnects_free_slots(endless_model):
    with serve_in_thread(create_app(endless_model, "q", max_queue=1)) as url:
        stats = lambda: httpx.get(url + "/health").json()["queue"]  # noqa: E731
        running, head = _open_stream(url)
        assert head.startswith("HTTP/1.1 200"), head
        assert _wait_for(lambda: stats()["busy"])
        waiting, _ = _open_stream(url, wait_head=False, stream=False)  # a non-streaming request waits too
        assert _wait_for(lambda: stats()["waiting"] == 1)

        full = post(url, {"model": "q", "messages": [{"role": "user", "content": "hi"}]}, key=None)
        err = assert_error(full, 503)
        assert err["code"] == "queue_full" and int(full.headers["Retry-After"]) >= 1

        waiting.close()  # the waiting client leaves: its place frees up without any generation
        assert _wait_for(lambda: stats()["waiting"] == 0), stats()
        third, _ = _open_stream(url, wait_head=False)  # accepted into the freed place, not 503
        assert _wait_for(lambda: stats()["waiting"] == 1)

        third.close()
        assert _wait_for(lambda: stats()["waiting"] == 0), stats()
        done_before = stats()["completed"]
        running.close()  # the running client leaves mid-stream: generation stops at its next token
        assert _wait_for(lambda: stats()["busy"] is False), stats()
        assert stats()["completed"] == done_before + 1  # only `running` ran; the others never generated
        ok = post(url, {"model": "q", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, key=None)
        assert ok.status_code == 200, ok.text


def test_requests_waiting_together_are_answered_in_one_batch(endless_model):
    """Requests that queue up behind a running one are answered together, each with its own answer."""
    prompts = ["Hi", "What shape is it?", "Tell me about yourself, please, in detail."]
    expected = [endless_model.chat([{"role": "user", "content": p}], settings=GenerationSettings(
        max_new_tokens=6 + i, temperature=0)).text for i, p in enumerate(prompts)]
    with serve_in_thread(create_app(endless_model, "q", max_queue=8, max_batch=4)) as url:
        stats = lambda: httpx.get(url + "/health").json()["queue"]  # noqa: E731
        running, head = _open_stream(url)  # holds the generation thread
        assert head.startswith("HTTP/1.1 200"), head
        answers: dict = {}

        def ask(i: int) -> None:
            answers[i] = client(url).chat.completions.create(
                model="q", messages=[{"role": "user", "content": prompts[i]}], max_tokens=6 + i, temperature=0,
                stream=i == 1)  # streaming and plain requests share a batch
            if i == 1:
                answers[i] = "".join(c.choices[0].delta.content or "" for c in answers[i])
            else:
                answers[i] = answers[i].choices[0].message.content

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        assert _wait_for(lambda: stats()["waiting"] == 3), stats()
        running.close()  # frees the thread: the three waiting requests go in together
        for t in threads:
            t.join(timeout=120)
        assert [answers.get(i) for i in range(3)] == expected
        assert stats()["largest_batch"] == 3


@pytest.mark.slow
def test_load_16_clients_30s(text_model):
    from llava_ft.serve.loadtest import run_load

    with serve_in_thread(create_app(text_model, "tiny", max_queue=8)) as url:
        report = run_load(url, model="tiny", clients=16, duration_s=30, max_tokens=16)
        assert report.ok > 0
        bad = {code: n for code, n in report.status_counts.items() if code >= 500 and code != 503}
        assert not bad, f"5xx other than 503: {bad}; errors: {report.errors[:5]}"
        assert not report.errors, report.errors[:5]
        health = httpx.get(url + "/health").json()
        assert health["status"] == "ok"
        after = post(url, {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}, key=None)
        assert after.status_code == 200


# ------------------------------------------------------------------------------------------------
# the command line


def test_cli_serve_subprocess(tiny_llama, tmp_path):
    """`llava_ft serve MODEL --api-key K` starts, binds to 127.0.0.1, answers the openai client, stops on SIGINT."""
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "llava_ft", "serve", tiny_llama, "--port", str(port),
                             "--api-key", "sk-cli", "--model-name", "cli-model", "--device", "cpu",
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        def up():
            try:
                return httpx.get(url + "/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return proc.poll() is not None  # stop waiting if it died
        assert _wait_for(up, 180) and proc.poll() is None, open(tmp_path / "serve.log").read()
        resp = client(url, "sk-cli").chat.completions.create(model="cli-model", max_tokens=4,
                                                             messages=[{"role": "user", "content": "hi"}])
        assert resp.usage.completion_tokens >= 1
        with pytest.raises(openai.AuthenticationError):
            client(url, "nope").models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        log.seek(0)
        out = log.read()
    assert f"http://127.0.0.1:{port}/" in out


def test_cli_serve_rejects_missing_image_dir(tiny_llama, tmp_path):
    from llava_ft.cli import main

    assert main(["serve", tiny_llama, "--image-dir", str(tmp_path / "nope")]) == 2
