"""InternLM2's tokenizer, natively: its sentencepiece `tokenizer.model` as a fast tokenizer, no remote code.

    if is_internlm2_tokenizer(folder):
        tokenizer = load_internlm2_tokenizer(folder)   # transformers.PreTrainedTokenizerFast

InternLM2 checkpoints ship only a sentencepiece model plus `tokenization_internlm2*.py`; under transformers 5
the remote *fast* class mis-splits text ("hello world" -> h|ellow|orld) and appends the chat tokens past the
vocabulary. The reference behaviour is the remote *slow* `InternLM2Tokenizer`: transformers' slow-tokenizer
machinery splits the text on the added tokens (`<s>`, `</s>`, `<unk>` and the chat tokens of
`tokenizer_config.json`'s `added_tokens_decoder`, matched exactly, no stripping around them), each piece of
text in between goes through `SentencePieceProcessor.encode` on its own (the model's own normaliser and
dummy-prefix settings, applied per piece), and `<s>` is put in front when `add_bos_token` (default true);
`</s>` (EOS, also pad) at the end only when `add_eos_token`. The chat tokens are pieces of the vocabulary
(placeholders `[UNUSED_TOKEN_141..146]` renamed by `added_tokens_decoder`), so their ids stay inside it.

The conversion uses transformers' own `SpmConverter.build_tokenizer_from_spm_proto`, which reproduces
`SentencePieceProcessor.encode` from the model's settings (normaliser, dummy prefix per piece of text with
`legacy=True`, byte fallback, BPE merges ranked by score). What it does not know about is the
`InternLM2Tokenizer` layer on top (renamed pieces, added tokens, BOS rule), which is done here.

The converted `tokenizer.json` is cached under the llava_ft cache (`<cache>/tokenizers/internlm2-<hash>`),
keyed by the bytes of the tokenizer files, so a 92,544-piece model is converted once.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

from llava_ft import fileio
from llava_ft.errors import UserError

TOKENIZER_CLASSES = ("InternLM2Tokenizer", "InternLM2TokenizerFast")
# Files whose bytes decide the converted tokenizer (cache key); CONVERTER_VERSION changes with this module.
_KEY_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
CONVERTER_VERSION = "1"


def _read_json(folder: str, name: str) -> dict:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); restore the file from the model's hub page") from None
    return data if isinstance(data, dict) else {}


def _names_internlm2_class(value: Any) -> bool:
    """True for 'InternLM2Tokenizer', 'module.InternLM2TokenizerFast', or a list holding one of them."""
    if isinstance(value, (list, tuple)):
        return any(_names_internlm2_class(v) for v in value)
    return isinstance(value, str) and value.rsplit(".", 1)[-1] in TOKENIZER_CLASSES


def is_internlm2_tokenizer(folder: str) -> bool:
    """Whether `folder` holds an InternLM2 sentencepiece tokenizer (by its config files, not its name).

    `tokenizer_config.json`'s `tokenizer_class` decides when present (a folder saved by llava_ft or by
    transformers as a fast tokenizer names another class and loads natively); else an `auto_map` entry
    naming InternLM2Tokenizer; else `config.json` `model_type: internlm2` with a `tokenizer.model`.
    """
    if not folder or not os.path.isdir(folder):
        return False
    config = _read_json(folder, "tokenizer_config.json")
    if config.get("tokenizer_class"):
        return _names_internlm2_class(config["tokenizer_class"])
    if _names_internlm2_class((config.get("auto_map") or {}).get("AutoTokenizer")):
        return True
    model_config = _read_json(folder, "config.json")
    return model_config.get("model_type") == "internlm2" and os.path.isfile(os.path.join(folder, "tokenizer.model"))


def _import_model_proto():
    """The sentencepiece ModelProto class, or a one-line UserError saying what to install."""
    try:
        from transformers.convert_slow_tokenizer import import_protobuf

        return import_protobuf()
    except ImportError:
        raise UserError("reading InternLM2's tokenizer.model needs sentencepiece and protobuf, which are not "
                        "installed: pip install sentencepiece protobuf") from None


def _token_content(value: Any) -> Optional[str]:
    # special_tokens_map/tokenizer_config hold a token as a string or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_tokens(folder: str, config: dict) -> dict[int, dict]:
    """{id: AddedToken fields} from `added_tokens_decoder`, plus the older `added_tokens.json` {content: id}."""
    added: dict[int, dict] = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _token_content(entry)
        try:
            token_id = int(key)
        except ValueError:
            token_id = -1
        if content is None or token_id < 0:
            raise UserError(f"{os.path.join(folder, 'tokenizer_config.json')}: added_tokens_decoder entry {key!r} "
                            "needs a non-negative integer id and a 'content'; fix or remove it")
        added[token_id] = dict(entry) if isinstance(entry, dict) else {"content": content, "special": True}
    for content, token_id in _read_json(folder, "added_tokens.json").items():
        added.setdefault(int(token_id), {"content": content, "special": True})
    return added


def native_conversion_supported() -> bool:
    """True when transformers' SpmConverter reproduces a sentencepiece model from its own settings
    (`build_tokenizer_from_spm_proto(..., legacy=)`, transformers >= 5.24); older ones build a BPE without
    merges from the vocabulary alone, which would not encode like InternLM2's tokenizer."""
    import inspect

    from transformers.convert_slow_tokenizer import SpmConverter

    return "legacy" in inspect.signature(SpmConverter.build_tokenizer_from_spm_proto).parameters


def _build_backend(folder: str, config: dict, special_map: dict):
    """The `tokenizers.Tokenizer` equivalent of InternLM2Tokenizer for this folder."""
    import transformers
    from tokenizers import AddedToken, processors
    from transformers.convert_slow_tokenizer import SpmConverter

    if not native_conversion_supported():
        raise UserError(f"{folder}: converting InternLM2's sentencepiece tokenizer natively needs transformers "
                        f">= 5.24 (installed {transformers.__version__}); pip install -U 'transformers>=5.24,<6'")

    model_pb2 = _import_model_proto()
    path = os.path.join(folder, "tokenizer.model")
    proto = model_pb2.ModelProto()
    try:
        with open(path, "rb") as f:
            proto.ParseFromString(f.read())
    except Exception as err:  # OSError or protobuf's DecodeError
        raise UserError(f"{path} is not a readable sentencepiece model ({err}); re-download it") from None
    if proto.trainer_spec.model_type != 2:  # 2 = BPE; InternLM2's remote fast class also insists on it
        raise UserError(f"{path} is not a BPE sentencepiece model; InternLM2 tokenizers are BPE")

    added = _added_tokens(folder, config)
    n_pieces = len(proto.pieces)
    # Pieces keep their ids; added_tokens_decoder renames those it names (the chat-token placeholders).
    names = [piece.piece for piece in proto.pieces]
    for token_id, entry in added.items():
        if token_id < n_pieces:
            names[token_id] = entry["content"]
    vocab = {}
    for token_id, name in enumerate(names):
        if vocab.setdefault(name, token_id) != token_id:
            raise UserError(f"{os.path.join(folder, 'tokenizer_config.json')}: added token {name!r} (id {token_id}) "
                            f"is also piece {vocab[name]} of tokenizer.model; one string cannot have two ids")
    backend = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab, legacy=True)

    # Added tokens split the text before sentencepiece sees it, in id order so appended ones get their ids.
    for token_id in sorted(added):
        entry = added[token_id]
        token = AddedToken(entry["content"], single_word=bool(entry.get("single_word", False)),
                           lstrip=bool(entry.get("lstrip", False)), rstrip=bool(entry.get("rstrip", False)),
                           normalized=False, special=bool(entry.get("special", True)))
        if token_id >= n_pieces and token_id != backend.get_vocab_size(with_added_tokens=True):
            raise UserError(f"{os.path.join(folder, 'tokenizer_config.json')}: added token {entry['content']!r} has "
                            f"id {token_id} but the ids after the {n_pieces} pieces of tokenizer.model must be "
                            "consecutive; fix added_tokens_decoder")
        backend.add_special_tokens([token]) if token.special else backend.add_tokens([token])
    # Named special tokens not listed as added tokens (older hub revisions) still split the text, and get
    # a new id past the vocabulary if they are not in it, as the slow tokenizer does.
    extra = [_token_content(special_map.get(k, config.get(k))) for k in ("bos_token", "eos_token", "unk_token",
                                                                          "pad_token")]
    extra += [_token_content(t) for t in (special_map.get("additional_special_tokens")
                                          or config.get("additional_special_tokens") or [])]
    known = {entry["content"] for entry in added.values()}
    new = [t for t in dict.fromkeys(extra) if t and t not in known]
    if new:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in new])

    # InternLM2Tokenizer.build_inputs_with_special_tokens: BOS + A (+ B) (+ EOS); no BOS before B, unlike
    # TokenizersBackend's default pair template, hence our own post-processor.
    bos = _token_content(special_map.get("bos_token", config.get("bos_token", "<s>")))
    eos = _token_content(special_map.get("eos_token", config.get("eos_token", "</s>")))
    add_bos, add_eos = config.get("add_bos_token", True), config.get("add_eos_token", False)
    head = [f"{bos}:0"] if add_bos and bos else []
    tail = [f"{eos}:0"] if add_eos and eos else []
    specials = [(t, backend.token_to_id(t)) for t in dict.fromkeys(([bos] if head else []) + ([eos] if tail else []))]
    backend.post_processor = processors.TemplateProcessing(
        single=" ".join(head + ["$A:0"] + tail), pair=" ".join(head + ["$A:0", "$B:1"] + tail),
        special_tokens=specials)
    return backend


def cache_root() -> str:
    """llava_ft's cache folder: $LLAVA_FT_CACHE, else ~/.cache/llava_ft."""
    return os.environ.get("LLAVA_FT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "llava_ft")


def _cache_key(folder: str) -> str:
    h = hashlib.sha256(f"internlm2-tokenizer v{CONVERTER_VERSION}".encode())
    for name in _KEY_FILES:
        path = os.path.join(folder, name)
        h.update(name.encode() + b"\0")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:20]


def _cached_backend(folder: str, config: dict, special_map: dict):
    from tokenizers import Tokenizer

    target = os.path.join(cache_root(), "tokenizers", f"internlm2-{_cache_key(folder)}", "tokenizer.json")
    if os.path.isfile(target):
        return Tokenizer.from_file(target)
    backend = _build_backend(folder, config, special_map)
    try:
        with fileio.atomic_path(target) as tmp:  # cached files follow the umask, like every output
            backend.save(str(tmp))
    except OSError:
        pass  # a read-only cache only costs a conversion next time
    return backend


def load_internlm2_tokenizer(folder: str):
    """A `PreTrainedTokenizerFast` that encodes exactly like InternLM2's remote slow tokenizer.

    Same ids (text, added tokens, BOS/EOS rules), same bos/eos/unk/pad and chat template; decoding gives
    the text back (without the slow class's habit of adding a space before each special token).
    """
    from transformers import PreTrainedTokenizerFast

    if not os.path.isfile(os.path.join(folder, "tokenizer.model")):
        raise UserError(f"{folder} has an InternLM2 tokenizer config but no tokenizer.model; copy it from the "
                        "base model's folder or hub page")
    config = _read_json(folder, "tokenizer_config.json")
    special_map = _read_json(folder, "special_tokens_map.json")
    backend = _cached_backend(folder, config, special_map)

    def special(name: str, default: Optional[str]) -> Optional[str]:
        return _token_content(special_map.get(name, config.get(name, default)))

    additional = [_token_content(t) for t in (special_map.get("additional_special_tokens")
                                              or config.get("additional_special_tokens") or [])]
    kwargs = dict(bos_token=special("bos_token", "<s>"), eos_token=special("eos_token", "</s>"),
                  unk_token=special("unk_token", "<unk>"), pad_token=special("pad_token", "</s>"),
                  clean_up_tokenization_spaces=False, name_or_path=folder)
    if additional:
        kwargs["extra_special_tokens"] = [t for t in additional if t]
    if config.get("model_max_length"):
        kwargs["model_max_length"] = config["model_max_length"]
    if config.get("chat_template"):
        kwargs["chat_template"] = config["chat_template"]
    post_processor = backend.post_processor
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    # Keep InternLM2's BOS/EOS rule whatever the wrapper's defaults; record it for code that reads the flags.
    tokenizer._tokenizer.post_processor = post_processor
    tokenizer._add_bos_token = bool(config.get("add_bos_token", True))
    tokenizer._add_eos_token = bool(config.get("add_eos_token", False))
    return tokenizer
