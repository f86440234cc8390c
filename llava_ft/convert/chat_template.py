"""Write a prompt template (llava_ft.templates.Template) as a Jinja chat template for exported folders.

    tokenizer.chat_template = template_to_jinja(get_template("qwen_chat"), default_system=None)

The Jinja renders what `llava_ft.data.encode.encode_prompt` builds (XTuner's layout): BOS at the start
and after every EOS, SYSTEM before a turn that has a system text, INSTRUCTION around the user text,
answer + SUFFIX, EOS unless SUFFIX_AS_EOS, then SEP. Consecutive user messages are joined and a system
message applies to the next turn, as in training. Content may be a string or a list of parts
(`{"type": "image"}` / `{"type": "text", "text": ...}`, what LlavaProcessor passes): image parts become
`<image>\n` at the start of the turn, where llava_ft puts images. Tools outside llava_ft (transformers'
`apply_chat_template`, vLLM) then prompt an export the way it was trained.
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
