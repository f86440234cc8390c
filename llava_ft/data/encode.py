"""Turn canonical records into training samples (input_ids + labels) exactly as XTuner 0.2 does.

XTuner's rules, which we keep so that a user moving from XTuner trains on the same tokens:
  * each segment (system+instruction, output+SUFFIX, SEP) is tokenized on its own, without special tokens;
  * BOS starts the sample and follows every EOS; EOS follows each output unless the template's
    SUFFIX_AS_EOS (then SUFFIX ends the turn and the next turn gets no BOS);
  * loss on outputs (+ SUFFIX, + EOS); system/user text, BOS, SEP and image placeholders are -100;
  * SEP follows every turn, the last one included; raw text = BOS + text, all of it supervised, no EOS.
Where XTuner would crash we choose: a tokenizer without BOS (e.g. Qwen2) gets none; without EOS, none.

Images: each `<image>` in a user turn becomes one IMAGE_TOKEN_INDEX id (label -100) and counts as
`num_image_tokens` positions in `length`. Truncation never cuts inside image features.

Tokenization is batched: `encode_records` gathers every distinct segment of a batch of records and calls
the (Rust) tokenizer once. `encode_record` is the one-record form. `encode_prompt` gives the ids for
generation, built by the same code so that inference sees exactly what training saw.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

from llava_ft import IGNORE_INDEX, IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from llava_ft.data.image_tokens import ImageTokenCount, as_image_token_count
from llava_ft.errors import UserError
from llava_ft.templates import HF_TEMPLATE, Template, conversation_turns, get_template

# Reasons a sample is dropped (keys of PreparedData.stats["dropped"]).
DROP_EMPTY = "empty_answer"  # no supervised turn has any answer text
DROP_TRUNCATED = "no_supervised_tokens"  # truncation to max_length removed every supervised token
DROP_TOO_LONG_IMAGES = "too_long_with_images"
DROP_IMAGE_MISMATCH = "image_marker_mismatch"
DROP_NO_TURNS = "no_conversation"  # nothing to learn from (no assistant turn)


@dataclass
class EncodeResult:
    sample: Optional[dict]
    drop_reason: Optional[str] = None


# A piece is (text_or_ids, supervised): str pieces are tokenized (batched), lists are ids already.
Piece = tuple


def _special_ids(tokenizer) -> tuple[list, list]:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return bos, eos


def _split_images(text: str) -> list:
    """Text pieces with one IMAGE_TOKEN_INDEX id between them (XTuner tokenizes each chunk on its own)."""
    chunks = text.split(IMAGE_TOKEN)
    out: list = []
    for i, chunk in enumerate(chunks):
        out.append((chunk, False))
        if i < len(chunks) - 1:
            out.append(([IMAGE_TOKEN_INDEX], False))
    return out


def _check_images(record: dict, skip_bad_samples: bool, for_generation: bool = False) -> Union[list, str]:
    """Messages with `<image>` markers matching the record's images, or a drop reason."""
    messages = record["messages"]
    images = record.get("images") or []
    markers = sum(m["content"].count(IMAGE_TOKEN) for m in messages if m["role"] == "user")
    if images and markers == 0:
        # Like inference: images without markers go to the start of the first user turn.
        messages = [dict(m) for m in messages]
        for m in messages:
            if m["role"] == "user":
                m["content"] = (IMAGE_TOKEN + "\n") * len(images) + m["content"]
                break
        markers = len(images)
    if markers != len(images):
        if for_generation:  # a chat/eval/serve prompt: the data settings mean nothing to whoever typed it
            raise UserError(f"the messages hold {markers} '{IMAGE_TOKEN}' marker(s) but {len(images)} image(s) were "
                            "given; use one marker per image (or none: the images then go first)")
        if skip_bad_samples:
            return DROP_IMAGE_MISMATCH
        raise UserError(f"sample {record['id']}: {markers} '<image>' marker(s) in the text but {len(images)} "
                        "image(s); make them match, or set data.skip_bad_samples=true to drop such samples")
    return messages


def _template_pieces(messages: list, template: Template, system: Optional[str], bos: list, eos: list,
                     for_generation: bool, with_images: bool) -> Union[list, str]:
    turns = conversation_turns(messages, system)
    if not for_generation:
        turns = [t for t in turns if t["output"] is not None]
        if not turns:
            return DROP_NO_TURNS
        if not any(t["loss"] and t["output"].strip() for t in turns):
            return DROP_EMPTY
    pieces: list = []
    next_needs_bos = True
    for turn in turns:
        if next_needs_bos:
            pieces.append((bos, False))
        prompt = template.format_system(turn["system"]) + template.format_instruction(turn["input"], turn["round"])
        pieces.extend(_split_images(prompt) if with_images else [(prompt, False)])
        if turn["output"] is None:
            break  # generation: stop where the answer starts
        pieces.append((turn["output"] + template.suffix, turn["loss"]))
        next_needs_bos = not template.suffix_as_eos
        if next_needs_bos:
            pieces.append((eos, turn["loss"]))
        if template.sep:
            pieces.append((template.sep, False))
    return pieces


def _hf_pieces(messages: list, tokenizer, system: Optional[str], for_generation: bool,
               with_images: bool, rid: str) -> Union[list, str]:
    """Pieces from the tokenizer's own chat template: each assistant message's rendered span is supervised."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise UserError("data.template is 'hf' but the tokenizer has no chat_template; "
                        "pick a named template (e.g. chatml) instead")
    msgs = [{"role": m["role"], "content": m["content"]} for m in messages]
    if system and not any(m["role"] == "system" for m in msgs):
        msgs.insert(0, {"role": "system", "content": system})
    losses = [bool(m.get("loss", True)) for m in messages]
    if len(msgs) != len(losses):
        losses.insert(0, False)
    if not for_generation:
        while msgs and msgs[-1]["role"] != "assistant":
            msgs.pop()
        if not msgs:
            return DROP_NO_TURNS
        if not any(m["role"] == "assistant" and l and m["content"].strip() for m, l in zip(msgs, losses)):
            return DROP_EMPTY

    lists = _reads_content_lists(tokenizer)
    chat = [_as_content_list(m) for m in msgs] if lists else msgs

    def render(upto: int, gen: bool) -> str:
        return tokenizer.apply_chat_template(chat[:upto], tokenize=False, add_generation_prompt=gen)

    pieces: list = []
    done = ""
    if lists:
        # A processor's template (released LLaVA-NeXT / OneVision): its text goes through tokenizer(text),
        # which adds the tokenizer's own leading specials (Llama/Mistral's BOS) unless the template wrote them.
        lead = _tokenizer_lead(tokenizer)
        if lead and not render(len(chat), False).startswith(tokenizer.decode(lead)):
            pieces.append((lead, False))
    cuts = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    for i in cuts:
        prompt = render(i, True)
        full = render(i + 1, False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise UserError(f"sample {rid}: the tokenizer's chat template does not render conversations "
                            "prefix-consistently, so answer spans cannot be found; use a named template")
        text = prompt[len(done):]
        pieces.extend(_split_images(text) if with_images else [(text, False)])
        pieces.append((full[len(prompt):], losses[i]))
        done = full
    if for_generation:
        text = render(len(msgs), True)[len(done):]
        pieces.extend(_split_images(text) if with_images else [(text, False)])
    return pieces


_CONTENT_LIST_TEMPLATES: dict = {}  # chat template text -> whether it reads content lists


def _reads_content_lists(tokenizer) -> bool:
    """Whether the tokenizer's chat template reads content lists ([{"type": "image"}, {"type": "text", ...}]),
    as the processors' templates of released LLaVA-NeXT / OneVision checkpoints do, rather than strings."""
    template = tokenizer.chat_template
    if template not in _CONTENT_LIST_TEMPLATES:
        probe = [{"role": "user", "content": "zq7 probe"}, {"role": "assistant", "content": "zq8 probe"}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False)
            as_string = all(m["content"] in text for m in probe)
        except Exception:  # a template indexing content['type'] fails on strings (jinja's own error types)
            as_string = False
        _CONTENT_LIST_TEMPLATES[template] = not as_string
    return _CONTENT_LIST_TEMPLATES[template]


def _as_content_list(message: dict) -> dict:
    """{"role", "content": "<image>\nQ"} -> {"role", "content": [{"type": "image"}, {"type": "text", "text": "Q"}]}
    (images first, as the released templates place them)."""
    text = message["content"]
    n = text.count(IMAGE_TOKEN)
    text = text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
    return {"role": message["role"], "content": [{"type": "image"}] * n + [{"type": "text", "text": text}]}


def _tokenizer_lead(tokenizer) -> list:
    """Ids the tokenizer puts before any text by itself (e.g. [bos] for Llama/Mistral; [] for Qwen)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    at = next((i for i in range(len(full)) if full[i:i + len(plain)] == plain), 0)
    return list(full[:at])


def _record_pieces(record: dict, tokenizer, template: Union[Template, str], system: Optional[str],
                   bos: list, eos: list, skip_bad_samples: bool, for_generation: bool = False) -> Union[list, str]:
    if "text" in record and "messages" not in record:
        text = record["text"].strip()  # XTuner strips pretraining text
        return [(bos, False), (text, True)] if text else DROP_EMPTY
    messages = _check_images(record, skip_bad_samples, for_generation)
    if isinstance(messages, str):
        return messages
    with_images = bool(record.get("images"))
    if template == HF_TEMPLATE:
        return _hf_pieces(messages, tokenizer, system, for_generation, with_images, record["id"])
    return _template_pieces(messages, template, system, bos, eos, for_generation, with_images)


def _tokenize_unique(tokenizer, texts: set) -> dict:
    texts = [t for t in texts if t]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    table = dict(zip(texts, ids))
    table[""] = []
    return table


def _truncate(sample_ids: list, labels: list, images: Sequence, max_length: int,
              num_image_tokens: ImageTokenCount, truncation: str) -> Union[tuple, str]:
    n_images = len(images)
    extra = max(num_image_tokens.total(images) - n_images, 0)
    if len(sample_ids) + extra <= max_length:
        return sample_ids, labels
    if n_images:
        keep = max_length - extra
        last_image = max(i for i, t in enumerate(sample_ids) if t == IMAGE_TOKEN_INDEX)
        if truncation == "drop" or keep <= last_image:
            return DROP_TOO_LONG_IMAGES
        return sample_ids[:keep], labels[:keep]
    # Text-only: cut at max_length as XTuner does.
    return sample_ids[:max_length], labels[:max_length]


def _resolve_template(template: Union[Template, str]) -> Union[Template, str]:
    if isinstance(template, str) and template != HF_TEMPLATE:
        return get_template(template)
    return template


def encode_records(records: Sequence[dict], tokenizer, template: Union[Template, str], max_length: int,
                   system: Optional[str] = None, num_image_tokens: Union[int, ImageTokenCount] = 0,
                   truncation: str = "drop", skip_bad_samples: bool = False) -> list[EncodeResult]:
    """Encode many records with one batched tokenizer call; one EncodeResult per record, in order."""
    template = _resolve_template(template)
    num_image_tokens = as_image_token_count(num_image_tokens)
    bos, eos = _special_ids(tokenizer)
    all_pieces = [_record_pieces(r, tokenizer, template, system, bos, eos, skip_bad_samples) for r in records]
    texts = {p for pieces in all_pieces if not isinstance(pieces, str) for p, _ in pieces if isinstance(p, str)}
    table = _tokenize_unique(tokenizer, texts)
    results = []
    for record, pieces in zip(records, all_pieces):
        if isinstance(pieces, str):
            results.append(EncodeResult(None, pieces))
            continue
        input_ids: list = []
        labels: list = []
        for part, supervised in pieces:
            ids = table[part] if isinstance(part, str) else part
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        images = list(record.get("images") or [])
        # What a token counter reads for each image: its encoded bytes when the dataset holds them
        # (llava_ft.data.hub), else its path.
        blobs = list(record.get("image_data") or [])
        refs = [{"bytes": b, "path": p} if b else p for p, b in zip(images, blobs)] if blobs else images
        cut = _truncate(input_ids, labels, refs, max_length, num_image_tokens, truncation)
        if isinstance(cut, str):
            results.append(EncodeResult(None, cut))
            continue
        input_ids, labels = cut
        if all(label == IGNORE_INDEX for label in labels):
            results.append(EncodeResult(None, DROP_TRUNCATED))
            continue
        length = (len(input_ids) - len(images) + num_image_tokens.total(refs)
                  if num_image_tokens else len(input_ids))
        results.append(EncodeResult({
            "id": str(record["id"]), "input_ids": input_ids, "labels": labels, "length": length,
            "modality_length": length if images else -length, "images": images,
        }))
    return results


def encode_record(record: dict, tokenizer, template: Union[Template, str], max_length: int,
                  system: Optional[str] = None, num_image_tokens: Union[int, ImageTokenCount] = 0,
                  truncation: str = "drop",
                  skip_bad_samples: bool = False) -> EncodeResult:
    """Encode one canonical record (see module docstring); `sample` is None when it is dropped."""
    return encode_records([record], tokenizer, template, max_length, system, num_image_tokens, truncation,
                          skip_bad_samples)[0]


def encode_prompt(messages: list, tokenizer, template: Union[Template, str], system: Optional[str] = None,
                  images: Sequence = ()) -> list[int]:
    """Token ids of a conversation up to where the next assistant answer starts (for generation).

    Same pieces as training, so BOS/EOS/SEP land where training put them. With `images`, each `<image>`
    becomes IMAGE_TOKEN_INDEX (markers are added at the start of the first user turn if there are none).
    """
    template = _resolve_template(template)
    bos, eos = _special_ids(tokenizer)
    msgs = [{"role": m["role"], "content": m["content"], "loss": True} for m in messages]
    record = {"id": "prompt", "messages": msgs, "images": list(images)}
    pieces = _record_pieces(record, tokenizer, template, system, bos, eos, False, for_generation=True)
    table = _tokenize_unique(tokenizer, {p for p, _ in pieces if isinstance(p, str)})
    out: list = []
    for part, _ in pieces:
        out += table[part] if isinstance(part, str) else part
    return out
