"""InternLM2's sentencepiece tokenizer, converted natively, encodes exactly like InternLM2's own.

The reference (`reference_encode`) is what the remote slow `InternLM2Tokenizer` does, written here from its
rules because the remote file cannot run: split the text on the added tokens (longest match, no stripping
around them), `SentencePieceProcessor.encode` each piece of text in between on its own, map pieces to ids
(added tokens by `added_tokens_decoder`), and put BOS in front when `add_bos_token`.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import sentencepiece as spm

from llava_ft import IGNORE_INDEX
from llava_ft.data.encode import encode_record
from llava_ft.errors import UserError
from llava_ft.model.internlm2_tokenizer import (is_internlm2_tokenizer, load_internlm2_tokenizer,
                                                native_conversion_supported)
from llava_ft.templates import get_template
from llava_ft.testing.internlm2_tokenizer import CHAT_TOKENS, VOCAB_SIZE, build_internlm2_tokenizer

# transformers < 5.24 cannot convert sentencepiece models natively; llava_ft then says so in one line
# (tests/test_llm.py::test_old_transformers_names_the_version_for_internlm2_tokenizers).
pytestmark = pytest.mark.skipif(not native_conversion_supported(),
                                reason="native InternLM2 tokenizer conversion needs transformers >= 5.24")

LLAMA_STYLE = {"add_dummy_prefix": True, "remove_extra_whitespaces": True}


class Reference:
    """InternLM2Tokenizer's encode, from sentencepiece and tokenizer_config.json alone."""

    def __init__(self, folder: str):
        self.sp = spm.SentencePieceProcessor(model_file=os.path.join(folder, "tokenizer.model"))
        with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
            config = json.load(f)
        self.added = {e["content"]: int(i) for i, e in config["added_tokens_decoder"].items()}
        self.add_bos = config.get("add_bos_token", True)

    def _pieces(self, text: str) -> list[int]:
        # The slow tokenizer maps sentencepiece's piece strings back to ids (added tokens first).
        return [self.added.get(p, self.sp.piece_to_id(p)) for p in self.sp.encode(text, out_type=str)]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [self.sp.bos_id()] if add_special_tokens and self.add_bos else []
        start = i = 0
        while i < len(text):
            match = max((t for t in self.added if text.startswith(t, i)), key=len, default=None)
            if match is None:
                i += 1
                continue
            if i > start:
                ids += self._pieces(text[start:i])
            ids.append(self.added[match])
            i = start = i + len(match)
        if start < len(text):
            ids += self._pieces(text[start:])
        return ids


def varied_strings(n: int = 240, seed: int = 0) -> list[str]:
    """Chinese, English, code, digits, emoji, odd whitespace and chat tokens, alone and mixed."""
    rng = random.Random(seed)
    fragments = [
        "hello world", "Hello, World!", "你好，世界！", "我是书生·浦语。", "请描述这张图片。", "机器学习",
        "图片中有一个红色的圆形", "The quick brown fox", "0123456789", "3.14159", "2024年11月29日", "１２３",
        "😀", "👍🏽", "🇨🇳", "🤖 robot", "∑∫√", "é", "e\u0301", "naïve café", "日本語のテキスト", "한국어", "مرحبا",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u200b", "def f(x):\n    return x * 2\n", "\tindented\ttabs", "line1\r\nline2",
        "   ", " ", "\n", "\n\n\n", "a  b   c", "trailing   ", "   leading", "user", "assistant", "system",
        "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
        "<|interpreter|>", "<|plugin|>", "<|im_start", "im_end|>", "<|", "|>", "<", ">", "[INST]",
    ]
    fixed = [
        "", "hello world", " hello world", "hello world ", "  hello  world  ", "\nhello\n", "你好", " 你好 ",
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n", "<|im_start|> user", "x <|im_end|> y",
        "<|im_end|><|im_start|>", "<s><s></s>", " <s> ", "<|action_start|><|interpreter|>\nprint(1)<|action_end|>\n",
        "<|plugin|>{\"name\": \"search\"}", "12345678901234567890", "a1b2c3", "😀😀😀", "中文English混合123",
    ]
    out = list(fixed)
    while len(out) < n:
        k = rng.randint(1, 5)
        parts = [rng.choice(fragments) for _ in range(k)]
        glue = rng.choice(["", " ", "\n", "  ", "\t"])
        text = glue.join(parts)
        if rng.random() < 0.3:
            text = " " * rng.randint(1, 3) + text
        if rng.random() < 0.3:
            text = text + rng.choice([" ", "  ", "\n", " \n"])
        out.append(text)
    return out


@pytest.fixture(scope="module")
def internlm2_tok(tmp_path_factory) -> str:
    return build_internlm2_tokenizer(tmp_path_factory.mktemp("internlm2") / "tok")


@pytest.fixture(scope="module")
def llama_style_tok(tmp_path_factory) -> str:
    return build_internlm2_tokenizer(tmp_path_factory.mktemp("internlm2") / "tok_prefix", spm_options=LLAMA_STYLE)


def test_detected_by_config_not_by_name(internlm2_tok, tmp_path, tiny_tokenizer):
    assert is_internlm2_tokenizer(internlm2_tok)
    assert not is_internlm2_tokenizer(tiny_tokenizer)  # a plain fast tokenizer folder
    # A folder named like InternLM2 with another tokenizer is not InternLM2...
    named = shutil.copytree(tiny_tokenizer, tmp_path / "internlm2-chat-1_8b")
    assert not is_internlm2_tokenizer(str(named))
    # ...and one with only config.json model_type internlm2 + tokenizer.model (no tokenizer_config) is.
    bare = tmp_path / "model"
    bare.mkdir()
    (bare / "tokenizer.model").write_bytes(open(os.path.join(internlm2_tok, "tokenizer.model"), "rb").read())
    (bare / "config.json").write_text(json.dumps({"model_type": "internlm2"}))
    assert is_internlm2_tokenizer(str(bare))


@pytest.mark.smoke
@pytest.mark.parametrize("which", ["internlm2", "llama_style"])
def test_ids_equal_sentencepiece_reference(which, internlm2_tok, llama_style_tok):
    folder = internlm2_tok if which == "internlm2" else llama_style_tok
    tok = load_internlm2_tokenizer(folder)  # the folder's tokenization_internlm2*.py raise if imported
    ref = Reference(folder)
    texts = varied_strings()
    assert len(set(texts)) >= 200
    mismatches = [(t, tok(t).input_ids, ref.encode(t)) for t in texts if tok(t).input_ids != ref.encode(t)]
    assert not mismatches, mismatches[:3]
    batch = tok(texts, add_special_tokens=False).input_ids
    assert batch == [ref.encode(t, add_special_tokens=False) for t in texts]
    # The chat tokens keep their ids inside the vocabulary (the last six pieces), as upstream.
    assert tok.convert_tokens_to_ids(CHAT_TOKENS) == list(range(VOCAB_SIZE - 6, VOCAB_SIZE))
    assert len(tok) == VOCAB_SIZE


def test_specials_and_decode_round_trip(internlm2_tok):
    tok = load_internlm2_tokenizer(internlm2_tok)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(internlm2_tok, "tokenizer.model"))
    assert (tok.bos_token, tok.eos_token, tok.pad_token, tok.unk_token) == ("<s>", "</s>", "</s>", "<unk>")
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id) == (
        sp.bos_id(), sp.eos_id(), sp.eos_id(), sp.unk_id()) == (1, 2, 2, 0)
    assert tok("hi").input_ids[0] == 1 and tok("hi").input_ids[-1] != 2  # BOS added, EOS not
    assert tok("a", "b").input_ids == [1] + tok("a", add_special_tokens=False).input_ids + tok(
        "b", add_special_tokens=False).input_ids  # InternLM2: no BOS before the second text
    for text in varied_strings():
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
        if not any(s in text for s in ("<s>", "</s>", "<unk>", "<|")):
            assert tok.decode(ids) == sp.decode(ids)
    chat = "<|im_start|>user\n你好<|im_end|>\n"
    assert tok.decode(tok(chat).input_ids, skip_special_tokens=True) == "user\n你好\n"


def test_llama_style_model_decodes_like_sentencepiece(llama_style_tok):
    tok = load_internlm2_tokenizer(llama_style_tok)
    sp = spm.SentencePieceProcessor(model_file=os.path.join(llama_style_tok, "tokenizer.model"))
    for text in ["hello world", "  a  b ", "你好，世界！", "x\ny 123 😀"]:
        ids = tok(text, add_special_tokens=False).input_ids
        assert ids == sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids)


def test_converted_tokenizer_is_cached(internlm2_tok, tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_FT_CACHE", str(tmp_path / "cache"))
    first = load_internlm2_tokenizer(internlm2_tok)
    cached = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "cache") for f in fs]
    assert len(cached) == 1 and cached[0].endswith("tokenizer.json")
    assert oct(os.stat(cached[0]).st_mode & 0o777) == oct(0o666 & ~_umask())
    second = load_internlm2_tokenizer(internlm2_tok)
    text = "<|im_start|>user\n你好 world<|im_end|>\n"
    assert first(text).input_ids == second(text).input_ids
    # Different tokenizer files -> a different cache entry, never a stale one.
    other = shutil.copytree(internlm2_tok, tmp_path / "other")
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["add_bos_token"] = False
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_internlm2_tokenizer(str(other))(text).input_ids == first(text).input_ids[1:]
    assert len([f for _, _, fs in os.walk(tmp_path / "cache") for f in fs]) == 2


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_missing_tokenizer_model_is_a_user_error(internlm2_tok, tmp_path):
    folder = tmp_path / "no_model"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_bytes(open(os.path.join(internlm2_tok, "tokenizer_config.json"), "rb").read())
    assert is_internlm2_tokenizer(str(folder))
    with pytest.raises(UserError, match="no tokenizer.model"):
        load_internlm2_tokenizer(str(folder))


def xtuner_encode(ref: Reference, turns: list[dict], template, system: str) -> tuple[list, list]:
    """XTuner 0.2: template_map_fn, then encode_fn (each segment on its own, BOS at start and after EOS).
    A turn's own "system" (openai_map_fn's) wins over `system`, which applies to the first turn."""
    bos, eos = [ref.sp.bos_id()], [ref.sp.eos_id()]
    conversation = []
    for i, turn in enumerate(turns):
        text = template.instruction.format(input=turn["input"], round=i + 1)  # an empty input too
        turn_system = turn.get("system", system if i == 0 else "")
        if turn_system:
            text = template.system.format(system=turn_system) + text
        conversation.append({"input": text, "output": turn["output"] + template.suffix,
                             "need_eos_token": not template.suffix_as_eos, "sep": template.sep})
    input_ids, labels, next_needs_bos = [], [], True
    for turn in conversation:
        if next_needs_bos:
            input_ids += bos
            labels += [IGNORE_INDEX] * len(bos)
        encoded = ref.encode(turn["input"], add_special_tokens=False)
        input_ids += encoded
        labels += [IGNORE_INDEX] * len(encoded)
        if turn["output"] != "":
            out = ref.encode(turn["output"], add_special_tokens=False)
            input_ids += out
            labels += out
        if turn["need_eos_token"]:
            next_needs_bos = True
            input_ids += eos
            labels += eos
        else:
            next_needs_bos = False
        if turn["sep"] != "":
            sep = ref.encode(turn["sep"], add_special_tokens=False)
            input_ids += sep
            labels += [IGNORE_INDEX] * len(sep)
    return input_ids, labels


@pytest.mark.smoke
def test_internlm2_chat_template_ids_equal_xtuner(internlm2_tok):
    tok = load_internlm2_tokenizer(internlm2_tok)
    ref = Reference(internlm2_tok)
    template = get_template("internlm2_chat")
    system = "你是书生·浦语，一个 helpful assistant."
    turns = [{"input": "你好！Who are you?", "output": "我是书生·浦语。 I am InternLM2."},
             {"input": " 1+1=? ", "output": "2 😀\n"},
             {"input": "Write code:\n", "output": "def f():\n    return 1\n"}]
    messages = [{"role": "system", "content": system}]
    for turn in turns:
        messages += [{"role": "user", "content": turn["input"]}, {"role": "assistant", "content": turn["output"]}]
    sample = encode_record({"id": "c1", "messages": messages}, tok, "internlm2_chat", 4096).sample
    want_ids, want_labels = xtuner_encode(ref, turns, template, system)
    assert sample["input_ids"] == want_ids
    assert sample["labels"] == want_labels
    # The chat markers are single special ids, and only the first turn starts with BOS (SUFFIX_AS_EOS).
    im_start, im_end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert want_ids.count(1) == 1 and want_ids.count(im_start) == 7 and want_ids.count(im_end) == 7


def xtuner_openai_turns(messages: list) -> list[dict]:
    """XTuner 0.2's openai_map_fn, from its rules: assistant messages at the very start of the list are
    dropped; user contents are joined; each assistant message closes a turn with the system message seen
    since the previous turn (or '') and the joined input (or '')."""
    start = 0
    while start < len(messages) and messages[start]["role"] == "assistant":
        start += 1
    turns, system, text = [], "", ""
    for message in messages[start:]:
        if message["role"] == "system":
            system = message["content"]
        elif message["role"] == "user":
            text += message["content"]
        else:
            turns.append({"system": system, "input": text, "output": message["content"]})
            system, text = "", ""
    return turns


@pytest.mark.parametrize("leading", [[], [{"role": "assistant", "content": "dropped: first in the list"}]])
def test_assistant_greeting_after_the_system_prompt_is_a_turn_as_in_xtuner(internlm2_tok, leading):
    """system, assistant (a greeting), user, assistant: XTuner keeps the greeting as a turn with an empty
    input (the system prompt stays on it); only assistant messages first in the list are dropped."""
    tok = load_internlm2_tokenizer(internlm2_tok)
    ref = Reference(internlm2_tok)
    template = get_template("internlm2_chat")
    greeting = "Hi! How can I help?"
    messages = leading + [{"role": "system", "content": "You are InternLM2."},
                          {"role": "assistant", "content": greeting},
                          {"role": "user", "content": "What is 1+1?"}, {"role": "assistant", "content": "2"}]
    turns = xtuner_openai_turns(messages)
    assert [t["input"] for t in turns] == ["", "What is 1+1?"] and turns[1]["system"] == ""
    sample = encode_record({"id": "g", "messages": messages}, tok, "internlm2_chat", 4096).sample
    want_ids, want_labels = xtuner_encode(ref, turns, template, "")
    assert sample["input_ids"] == want_ids
    assert sample["labels"] == want_labels
    greeting_ids = ref.encode(greeting + template.suffix, add_special_tokens=False)
    supervised = [t for t in want_labels if t != IGNORE_INDEX]
    assert supervised[: len(greeting_ids)] == greeting_ids  # the greeting is learned
    assert sample["input_ids"].count(ref.sp.bos_id()) == 1  # SUFFIX_AS_EOS: one BOS, no EOS between turns


def test_missing_sentencepiece_and_protobuf_is_one_line(internlm2_tok, tmp_path):
    # A fresh interpreter where neither package can be imported (as after a bare install without them).
    code = (
        "import sys\n"
        "for name in ('sentencepiece', 'google.protobuf'):\n"
        "    sys.modules[name] = None\n"
        "from llava_ft.errors import UserError\n"
        "from llava_ft.model.internlm2_tokenizer import load_internlm2_tokenizer\n"
        "try:\n"
        f"    load_internlm2_tokenizer({internlm2_tok!r})\n"
        "except UserError as err:\n"
        "    print('USER ERROR:', err)\n"
    )
    env = dict(os.environ, LLAVA_FT_CACHE=str(tmp_path / "empty_cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("USER ERROR:")]
    assert line and "pip install sentencepiece protobuf" in line[0], out.stdout + out.stderr[-2000:]


def test_saved_tokenizer_reloads_natively_with_the_same_ids(internlm2_tok, tmp_path):
    # What exports (pth_to_hf, merge) write: a plain fast tokenizer folder, loaded by AutoTokenizer as is.
    from transformers import AutoTokenizer

    tok = load_internlm2_tokenizer(internlm2_tok)
    tok.save_pretrained(tmp_path / "saved")
    assert not is_internlm2_tokenizer(str(tmp_path / "saved"))
    again = AutoTokenizer.from_pretrained(tmp_path / "saved")
    texts = varied_strings(60)
    assert [again(t).input_ids for t in texts] == [tok(t).input_ids for t in texts]
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 2)


def test_older_revision_without_added_tokens_decoder(internlm2_tok, tmp_path):
    # Early InternLM2 revisions named no chat tokens: the placeholders are then plain user-defined pieces,
    # which sentencepiece emits whole, and "<|im_start|>" is ordinary text.
    folder = shutil.copytree(internlm2_tok, tmp_path / "old")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"], config["additional_special_tokens"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").unlink()
    tok = load_internlm2_tokenizer(str(folder))
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    for text in ["[UNUSED_TOKEN_146]user\nhi[UNUSED_TOKEN_145]\n", "<|im_start|>user", " 你好 😀 "] + varied_strings(50):
        if not any(s in text for s in ("<s>", "</s>", "<unk>")):
            assert tok(text).input_ids == [1] + sp.encode(text), text
