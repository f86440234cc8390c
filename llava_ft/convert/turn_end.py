"""End-of-turn token ids for the generation_config.json of every export (pth_to_hf, llava-hf, merge).

    gen = with_turn_end(llm.generation_config, tokenizer, "chatml")   # eos_token_id = [</s>, <|im_end|>]
    model.generation_config = gen; model.save_pretrained(out)

llava_ft's own chat ends an answer at the template's stop words, but plain transformers `generate` (and
vLLM, which reads generation_config.json) stops only at `eos_token_id`. A chatml run ends its answers with
`<|im_end|>`, not `</s>`, so an export that listed only the tokenizer's EOS ran on past the turn. The eos
list written here is: the base model's own eos id(s), the tokenizer's EOS, and every stop word / SUFFIX end
marker of the template that is ONE token in the tokenizer (`<|im_end|>` for chatml/qwen_chat/internlm2_chat,
`<|eot_id|>` for llama3_chat, ...). A stop word that is several tokens cannot be an eos id: a warning says
so. It is not written as `stop_strings` either, although GenerationConfig can hold them: transformers'
`generate` then refuses to run unless the caller passes `tokenizer=`, which would break plain
`model.generate(**inputs)` for every user of the export.
"""
from __future__ import annotations

import copy
import logging
from typing import Optional

log = logging.getLogger("llava_ft")


def turn_end_words(template) -> list:
    """The strings that end an answer in `template` (a Template, a template name, or "hf"/None: none known)."""
    from llava_ft.templates import HF_TEMPLATE, get_template

    if template in (None, "", HF_TEMPLATE):
        return []
    if isinstance(template, str):
        template = get_template(template)
    words = list(template.stop_words or ())
    suffix = (template.suffix or "").strip()
    if template.suffix_as_eos and suffix:
        words.append(suffix)  # SUFFIX_AS_EOS: the suffix is what training put where EOS would be
    return list(dict.fromkeys(w for w in words if w))


def single_token_id(tokenizer, word: str) -> Optional[int]:
    """The id of `word` when the tokenizer has it as one token (added/special or in the vocab), else None."""
    ids = tokenizer.encode(word, add_special_tokens=False)
    if len(ids) == 1:
        return int(ids[0])
    # Some sentencepiece tokenizers put a word-start piece before an added token: look the token up directly.
    tid = tokenizer.convert_tokens_to_ids(word)
    if isinstance(tid, int) and tid != tokenizer.unk_token_id and tokenizer.convert_ids_to_tokens(tid) == word:
        return tid
    return None


def _as_list(value) -> list:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def turn_end_ids(tokenizer, template, base_eos=None, where: str = "convert") -> list:
    """eos ids for generation: `base_eos` (the base's), the tokenizer's EOS, the template's one-token end words."""
    ids = _as_list(base_eos)
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    name = getattr(template, "name", template)
    for word in turn_end_words(template):
        tid = single_token_id(tokenizer, word)
        if tid is None:
            n = len(tokenizer.encode(word, add_special_tokens=False))
            log.warning("%s: template %s ends a turn with %r, which this tokenizer splits into %d tokens, so it "
                        "cannot be an eos_token_id in generation_config.json and plain transformers generate will "
                        "not stop there (pass stop_strings=[%r] and tokenizer= to generate; llava_ft chat and "
                        "serve stop there by themselves)", where, name, word, n, word)
        else:
            ids.append(tid)
    return list(dict.fromkeys(ids))


def with_turn_end(generation_config, tokenizer, template, where: str = "convert"):
    """A copy of `generation_config` (a GenerationConfig, or None for a fresh one) whose eos_token_id lists the
    template's end-of-turn tokens (see module docstring); a single id stays an int."""
    from transformers import GenerationConfig

    gen = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    ids = turn_end_ids(tokenizer, template, gen.eos_token_id, where)
    if ids:
        gen.eos_token_id = ids if len(ids) > 1 else ids[0]
    if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
        gen.pad_token_id = int(tokenizer.pad_token_id)
    return gen

