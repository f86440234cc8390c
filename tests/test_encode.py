"""Encoding records: image placeholders, truncation that never cuts image features, drops, raw text."""
import pytest
from transformers import AutoTokenizer

from llava_ft import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llava_ft.data.encode import encode_record, encode_records
from llava_ft.errors import UserError


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return AutoTokenizer.from_pretrained(tiny_tokenizer)


def chat(q, a, images=(), rid="s", loss=True):
    return {"id": rid, "images": list(images), "messages": [{"role": "user", "content": q, "loss": True},
                                                            {"role": "assistant", "content": a, "loss": loss}]}


def test_image_placeholder_and_length(tok):
    rec = chat("<image>\nWhat is it?", "A red square.", ["/img/a.png"])
    s = encode_record(rec, tok, "qwen_chat", 512, num_image_tokens=16).sample
    pos = s["input_ids"].index(IMAGE_TOKEN_INDEX)
    assert s["input_ids"].count(IMAGE_TOKEN_INDEX) == 1 and s["labels"][pos] == IGNORE_INDEX
    assert tok.decode(s["input_ids"][:pos]) == "<s><|im_start|>user\n"
    assert s["length"] == len(s["input_ids"]) + 15 == s["modality_length"]
    assert s["images"] == ["/img/a.png"]


def test_two_images_and_marker_free_record(tok):
    s = encode_record(chat("<image>\n<image>\ncompare", "same", ["/a", "/b"]), tok, "qwen_chat", 512,
                      num_image_tokens=4).sample
    assert s["input_ids"].count(IMAGE_TOKEN_INDEX) == 2 and s["length"] == len(s["input_ids"]) + 6
    # Images without any marker: one marker per image goes to the start of the first user turn.
    s2 = encode_record(chat("compare", "same", ["/a", "/b"]), tok, "qwen_chat", 512, num_image_tokens=4).sample
    assert s2["input_ids"] == s["input_ids"]


def test_marker_mismatch_raises_or_drops(tok):
    rec = chat("<image>\n<image>\nQ", "A", ["/a"], rid="sample-42")
    with pytest.raises(UserError, match="sample sample-42: 2 '<image>' marker"):
        encode_record(rec, tok, "default", 512, num_image_tokens=4)
    res = encode_record(rec, tok, "default", 512, num_image_tokens=4, skip_bad_samples=True)
    assert res.sample is None and res.drop_reason == "image_marker_mismatch"


def test_truncation_with_images(tok):
    rec = chat("<image>\nDescribe it in detail please", "It is a long answer " * 5, ["/a"])
    full = encode_record(rec, tok, "default", 4096, num_image_tokens=20).sample
    limit = full["length"] - 5
    assert encode_record(rec, tok, "default", limit, num_image_tokens=20).drop_reason == "too_long_with_images"
    cut = encode_record(rec, tok, "default", limit, num_image_tokens=20, truncation="cut_text").sample
    assert cut["length"] == limit and cut["input_ids"] == full["input_ids"][:len(cut["input_ids"])]
    # Cutting would have to enter the image features: dropped even with cut_text.
    res = encode_record(rec, tok, "default", 22, num_image_tokens=20, truncation="cut_text")
    assert res.sample is None and res.drop_reason == "too_long_with_images"


def test_text_truncation_and_drops(tok):
    long_q = chat("question " * 200, "answer")
    res = encode_record(long_q, tok, "default", 32)
    assert res.sample is None and res.drop_reason == "no_supervised_tokens"
    ok = encode_record(chat("q", "answer " * 50), tok, "default", 32).sample
    assert len(ok["input_ids"]) == 32 and any(l != IGNORE_INDEX for l in ok["labels"])
    assert encode_record(chat("q", "  "), tok, "default", 64).drop_reason == "empty_answer"
    assert encode_record({"id": "e", "images": [], "messages": []}, tok, "default", 64).drop_reason == "no_conversation"


def test_loss_false_turn_is_not_supervised(tok):
    rec = {"id": "m", "images": [], "messages": [
        {"role": "user", "content": "Q1", "loss": True}, {"role": "assistant", "content": "A1", "loss": False},
        {"role": "user", "content": "Q2", "loss": True}, {"role": "assistant", "content": "A2", "loss": True}]}
    s = encode_record(rec, tok, "default", 512).sample
    assert tok.decode([l for l in s["labels"] if l != IGNORE_INDEX]) == "A2</s>"


def test_raw_text_is_fully_supervised_without_eos(tok):
    s = encode_record({"id": "t", "text": "  hello world  "}, tok, "qwen_chat", 512).sample
    assert tok.decode(s["input_ids"]) == "<s>hello world"
    assert s["labels"][0] == IGNORE_INDEX and s["labels"][1:] == s["input_ids"][1:]


def test_batched_equals_single(tok):
    recs = [chat(f"q{i}", f"a{i}" * (i + 1), rid=str(i)) for i in range(5)] + [{"id": "t", "text": "txt"}]
    batched = encode_records(recs, tok, "llama3_chat", 512)
    assert [r.sample for r in batched] == [encode_record(r, tok, "llama3_chat", 512).sample for r in recs]
