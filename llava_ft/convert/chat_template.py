"""Write a prompt template (llava_ft.templates.Template) as a Jinja chat template for exported folders.

    tokenizer.chat_template = template_to_jinja(get_template("qwen_chat"), default_system=None)

The Jinja renders what `llava_ft.data.encode.encode_prompt` builds (XTuner's layout): BOS at the start
and after every EOS, SYSTEM before a turn that has a system text, INSTRUCTION around the user text,
answer + SUFFIX, EOS unless SUFFIX_AS_EOS, then SEP. Consecutive user messages are joined and a system
message applies to the next turn, as in training. Content may be a string or a list of parts
(`{"type": "image"}` / `{"type": "text", "text": ...}`, what LlavaProcessor passes): image parts become
`<image>\n` at the start of the turn, where llava_ft puts images. Tools outside llava_ft (transformers'
`apply_chat_template`, vLLM) then prompt an export the way it was trained.

    tokenizer.chat_template = training_chat_template(tokenizer, "qwen_chat", system)   # `hf`: kept as is
    chat_template_mismatch(tokenizer, "qwen_chat", system)   # None, or where the ids differ from training

Every export's tokenizer gets `training_chat_template`; `chat_template_mismatch` tells when a tokenizer
would still give other ids than training (same text; XTuner tokenizes each segment on its own).
"""
from __future__ import annotations

import json
from typing import Optional

from llava_ft import IMAGE_TOKEN


def _lit(text: str) -> str:
    """A Jinja expression printing `text` verbatim (a string literal, escaped)."""
    return "{{ " + json.dumps(text, ensure_ascii=False) + " }}" if text else ""


def _fill(fmt: str, field: str, expr: str) -> str:
    """Jinja for a Python format string `fmt` with `{field}` -> `expr` (and `{round}` -> the turn number)."""
    out = []
    for i, chunk in enumerate(fmt.split("{" + field + "}")):
        if i:
            out.append("{{ " + expr + " }}")
        pieces = chunk.split("{round}")
        for j, piece in enumerate(pieces):
            if j:
                out.append("{{ ns.round }}")
            out.append(_lit(piece))
    return "".join(out)


def template_to_jinja(template, default_system: Optional[str] = None) -> str:
    """Jinja chat template equivalent to `template` (see module docstring)."""
    system_fmt = template.system or "{system}\n"  # same fallback as Template.format_system
    eos_after_answer = not template.suffix_as_eos
    turn_prompt = (
        "{%- if ns.system -%}" + _fill(system_fmt, "system", "ns.system") + "{%- endif -%}"
        + _fill(template.instruction, "input", "ns.input")
    )
    content = (
        "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
        "{%- else -%}{%- set parts = namespace(images='', text='') -%}"
        "{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{%- set parts.images = parts.images + " + json.dumps(IMAGE_TOKEN + "\n")
        + " -%}"
        "{%- elif part['type'] == 'text' -%}{%- set parts.text = parts.text + part['text'] -%}{%- endif -%}"
        "{%- endfor -%}{%- set text = parts.images + parts.text -%}{%- endif -%}"
    )
    return (
        "{%- set ns = namespace(system=" + json.dumps(default_system or "", ensure_ascii=False)
        + ", input='', has_input=false, round=0, bos=true) -%}"
        "{%- for message in messages -%}" + content +
        "{%- if message['role'] == 'system' -%}{%- set ns.system = text -%}"
        "{%- elif message['role'] == 'user' -%}{%- set ns.input = ns.input + text -%}{%- set ns.has_input = true -%}"
        "{%- elif message['role'] == 'assistant' and (ns.round > 0 or ns.has_input) -%}"
        "{%- set ns.round = ns.round + 1 -%}"
        "{%- if ns.bos and bos_token -%}{{ bos_token }}{%- endif -%}"
        + turn_prompt + "{{ text }}" + _lit(template.suffix)
        + ("{%- if eos_token -%}{{ eos_token }}{%- endif -%}" if eos_after_answer else "")
        + _lit(template.sep)
        + "{%- set ns.system = '' -%}{%- set ns.input = '' -%}{%- set ns.has_input = false -%}"
        "{%- set ns.bos = " + ("true" if eos_after_answer else "false") + " -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if ns.has_input -%}{%- set ns.round = ns.round + 1 -%}"
        "{%- if ns.bos and bos_token -%}{{ bos_token }}{%- endif -%}" + turn_prompt + "{%- endif -%}"
    )


# A conversation that crosses every seam of a template: system text, two rounds, a pending question.
PROBE = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "What colour is the sky?"},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And grass?"},
    {"role": "assistant", "content": "A green one, mostly."},
    {"role": "user", "content": "3 more?"},
    {"role": "assistant", "content": "the rest are red"},
]


def training_chat_template(tokenizer, template_name: str, system: Optional[str] = None) -> Optional[str]:
    """The Jinja chat template that prompts like training with `template_name` (`hf`: the tokenizer's own)."""
    from llava_ft.templates import HF_TEMPLATE, get_template

    if template_name == HF_TEMPLATE:
        return getattr(tokenizer, "chat_template", None)
    return template_to_jinja(get_template(template_name), system)


def chat_template_mismatch(tokenizer, template_name: str, system: Optional[str] = None) -> Optional[str]:
    """None when `tokenizer.apply_chat_template` yields the training ids on PROBE, else what differs.

    The text always matches; the ids can differ because XTuner (and so llava_ft) tokenizes each segment on
    its own while apply_chat_template tokenizes the whole string: a tokenizer that merges across a seam
    (e.g. 'Assistant: ' + 'Hello' -> ' Hello') or adds a word-start marker to each segment differs there.
    """
    from llava_ft.data.encode import encode_prompt, encode_record

    full = encode_record({"id": "probe", "messages": PROBE, "images": []}, tokenizer, template_name,
                         max_length=1 << 20, system=system).sample["input_ids"]
    prompt = encode_prompt(PROBE[:-1], tokenizer, template_name, system=system)
    got_full = list(tokenizer.apply_chat_template(PROBE, tokenize=True, add_generation_prompt=False,
                                                  return_dict=False))
    got_prompt = list(tokenizer.apply_chat_template(PROBE[:-1], tokenize=True, add_generation_prompt=True,
                                                    return_dict=False))
    for what, want, got in (("generation prompt", prompt, got_prompt), ("full conversation", full, got_full)):
        if want != got:
            at = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            pieces = tokenizer.convert_ids_to_tokens
            return (f"{what}: apply_chat_template renders the training text but its ids differ from token {at} on "
                    f"({pieces(got[at:at + 3])} instead of {pieces(want[at:at + 3])}), because training tokenizes "
                    "each template segment on its own; prompt with llava_ft (chat/serve/encode_prompt) for exact ids")
    return None
