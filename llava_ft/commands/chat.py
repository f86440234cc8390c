"""`llava_ft chat`: talk to a trained model in the terminal (text, or images for LLaVA models).

    llava_ft chat ./merged --prompt-template qwen_chat
    llava_ft chat BASE --adapter ./hf
    llava_ft chat LLM --visual-encoder VE --llava ./xtuner_out --image cat.jpg
    llava_ft chat ./llava_hf --prompt "Describe the image." --image cat.jpg      # answer and exit
    llava_ft chat ./ov_export --prompt "What happens?" --video clip.mp4          # OneVision: a video clip

Interactive commands: `/image PATH|URL` attaches an image to the next message (several per conversation),
`/video PATH` a video clip (runs and exports of a released LLaVA-OneVision; frames sampled as in training),
`/reset` starts over, `/exit` (or Ctrl-D, or Ctrl-C at the prompt) leaves. Ctrl-C while an answer is being
written stops that answer and returns to the prompt. Answers stream as they are generated; the
template's stop words end a turn; when the conversation outgrows the context window the oldest turns are
dropped with a notice. A missing or unreadable image is a one-line error and the session goes on.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from llava_ft import IMAGE_TOKEN
from llava_ft.errors import UserError

HELP = ("commands: /image PATH|URL (attach to next message), /video PATH (OneVision), /reset, /exit (or Ctrl-D); "
        "Ctrl-C stops an answer")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="work dir / iter_N.pth / converted folder / llava-hf folder / HF model (the "
                                      "LLM when --llava is given)")
    parser.add_argument("--adapter", help="PEFT adapter folder to apply to MODEL")
    parser.add_argument("--llava", help="XTuner-layout folder from `convert pth_to_hf` (projector/, adapters)")
    parser.add_argument("--visual-encoder", help="vision tower for --llava (default: the one the run used)")
    parser.add_argument("--image", action="append", default=[], help="image for the first message (repeatable)")
    parser.add_argument("--video", action="append", default=[],
                        help="video clip for the first message (repeatable; LLaVA-OneVision runs and exports)")
    parser.add_argument("--prompt-template", help="template name (default: the one the run trained with)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--bits", type=int, choices=(4, 8), help="load the LLM quantized")
    parser.add_argument("--torch-dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    from llava_ft.commands.convert import add_model_loading_arguments

    add_model_loading_arguments(parser)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.1, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=40)
    parser.add_argument("--top-p", type=float, default=0.75)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-streamer", action="store_true", help="print each answer when complete")
    parser.add_argument("--prompt", action="append", default=[], help="answer this and exit (repeatable: a "
                                                                       "multi-turn conversation)")


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class Session:
    """One conversation: history, images waiting for the next message, and how to answer."""

    def __init__(self, chat_model, settings, system, stream: bool, out=None):
        # sys.stdout looked up now, not when the module was imported (it may have been replaced since)
        self.cm, self.settings, self.system, self.stream = chat_model, settings, system, stream
        self.out = out if out is not None else sys.stdout
        self.cap_noted = False
        self.reset()

    def _fit(self, messages: list, images: list):
        """The conversation trimmed to the context; a prompt that alone fills it names what to change."""
        from llava_ft.inference.chat_model import ContextLengthError

        try:
            return self.cm.fit(messages, images, self.settings.max_new_tokens)
        except ContextLengthError as err:
            raise UserError(f"{err.summary}; shorten the message, attach fewer images (--image, /image) or use a "
                            "shorter --system (earlier turns are already dropped; /reset starts over)") from None

    def reset(self) -> None:
        self.messages: list = [{"role": "system", "content": self.system}] if self.system else []
        self.images: list = []
        self.pending: list = []

    def attach(self, source: str) -> None:
        from llava_ft.data.videos import is_video

        if not self.cm.supports_images:
            raise UserError(f"{self.cm.source or 'this model'} is text-only; it cannot take images")
        if is_video(source):
            self.cm.load_clip(source)  # decodes the sampled frames: a bad clip fails now, with its path
        else:
            self.cm.load_image(source)  # fail now, with the path, rather than at the next answer
        self.pending.append(source)

    def ask(self, text: str) -> str:
        from llava_ft.data.formats import VIDEO_TOKEN
        from llava_ft.data.videos import is_video

        content = "".join((VIDEO_TOKEN if is_video(src) else IMAGE_TOKEN) + "\n" for src in self.pending) + text
        messages = self.messages + [{"role": "user", "content": content}]
        images = self.images + self.pending
        fitted = self._fit(messages, images)
        messages, images, dropped = fitted.messages, fitted.images, fitted.dropped_turns
        if dropped:
            print(f"[dropped the {dropped} oldest turn(s) to fit the {self.cm.context_length}-token context]",
                  file=self.out, flush=True)
        settings = self.settings
        if fitted.max_new_tokens < settings.max_new_tokens:
            if not self.cap_noted:  # said once: it applies to every later answer alike
                self.cap_noted = True
                print(f"[answers are capped at what the {self.cm.context_length}-token context leaves after the "
                      f"prompt ({fitted.max_new_tokens} tokens now; the prompt is {fitted.prompt_tokens}); "
                      f"--max-new-tokens {settings.max_new_tokens} does not fit]", file=self.out, flush=True)
            settings = dataclasses.replace(settings, max_new_tokens=fitted.max_new_tokens)
        parts: list = []
        try:
            if self.stream:
                stream = self.cm.stream_chat(messages, images, settings)
                try:
                    for delta in stream:
                        parts.append(delta)
                        print(delta, end="", file=self.out, flush=True)
                finally:
                    stream.close()  # Ctrl-C lands here too: generation stops before we go on
            else:
                parts.append(self.cm.chat(messages, images, settings).text)
                print(parts[0], end="", file=self.out, flush=True)
        except KeyboardInterrupt:
            # Ctrl-C stops this answer, not the session. What was shown stays in the history (the next
            # question may refer to it); an answer stopped before its first word leaves no turn at all.
            print(file=self.out, flush=True)
            print("[answer stopped; Ctrl-C at an empty prompt, Ctrl-D or /exit quits]", file=self.out, flush=True)
            if not "".join(parts).strip():
                return ""
        else:
            print(file=self.out, flush=True)
        answer = "".join(parts)
        self.messages = messages + [{"role": "assistant", "content": answer}]
        self.images, self.pending = images, []
        return answer


def run(args: argparse.Namespace) -> int:
    _quiet_transformers()
    from llava_ft.inference import GenerationSettings, load_chat_model

    cm = load_chat_model(args.model, adapter=args.adapter, llava=args.llava, visual_encoder=args.visual_encoder,
                         bits=args.bits, torch_dtype=args.torch_dtype, prompt_template=args.prompt_template,
                         device=args.device, attn_implementation=args.attn_implementation,
                         trust_remote_code=args.trust_remote_code, system=args.system)
    settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                  top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                  seed=args.seed)
    session = Session(cm, settings, None, stream=not args.no_streamer)
    for image in args.image:
        session.attach(image)  # a bad --image is fatal: nothing was asked yet
    for clip in args.video:
        from llava_ft.data.videos import is_video

        if not is_video(clip):
            raise UserError(f"--video {clip}: not a video file name (expected .mp4, .avi, .mov, .mkv, .webm, ...)")
        session.attach(clip)
    if args.prompt:
        for prompt in args.prompt:
            session.ask(prompt)
        return 0
    kind = "text + images" if cm.supports_images else "text"
    print(f"llava_ft chat: {cm.source} ({kind}, context {cm.context_length} tokens). {HELP}", flush=True)
    while True:
        try:
            line = input(">>> ")
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return 0
        text = line.strip()
        if not text:
            continue
        try:
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                session.reset()
                print("[conversation reset]", flush=True)
            elif text.startswith("/image") or text.startswith("/video"):
                kind = text[1:6]
                path = text[len("/image"):].strip()
                if not path:
                    print(f"usage: /{kind} PATH" + ("|URL" if kind == "image" else ""), flush=True)
                    continue
                from llava_ft.data.videos import is_video

                if kind == "video" and not is_video(path):
                    raise UserError(f"/video {path}: not a video file name (expected .mp4, .avi, .mov, .mkv, ...)")
                session.attach(path)
                print(f"[{'video' if is_video(path) else 'image'} attached to your next message: {path}]", flush=True)
            elif text.startswith("/") and " " not in text:
                print(f"unknown command {text}; {HELP}", flush=True)
            else:
                session.ask(line)
        except UserError as err:
            print(f"error: {err}", flush=True)
        except KeyboardInterrupt:  # outside an answer (e.g. while an image loads): back to the prompt
            print("\n[interrupted]", flush=True)
