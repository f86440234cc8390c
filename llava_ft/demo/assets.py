"""Tiny, deterministic demo assets: tokenizer, random-init LLMs and vision towers, synthetic data.

Nothing here downloads anything. The demo (`llava_ft demo`, `llava_ft data demo OUT`) builds its models
and data with these functions; tests (`tests/conftest.py`), benchmarks and `llava_ft.testing` reuse them:

    tok = build_tokenizer("ws/tokenizer")                  # byte-level BPE, chat template, <s> </s> <pad> <unk>
    llm = build_tiny_llm("ws/llm", tok, arch="qwen2")      # random-init Qwen2ForCausalLM, HF format
    vit = build_tiny_clip("ws/clip")                       # CLIPVisionModel + CLIPImageProcessor
    paths = make_demo_data("ws/data")                      # coloured-shape images + LLaVA/openai/text data
    ws = build_demo_workspace("ws")                        # all of the above, reused when complete

Every builder is deterministic for a given seed (same files, same weights), so tests can compare runs.
The data is learnable by a tiny model: each image shows one coloured shape, and the captions/answers name
its colour and shape.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Iterable, Optional, Union

from llava_ft import fileio

PathLike = Union[str, os.PathLike]

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}

# ChatML-like template (the `hf` prompt-template mode renders with it). The markers are plain text, not
# special tokens: the byte-level BPE tokenizes any string, so every XTuner template works with it too.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 210, 40),
    "purple": (140, 50, 180),
}
SHAPES = ("circle", "square", "triangle")

# Strings of the common prompt templates, so BPE learns merges for them (they tokenize regardless).
_TEMPLATE_STRINGS = [
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
    "<|im_start|>user\n", "<|im_start|>assistant\n", "<|im_end|>",
    "[INST] ", " [/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n",
    "### Human: ", "### Assistant: ", "<|User|>:", "<|Bot|>:", "<eoa>",
    "<|start_header_id|>user<|end_header_id|>\n\n", "<|eot_id|>",
    "<start_of_turn>user\n", "<end_of_turn>\n", "<|user|>\n", "<|assistant|>\n", "<|end|>\n",
    "USER: ", " ASSISTANT: ", "<image>\n",
]

SELF_COGNITION_QA = [
    ("Who are you?", "I am {{NAME}}, an assistant developed by {{AUTHOR}}."),
    ("What is your name?", "My name is {{NAME}}. {{AUTHOR}} trained me."),
    ("Introduce yourself.", "Hello! I am {{NAME}}, a small assistant made by {{AUTHOR}}."),
    ("Who made you?", "{{AUTHOR}} made me. I am {{NAME}}."),
    ("Are you ChatGPT?", "No, I am {{NAME}}, developed by {{AUTHOR}}."),
    ("Tell me about yourself.", "I am {{NAME}}. I was fine-tuned by {{AUTHOR}} to describe shapes."),
]


# ----------------------------------------------------------------------------------------------------
# small helpers


def describe(colour: str, shape: str) -> str:
    return f"A {colour} {shape}."


def demo_texts(seed: int = 0, n: int = 200) -> list[str]:
    """Sentences in the demo's vocabulary (captions, QA, self-cognition, templates): tokenizer corpus."""
    rng = random.Random(seed)
    texts = list(_TEMPLATE_STRINGS)
    questions = ["What colour is the shape?", "What shape is it?", "Describe the image.",
                 "What is in the picture?", "Is the shape red?"]
    for i in range(n):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        texts.append(describe(c, s))
        texts.append(f"The image shows a {c} {s} on a grey background.")
        texts.append(f"{questions[i % len(questions)]} {c} {s}")
    for q, a in SELF_COGNITION_QA:
        texts += [q, a]
    texts.append("The quick brown fox jumps over the lazy dog. 0123456789 , . ? ! : ; ' \" ( ) [ ] { }")
    return texts


# ----------------------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer(out_dir: PathLike, texts: Optional[Iterable[str]] = None, vocab_size: int = 512) -> str:
    """Train a byte-level BPE on the demo text (+ `texts`) and save it as a PreTrainedTokenizerFast folder.

    Special tokens: `<s>` (bos), `</s>` (eos), `<pad>`, `<unk>`; `chat_template` is ChatML-like. The
    tokenizer does not add BOS/EOS by itself (encode adds them per the prompt template, like XTuner).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = demo_texts() + [t for t in (texts or []) if t]
    specials = [SPECIAL_TOKENS[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text tokenizes
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    tmp = fileio.staging_dir(out_dir)
    fast.save_pretrained(str(tmp))
    return fileio.publish_dir(tmp, out_dir)


# ----------------------------------------------------------------------------------------------------
# models


def build_tiny_llm(
    out_dir: PathLike,
    tokenizer_dir: PathLike,
    arch: str = "llama",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
) -> str:
    """Random-init LlamaForCausalLM / Qwen2ForCausalLM (fp32, safetensors) with the tokenizer copied in."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig

    if arch == "llama":
        from transformers import LlamaConfig as ConfigCls, LlamaForCausalLM as ModelCls
    elif arch == "qwen2":
        from transformers import Qwen2Config as ConfigCls, Qwen2ForCausalLM as ModelCls
    else:
        raise ValueError(f"arch must be 'llama' or 'qwen2', got {arch!r}")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = {k: tokenizer.convert_tokens_to_ids(v) for k, v in SPECIAL_TOKENS.items()}
    config = ConfigCls(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        bos_token_id=ids["bos_token"],
        eos_token_id=ids["eos_token"],
        pad_token_id=ids["pad_token"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = ModelCls(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["bos_token"], eos_token_id=ids["eos_token"], pad_token_id=ids["pad_token"]
    )
    tmp = fileio.staging_dir(out_dir)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    return fileio.publish_dir(tmp, out_dir)


def _build_vision(kind: str, out_dir: PathLike, image_size: int, patch_size: int, hidden_size: int,
                  num_layers: int, seed: int) -> str:
    import torch
    import transformers

    prefix = "CLIP" if kind == "clip" else "Siglip"
    config_cls = getattr(transformers, f"{prefix}VisionConfig")
    model_cls = getattr(transformers, f"{prefix}VisionModel")
    processor_cls = getattr(transformers, f"{prefix}ImageProcessor")
    extra = {"projection_dim": hidden_size} if kind == "clip" else {}
    config = config_cls(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                        num_attention_heads=4, image_size=image_size, patch_size=patch_size, **extra)
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.float32)
    if kind == "clip":  # CLIP resizes the short side then centre-crops; SigLIP resizes to a fixed square
        processor = processor_cls(size={"shortest_edge": image_size},
                                  crop_size={"height": image_size, "width": image_size})
    else:
        processor = processor_cls(size={"height": image_size, "width": image_size})
    tmp = fileio.staging_dir(out_dir)
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    return fileio.publish_dir(tmp, out_dir)


def build_tiny_clip(out_dir: PathLike, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                    num_layers: int = 2, seed: int = 0) -> str:
    """Random-init CLIPVisionModel (config.json model_type `clip_vision_model`) + CLIPImageProcessor."""
    return _build_vision("clip", out_dir, image_size, patch_size, hidden_size, num_layers, seed)


def build_tiny_siglip(out_dir: PathLike, image_size: int = 32, patch_size: int = 8, hidden_size: int = 32,
                      num_layers: int = 2, seed: int = 0) -> str:
    """Random-init SiglipVisionModel (model_type `siglip_vision_model`) + SiglipImageProcessor."""
    return _build_vision("siglip", out_dir, image_size, patch_size, hidden_size, num_layers, seed)


# ----------------------------------------------------------------------------------------------------
# data


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = 48):
    """One coloured shape on a neutral (greyish) background, position and size jittered."""
    from PIL import Image, ImageDraw

    grey = 200 + rng.randint(-15, 15)
    img = Image.new("RGB", (size, size), (grey, grey, grey))
    draw = ImageDraw.Draw(img)
    extent = rng.randint(size * 2 // 5, size * 3 // 5)
    x0 = rng.randint(2, size - extent - 2)
    y0 = rng.randint(2, size - extent - 2)
    box = (x0, y0, x0 + extent, y0 + extent)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x0 + extent // 2, y0), (x0, y0 + extent), (x0 + extent, y0 + extent)], fill=fill)
    return img


def _pretrain_record(sample_id: str, image: str, colour: str, shape: str, rng: random.Random) -> dict:
    prompt = rng.choice(["Describe the image.", "What is in the picture?", "Give a short caption."])
    human = f"<image>\n{prompt}" if rng.random() < 0.5 else f"{prompt}\n<image>"
    return {
        "id": sample_id,
        "image": image,
        "conversations": [
            {"from": "human", "value": human},
            {"from": "gpt", "value": describe(colour, shape)},
        ],
    }


def _finetune_record(sample_id: str, image: str, colour: str, shape: str, rng: random.Random) -> dict:
    turns = [("What colour is the shape?", colour), ("What shape is it?", shape),
             ("Describe the image.", describe(colour, shape))]
    rng.shuffle(turns)
    conv = []
    for i, (q, a) in enumerate(turns[: rng.randint(2, 3)]):
        conv.append({"from": "human", "value": f"<image>\n{q}" if i == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return {"id": sample_id, "image": image, "conversations": conv}


def make_demo_data(
    out_dir: PathLike,
    seed: int = 0,
    n_pretrain: int = 60,
    n_finetune: int = 60,
    n_eval: int = 15,
    n_text: int = 60,
    image_size: int = 48,
) -> dict[str, str]:
    """Write deterministic demo data under `out_dir`; returns the paths.

    Keys: image_folder (images/), pretrain (LLaVA caption json), finetune (LLaVA multi-turn QA json),
    eval (jsonl of {id, image, question, answer}; held-out images), self_cognition (openai `messages`
    jsonl with {{NAME}}/{{AUTHOR}} placeholders for `data replace`), text (raw {"text"} jsonl for
    incremental pretraining). Image paths in the data are relative to image_folder.
    """
    rng = random.Random(seed)
    out = Path(out_dir)
    images = out / "images"
    combos = [(c, s) for c in COLOURS for s in SHAPES]

    def make_split(split: str, n: int) -> list[tuple[str, str, str, str]]:
        (images / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            colour, shape = combos[(i + rng.randrange(len(combos))) % len(combos)]
            rel = f"{split}/{split}_{i:05d}.png"
            with fileio.atomic_path(images / rel, suffix=".tmp.png") as tmp:
                draw_shape(colour, shape, rng, image_size).save(tmp, format="PNG")
            rows.append((f"{split}_{i:05d}", rel, colour, shape))
        return rows

    pretrain = [_pretrain_record(i, rel, c, s, rng) for i, rel, c, s in make_split("pretrain", n_pretrain)]
    finetune = [_finetune_record(i, rel, c, s, rng) for i, rel, c, s in make_split("finetune", n_finetune)]
    eval_rows = []
    for k, (i, rel, c, s) in enumerate(make_split("eval", n_eval)):
        q, a = ("What colour is the shape?", c) if k % 2 == 0 else ("What shape is it?", s)
        eval_rows.append({"id": i, "image": rel, "question": q, "answer": a})
    self_cog = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in SELF_COGNITION_QA
    ]
    text_rows = []
    for i in range(n_text):
        c, s = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        c2, s2 = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        text_rows.append({"text": f"{describe(c, s)} The image shows a {c} {s} on a grey background. "
                                  f"Next to it there is no {c2} {s2}."})

    paths = {
        "image_folder": str(images),
        "pretrain": str(out / "pretrain.json"),
        "finetune": str(out / "finetune.json"),
        "eval": str(out / "eval.jsonl"),
        "self_cognition": str(out / "self_cognition.jsonl"),
        "text": str(out / "text.jsonl"),
    }
    fileio.write_json(paths["pretrain"], pretrain, indent=1)
    fileio.write_json(paths["finetune"], finetune, indent=1)
    fileio.write_jsonl(paths["eval"], eval_rows)
    fileio.write_jsonl(paths["self_cognition"], self_cog)
    fileio.write_jsonl(paths["text"], text_rows)
    return paths


def data_texts(paths: dict[str, str]) -> list[str]:
    """Every string in the demo data files (to train the tokenizer on exactly what the demo uses)."""
    texts: list[str] = []

    def walk(obj):
        if isinstance(obj, str):
            texts.append(obj)
        elif isinstance(obj, dict):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)

    for key in ("pretrain", "finetune"):
        walk(json.loads(Path(paths[key]).read_text(encoding="utf-8")))
    for key in ("eval", "self_cognition", "text"):
        for line in Path(paths[key]).read_text(encoding="utf-8").splitlines():
            walk(json.loads(line))
    return texts


# ----------------------------------------------------------------------------------------------------
# workspace

_MARKER = "workspace.json"


def build_demo_workspace(
    out_dir: PathLike,
    seed: int = 0,
    arch: str = "qwen2",
    vision: str = "clip",
    hidden_size: int = 64,
    num_layers: int = 2,
    image_size: int = 32,
    force: bool = False,
    data_sizes: Optional[dict] = None,
    vision_hidden_size: int = 32,
) -> dict:
    """Data + tokenizer + tiny LLM + tiny vision tower in one folder; reused when already complete.

    `workspace.json` (written last) records the paths and the build settings; a folder whose marker is
    missing (interrupted build) or whose settings differ is rebuilt. `data_sizes` passes n_pretrain /
    n_finetune / n_eval / n_text / image_size on to `make_demo_data` (the demo's full run wants more data
    than the fixtures); `vision_hidden_size` is the tiny tower's width.
    """
    out = Path(out_dir)
    settings = {"seed": seed, "arch": arch, "vision": vision, "hidden_size": hidden_size,
                "num_layers": num_layers, "image_size": image_size}
    # Only non-default extras enter the marker, so workspaces built before these options stay valid.
    if data_sizes:
        settings["data_sizes"] = dict(sorted(data_sizes.items()))
    if vision_hidden_size != 32:
        settings["vision_hidden_size"] = vision_hidden_size
    marker = out / _MARKER
    if marker.is_file() and not force:
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            info = {}
        if info.get("settings") == settings and all(Path(p).exists() for p in info.get("paths", {}).values()):
            return info["paths"]
    if marker.exists():
        marker.unlink()
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, str] = dict(make_demo_data(out / "data", seed=seed, **(data_sizes or {})))
    paths["tokenizer"] = build_tokenizer(out / "tokenizer", texts=data_texts(paths))
    paths["llm"] = build_tiny_llm(out / "llm", paths["tokenizer"], arch=arch, hidden_size=hidden_size,
                                  num_layers=num_layers, seed=seed)
    builder = build_tiny_clip if vision == "clip" else build_tiny_siglip
    paths["visual_encoder"] = builder(out / vision, image_size=image_size, hidden_size=vision_hidden_size, seed=seed)
    paths["root"] = str(out)
    fileio.write_json(marker, {"settings": settings, "paths": paths}, indent=1)
    return paths


CORNER_QUESTION = "What colour is the small square?"


def make_corner_data(out_dir: PathLike, seed: int = 0, n_train: int = 160, n_eval: int = 40,
                     tile: int = 32, square: int = 6) -> dict[str, str]:
    """Wide images (tile x 3 tile) with one small coloured square near the left or right end: a question a
    single low-resolution view cannot answer (CLIP's centre crop cuts both ends off; padding to square
    shrinks the square to a pixel or two) and AnyRes tiles can (the demo's AnyRes stages).

    Keys: image_folder, finetune (LLaVA json, one QA turn per image), eval (jsonl {id, image, question, answer}).
    """
    from PIL import Image

    rng = random.Random(seed)
    out = Path(out_dir)
    images = out / "images"
    height, width = tile, 3 * tile
    colours = list(COLOURS)

    def draw(colour: str):
        grey = 235 + rng.randint(-10, 10)
        img = Image.new("RGB", (width, height), (grey, grey, grey))
        # Left or right third only: never inside the centre crop of a pad-mode view.
        x = rng.randint(1, tile - square - 1) + (0 if rng.random() < 0.5 else 2 * tile)
        y = rng.randint(1, height - square - 1)
        img.paste(COLOURS[colour], (x, y, x + square, y + square))
        return img

    def split(name: str, n: int) -> list[tuple[str, str, str]]:
        (images / name).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            colour = colours[(i + rng.randrange(len(colours))) % len(colours)]
            rel = f"{name}/corner_{name}_{i:05d}.png"
            with fileio.atomic_path(images / rel, suffix=".tmp.png") as tmp:
                draw(colour).save(tmp, format="PNG")
            rows.append((f"corner_{name}_{i:05d}", rel, colour))
        return rows

    train = [{"id": i, "image": rel, "conversations": [
        {"from": "human", "value": f"<image>\n{CORNER_QUESTION}"}, {"from": "gpt", "value": c}]}
        for i, rel, c in split("train", n_train)]
    evals = [{"id": i, "image": rel, "question": CORNER_QUESTION, "answer": c} for i, rel, c in split("eval", n_eval)]
    paths = {"image_folder": str(images), "finetune": str(out / "corner_finetune.json"),
             "eval": str(out / "corner_eval.jsonl")}
    fileio.write_json(paths["finetune"], train, indent=1)
    fileio.write_jsonl(paths["eval"], evals)
    return paths
