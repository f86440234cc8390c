"""A tiny tokenizer folder in InternLM2's hub layout, built offline for tests.

    folder = build_internlm2_tokenizer("ws/internlm2_tok")   # -> str path of the finished folder

What it writes mirrors internlm/internlm2-chat-*: a sentencepiece BPE `tokenizer.model` trained here on a
varied corpus (English, Chinese, code, digits, the demo's captions and prompt templates) with byte fallback,
so any text (emoji, rare CJK) encodes; the last six pieces are placeholders `[UNUSED_TOKEN_141..146]`
that `tokenizer_config.json`'s `added_tokens_decoder` renames to InternLM2's chat tokens (`<|plugin|>`,
`<|interpreter|>`, `<|action_end|>`, `<|action_start|>`, `<|im_end|>`, `<|im_start|>`: same order and
position from the end as in the real 92,544-piece vocabulary, where they are ids 92538..92543). So the
model's `vocab_size` is the piece count (`VOCAB_SIZE`) and the chat tokens lie inside it, as upstream.
`<unk>` 0, `<s>` 1 (BOS, added by default), `</s>` 2 (EOS and pad), as InternLM2 has them.

The folder also holds `tokenization_internlm2.py` / `tokenization_internlm2_fast.py` named by `auto_map`,
which raise on import: a test that loads this folder proves no remote code runs.

The build is deterministic (same corpus, single-threaded sentencepiece training -> same model bytes).
"""
from __future__ import annotations

import io
import json
import os
import random
from pathlib import Path
from typing import Optional, Union

from llava_ft.fileio import publish_dir, staging_dir
from llava_ft.demo.assets import demo_texts

PathLike = Union[str, os.PathLike]

VOCAB_SIZE = 640  # pieces in tokenizer.model, chat placeholders included (= config.json vocab_size)

# InternLM2's chat tokens with their offset from the end of the vocabulary (92538..92543 of 92544).
CHAT_TOKENS = ["<|plugin|>", "<|interpreter|>", "<|action_end|>", "<|action_start|>", "<|im_end|>", "<|im_start|>"]
PLACEHOLDERS = [f"[UNUSED_TOKEN_{141 + i}]" for i in range(len(CHAT_TOKENS))]

# InternLM2's chat template (tokenizer_config.json of internlm2-chat): BOS, then ChatML turns.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_RAISING_MODULE = '''"""Stand-in for InternLM2's remote tokenizer code: llava_ft must never import it."""
raise ImportError("remote tokenizer code was executed: llava_ft must load InternLM2 tokenizers natively")
'''


def training_corpus(seed: int = 0) -> list[str]:
    """Varied lines in InternLM2's domains, so the BPE learns English, Chinese, code and chat merges."""
    rng = random.Random(seed)
    lines = list(demo_texts())
    english = ["The model answers questions about images.", "Please describe the picture in detail.",
               "Fine-tuning a language model takes data, time and care.", "hello world", "Hello, World!",
               "She said: \"it's fine\"; he replied (quietly) [later].", "user", "assistant", "system",
               "You are a helpful assistant.", "What is the capital of France? Paris.", "Good morning!"]
    chinese = ["你好，世界！", "我是书生·浦语，一个由上海人工智能实验室开发的人工智能助手。", "请描述这张图片。",
               "图片中有一个红色的圆形。", "今天天气很好，我们去公园散步吧。", "机器学习和深度学习", "谢谢你的帮助！",
               "这是一个测试句子，用于训练分词器。", "中文和English混合的句子。", "数字１２３和123"]
    code = ["def main():\n    print('hi')\n    return 0\n", "for i in range(10):\n\tx += i * 2\n",
            "import torch\nmodel = torch.nn.Linear(4, 4)\n", "if (a && b) { return a->b; }", "x = {\"key\": [1, 2, 3]}"]
    for _ in range(60):
        lines.append(rng.choice(english) + " " + rng.choice(english))
        lines.append(rng.choice(chinese) + rng.choice(chinese))
        lines.append(rng.choice(code))
        lines.append(" ".join(str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(4)))
        lines.append("  " + rng.choice(english) + "   \n\n" + rng.choice(chinese) + "  ")
    return lines


def train_sentencepiece(vocab_size: int = VOCAB_SIZE, seed: int = 0, spm_options: Optional[dict] = None) -> bytes:
    """Serialized sentencepiece ModelProto, InternLM2-style, with the chat placeholders as its last pieces.

    Settings follow InternLM2's tokenizer.model as far as its published files show: BPE with byte fallback,
    digits split, identity normalisation (no NFKC), whitespace kept as is (no dummy prefix, no collapsing of
    repeated spaces), ids unk 0 / bos 1 / eos 2 and no pad piece. `spm_options` overrides trainer settings
    (e.g. `{"add_dummy_prefix": True, "remove_extra_whitespaces": True}` for a Llama-style normaliser).
    """
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    buf = io.BytesIO()
    options = dict(
        model_type="bpe", vocab_size=vocab_size - len(PLACEHOLDERS),
        byte_fallback=True, split_digits=True, character_coverage=0.9995,
        normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, split_by_whitespace=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
        max_sentence_length=8192,
    )
    options.update(spm_options or {})
    spm.SentencePieceTrainer.train(sentence_iterator=iter(training_corpus(seed)), model_writer=buf, **options)
    proto = model_pb2.ModelProto()
    proto.ParseFromString(buf.getvalue())
    # Upstream's chat placeholders are user-defined pieces at the very end of the vocabulary; the trainer
    # puts user-defined symbols right after the control pieces, so they are appended to the proto here.
    for name in PLACEHOLDERS:
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = name, 0.0, model_pb2.ModelProto.SentencePiece.USER_DEFINED
    assert len(proto.pieces) == vocab_size, len(proto.pieces)
    return proto.SerializeToString()


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def tokenizer_config(vocab_size: int = VOCAB_SIZE) -> dict:
    """tokenizer_config.json as internlm2-chat ships it (ids of the chat tokens counted from the end)."""
    decoder = {"0": _added("<unk>"), "1": _added("<s>"), "2": _added("</s>")}
    first = vocab_size - len(CHAT_TOKENS)
    decoder.update({str(first + i): _added(tok) for i, tok in enumerate(CHAT_TOKENS)})
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>",
                                      "<|interpreter|>", "<|plugin|>"],
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "bos_token": "<s>",
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "eos_token": "</s>",
        "model_max_length": 1000000000000000019884624838656,
        "pad_token": "</s>",
        "sp_model_kwargs": None,
        "tokenizer_class": "InternLM2Tokenizer",
        "unk_token": "<unk>",
    }


def write_internlm2_tokenizer_files(folder: PathLike, seed: int = 0, spm_options: Optional[dict] = None) -> None:
    """Write the tokenizer files into `folder` (a fresh folder being built, published by renaming it)."""
    folder = Path(folder)
    (folder / "tokenizer.model").write_bytes(train_sentencepiece(seed=seed, spm_options=spm_options))
    config = tokenizer_config()
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False, indent=2) + "\n",
                                                  encoding="utf-8")
    special = {"additional_special_tokens": config["additional_special_tokens"],
               "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    for name in ("tokenization_internlm2.py", "tokenization_internlm2_fast.py"):
        (folder / name).write_text(_RAISING_MODULE, encoding="utf-8")


def build_internlm2_tokenizer(out_dir: PathLike, seed: int = 0, spm_options: Optional[dict] = None) -> str:
    """Build the tokenizer folder at `out_dir` (replaced atomically when complete) and return its path."""
    tmp = staging_dir(out_dir)
    write_internlm2_tokenizer_files(tmp, seed=seed, spm_options=spm_options)
    return publish_dir(tmp, out_dir)
