"""Does a named prompt template reproduce a released checkpoint's own chat template? (`model.llava` runs)

    problem = template_mismatch("mistral", None, tokenizer)   # None when equal, else a UserError message

A released LLaVA-NeXT / OneVision checkpoint carries its prompt format as a chat template (its
processor's, reading content lists). A run that continues from it must train on the same token ids, or
the finetune teaches a second format. `data.template: hf` uses that template itself (llava_ft.data.encode);
a named template (mistral, vicuna, llama3_chat, qwen_chat, ...) is accepted only when it encodes a probe
conversation (an image, two turns) to exactly the ids the checkpoint's template gives. Otherwise the message
says which named templates do match, or to set `data.template: hf`.
"""
from __future__ import annotations

from typing import Optional

from llava_ft.templates import HF_TEMPLATE, TEMPLATES

_PROBE = {"id": "template-probe", "images": ["probe.png"], "messages": [
    {"role": "user", "content": "<image>\nWhat is in the picture?"}, {"role": "assistant", "content": "A cat."},
    {"role": "user", "content": "What colour is it?"}, {"role": "assistant", "content": "Black."}]}


def _ids(template: str, system: Optional[str], tokenizer) -> Optional[list]:
    from llava_ft.data.encode import encode_record
    from llava_ft.errors import UserError

    try:
        result = encode_record(_PROBE, tokenizer, template, max_length=1 << 20, system=system)
    except UserError:
        return None
    return None if result.sample is None else result.sample["input_ids"]


def template_mismatch(template: str, system: Optional[str], tokenizer) -> Optional[str]:
    """None if `template` encodes the probe conversation as the tokenizer's chat template does, else what to set."""
    if template == HF_TEMPLATE:
        return None
    theirs = _ids(HF_TEMPLATE, system, tokenizer)
    if theirs is None:
        return None  # no usable chat template in the checkpoint: nothing to compare with
    ours = _ids(template, system, tokenizer)
    if ours == theirs:
        return None
    matching = [name for name in TEMPLATES if name != template and _ids(name, system, tokenizer) == theirs]
    ours = ours or []
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))

    def show(ids: list) -> str:  # the ids around the first difference, images shown as <image>
        return repr("".join("<image>" if t < 0 else tokenizer.decode([t]) for t in ids[max(0, at - 6):at + 6]))

    fix = (f"set data.template to {' or '.join(matching)} (same ids) or hf" if matching
           else "set data.template: hf (the checkpoint's own chat template)")
    return (f"data.template={template!r} does not give the prompt format of the checkpoint: a probe conversation "
            f"differs from token {at} on, {show(ours)} with it vs {show(theirs)} with the checkpoint's chat "
            f"template; {fix}")


def answer_end_ids(tokenizer) -> list:
    """Special tokens the tokenizer's chat template writes right after an answer (`<|im_end|>` for ChatML,
    `</s>` for the mistral format): the end-of-turn ids an export's generation_config must stop at."""
    from llava_ft import IGNORE_INDEX
    from llava_ft.data.encode import encode_record
    from llava_ft.errors import UserError

    try:
        sample = encode_record(_PROBE, tokenizer, HF_TEMPLATE, max_length=1 << 20).sample
    except UserError:  # no usable chat template
        return []
    if sample is None:
        return []
    answer = [t for t, lab in zip(sample["input_ids"], sample["labels"]) if lab != IGNORE_INDEX]
    special = set(tokenizer.all_special_ids)
    return [t for t in answer[:len(answer) // 2] if t in special]  # the first of the probe's two answers
