"""Preference pairs (prompt, chosen answer, rejected answer): the pair formats users bring, and their tokens.

    fmt = detect_pair_format(row, where)            # what `data.sources[i].format: auto` does for pair data
    pair = to_pair(row, fmt, where, image_folder)   # {"id", "messages", "chosen", "rejected", "images"}
    sample = encode_pair(pair, tokenizer, "qwen_chat", max_length=2048, num_image_tokens=576)
    # -> {"prompt_ids", "chosen_ids", "rejected_ids", "chosen_labels", "rejected_labels", "num_images", ...}
    #    or (None, reason) when the pair is dropped

Formats (`data.sources[i].format`; `auto` looks at the first record's keys, llava_ft.config.PAIR_FORMATS):
  trl               TRL's preference type: `prompt` + `chosen` + `rejected`, each a string (standard) or a
                    list of {role, content} messages (conversational; content may be TRL's parts
                    [{"type": "image"}, {"type": "text", "text": ...}]); `images` (vision datasets) or `image`.
                    Implicit prompt: `chosen`/`rejected` are whole conversations sharing every message but
                    the last one. A string prompt is taken as the user's turn and the template is applied
                    (as SFT does with alpaca), not continued as raw text.
  xtuner            XTuner's DPO / reward data: `prompt`, `chosen`, `rejected` as OpenAI message lists
                    (chosen/rejected = [one assistant message]); also the Hub's orpo-dpo-mix-40k rows,
                    whose `chosen`/`rejected` are whole conversations (prompt = all but the last message,
                    exactly XTuner's orpo_dpo_mix_40k_map_fn; its string `prompt` column is then ignored).
  rlaif_v           RLAIF-V-Dataset's columns: `image` (one), `question`, `chosen`, `rejected` (strings),
                    `idx` as the id.
  sharegpt_pairwise LLaMA-Factory's sharegpt ranking data: `conversations` (ending with a human turn),
                    `chosen` / `rejected` = {"from": "gpt", "value": ...}, optional `system`, `images`.
  alpaca_pairwise   LLaMA-Factory's alpaca ranking data: `instruction`, `input`, `chosen`, `rejected`
                    (strings), optional `system`.

The normalized pair: `messages` is the prompt conversation as OpenAI messages (system / user / assistant,
ending with a user turn) with one `<image>` marker per image, placed as SFT places them (images without
any marker go to the start of the first user turn; sharegpt moves markers to the start of their turn);
`images` are absolute paths, or for images stored inside a `datasets` source a label (`file[#row].images[k]`)
with the encoded bytes in `image_data` (as llava_ft.data.hub does for SFT).

Bad pairs raise llava_ft.data.formats.RecordError with a `reason` (counted under data.skip_bad_samples):
identical_answers, empty_answer, image_marker_mismatch, prompt_not_user_last, prompt_mismatch (implicit
prompts that differ), no_<key>, bad_role, malformed.

Tokens: the prompt is encoded by llava_ft.data.encode exactly as SFT encodes the same conversation up to the
assistant answer (XTuner's segments, BOS/EOS/SEP, IMAGE_TOKEN_INDEX placeholders); each answer's tokens and
labels are what SFT gives that answer (its text + SUFFIX, EOS unless SUFFIX_AS_EOS, then SEP with label -100).

Truncation rule (positions count each image as its feature vectors): the prompt is cut from the LEFT to
`max_prompt_length` (BOS, if the tokenizer has one, is kept at the start); a cut that would remove part of
an image drops the pair (reason prompt_too_long_with_images) -- never inside image features. Then both
answers are cut from the RIGHT to the same budget, `max_length - prompt positions`, so the prompt plus the
longer answer fit `max_length`. A pair whose answers lose every supervised token, or become identical, is
dropped (no_supervised_tokens, identical_after_truncation). `max_prompt_length` None: max_length // 2.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

from llava_ft import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_ft.config import PAIR_FORMATS
from llava_ft.data.encode import DROP_EMPTY, DROP_TRUNCATED, _resolve_template, encode_records
from llava_ft.data.image_tokens import as_image_token_count
from llava_ft.data.formats import RecordError, _move_image_tokens, _openai, _sharegpt
from llava_ft.errors import UserError

# Reasons a pair is bad (to_pair) or dropped (encode_pair), keys of the skipped / dropped counts.
BAD_IDENTICAL = "identical_answers"
BAD_EMPTY = DROP_EMPTY  # "empty_answer", the same word SFT uses
BAD_MISMATCH = "image_marker_mismatch"
BAD_PROMPT_END = "prompt_not_user_last"
BAD_PROMPT_MISMATCH = "prompt_mismatch"
BAD_MISSING_IMAGE = "missing_image"
DROP_PROMPT_IMAGES = "prompt_too_long_with_images"
DROP_IDENTICAL_CUT = "identical_after_truncation"

PAIR_KEYS = ("chosen", "rejected")
_IMAGE_COLUMNS = ("images", "image")


def is_pair_record(row: Any) -> bool:
    """True for a record of any pair format (it has both `chosen` and `rejected`)."""
    return isinstance(row, dict) and all(k in row for k in PAIR_KEYS)


def detect_pair_format(row: dict, where: str = "record") -> str:
    """Guess the pair format from one record's keys (see the module docstring)."""
    if not is_pair_record(row):
        raise UserError(f"{where}: not a preference pair (keys {sorted(row) if isinstance(row, dict) else row!r}); "
                        "a pair needs 'chosen' and 'rejected' (and 'prompt', 'question', 'conversations' or "
                        f"'instruction'); pair formats: {', '.join(PAIR_FORMATS)}")
    if "conversations" in row:
        return "sharegpt_pairwise"
    if "question" in row and "prompt" not in row:
        return "rlaif_v"
    if "instruction" in row and "prompt" not in row:
        return "alpaca_pairwise"
    chosen, prompt = row.get("chosen"), row.get("prompt")
    has_images = any(row.get(col) not in (None, "", []) for col in _IMAGE_COLUMNS)
    if isinstance(chosen, list) and not has_images and _plain_messages(chosen) and (
            prompt is None or isinstance(prompt, str) and len(chosen) > 1 or _plain_messages(prompt)):
        return "xtuner"  # message lists with string contents (XTuner's docs, orpo-dpo-mix-40k)
    if "prompt" in row or isinstance(chosen, list):
        return "trl"
    raise UserError(f"{where}: cannot detect the pair format from keys {sorted(row)}; set data.sources[].format "
                    f"to one of: {', '.join(PAIR_FORMATS)}")


def _plain_messages(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(m, dict) and "role" in m and isinstance(m.get("content"), str) for m in value)


def _need(row: dict, key: str, where: str, fmt: str) -> Any:
    if row.get(key) is None:
        raise RecordError(f"{where}: {fmt} pair has no '{key}' (keys: {sorted(row)}); fix the record or set "
                          "data.sources[].format correctly", f"no_{key}")
    return row[key]


def _parts_text(content: Any, where: str) -> Any:
    """TRL content parts -> one string (an image part becomes `<image>`), as SFT reads them (data.hub)."""
    from llava_ft.data.hub import _content_text

    return _content_text(content, where)


def _message_list(value: Any, where: str, key: str) -> list[dict]:
    """A list of {role, content} messages (content a string or TRL parts) -> canonical messages."""
    if not isinstance(value, list):
        raise RecordError(f"{where}: '{key}' must be a string or a list of {{role, content}} messages, got "
                          f"{type(value).__name__}", "malformed")
    fixed = [dict(m, content=_parts_text(m.get("content"), f"{where} {key}[{j}]")) if isinstance(m, dict) else m
             for j, m in enumerate(value)]
    return _openai({"messages": fixed}, f"{where} '{key}'")


def _answer_text(value: Any, where: str, key: str) -> str:
    """One answer: a string, {"from"/"role", "value"/"content"}, or a list holding one assistant message."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        text = value.get("value", value.get("content"))
        role = value.get("from", value.get("role", "assistant"))
        if str(role).lower() not in ("gpt", "assistant", "bot", "model"):
            raise RecordError(f"{where}: '{key}' comes from {role!r}; an answer must be the assistant's (gpt)",
                              "bad_role")
        text = _parts_text(text, f"{where} {key}")
        if not isinstance(text, str):
            raise RecordError(f"{where}: '{key}' has no string 'value'/'content'", "malformed")
        return text
    messages = _message_list(value, where, key)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RecordError(f"{where}: '{key}' must hold exactly one assistant message after the prompt, got "
                          f"roles {[m['role'] for m in messages]}", "malformed")
    return messages[0]["content"]


def _split_implicit(row: dict, where: str) -> tuple[list, list, list]:
    """chosen/rejected as whole conversations: (shared prompt messages, chosen tail, rejected tail)."""
    chosen = _message_list(row["chosen"], where, "chosen")
    rejected = _message_list(row["rejected"], where, "rejected")
    def plain(ms):
        return [(m["role"], m["content"]) for m in ms]

    if plain(chosen[:-1]) != plain(rejected[:-1]):
        raise RecordError(f"{where}: 'chosen' and 'rejected' are whole conversations whose prompts differ "
                          "(every message but the last must be equal)", BAD_PROMPT_MISMATCH)
    return chosen[:-1], chosen[-1:], rejected[-1:]


def _trl_like(row: dict, where: str, fmt: str) -> tuple[list, str, str]:
    prompt = row.get("prompt")
    chosen = _need(row, "chosen", where, fmt)
    _need(row, "rejected", where, fmt)
    if isinstance(chosen, list) and len(chosen) > 1 and not isinstance(prompt, list):
        # Implicit prompt (TRL) / orpo-dpo-mix-40k (XTuner's map fn: prompt = chosen[:-1]).
        messages, c, r = _split_implicit(row, where)
        return messages, _answer_text(c, where, "chosen"), _answer_text(r, where, "rejected")
    if prompt is None:
        raise RecordError(f"{where}: {fmt} pair has no 'prompt' and 'chosen' is not a whole conversation; "
                          "add the prompt", "no_prompt")
    messages = ([{"role": "user", "content": prompt, "loss": False}] if isinstance(prompt, str)
                else _message_list(prompt, where, "prompt"))
    return messages, _answer_text(chosen, where, "chosen"), _answer_text(row["rejected"], where, "rejected")


def _prompt_and_answers(row: dict, fmt: str, where: str) -> tuple[list, str, str]:
    if fmt in ("trl", "xtuner"):
        return _trl_like(row, where, fmt)
    if fmt == "rlaif_v":
        question = _need(row, "question", where, fmt)
        if not isinstance(question, str):
            raise RecordError(f"{where}: 'question' must be a string", "malformed")
        messages = [{"role": "user", "content": question, "loss": False}]
    elif fmt == "alpaca_pairwise":
        instruction = _need(row, "instruction", where, fmt)
        messages = [{"role": "user", "content": f"{instruction}\n{row.get('input') or ''}", "loss": False}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": str(row["system"]), "loss": False})
    elif fmt == "sharegpt_pairwise":
        messages = _sharegpt(row, where, move_images=True)
        if row.get("system") and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": str(row["system"]), "loss": False})
    else:
        raise UserError(f"unknown pair format '{fmt}'; valid pair formats: {', '.join(PAIR_FORMATS)}")
    return (messages, _answer_text(_need(row, "chosen", where, fmt), where, "chosen"),
            _answer_text(_need(row, "rejected", where, fmt), where, "rejected"))


def _images(row: dict, where: str, image_folder: Optional[str], base_dir: str) -> list[tuple]:
    """(path-or-label, bytes) per image of the row (paths resolved as SFT resolves them)."""
    from llava_ft.data.hub import _image_item

    folder = image_folder if image_folder is not None else base_dir
    for col in _IMAGE_COLUMNS:
        value = row.get(col)
        if value is not None and value != "" and value != []:
            items = value if isinstance(value, list) else [value]
            try:
                return [_image_item(item, f"{where}.{col}[{k}]", folder) for k, item in enumerate(items)]
            except UserError as err:
                raise RecordError(str(err), "malformed") from None
    return []


def to_pair(row: dict, fmt: str, where: str, image_folder: Optional[str] = None, base_dir: str = ".") -> dict:
    """One raw record of pair format `fmt` -> the normalized pair (module docstring); RecordError if bad."""
    if not isinstance(row, dict):
        raise RecordError(f"{where}: expected an object per pair, got {type(row).__name__}", "not_an_object")
    messages, chosen, rejected = _prompt_and_answers(row, fmt, where)
    rid = next((str(row[k]) for k in ("id", "idx") if row.get(k) not in (None, "")), where)
    name = where if rid == where else f"{where}: pair {rid}"
    messages = [dict(m, loss=False) for m in messages]  # nothing of the prompt is supervised
    if not messages or messages[-1]["role"] != "user":
        raise RecordError(f"{where}: the prompt must end with a user turn (it ends with "
                          f"{messages[-1]['role'] if messages else 'nothing'})", BAD_PROMPT_END)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise RecordError(f"{name}: the {key} answer is empty", BAD_EMPTY)
        if IMAGE_TOKEN in text:
            raise RecordError(f"{name}: the {key} answer holds '{IMAGE_TOKEN}'; images belong "
                              "in the prompt", BAD_MISMATCH)
    if chosen.strip() == rejected.strip():
        raise RecordError(f"{name}: chosen and rejected are the same text, nothing to prefer",
                          BAD_IDENTICAL)
    images = _images(row, where, image_folder, base_dir)
    users = [m for m in messages if m["role"] == "user"]
    markers = sum(m["content"].count(IMAGE_TOKEN) for m in users)
    if images and not markers:  # as SFT (encode._check_images): images without markers go first
        users[0]["content"] = (IMAGE_TOKEN + "\n") * len(images) + users[0]["content"]
        markers = len(images)
    elif fmt == "rlaif_v" and markers:
        users[0]["content"] = _move_image_tokens(users[0]["content"])
    if markers != len(images):
        raise RecordError(f"{name}: {markers} '{IMAGE_TOKEN}' marker(s) in the prompt but "
                          f"{len(images)} image(s); make them match", BAD_MISMATCH)
    pair = {"id": rid, "messages": messages, "chosen": chosen, "rejected": rejected,
            "images": [label for label, _ in images]}
    if any(data for _, data in images):
        pair["image_data"] = [data for _, data in images]
    return pair


def missing_images(pair: dict) -> list[str]:
    """Image paths of the pair that are not files (images held as bytes are never missing)."""
    blobs = pair.get("image_data") or [b""] * len(pair["images"])
    return [p for p, b in zip(pair["images"], blobs) if not b and not os.path.isfile(p)]


@dataclass
class PairResult:
    sample: Optional[dict]
    drop_reason: Optional[str] = None


def _first_supervised(labels: Sequence[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def _cut_prompt(prompt: list, extra: int, max_prompt_length: int, bos: Optional[int]) -> Union[list, str]:
    """Cut the prompt from the left to `max_prompt_length` positions (module docstring)."""
    over = len(prompt) + extra - max_prompt_length
    if over <= 0:
        return prompt
    keep_bos = 1 if bos is not None and prompt and prompt[0] == bos else 0
    removed = prompt[keep_bos:keep_bos + over]
    if IMAGE_TOKEN_INDEX in removed or len(removed) < over:
        return DROP_PROMPT_IMAGES
    return prompt[:keep_bos] + prompt[keep_bos + over:]


def encode_pairs(pairs: Sequence[dict], tokenizer, template, system: Optional[str] = None, max_length: int = 2048,
                 max_prompt_length: Optional[int] = None, num_image_tokens=0) -> list[PairResult]:
    """Encode many pairs with one batched tokenizer call (llava_ft.data.encode); one PairResult per pair.

    sample: {"id", "prompt_ids", "chosen_ids", "rejected_ids", "chosen_labels", "rejected_labels",
    "num_images", "images", "prompt_length" (positions, images expanded), "length" (prompt + chosen +
    rejected positions), "modality_length" (+length with images, -length without)}."""
    if max_prompt_length is None:
        max_prompt_length = max_length // 2
    if not 0 < max_prompt_length < max_length:
        raise UserError(f"preference.max_prompt_length ({max_prompt_length}) must be above 0 and below "
                        f"data.max_length ({max_length}), so that answers keep some tokens")
    template = _resolve_template(template)
    records = []
    for pair in pairs:
        for key in PAIR_KEYS:
            records.append({"id": pair["id"], "images": pair["images"], "image_data": pair.get("image_data"),
                            "messages": pair["messages"] + [{"role": "assistant", "content": pair[key], "loss": True}]})
    # No truncation here (sys.maxsize): the pair rule below cuts prompt and answers separately.
    encoded = encode_records(records, tokenizer, template, sys.maxsize, system, num_image_tokens, "drop",
                             skip_bad_samples=True)
    bos = tokenizer.bos_token_id
    results = []
    for n, pair in enumerate(pairs):
        chosen, rejected = encoded[2 * n], encoded[2 * n + 1]
        if chosen.sample is None or rejected.sample is None:
            results.append(PairResult(None, chosen.drop_reason or rejected.drop_reason))
            continue
        c_ids, c_labels = chosen.sample["input_ids"], chosen.sample["labels"]
        r_ids, r_labels = rejected.sample["input_ids"], rejected.sample["labels"]
        p, q = _first_supervised(c_labels), _first_supervised(r_labels)
        if c_ids[:p] != r_ids[:q]:
            raise UserError(f"pair {pair['id']}: the template renders the prompt differently before the chosen and "
                            "the rejected answer, so they cannot share it; use a named data.template")
        prompt = c_ids[:p]
        images = pair["images"]
        blobs = pair.get("image_data")
        refs = [{"bytes": b, "path": i} if b else i for i, b in zip(images, blobs)] if blobs else images
        extra = as_image_token_count(num_image_tokens).total(refs) - len(images) if num_image_tokens else 0
        prompt = _cut_prompt(prompt, extra, max_prompt_length, bos)
        if isinstance(prompt, str):
            results.append(PairResult(None, prompt))
            continue
        prompt_length = len(prompt) + extra
        budget = max_length - prompt_length
        answers = [(c_ids[p:p + budget], c_labels[p:p + budget]), (r_ids[q:q + budget], r_labels[q:q + budget])]
        if any(all(label == IGNORE_INDEX for label in labels) for _, labels in answers):
            results.append(PairResult(None, DROP_TRUNCATED))
            continue
        if answers[0][0] == answers[1][0]:
            results.append(PairResult(None, DROP_IDENTICAL_CUT))
            continue
        length = prompt_length + len(answers[0][0]) + len(answers[1][0])
        results.append(PairResult({
            "id": str(pair["id"]), "prompt_ids": prompt, "chosen_ids": answers[0][0], "chosen_labels": answers[0][1],
            "rejected_ids": answers[1][0], "rejected_labels": answers[1][1], "num_images": len(images),
            "images": list(images), "prompt_length": prompt_length, "length": length,
            "modality_length": length if images else -length,
        }))
    return results


def encode_pair(pair: dict, tokenizer, template, system: Optional[str] = None, max_length: int = 2048,
                max_prompt_length: Optional[int] = None, num_image_tokens=0) -> Union[dict, tuple]:
    """Encode one pair (encode_pairs' sample dict), or (None, reason) when the truncation rule drops it."""
    result = encode_pairs([pair], tokenizer, template, system, max_length, max_prompt_length, num_image_tokens)[0]
    return result.sample if result.sample is not None else (None, result.drop_reason)


__all__ = ["PAIR_FORMATS", "detect_pair_format", "to_pair", "encode_pair", "encode_pairs", "is_pair_record",
           "missing_images", "PairResult"]
