"""One generation thread in front of one model, fed by a bounded waiting line.

`llava_ft.serve.app` creates one `GenerationWorker(chat_model, max_queue)` per app. Each request becomes a `Job`;
`submit(job)` puts it in line or raises ApiError 503 (with Retry-After) when `max_queue` jobs already wait.
The thread owns the model (generation on one model is not thread-safe). When it is free it takes the
first waiting job plus up to `max_batch - 1` more waiting jobs with the same sampling settings
(`batch_stream.batch_key`) and answers them in one batched generate call (`ChatModel.stream_batch`); a
lone job, or one with a seed, goes through `stream_chat` as before. It sends events back to each
request's event loop:
    ("delta", str)   a piece of the answer
    ("done", Usage)  finished; token counts and finish_reason
    ("error", ApiError)
`cancel(job)` (client went away) takes a waiting job out of line at once, so its slot is free for the next
client, and stops a running job at its next token.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from llava_ft.serve.errors import ApiError

log = logging.getLogger("llava_ft.serve")


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length | cancelled

    @classmethod
    def of(cls, result) -> "Usage":
        """From a ChatResult (or anything with its token counts and finish_reason)."""
        return cls(int(result.prompt_tokens), int(result.completion_tokens),
                   "length" if getattr(result, "finish_reason", "stop") == "length" else "stop")

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


@dataclass(eq=False)
class Job:
    messages: list
    images: list
    settings: Any
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, kind: str, payload: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the request's loop is gone (server shutting down): nobody to tell
            self.cancelled.set()


class GenerationWorker:
    def __init__(self, chat_model, max_queue: int = 16, max_batch: int = 8):
        self.model = chat_model
        self.max_queue = max(0, int(max_queue))
        self.max_batch = max(1, int(max_batch))
        self._cv = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._running: list[Job] = []
        self._stopping = False
        self._avg_job_s = 2.0  # running mean of one batch's time, for Retry-After
        self.completed = 0
        self.largest_batch = 0
        self._thread = threading.Thread(target=self._loop, name="llava_ft-serve-generation", daemon=True)

    # --- request side ----------------------------------------------------------------------------

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            for job in self._waiting:
                job.cancelled.set()
            self._waiting.clear()
            for job in self._running:
                job.cancelled.set()
            self._cv.notify_all()
        self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def stats(self) -> dict:
        with self._cv:
            return {"waiting": len(self._waiting), "max_queue": self.max_queue, "busy": bool(self._running),
                    "running": len(self._running), "max_batch": self.max_batch, "largest_batch": self.largest_batch,
                    "completed": self.completed}

    def retry_after_s(self) -> int:
        with self._cv:
            batches_ahead = math.ceil(len(self._waiting) / self.max_batch) + bool(self._running)
        return max(1, math.ceil(self._avg_job_s * batches_ahead))

    def submit(self, job: Job) -> None:
        with self._cv:
            # Full when max_queue jobs wait behind a running one; an idle worker always takes one job.
            if len(self._waiting) >= self.max_queue and (self._running or self._waiting):
                full = True
            else:
                full = False
                self._waiting.append(job)
                self._cv.notify()
        if full:
            raise ApiError(503, f"the server is busy ({self.max_queue} requests waiting); retry later",
                           code="queue_full", headers={"Retry-After": str(self.retry_after_s())})

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self._cv:
            try:
                self._waiting.remove(job)
            except ValueError:
                pass  # already running or done; the running loop sees `cancelled` at its next token

    # --- generation thread ------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stopping:
                    self._cv.wait()
                if self._stopping:
                    return
                jobs = self._take_batch()
                self._running = jobs
                self.largest_batch = max(self.largest_batch, len(jobs))
            started = time.monotonic()
            try:
                if len(jobs) == 1:
                    self._run(jobs[0])
                else:
                    self._run_batch(jobs)
            except BaseException as err:  # noqa: BLE001 - the thread must survive anything a request causes
                log.exception("generation failed")
                for job in jobs:
                    job.emit("error", _model_error(err))
            finally:
                with self._cv:
                    self._running = []
                    self.completed += len(jobs)
                self._avg_job_s = 0.8 * self._avg_job_s + 0.2 * (time.monotonic() - started)

    def _take_batch(self) -> list:
        """The first waiting job and, if it can share a generate call, up to max_batch - 1 more like it
        (same sampling settings, no seed), in arrival order; the others keep their places. Holds _cv."""
        from llava_ft.inference.batch_stream import batch_key

        first = self._waiting.popleft()
        key = batch_key(first.settings) if self.max_batch > 1 else None
        if key is None or not hasattr(self.model, "stream_batch"):
            return [first]
        jobs, keep = [first], collections.deque()
        while self._waiting and len(jobs) < self.max_batch:
            job = self._waiting.popleft()
            (jobs if batch_key(job.settings) == key else keep).append(job)
        self._waiting.extendleft(reversed(keep))
        return jobs

    def _run_batch(self, jobs: list) -> None:
        from llava_ft.inference.batch_stream import StreamRequest

        live = [job for job in jobs if not job.cancelled.is_set()]
        if not live:
            return
        streamed = []

        def sender(job):
            def send(delta: str) -> None:
                streamed.append(True)
                job.emit("delta", delta)
            return send

        requests = [StreamRequest(job.messages, job.images, job.settings, on_delta=sender(job),
                                  cancelled=job.cancelled.is_set) for job in live]
        try:
            results = self.model.stream_batch(requests)
        except Exception:
            if streamed:
                raise  # text already went out: every job of the batch gets the error
            # Most failures come from one request (a prompt too long, an image the model rejects) and are
            # raised before any token: answer the jobs one by one, so only that request gets the error.
            for job in live:
                try:
                    self._run(job)
                except Exception as err:  # noqa: BLE001
                    job.emit("error", _model_error(err))
            return
        for job, result in zip(live, results):
            if result is not None and not job.cancelled.is_set():
                job.emit("done", Usage.of(result))

    def _run(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        stream = self.model.stream_chat(job.messages, images=job.images, settings=job.settings)
        result = None
        try:
            while True:
                if job.cancelled.is_set():
                    break
                try:
                    delta = next(stream)
                except StopIteration as stop:
                    result = stop.value
                    break
                if delta:
                    job.emit("delta", delta)
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()  # stops generation of an abandoned stream
        if job.cancelled.is_set():
            return
        job.emit("done", self._usage(stream, result))

    def _usage(self, stream, result) -> Usage:
        info = result if result is not None and hasattr(result, "prompt_tokens") else getattr(stream, "result", None)
        if info is None:
            info = getattr(self.model, "last_result", None)
        if info is None or not hasattr(info, "prompt_tokens"):
            raise RuntimeError("the chat model's stream_chat reported no token counts")
        return Usage.of(info)


def _model_error(err: BaseException) -> ApiError:
    """Errors from the model: the user's fault (bad input for this model) -> 400, anything else -> 500."""
    if isinstance(err, ApiError):
        return err
    from llava_ft.errors import UserError
    from llava_ft.inference.chat_model import ContextLengthError

    if isinstance(err, ContextLengthError):
        # OpenAI's shape and wording for a prompt that alone fills the context (a too-large max_tokens is
        # not an error: the model caps the answer at context - prompt and reports finish_reason "length").
        images = (f" ({err.n_images} image(s) count {err.n_images * err.image_tokens})"
                  if err.n_images and err.image_tokens else "")
        return ApiError(400, f"This model's maximum context length is {err.context_length} tokens. However, your "
                             f"messages resulted in {err.prompt_tokens} tokens{images}, which leaves no room for "
                             "an answer. Please reduce the length of the messages or the number of images.",
                        param="messages", code="context_length_exceeded")
    if isinstance(err, (UserError, ValueError)):
        return ApiError(400, f"the model rejected the request: {err}", code="invalid_request")
    return ApiError(500, f"generation failed: {type(err).__name__}: {err}", code="generation_failed")
