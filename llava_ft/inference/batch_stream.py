"""Streaming several answers from one batched `generate` call (what `serve/` uses under concurrent load).

    requests = [StreamRequest(messages, images, settings, on_delta=print, cancelled=lambda: False), ...]
    results = chat_model.stream_batch(requests)      # one ChatResult per request, deltas sent as they come

transformers' TextIteratorStreamer only handles a batch of one, and `stop_strings` inside `generate` apply
to every row alike. `RowStreamer` is the per-row version: generate hands it each step's new token of every
row; it keeps each row's tokens, decodes them, cuts at that row's own stop words, holds back text that
could still become a stop word (or is half a multi-byte character), and sends the safe part to the row's
`on_delta`. A row that hits a stop word, its own max_new_tokens or a cancel is marked done; `rows_done`
(a StoppingCriteria) reports that to generate, which stops spending compute on the row (it pads it) and
ends when every row is done. Rows must share sampling settings (the caller groups them: see
`batch_key`); a request with a seed always runs alone, since seeded sampling is per call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from llava_ft.inference.stops import cut_at_stop, holdback


@dataclass
class StreamRequest:
    messages: list
    images: Sequence
    settings: object  # GenerationSettings
    on_delta: Callable[[str], None]
    cancelled: Callable[[], bool] = lambda: False


def batch_key(settings) -> tuple | None:
    """Requests with equal keys can share one generate call; None: run alone (seeded sampling)."""
    if settings.seed is not None:
        return None
    greedy = not settings.temperature or settings.temperature <= 0
    sampling = () if greedy else (float(settings.temperature), float(settings.top_p), int(settings.top_k))
    return (greedy, sampling, float(settings.repetition_penalty))


class RowStreamer:
    """transformers streamer (put/end) + StoppingCriteria (`rows_done`) for a left-padded batch."""

    def __init__(self, tokenizer, stops: list, max_new: list, eos_ids: Sequence[int], on_delta: list,
                 cancelled: list):
        self.tokenizer = tokenizer
        self.stops, self.max_new, self.eos = stops, max_new, set(eos_ids or ())
        self.on_delta, self.cancelled = on_delta, cancelled
        n = len(max_new)
        self.tokens: list = [[] for _ in range(n)]
        self.texts = [""] * n  # final answer text of a finished row
        self.sent = [0] * n
        self.done = [False] * n
        self.hit_stop = [False] * n
        self._prompt_seen = False

    # -- streamer interface: generate calls put(prompt ids) once, then put(new tokens [batch]) per step
    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for i, tok in enumerate(value.reshape(len(self.tokens), -1)[:, -1].tolist()):
            if self.done[i]:
                continue
            if self.cancelled[i]():
                self.done[i] = True
                continue
            self.tokens[i].append(tok)
            self._advance(i, finished=tok in self.eos or len(self.tokens[i]) >= self.max_new[i])

    def end(self) -> None:
        for i in range(len(self.tokens)):
            if not self.done[i]:
                self._advance(i, finished=True)

    def rows_done(self, input_ids, scores, **kwargs) -> torch.Tensor:
        for i, cancel in enumerate(self.cancelled):
            if not self.done[i] and cancel():
                self.done[i] = True
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)

    def _advance(self, i: int, finished: bool) -> None:
        text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
        cut, found = cut_at_stop(text, self.stops[i])
        if not found and self.stops[i]:
            # A stop word may be a special token (<|im_end|>) that the shown text drops: look for it in the
            # raw text too, as generate's stop_strings do for a lone request.
            raw = self.tokenizer.decode(self.tokens[i], skip_special_tokens=False)
            found = cut_at_stop(raw, self.stops[i])[1]
        if found or finished:
            self.done[i], self.hit_stop[i], self.texts[i] = True, found, cut
            self._send(i, cut, len(cut))
            return
        safe = len(text) - holdback(text, self.stops[i])
        while safe > self.sent[i] and text[safe - 1] == "\ufffd":  # half of a multi-byte character
            safe -= 1
        self._send(i, text, safe)

    def _send(self, i: int, text: str, upto: int) -> None:
        if upto > self.sent[i] and not self.cancelled[i]():
            self.on_delta[i](text[self.sent[i]:upto])
        self.sent[i] = max(self.sent[i], upto)
