"""The OpenAI chat-completions request schema and its translation to `ChatModel` inputs.

`parse_request(raw_bytes) -> ChatRequest` (ApiError 400 on malformed JSON or schema) and
`to_chat_inputs(request) -> (messages, image_urls)`: messages in the `ChatModel` form
`[{"role", "content": str}]` with one `<image>` marker per image (placed at the start of its turn, where
LLaVA training puts it) and the image URLs in marker order. A `{"type": "video_url", "video_url": {"url":
...}}` part (vLLM's convention for video in OpenAI-style requests) adds a `<video>` marker and its URL as a
`VideoRef` (LLaVA-OneVision models). Unknown extra fields that OpenAI clients send
(`frequency_penalty`, `user`, ...) are accepted and ignored; `n` must be 1.
"""
from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llava_ft.serve.errors import ApiError

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: Optional[str] = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: Union[ImageURL, str]  # some clients send the URL string directly

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


class VideoPart(_Lenient):
    type: Literal["video_url"]
    video_url: Union[ImageURL, str]

    @property
    def url(self) -> str:
        return self.video_url if isinstance(self.video_url, str) else self.video_url.url


class VideoRef(str):
    """A `video_url` part's URL in the list `to_chat_inputs` returns (images and videos in marker order)."""


Part = Union[TextPart, ImagePart, VideoPart]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[Part], None] = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    top_k: Optional[int] = Field(default=None, ge=0)  # extension (vLLM-style); not in OpenAI's schema
    repetition_penalty: Optional[float] = Field(default=None, gt=0.0)  # extension
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = 1

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("n")
    @classmethod
    def _n(cls, v):
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v


def _first_error(err: ValidationError) -> tuple[str, str]:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "invalid"), where


def parse_request(raw: bytes) -> ChatRequest:
    try:
        obj: Any = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}", code="invalid_json")
    except RecursionError:  # e.g. 50,000 nested brackets: valid-looking, but no request needs it
        raise ApiError(400, "request body is nested too deeply", code="invalid_json")
    if not isinstance(obj, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return ChatRequest.model_validate(obj)
    except ValidationError as err:
        msg, where = _first_error(err)
        raise ApiError(400, f"invalid request: {msg}", param=where or None)


def to_chat_inputs(req: ChatRequest) -> tuple[list[dict], list[str]]:
    """OpenAI messages -> (ChatModel messages, image URLs in the order of their `<image>` markers)."""
    messages: list[dict] = []
    urls: list[str] = []
    for i, msg in enumerate(req.messages):
        role = "system" if msg.role == "developer" else msg.role
        parts = [TextPart(type="text", text=msg.content)] if isinstance(msg.content, str) else (msg.content or [])
        # A literal "<image>" typed by a client would claim an image that was never sent (the model would
        # then fail on a marker/image count mismatch); only real image parts produce markers.
        texts = [p.text.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "") for p in parts if isinstance(p, TextPart)]
        for text in texts:
            try:
                text.encode("utf-8")  # JSON may carry lone surrogates ("\ud800"); tokenizers cannot take them
            except UnicodeEncodeError:
                raise ApiError(400, f"messages[{i}]: text is not valid Unicode (lone surrogate)",
                               param=f"messages.{i}.content")
        media = [p for p in parts if isinstance(p, (ImagePart, VideoPart))]
        if media and role != "user":
            raise ApiError(400, f"messages[{i}]: images and videos are only accepted in user messages",
                           param=f"messages.{i}.content")
        urls.extend(VideoRef(p.url) if isinstance(p, VideoPart) else p.url for p in media)
        content = "".join(f"{VIDEO_TOKEN if isinstance(p, VideoPart) else IMAGE_TOKEN}\n" for p in media) \
            + "\n".join(texts)
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] == "assistant":
        raise ApiError(400, "the last message must not be from the assistant", param="messages")
    return messages, urls


def settings_kwargs(req: ChatRequest, context_length: Optional[int]) -> dict:
    """GenerationSettings keyword arguments for the fields the client set (the rest keep their defaults)."""
    kw: dict = {}
    max_new = req.max_completion_tokens or req.max_tokens
    if max_new is not None:
        kw["max_new_tokens"] = min(max_new, context_length) if context_length else max_new
    for name in ("temperature", "top_p", "top_k", "repetition_penalty", "seed"):
        value = getattr(req, name)
        if value is not None:
            kw[name] = value
    if req.stop is not None:
        kw["stop"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return kw
