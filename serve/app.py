"""FastAPI app: an OpenAI-compatible chat API and a web chat page over one `ChatModel`.

    from llava_ft.inference import load_chat_model
    from llava_ft.serve.app import create_app
    app = create_app(load_chat_model("./merged"), "merged", api_key="sk-local", image_dir="./images")
    uvicorn.run(app, host="127.0.0.1", port=8000)       # or: llava_ft serve ./merged

Routes: `POST /v1/chat/completions` (OpenAI schema, `stream: true` -> server-sent events ending in
`data: [DONE]`), `GET /v1/models`, `GET /v1/models/{id}`, `GET /health`, `GET /` (the chat page, files in
`serve/static/`). Every error is an OpenAI-style body `{"error": {message, type, param, code}}`:
400 malformed JSON/schema or undecodable image, 401 missing/wrong key, 403 image path outside the image dir
or remote image while disabled, 404 unknown model, 413 body/image/pixel count over the limits, 503 queue full
(with Retry-After). Generation runs in one thread (`llava_ft.serve.worker`); a request waits in a bounded line and
gives its place up when the client disconnects; requests that wait together with the same sampling
settings are answered in one batched generate call (up to `max_batch`), each still streamed on its own.

Layout: `create_app` builds a `ServerState` (model, worker, image loader, limits) on `app.state.server`
and includes one APIRouter per concern (health, models, chat completions, the page); each route is one
function that reads the state from its request, and `require_key` is a router dependency.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from llava_ft.serve.errors import ApiError, error_body
from llava_ft.serve.images import ImageLoader
from llava_ft.serve.schema import VideoRef, parse_request, settings_kwargs, to_chat_inputs
from llava_ft.serve.worker import GenerationWorker, Job

log = logging.getLogger("llava_ft.serve")

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024  # base64 inflates images by 4/3: room for a 20 MiB image
DEFAULT_MAX_IMAGE_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_IMAGE_PIXELS = 40_000_000  # ~6300 x 6300; a bigger header is treated as a decompression bomb
DEFAULT_MAX_IMAGES = 8
DEFAULT_MAX_VIDEO_BYTES = 64 * 1024 * 1024  # a remote clip (a data: one is bounded by the body limit)
POLL_S = 0.5  # how often a waiting request checks whether its client is still there


class _ClosingStreamingResponse(StreamingResponse):
    """Closes the body generator however the send ends (client gone -> OSError), so its `finally`
    cancels the generation job at once instead of whenever the generator is garbage-collected."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            declared = int(length)
        except ValueError:
            raise ApiError(400, "invalid Content-Length header")
        if declared > limit:
            raise ApiError(413, f"request body is {declared} bytes; the limit is {limit} bytes",
                           code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():  # counted as it arrives: a chunked upload cannot exceed it either
        body.extend(chunk)
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    return bytes(body)


def _chunk(cid: str, created: int, model: str, delta: dict, finish_reason=None, usage=None) -> str:
    obj = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage is not None:
        obj["usage"] = usage
    return sse_data(obj)


# JSON leaves these in strings as they are (with ensure_ascii=False), but str.splitlines() and clients built on
# it (httpx's iter_lines) end a line at each: a sampled token decoding to one cut the event in two. Escaped,
# the payload stays readable UTF-8 and one line for every client.
_LINE_BREAKS_JSON_KEEPS = {"\u0085": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def sse_data(obj) -> str:
    """One server-sent event `data: <json>` on a single line, whatever characters the text holds."""
    text = json.dumps(obj, ensure_ascii=False)
    for char, escaped in _LINE_BREAKS_JSON_KEEPS.items():
        text = text.replace(char, escaped)
    return f"data: {text}\n\n"


@dataclass
class ServerState:
    """What every route shares, kept on `app.state.server` (one model, one generation worker)."""

    chat_model: Any
    model_name: str
    api_key: Optional[str]
    worker: GenerationWorker
    loader: ImageLoader
    max_body_bytes: int
    max_images: int
    created_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def supports_images(self) -> bool:
        return bool(getattr(self.chat_model, "supports_images", False))

    @property
    def context_length(self) -> Optional[int]:
        return getattr(self.chat_model, "context_length", None)

    def model_card(self) -> dict:
        return {"id": self.model_name, "object": "model", "created": self.created_at, "owned_by": "llava_ft"}

    def check_model(self, requested: str) -> None:
        if requested != self.model_name:
            raise ApiError(404, f"model '{requested}' not found; this server serves '{self.model_name}'",
                           param="model", code="model_not_found")


def create_app(chat_model, model_name: str, api_key: Optional[str] = None, max_queue: int = 16,
               max_batch: int = 8, image_dir: Optional[str] = None, allow_remote_images: bool = False,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_images: int = DEFAULT_MAX_IMAGES,
               max_video_bytes: int = DEFAULT_MAX_VIDEO_BYTES) -> FastAPI:
    """Build the app around a loaded `ChatModel` (see docs/architecture.md, Inference)."""
    worker = GenerationWorker(chat_model, max_queue=max_queue, max_batch=max_batch)
    loader = ImageLoader(image_dir=image_dir, allow_remote=allow_remote_images,
                         max_bytes=min(max_image_bytes, max_body_bytes), max_pixels=max_image_pixels,
                         max_video_bytes=max_video_bytes)
    app = FastAPI(title="llava_ft serve", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState(chat_model, model_name, api_key, worker, loader, max_body_bytes, max_images)
    app.state.worker = worker
    app.state.model_name = model_name
    for exc_class, handler in ((ApiError, _api_error), (StarletteHTTPException, _http_error),
                               (RequestValidationError, _validation_error), (Exception, _unexpected)):
        app.add_exception_handler(exc_class, handler)
    for router in (health_routes, model_routes, chat_routes, page_routes):
        app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


@asynccontextmanager
async def _lifespan(app: FastAPI):
    worker = app.state.server.worker
    worker.start()
    yield
    await run_in_threadpool(worker.stop)


def _state(request: Request) -> ServerState:
    return request.app.state.server


# ---- errors: every failure answers in OpenAI's shape -------------------------------------------

async def _api_error(_request, err: ApiError):
    return _error_response(err)


async def _http_error(_request, err: StarletteHTTPException):
    return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code,
                        headers=getattr(err, "headers", None))


async def _validation_error(_request, err: RequestValidationError):
    return JSONResponse(error_body(400, f"invalid request: {err.errors()[:1]}"), status_code=400)


async def _unexpected(_request, err: Exception):
    log.exception("unhandled error")
    return JSONResponse(error_body(500, f"internal error: {type(err).__name__}", code="internal_error"),
                        status_code=500)


def require_key(request: Request) -> None:
    """Route dependency: the `Authorization: Bearer KEY` header when the server has a key."""
    api_key = _state(request).api_key
    if api_key is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    # constant-time compare: the key must not leak through response timing
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


# ---- health and models -------------------------------------------------------------------------

health_routes = APIRouter()
model_routes = APIRouter(dependencies=[Depends(require_key)])


@health_routes.get("/health")
async def health(request: Request):
    state = _state(request)
    ok = state.worker.alive
    body = {"status": "ok" if ok else "generation thread stopped", "model": state.model_name,
            "supports_images": state.supports_images,
            "supports_video": bool(getattr(state.chat_model, "supports_video", False)),
            "auth_required": state.api_key is not None,
            "context_length": state.context_length, "queue": state.worker.stats()}
    return JSONResponse(body, status_code=200 if ok else 503)


@model_routes.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_state(request).model_card()]}


@model_routes.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request):
    state = _state(request)
    state.check_model(model_id)
    return state.model_card()


# ---- chat completions --------------------------------------------------------------------------

chat_routes = APIRouter(dependencies=[Depends(require_key)])


@chat_routes.post("/v1/chat/completions")
async def chat_completions(request: Request):
    from llava_ft.inference import GenerationSettings

    state = _state(request)
    req = parse_request(await _read_body(request, state.max_body_bytes))
    state.check_model(req.model)
    messages, urls = to_chat_inputs(req)
    if urls and not state.supports_images:
        raise ApiError(400, f"model '{state.model_name}' is a text model and does not accept images",
                       param="messages", code="images_not_supported")
    if len(urls) > state.max_images:
        raise ApiError(400, f"{len(urls)} images in one request; the limit is {state.max_images}",
                       param="messages")
    images = []
    for url in urls:
        if isinstance(url, VideoRef):  # a clip: a local path (the model decodes it) or its decoded frames
            if not getattr(state.chat_model, "supports_video", False):
                raise ApiError(400, f"model '{state.model_name}' does not accept videos (only LLaVA-OneVision "
                                    "runs and exports do)", param="messages", code="videos_not_supported")
            images.append(await state.loader.load_video(url, state.chat_model.load_clip))
            continue
        data = await state.loader.load_bytes(url)
        images.append(await run_in_threadpool(state.loader.decode, data))  # decoding is CPU work: off the loop
    try:
        settings = GenerationSettings(**settings_kwargs(req, state.context_length))
    except (TypeError, ValueError) as err:
        raise ApiError(400, f"invalid generation settings: {err}")
    job = Job(messages, images, settings, loop=asyncio.get_running_loop())
    state.worker.submit(job)  # ApiError 503 when the line is full
    answer = _Answer(state, job, request, f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()))
    if req.stream:
        # Wait for the first event before answering, so a request the model rejects (prompt longer
        # than the context, ...) still gets its 4xx status instead of a 200 stream holding an error.
        try:
            first = await answer.next_event()
        except BaseException:
            state.worker.cancel(job)
            raise
        if first is None:
            return Response(status_code=499)
        if first[0] == "error":
            return _error_response(first[1])
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _ClosingStreamingResponse(
            answer.sse(first, include_usage), media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await answer.collect()


@dataclass
class _Answer:
    """One accepted request's answer, read from its job's events: whole (`collect`) or streamed (`sse`).
    Leaving either before the end (error, client gone) cancels the job."""

    state: ServerState
    job: Job
    request: Request
    cid: str
    created: int

    async def next_event(self):
        """The job's next event; None when the client has gone away (the job is then cancelled)."""
        while True:
            try:
                return await asyncio.wait_for(self.job.events.get(), timeout=POLL_S)
            except asyncio.TimeoutError:
                if await self.request.is_disconnected():
                    self.state.worker.cancel(self.job)
                    return None

    def chunk(self, delta: dict, finish_reason=None, usage=None) -> str:
        return _chunk(self.cid, self.created, self.state.model_name, delta, finish_reason, usage=usage)

    async def collect(self):
        parts: list[str] = []
        finished = False
        try:
            while True:
                event = await self.next_event()
                if event is None:
                    return Response(status_code=499)  # nobody reads it; closes the connection cleanly
                kind, payload = event
                if kind == "delta":
                    parts.append(payload)
                elif kind == "error":
                    finished = True
                    return _error_response(payload)
                else:
                    finished = True
                    return {"id": self.cid, "object": "chat.completion", "created": self.created,
                            "model": self.state.model_name,
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                                         "finish_reason": payload.finish_reason, "logprobs": None}],
                            "usage": payload.as_dict()}
        finally:
            if not finished:
                self.state.worker.cancel(self.job)

    async def sse(self, first: tuple, include_usage: bool):
        finished = False
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            event = first
            while True:
                if event is None:
                    event = await self.next_event()
                if event is None:
                    return
                kind, payload = event
                event = None
                if kind == "delta":
                    yield self.chunk({"content": payload})
                    continue
                finished = True
                if kind == "error":
                    yield sse_data(payload.body())
                else:
                    usage = payload.as_dict()
                    yield self.chunk({}, payload.finish_reason, usage=usage)
                    if include_usage:  # OpenAI's form: a last chunk with no choices and the usage
                        yield sse_data({"id": self.cid, "object": "chat.completion.chunk",
                                        "created": self.created, "model": self.state.model_name,
                                        "choices": [], "usage": usage})
                yield "data: [DONE]\n\n"
                return
        finally:
            if not finished:
                self.state.worker.cancel(self.job)


# ---- the web page ------------------------------------------------------------------------------

page_routes = APIRouter()


@page_routes.get("/", include_in_schema=False)
async def index():
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})
