"""ChatModel: prompt rendering, image handling and (streaming or batched) generation over any loaded model.

Built by `llava_ft.inference.load_chat_model`; used by `llava_ft chat`, `llava_ft eval` and `serve/`:

    cm = load_chat_model("out/merged", prompt_template="qwen_chat")
    for delta in cm.stream_chat([{"role": "user", "content": "Hi"}]):      # text deltas as generated
        print(delta, end="", flush=True)
    res = cm.chat(messages, images=["cat.jpg"], settings=GenerationSettings(max_new_tokens=64))
    results = cm.generate_batch([(messages, images), ...], settings)       # left-padded batches (eval)

Prompts are token ids built by `llava_ft.data.encode.encode_prompt`, the same code that builds training
samples, so BOS/EOS/SEP and `<image>` placeholders land where training put them. Two backends run the
ids: `LlavaFtModel` (text models, XTuner-layout and iter_N.pth runs: one IMAGE_TOKEN_INDEX per image,
features spliced in) and transformers' `LlavaForConditionalGeneration` (llava-hf exports: each placeholder
expanded to N copies of the image token, as LlavaProcessor does). Template stop words end a turn and are
never shown: streamed text is held back while it could still be the start of a stop word.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch

from llava_ft import IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_ft.data.formats import VIDEO_TOKEN
from llava_ft.errors import UserError
from llava_ft.inference.stops import cut_at_stop, holdback

log = logging.getLogger("llava_ft")


@dataclass
class GenerationSettings:
    """Sampling settings; temperature 0 = greedy. `stop` adds stop strings to the template's."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    stop: tuple = ()


@dataclass
class ChatResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (EOS or a stop word) | "length" (max_new_tokens reached)


@dataclass
class FittedConversation:
    """What `ChatModel.fit` returns: the conversation trimmed to the context and the answer's token budget."""

    messages: list
    images: list
    dropped_turns: int
    prompt_tokens: int
    max_new_tokens: int  # the requested max_new_tokens, capped at context - prompt


class ContextLengthError(UserError):
    """The prompt alone fills the model's context: no room is left for an answer.

    Carries the numbers so each front end can say what to change in its own terms (serve answers 400
    `context_length_exceeded`, chat names its flags)."""

    def __init__(self, prompt_tokens: int, context_length: int, n_images: int = 0, image_tokens: int = 0,
                 advice: str = "shorten the messages or send fewer images"):
        self.prompt_tokens, self.context_length = int(prompt_tokens), int(context_length)
        self.n_images, self.image_tokens = int(n_images), int(image_tokens)
        self.index: Optional[int] = None  # generate_batch: which conversation it was
        images = (f", of which {n_images} image(s) take {n_images * image_tokens}" if n_images and image_tokens
                  else "")
        self.summary = (f"the prompt is {self.prompt_tokens} tokens{images}, and the model's context is "
                        f"{self.context_length} tokens: no room is left for an answer")
        super().__init__(f"{self.summary}; {advice}")


@dataclass
class _Prompt:
    ids: list  # token ids; IMAGE_TOKEN_INDEX once per image
    pixel_values: Optional[torch.Tensor]  # [n_images, 3, H, W] or None (AnyRes: [all views, 3, S, S])
    length: int  # positions the model sees (image placeholders expanded)
    image_sizes: Optional[torch.Tensor] = None  # AnyRes: [n_images, 2] (height, width)
    image_tokens: tuple = ()  # feature vectors per image, in placeholder order
    clips: tuple = ()  # per placeholder: True where it is a video clip (OneVision), in placeholder order


class _Cancel:
    """StoppingCriteria-compatible flag: set from the consumer thread to stop generation at the next step."""

    def __init__(self):
        self.flag = threading.Event()

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), self.flag.is_set(), dtype=torch.bool, device=input_ids.device)


class ChatStream:
    """Iterator of text deltas; after exhaustion `.result` holds the ChatResult. `close()` stops early."""

    def __init__(self, run: Callable[["ChatStream"], Iterator[str]]):
        self.result: Optional[ChatResult] = None
        self._cancel = _Cancel()
        self._iter = run(self)

    def __iter__(self):
        return self

    def __next__(self) -> str:
        return next(self._iter)

    def close(self) -> None:
        self._cancel.flag.set()
        self._iter.close()


def _is_path(image) -> bool:
    return isinstance(image, (str, os.PathLike))


def _is_frames(image) -> bool:
    """A clip given as its decoded frames: uint8 [F, H, W, 3], what `ChatModel.load_clip` returns."""
    import numpy as np

    return isinstance(image, np.ndarray) and image.ndim == 4 and image.shape[-1] == 3


class ChatModel:
    """A loaded model plus everything needed to prompt it the way it was trained (see module docstring)."""

    def __init__(self, model, tokenizer, template, system: Optional[str] = None, image_processor=None,
                 image_mean: Optional[tuple] = None, pad_image_to_square: bool = False,
                 num_image_tokens: int = 0, hf_llava: bool = False, source: str = "", device=None,
                 anyres=None):
        self.model = model
        self.tokenizer = tokenizer
        self.template = template  # a templates.Template, or "hf" (tokenizer's chat template)
        self.system = system
        self.image_processor = image_processor  # callable PIL -> tensor[3,H,W]
        self.image_mean = image_mean
        self.pad_image_to_square = pad_image_to_square
        self.num_image_tokens = num_image_tokens
        # AnyRes (llava_ft.model.anyres.AnyResSpec): images become an overview + tiles, and their token
        # count depends on their size; None = one view of num_image_tokens per image.
        self.anyres = anyres
        self.hf_llava = hf_llava
        self.source = source
        self.device = device if device is not None else _model_device(model)
        self._lock = threading.Lock()  # one generation at a time per model (the server may call from threads)
        self._cap_logged = False

    # ---- properties the CLI and server rely on -------------------------------------------------
    @property
    def supports_images(self) -> bool:
        return self.image_processor is not None

    @property
    def context_length(self) -> int:
        cfg = self.model.config
        cfg = getattr(cfg, "text_config", None) or cfg
        n = getattr(cfg, "max_position_embeddings", None)
        limit = getattr(self.tokenizer, "model_max_length", None)
        # Tokenizers without a limit report a huge sentinel (1e30); only a real, smaller limit counts.
        if limit and limit < 10**7 and (n is None or limit < n):
            n = limit
        return int(n or 2048)

    @property
    def stop_words(self) -> tuple:
        return tuple(getattr(self.template, "stop_words", ()) or ())

    # ---- prompt building -----------------------------------------------------------------------
    def load_image(self, image):
        """A PIL RGB image from a path, URL or PIL image (padded to square when training did so)."""
        from llava_ft.inference.images import open_image, pad_to_square

        img = open_image(image)
        if self.pad_image_to_square:
            img = pad_to_square(img, self.image_mean or (0, 0, 0))
        return img

    @property
    def supports_video(self) -> bool:
        """A LLaVA-OneVision run or export: `images` may hold clip paths (.mp4, ...), marked `<video>`."""
        return bool(getattr(self.anyres, "takes_video", False))

    def load_clip(self, path):
        """A clip's frames (uint8 [F, H, W, 3]), sampled as training sampled them (llava_ft.data.videos);
        frames already decoded (such an array, e.g. from the server) are taken as they are."""
        from llava_ft.data.videos import BadVideoError, load_video_frames

        if not self.supports_video:
            raise UserError(f"{path if _is_path(path) else 'a video'}: {self.source or 'this model'} cannot take "
                            "a video; only runs and exports of a released LLaVA-OneVision (model.llava) do")
        if _is_frames(path):
            return path
        try:
            return load_video_frames(str(path), self.anyres.video_frames)
        except BadVideoError as err:
            raise UserError(f"{path}: {err.reason}") from None

    def encode(self, messages: list, images: Sequence = ()) -> _Prompt:
        """Token ids (+ pixel values) for a conversation, ending where the next answer starts. `images` may
        hold video clips (by suffix, .mp4 ...) for OneVision; a `<video>` marker places one like `<image>`."""
        from llava_ft.data.encode import encode_prompt
        from llava_ft.data.videos import is_video

        images = list(images or ())
        if images and not self.supports_images:
            raise UserError(f"{self.source or 'this model'} is a text-only model; it cannot take images")
        _check_messages(messages)
        # Training reads LLaVA-NeXT's `<video>` marker as an image placeholder (data.formats); so does chat.
        messages = [dict(m, content=m["content"].replace(VIDEO_TOKEN, IMAGE_TOKEN)) for m in messages]
        clips = tuple(is_video(str(im)) if _is_path(im) else _is_frames(im) for im in images)
        if any(clips) and not self.supports_video:
            self.load_clip(images[clips.index(True)])  # says which, and why not
        ids = encode_prompt(messages, self.tokenizer, self.template, system=self.system, images=images)
        n_markers = sum(1 for t in ids if t == IMAGE_TOKEN_INDEX)
        if n_markers != len(images):
            raise UserError(f"the messages hold {n_markers} '{IMAGE_TOKEN}'/'{VIDEO_TOKEN}' marker(s) but "
                            f"{len(images)} image(s)/video(s) were given; use one marker per image or video (or "
                            "none: they then go first)")
        pixel_values = sizes = None
        counts = [self.num_image_tokens] * len(images)
        if images and self.anyres is not None:
            pils = [self.load_clip(im) if clip else self.load_image(im) for im, clip in zip(images, clips)]
            if hasattr(self.anyres, "sample_views"):  # a released NeXT/OneVision: its processor sees them together
                pixel_values, sizes = self.anyres.sample_views(pils)
            else:
                pixel_values = torch.cat([self.anyres.views(im) for im in pils])
                sizes = torch.tensor([(im.height, im.width) for im in pils], dtype=torch.long)
            counts = [self.anyres.num_tokens(hw) for hw in sizes.tolist()]
        elif images:
            pixel_values = torch.stack([self.image_processor(self.load_image(im)) for im in images])
        length = len(ids) - len(images) + sum(counts)
        return _Prompt(ids, pixel_values, length, sizes, tuple(counts), clips)

    def fit(self, messages: list, images: Sequence = (), max_new_tokens: int = 0) -> FittedConversation:
        """Drop the oldest user/assistant turns (and their images) until the prompt leaves room for the answer.

        The room kept for the answer is `max_new_tokens`, but at most half the context: a max_new_tokens as
        large as the context (512 on a 512-token model) must not wipe the history (and its image) at every
        turn. The answer is then capped at context - prompt (`.max_new_tokens`). The system message and the
        last user turn are always kept; when they alone fill the context, ContextLengthError.
        """
        images = list(images or ())
        msgs = [dict(m) for m in messages]
        room = max(1, min(int(max_new_tokens), self.context_length // 2))
        dropped = 0
        while True:
            prompt = self.encode(msgs, images)
            if prompt.length + room <= self.context_length:
                break
            first = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
            nxt = next((i for i, m in enumerate(msgs) if i > (first or 0) and m["role"] == "user"), None)
            if first is None or nxt is None:
                self._check_fits(prompt)
                break  # the last turn alone fits, with less room than asked: the answer is capped
            gone = msgs[first:nxt]
            # Images belong to markers in order; drop the ones the removed turns carried.
            n_img = _images_in(gone, msgs, images)
            images = images[n_img:]
            del msgs[first:nxt]
            dropped += 1
        return FittedConversation(msgs, images, dropped, prompt.length,
                                  self.answer_budget(prompt.length, max_new_tokens))

    def fit_history(self, messages: list, images: Sequence = (), max_new_tokens: int = 0):
        """`fit` as a tuple (messages, images, n_dropped_turns)."""
        fitted = self.fit(messages, images, max_new_tokens)
        return fitted.messages, fitted.images, fitted.dropped_turns

    def answer_budget(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Tokens an answer may take: `max_new_tokens`, capped at what the context leaves after the prompt."""
        return max(0, min(int(max_new_tokens), self.context_length - int(prompt_tokens)))

    # ---- generation ----------------------------------------------------------------------------
    def _eos_ids(self) -> list:
        """The tokenizer's EOS plus the model's generation_config eos ids (exports list end-of-turn tokens)."""
        tok = self.tokenizer
        eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
        gen_cfg = getattr(self.model, "generation_config", None)
        model_eos = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
        for e in ([model_eos] if isinstance(model_eos, int) else (model_eos or [])):
            if e not in eos:
                eos.append(e)
        return eos

    def _gen_kwargs(self, settings: GenerationSettings) -> dict:
        tok = self.tokenizer
        eos = self._eos_ids()
        pad = tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos else 0)
        kw = dict(max_new_tokens=int(settings.max_new_tokens), eos_token_id=eos or None, pad_token_id=pad,
                  repetition_penalty=float(settings.repetition_penalty))
        if settings.temperature and settings.temperature > 0:
            kw.update(do_sample=True, temperature=float(settings.temperature), top_p=float(settings.top_p),
                      top_k=int(settings.top_k))
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        stops = self.stop_words + tuple(settings.stop or ())
        if stops:
            # Checked inside generate, so no token is spent after a stop word appears. Given as a stopping
            # criterion rather than generate(stop_strings=, tokenizer=): with trust_remote_code models
            # transformers hands `tokenizer` on to a forward() that does not take it (TypeError).
            from transformers import StoppingCriteriaList, StopStringCriteria

            kw["stopping_criteria"] = StoppingCriteriaList([StopStringCriteria(tok, list(stops))])
        return kw

    def _to_model_inputs(self, prompts: list) -> dict:
        """Left-pad a batch of prompts into input_ids / attention_mask (+ pixel_values) on the model device."""
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        rows = []
        for p in prompts:
            ids = p.ids
            if self.hf_llava:
                # transformers' Llava wants N image tokens per image (what LlavaProcessor writes); LlavaNext
                # as many as each image's AnyRes features.
                # LlavaOnevision: a clip's placeholder becomes its video tokens (the processor's `<video>`).
                image_id = self.model.config.image_token_id
                marks = iter([(getattr(self.model.config, "video_token_id", None) if clip else image_id, n)
                              for clip, n in zip(p.clips or (False,) * len(p.image_tokens), p.image_tokens)])
                expanded = []
                for x in ids:
                    if x == IMAGE_TOKEN_INDEX:
                        token, n = next(marks)
                        expanded += [token] * n
                    else:
                        expanded.append(x)
                ids = expanded
            rows.append(ids)
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        out = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        pv = [p.pixel_values for p in prompts if p.pixel_values is not None]
        if pv:
            out["pixel_values"] = torch.cat(pv).to(self.device)
        sizes = [p.image_sizes for p in prompts if p.image_sizes is not None]
        if sizes:
            out["image_sizes"] = torch.cat(sizes).to(self.device)
            if getattr(self.anyres, "single_view_for_multi_image", False):  # OneVision: images per prompt
                # Clips (height < 0) are not images here: transformers takes them as pixel_values_videos.
                out["batch_num_images"] = torch.tensor([int((s[:, 0] >= 0).sum()) for s in sizes], device=self.device)
        return out

    def _generate(self, inputs: dict, **kw) -> torch.Tensor:
        """New tokens only, [batch, new_len], for either backend."""
        if self.hf_llava:
            extra = {}
            pv = inputs.get("pixel_values")
            if pv is not None:
                extra["pixel_values"] = pv.to(self.model.dtype)
            if "image_sizes" in inputs:
                sizes = inputs["image_sizes"]
                views = extra.pop("pixel_values").split([self.anyres.num_views(hw) for hw in sizes.tolist()])
                clip = (sizes[:, 0] < 0).tolist()
                if any(clip):  # OneVision clips: [n_clips, frames, 3, S, S], as its video processor batches them
                    extra["pixel_values_videos"] = torch.stack([v for v, c in zip(views, clip) if c])
                if not all(clip):
                    # LlavaNext takes the views of all images of the batch as [n_images, max views, 3, S, S].
                    keep = [not c for c in clip]
                    extra["pixel_values"] = _per_image_views(torch.cat([v for v, k in zip(views, keep) if k]),
                                                             sizes[keep], self.anyres)
                    extra["image_sizes"] = sizes[keep]
                    if "batch_num_images" in inputs:
                        extra["batch_num_images"] = inputs["batch_num_images"]
            # No pixel_values key at all for a text-only prompt: transformers >= 5.24 runs the vision tower
            # on any `pixel_values` key passed to generate, None included, and crashes on it.
            out = self.model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                      **extra, **kw)
            return out[:, inputs["input_ids"].shape[1]:]
        return self.model.generate(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"),
                                   image_sizes=inputs.get("image_sizes"), **kw)

    def _check_fits(self, prompt: _Prompt, settings: Optional[GenerationSettings] = None) -> None:
        if prompt.length >= self.context_length:
            n_images = sum(1 for t in prompt.ids if t == IMAGE_TOKEN_INDEX)
            raise ContextLengthError(prompt.length, self.context_length, n_images, self.num_image_tokens)

    def _fit_settings(self, prompt: _Prompt, settings: GenerationSettings) -> GenerationSettings:
        """`settings` with max_new_tokens capped at context - prompt (ContextLengthError when nothing is left).

        Generating past the context would run positions the model never saw (or fail), so a too-large
        max_new_tokens is capped, not refused; the answer then ends with finish_reason "length"."""
        self._check_fits(prompt)
        budget = self.answer_budget(prompt.length, settings.max_new_tokens)
        if budget >= settings.max_new_tokens:
            return settings
        if not self._cap_logged:
            self._cap_logged = True  # said once per model: a server would otherwise log it per request
            log.warning("max_new_tokens %d does not fit beside a %d-token prompt in the model's %d-token context; "
                        "answers are capped at context - prompt (%d here). This is said once.",
                        settings.max_new_tokens, prompt.length, self.context_length, budget)
        return dataclasses.replace(settings, max_new_tokens=budget)

    def stream_chat(self, messages: list, images: Sequence = (),
                    settings: Optional[GenerationSettings] = None) -> ChatStream:
        """Generate an answer; iterate for text deltas as tokens arrive. `.result` is set at the end."""
        from transformers import TextIteratorStreamer

        prompt = self.encode(messages, images)
        settings = self._fit_settings(prompt, settings or GenerationSettings())
        inputs = self._to_model_inputs([prompt])
        stops = self.stop_words + tuple(settings.stop or ())

        def run(stream: ChatStream) -> Iterator[str]:
            streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
            box: dict = {}
            kw = self._gen_kwargs(settings)
            kw["stopping_criteria"] = _stopping_list(stream._cancel, kw.get("stopping_criteria", ()))

            def work():
                try:
                    with self._lock:
                        if settings.seed is not None:
                            torch.manual_seed(int(settings.seed))
                        box["new"] = self._generate(inputs, streamer=streamer, **kw)
                except BaseException as err:  # re-raised in the consumer thread
                    box["error"] = err
                    streamer.end()

            thread = threading.Thread(target=work, daemon=True)
            thread.start()
            text, sent, stopped = "", 0, False
            try:
                for delta in streamer:
                    if stopped:
                        continue  # drain the queue until generation notices the cancel flag
                    text += delta
                    cut, found = cut_at_stop(text, stops)
                    if found:
                        stopped = True
                        stream._cancel.flag.set()
                        if len(cut) > sent:
                            yield cut[sent:]
                        sent = len(cut)
                        continue
                    safe = len(text) - holdback(text, stops)
                    if safe > sent:
                        yield text[sent:safe]
                        sent = safe
            finally:
                # Also reached when the caller stops iterating early (close(), Ctrl-C): stop generating.
                stream._cancel.flag.set()
                thread.join()
            if "error" in box:
                raise box["error"]
            new = box["new"][0].tolist()
            final = self._decode_answer(new, stops)
            if len(final) > sent and final.startswith(text[:sent]):
                yield final[sent:]
            stream.result = ChatResult(final, prompt.length, len(new),
                                       self._finish_reason(new, final, stops, settings))
            return stream.result  # also the StopIteration value, for callers that drive next() themselves

        return ChatStream(run)

    def chat(self, messages: list, images: Sequence = (), settings: Optional[GenerationSettings] = None) -> ChatResult:
        """Generate a whole answer (no streaming)."""
        return self.generate_batch([(messages, images)], settings)[0]

    def generate_batch(self, conversations: Sequence, settings: Optional[GenerationSettings] = None,
                       batch_size: int = 8) -> list:
        """Answer many (messages, images) pairs in left-padded batches; one ChatResult per pair, in order."""
        settings = settings or GenerationSettings()
        stops = self.stop_words + tuple(settings.stop or ())
        results: list = []
        prompts = [self.encode(m, im) for m, im in conversations]
        # Each row's own max_new_tokens, capped at what the context leaves after its prompt.
        row_settings = []
        for i, p in enumerate(prompts):
            try:
                row_settings.append(self._fit_settings(p, settings))
            except ContextLengthError as err:
                if len(prompts) > 1:
                    err.args = (f"conversation {i}: {err}",)
                err.index = i
                raise
        batch_size = max(1, batch_size)
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            budgets = row_settings[start:start + batch_size]
            kw = self._gen_kwargs(dataclasses.replace(settings, max_new_tokens=max(
                b.max_new_tokens for b in budgets)))
            inputs = self._to_model_inputs(chunk)
            with self._lock:
                if settings.seed is not None:
                    torch.manual_seed(int(settings.seed))
                new = self._generate(inputs, **kw)
            for p, row, row_set in zip(chunk, new.tolist(), budgets):
                # A row with a smaller budget than the batch's longest ran on (discarded here).
                row = _strip_after_eos(row, kw["eos_token_id"] or [], kw["pad_token_id"])[:row_set.max_new_tokens]
                text = self._decode_answer(row, stops)
                results.append(ChatResult(text, p.length, len(row),
                                          self._finish_reason(row, text, stops, row_set)))
        return results

    def stream_batch(self, requests: Sequence) -> list:
        """Answer several `batch_stream.StreamRequest`s in one left-padded generate call, streaming each
        row's text to its `on_delta` as it is generated; one ChatResult per request (None if cancelled).
        All requests must share `batch_stream.batch_key(settings)` (sampling settings, no seed)."""
        from llava_ft.inference.batch_stream import RowStreamer, batch_key

        if len({batch_key(r.settings) for r in requests}) != 1 or batch_key(requests[0].settings) is None:
            raise ValueError("stream_batch needs requests with the same sampling settings and no seed")
        prompts = [self.encode(r.messages, r.images) for r in requests]
        max_new = [int(self._fit_settings(p, r.settings).max_new_tokens) for p, r in zip(prompts, requests)]
        kw = self._gen_kwargs(requests[0].settings)
        kw.pop("stopping_criteria", None)  # per row, in the streamer: rows have different stop words
        kw["max_new_tokens"] = max(max_new)
        streamer = RowStreamer(self.tokenizer, [self.stop_words + tuple(r.settings.stop or ()) for r in requests],
                               max_new, kw["eos_token_id"] or [], [r.on_delta for r in requests],
                               [r.cancelled for r in requests])
        from transformers import StoppingCriteriaList

        kw["stopping_criteria"] = StoppingCriteriaList([streamer.rows_done])
        inputs = self._to_model_inputs(prompts)
        with self._lock:
            self._generate(inputs, streamer=streamer, **kw)
        results = []
        for i, (p, r) in enumerate(zip(prompts, requests)):
            if r.cancelled():
                results.append(None)
                continue
            ids = streamer.tokens[i]
            stopped = streamer.hit_stop[i] or (ids and ids[-1] in (kw["eos_token_id"] or [])) or len(ids) < max_new[i]
            results.append(ChatResult(streamer.texts[i], p.length, len(ids), "stop" if stopped else "length"))
        return results

    def _decode_answer(self, ids: list, stops: Sequence[str]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return cut_at_stop(text, stops)[0]

    def _finish_reason(self, ids: list, text: str, stops, settings: GenerationSettings) -> str:
        # Any eos id (an export's <|im_end|> too), and stop words in the raw text: a stop word that is a
        # special token is missing from the shown text.
        full = self.tokenizer.decode(ids, skip_special_tokens=False)
        if (ids and ids[-1] in self._eos_ids()) or cut_at_stop(full, stops)[1] or len(ids) < settings.max_new_tokens:
            return "stop"
        return "length"


def _stopping_list(cancel: _Cancel, others=()):
    """The cancel flag plus the criteria `_gen_kwargs` made (stop words)."""
    from transformers import StoppingCriteriaList

    return StoppingCriteriaList([*others, cancel])


def _strip_after_eos(row: list, eos: list, pad: int) -> list:
    """A batch row's new tokens up to and including its first EOS (later positions are padding)."""
    for i, t in enumerate(row):
        if t in eos:
            return row[:i + 1]
    return row


def _images_in(gone: list, msgs: list, images: list) -> int:
    """Images carried by the dropped messages: their markers, or all of them when markers are implicit."""
    def markers(m):  # `<video>` places a clip like `<image>` places an image
        return m["content"].count(IMAGE_TOKEN) + m["content"].count(VIDEO_TOKEN) if m["role"] == "user" else 0

    if sum(markers(m) for m in msgs) == 0:
        return len(images)  # implicit: all images sit in the first user turn, which is being dropped
    return sum(markers(m) for m in gone)


def _check_messages(messages) -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise UserError(f"message {i} must be {{'role': system|user|assistant, 'content': str}}, got {m!r}")
    if messages[-1]["role"] != "user":
        raise UserError("the last message must be from the user (the model answers it)")


def _model_device(model) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except AttributeError:
        return next(model.parameters()).device


def _per_image_views(views: torch.Tensor, image_sizes: torch.Tensor, anyres) -> torch.Tensor:
    """[all views, 3, S, S] -> [n_images, max views, 3, S, S], zero-padded, as LlavaNext's processor batches."""
    counts = [anyres.num_views(hw) for hw in image_sizes.tolist()]
    out = views.new_zeros((len(counts), max(counts), *views.shape[1:]))
    start = 0
    for i, n in enumerate(counts):
        out[i, :n] = views[start:start + n]
        start += n
    return out
