"""Tiny released-style LLaVA-NeXT / LLaVA-OneVision checkpoints for tests, built with transformers' own classes.

    folder = build_tiny_llava_next(tmp / "next", tokenizer_dir)                         # CLIP + Llama, mistral template
    folder = build_tiny_llava_onevision(tmp / "ov", tokenizer_dir)                      # SigLIP + Qwen2, ChatML template

Each folder is what `save_pretrained` writes for a LlavaNextForConditionalGeneration /
LlavaOnevisionForConditionalGeneration (random weights, fp32) plus its processor (tokenizer with `<image>`
(and `<video>`), image processor, OneVision's video processor, chat template): the layout of the Hub's
llava-hf checkpoints, at a size the CPU runs in milliseconds. Nothing is downloaded; the tokenizer is the
local BPE of `llava_ft.demo.assets.build_tokenizer`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

PathLike = Union[str, Path]

# The released checkpoints' prompt formats, written for content lists as their processors' templates are:
# llava-v1.6-mistral-7b-hf ("<s>[INST] <image>\nQ [/INST] A</s>", the BOS added by the tokenizer) and
# llava-onevision-qwen2-*-ov-hf (ChatML).
MISTRAL_JINJA = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} [/INST]"
    "{% elif message['role'] == 'assistant' %} "
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)
CHATML_JINJA = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}"
    "{% if c['type'] == 'video' %}<video>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tokenizer(tokenizer_dir: PathLike, extra: list, adds_bos: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": list(extra)})
    if adds_bos:  # as Llama/Mistral tokenizers do: BOS comes from the tokenizer, not the chat template
        from tokenizers.processors import TemplateProcessing

        bos = (tok.bos_token, tok.bos_token_id)
        tok._tokenizer.post_processor = TemplateProcessing(single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B",
                                                           special_tokens=[bos])
    return tok


def _vision_config(kind: str, image_size: int, patch_size: int, hidden_size: int, num_layers: int,
                   shape: Optional[dict] = None):
    from transformers import CLIPVisionConfig, SiglipVisionConfig

    cls = CLIPVisionConfig if kind == "clip" else SiglipVisionConfig
    extra = {"projection_dim": hidden_size} if kind == "clip" else {}
    sizes = dict(hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                 num_attention_heads=4) | (shape or {})
    return cls(image_size=image_size, patch_size=patch_size, **extra, **sizes)


def _text_config(arch: str, vocab: int, tok, hidden_size: int = 64, shape: Optional[dict] = None):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[arch]
    sizes = dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=hidden_size * 2, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False) | (shape or {})
    return cls(max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id, **sizes)


def _save(model, processor, out_dir: PathLike) -> str:
    from transformers import GenerationConfig

    from llava_ft import fileio

    tok = processor.tokenizer
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    tmp = fileio.staging_dir(out_dir)
    model.save_pretrained(str(tmp))
    processor.save_pretrained(str(tmp))
    return fileio.publish_dir(tmp, out_dir)


def build_tiny_llava_next(out_dir: PathLike, tokenizer_dir: PathLike, tower: str = "clip", arch: str = "mistral",
                          image_size: int = 32, patch_size: int = 8, feature_layer: int = -2,
                          projector_bias: bool = True, seed: int = 0) -> str:
    """A LlavaNextForConditionalGeneration folder shaped like llava-v1.6-mistral-7b-hf (CLIP, `default`
    strategy, feature layer -2, the five LLaVA-NeXT pinpoints at the tower's size)."""
    import torch
    from transformers import (CLIPImageProcessor, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    from llava_ft.model.anyres import default_grid_pinpoints

    tok = _tokenizer(tokenizer_dir, ["<image>"], adds_bos=True)
    pinpoints = default_grid_pinpoints(image_size)
    vision = _vision_config(tower, image_size, patch_size, 32, 2)
    config = LlavaNextConfig(vision_config=vision.to_dict() | {"model_type": vision.model_type},
                             text_config=_text_config(arch, len(tok), tok).to_dict(),
                             image_token_index=tok.convert_tokens_to_ids("<image>"),
                             vision_feature_select_strategy="default" if tower == "clip" else "full",
                             vision_feature_layer=feature_layer, image_grid_pinpoints=pinpoints,
                             multimodal_projector_bias=projector_bias, projector_hidden_act="gelu")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config).to(torch.float32).eval()
    base = CLIPImageProcessor()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints, image_mean=list(base.image_mean), image_std=list(base.image_std))
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch_size,
                                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                                   chat_template=MISTRAL_JINJA, num_additional_image_tokens=1 if tower == "clip" else 0)
    return _save(model, processor, out_dir)


def build_tiny_llava_onevision(out_dir: PathLike, tokenizer_dir: PathLike, tower: str = "siglip",
                               arch: str = "qwen2", image_size: int = 32, patch_size: int = 8,
                               max_tiles: int = 9, grid: int = 3, seed: int = 0, text_shape: Optional[dict] = None,
                               vision_shape: Optional[dict] = None, dtype: str = "float32") -> str:
    """A LlavaOnevisionForConditionalGeneration folder shaped like llava-onevision-qwen2-0.5b-ov-hf (SigLIP,
    `full` strategy, feature layer -1, pinpoints 1x1 .. grid x grid tiles, vision_aspect_ratio anyres_max_N).
    A small `max_tiles` makes the anyres_max interpolation happen on small images. `text_shape` /
    `vision_shape` override the sizes (benchmarks build real-sized shapes), `dtype` the saved precision."""
    import torch
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor)

    tok = _tokenizer(tokenizer_dir, ["<image>", "<video>", "<|im_start|>", "<|im_end|>"])
    pinpoints = [[r * image_size, c * image_size] for r in range(1, grid + 1) for c in range(1, grid + 1)]
    vision = _vision_config(tower, image_size, patch_size, 32, 2, vision_shape)
    config = LlavaOnevisionConfig(vision_config=vision.to_dict() | {"model_type": vision.model_type},
                                  text_config=_text_config(arch, len(tok), tok, shape=text_shape).to_dict(),
                                  image_token_index=tok.convert_tokens_to_ids("<image>"),
                                  video_token_index=tok.convert_tokens_to_ids("<video>"),
                                  vision_feature_select_strategy="full" if tower == "siglip" else "default",
                                  vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
                                  vision_aspect_ratio=f"anyres_max_{max_tiles}")
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config).to(getattr(torch, dtype)).eval()
    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    image_processor = LlavaOnevisionImageProcessor(size={"height": image_size, "width": image_size},
                                                   image_grid_pinpoints=pinpoints, image_mean=mean, image_std=std)
    video_processor = LlavaOnevisionVideoProcessor(size={"height": image_size, "width": image_size},
                                                   image_mean=mean, image_std=std)
    tokens = (image_size // patch_size) ** 2
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tok, video_processor=video_processor,
                                        num_image_tokens=tokens,
                                        vision_feature_select_strategy=config.vision_feature_select_strategy,
                                        chat_template=CHATML_JINJA, vision_aspect_ratio=config.vision_aspect_ratio)
    return _save(model, processor, out_dir)


def write_test_video(path: PathLike, frames: int = 6, size: tuple = (48, 40), seed: int = 0) -> str:
    """A short clip written with PyAV (MPEG-4 part 2, which every FFmpeg build encodes): a coloured square
    moving across `frames` frames of (width, height) `size`."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    width, height = size
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            img = np.full((height, width, 3), rng.integers(0, 255, 3), dtype=np.uint8)
            x = (i * 7) % max(1, width - 12)
            img[10:22, x:x + 12] = (250, 30, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)
