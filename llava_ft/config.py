"""Typed run configuration: dataclass schema, YAML loading, `a.b=value` overrides, validation.

A recipe is a YAML file with four sections (model, data, train, evaluation) plus optional `name` and
`phase`. Load one with:

    cfg = load_config("configs/demo/tiny_text_sft_qlora.yaml", overrides=["train.learning_rate=1e-4"])

Every key is checked against the dataclasses below before any model loads: an unknown key, or a value
outside its allowed set, raises `UserError` naming the key, the allowed values and the closest match.
`save_config(cfg, path)` writes the resolved config (what the run really used) into the work dir.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from llava_ft.errors import UserError
from llava_ft.fileio import write_text

# Where the built-in recipes live: the package's `recipes/` folder, which is the repository's `configs/`
# (llava_ft/recipes is a link to ../configs in the checkout; the wheel holds the files themselves, see
# pyproject.toml). Resolved, so that in a checkout messages name configs/... as users browse it.
# `llava_ft list-cfg`, recipe names and `--deepspeed zero2` read this folder.
CONFIG_ROOT = (Path(__file__).parent / "recipes").resolve()

DATA_FORMATS = ("auto", "openai", "alpaca", "sharegpt", "llava", "oasst1", "text")
# Preference pair formats (llava_ft.data.preference); `auto` detects them too when the records are pairs.
PAIR_FORMATS = ("trl", "xtuner", "rlaif_v", "sharegpt_pairwise", "alpaca_pairwise")
QUANTIZATIONS = ("none", "4bit", "8bit")
DTYPES = ("auto", "bf16", "fp16", "fp32")
ATTN_IMPLS = ("auto", "sdpa", "eager", "flash_attention_2")
VISION_TYPES = ("auto", "clip", "siglip", "open_clip")
IMAGE_ASPECTS = ("pad", "anyres")
PHASES = ("auto", "sft", "incremental_pretrain", "pretrain", "finetune", "preference")
PREFERENCE_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "orpo", "simpo")
PREFERENCE_REFERENCES = ("auto", "adapter", "copy", "precompute", "none")
TRUNCATIONS = ("drop", "cut_text")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")


@dataclass
class LoraSettings:
    """LoRA adapter settings (peft.LoraConfig). `target_modules: all-linear` = every Linear but lm_head."""

    enabled: bool = False
    r: int = 64
    alpha: int = 16
    dropout: float = 0.1
    target_modules: Union[str, list] = "all-linear"


@dataclass
class ModelConfig:
    llm: str = ""  # hub id or local folder of an AutoModelForCausalLM
    tokenizer: Optional[str] = None  # defaults to `llm`
    dtype: str = "auto"  # auto: bf16 where the GPU supports it, fp16 on older GPUs, fp32 on CPU (llm.dtype_choice)
    quantization: str = "none"  # 4bit = NF4 + double quant (QLoRA)
    attn_implementation: str = "auto"  # auto: flash_attention_2 if installed on a GPU, else sdpa (eager if unsupported)
    trust_remote_code: bool = False  # run a model folder's own Python code (auto_map); InternLM2 never needs it
    gradient_checkpointing: bool = False
    freeze_llm: bool = False  # true: LLM weights never train (LoRA, if enabled, still does)
    llm_lora: LoraSettings = field(default_factory=LoraSettings)
    # --- LLaVA only (visual_encoder set) ---
    visual_encoder: Optional[str] = None  # HF id/folder, or an open_clip architecture name
    visual_encoder_type: str = "auto"  # auto reads the folder's config.json (never the folder name)
    open_clip_pretrained: Optional[str] = None  # open_clip pretrained tag or checkpoint path
    visual_select_layer: int = -2
    projector_depth: int = 2
    freeze_visual_encoder: bool = True
    visual_encoder_lora: LoraSettings = field(
        default_factory=lambda: LoraSettings(enabled=False, r=64, alpha=16, dropout=0.05)
    )
    pretrained_pth: Optional[str] = None  # iter_N.pth of a pretrain run (projector weights)
    # pad: one tower-sized view per image (LLaVA-1.5). anyres: LLaVA-NeXT tiles from image_grid_pinpoints
    # (default: LLaVA-NeXT's, scaled to the tower) + an overview, and a learned newline per feature row.
    image_aspect: str = "pad"
    image_grid_pinpoints: Optional[list] = None  # [[height, width], ...], multiples of the tower's input
    max_image_tiles: Optional[int] = None  # drop pinpoints needing more tiles than this
    # A released LlavaForConditionalGeneration (folder or hub id): LLM, tower, projector, tokenizer and
    # processor settings all come from it (model.llm / visual_encoder / visual_select_layer are then ignored).
    llava: Optional[str] = None


@dataclass
class DataSource:
    # .json / .jsonl / .parquet file, a `datasets.save_to_disk` folder, a folder of data files
    # (parquet/json/csv, read by datasets.load_dataset) or a Hub dataset id (llava_ft.data.hub)
    path: str = ""
    format: str = "auto"  # auto detects from the columns / first record's keys (and logs its choice)
    image_folder: Optional[str] = None  # LLaVA: image paths are relative to this
    repeat: int = 1  # use this source N times per epoch
    # --- Hub ids and data folders (passed to datasets.load_dataset) ---
    split: Optional[str] = None  # default: train (or the only split)
    subset: Optional[str] = None  # the dataset's configuration name (load_dataset's `name`)
    name: Optional[str] = None  # alias of `subset`
    data_files: Union[str, list, dict, None] = None
    revision: Optional[str] = None  # branch, tag or commit of a Hub dataset
    columns: dict = field(default_factory=dict)  # llava_ft name -> the dataset's column, e.g. {messages: conversations}


@dataclass
class DataConfig:
    sources: list = field(default_factory=list)  # list[DataSource]
    template: str = "default"  # prompt template name (llava_ft.templates), or `hf`
    system: Optional[str] = None  # system prompt; None = the template's default (if any)
    max_length: int = 2048
    pack_to_max_length: bool = False
    pad_image_to_square: bool = False
    skip_bad_samples: bool = False  # true: bad samples/images are warned about and counted, not fatal
    video_frames: int = 8  # frames sampled uniformly from a `"video"` clip (released LLaVA-OneVision runs)
    truncation: str = "drop"  # image samples too long: drop them, or cut text after the last image
    num_proc: int = 1  # processes for tokenization
    cache_dir: Optional[str] = None  # default: ~/.cache/llava_ft/datasets (LLAVA_FT_CACHE overrides)
    shuffle_before_pack: bool = True
    # Validation loss (llava_ft.engine.validation): held-out sources, or a fraction of the training samples
    val_sources: list = field(default_factory=list)  # list[DataSource], same schema as sources
    val_split: float = 0.0  # e.g. 0.02: that share of the samples, held out deterministically by train.seed


@dataclass
class TrainConfig:
    learning_rate: float = 2e-4
    projector_lr: Optional[float] = None  # None: learning_rate
    visual_encoder_lr: Optional[float] = None  # None: learning_rate
    per_device_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    num_epochs: float = 1.0
    max_steps: int = -1  # >0 overrides num_epochs
    warmup_ratio: float = 0.03
    warmup_steps: Optional[int] = None  # an absolute warmup length in optimizer steps, instead of warmup_ratio
    lr_scheduler: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int = 3  # stop after this many consecutive NaN/inf loss or grad-norm steps (0: guard off)
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    seed: int = 42
    group_by_length: bool = True
    # Length-grouped megabatch = world_size x batch x grad_accum x this. Larger groups sort more samples
    # together: 16 gives ~0.9 % padding on a LLaVA-mix-665K-like mix at batch 16 x 8 GPUs (1 gives 13.7 %);
    # see benchmarks/bench_sampler.py.
    length_group_multiplier: int = 16
    dataloader_num_workers: int = 0
    # Experiment tracking: none | tensorboard | wandb | mlflow | ... (transformers' integrations), or a list
    report_to: Union[str, list] = "none"
    # Any further transformers.TrainingArguments field (optim, torch_compile, neftune_noise_alpha, ...);
    # checked against TrainingArguments when the config loads (llava_ft.trainer_args)
    trainer_args: dict = field(default_factory=dict)
    keep_best: Optional[str] = None  # eval_loss: keep the best iter_N.pth as best_iter.pth (needs validation data)
    # The LM head + loss run only at supervised positions, this many rows at a time (llava_ft.model.lm_loss):
    # one [chunk, vocab] block of logits at a time instead of [batch, length, vocab]; 0: transformers' own
    # forward (logits at every position). Default from benchmarks/bench_memory.py (see the README).
    loss_chunk_tokens: int = 256


@dataclass
class EvalConfig:
    """Prompts answered every `every_n_steps` steps and at the end -> eval_outputs_iter_<step>.txt."""

    prompts: list = field(default_factory=list)
    images: list = field(default_factory=list)  # LLaVA: one image per prompt (or one for all)
    every_n_steps: int = 500
    max_new_tokens: int = 64


@dataclass
class PreferenceConfig:
    """Preference training (DPO family, ORPO, SimPO) after SFT: on when `loss` is set (phase `preference`).

    loss: sigmoid (DPO) | ipo | hinge | robust (label-smoothed DPO, with `label_smoothing`) | orpo | simpo
    (orpo and simpo need no reference model). reference: auto (the starting policy: adapter switched off /
    the SFT adapter frozen under LoRA, a frozen copy for full fine-tunes) | adapter | copy | precompute
    (reference log-probs computed once before training, no reference held) | none (reference-free losses).
    """

    loss: Optional[str] = None  # None: not a preference run
    beta: float = 0.1
    label_smoothing: float = 0.0  # robust / conservative DPO
    sft_weight: float = 0.0  # weight of an SFT (NLL) term on the chosen answer (LLaVA-NeXT's dpo_alpha, pref_ftx)
    simpo_gamma: float = 0.5  # SimPO's target reward margin gamma: -log sigmoid(beta * (mean logp chosen - rejected) - gamma)
    reference: str = "auto"
    max_prompt_length: Optional[int] = None  # None: max_length // 2; prompts are cut from the left


@dataclass
class Config:
    name: str = ""  # default: the YAML file's stem; work dir = work_dirs/<name>
    phase: str = "auto"  # auto: derived (see `resolved_phase`)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluation: EvalConfig = field(default_factory=EvalConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)
    source_path: Optional[str] = None  # where it was loaded from (set by load_config)

    @property
    def is_llava(self) -> bool:
        return bool(self.model.visual_encoder or self.model.llava)

    @property
    def resolved_phase(self) -> str:
        """sft | incremental_pretrain | pretrain | finetune | preference, from `phase` or the model/data settings."""
        if self.phase != "auto":
            return self.phase
        if self.preference.loss:
            return "preference"
        if self.is_llava:
            m = self.model
            only_projector = (m.freeze_llm and not m.llm_lora.enabled and m.freeze_visual_encoder
                              and not m.visual_encoder_lora.enabled)
            return "pretrain" if only_projector else "finetune"
        if self.data.sources and all(as_data_source(s).format == "text" for s in self.data.sources):
            return "incremental_pretrain"
        return "sft"


# Allowed values per dotted key (validated after loading and after every override).
CHOICES: dict[str, tuple] = {
    "model.dtype": DTYPES,
    "model.quantization": QUANTIZATIONS,
    "model.attn_implementation": ATTN_IMPLS,
    "model.visual_encoder_type": VISION_TYPES,
    "model.image_aspect": IMAGE_ASPECTS,
    "data.truncation": TRUNCATIONS,
    "train.lr_scheduler": SCHEDULERS,
    "phase": PHASES,
    "preference.loss": PREFERENCE_LOSSES,
    "preference.reference": PREFERENCE_REFERENCES,
}


def as_data_source(s: Any) -> DataSource:
    """An entry of `data.sources` as a DataSource (entries may still be plain dicts from YAML)."""
    return s if isinstance(s, DataSource) else DataSource(**s)


def _closest(word: str, options) -> str:
    match = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.4)
    return f" Did you mean '{match[0]}'?" if match else ""


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, annotation: Any, key: str, where: str) -> Any:
    """Convert a YAML value to the annotated type, or raise a UserError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, where)
            except UserError as err:
                errors.append(str(err))
        raise UserError(errors[0] if errors else f"{where}: bad value for '{key}': {value!r}")
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise UserError(f"{where}: '{key}' must be a mapping of {annotation.__name__} keys, got {value!r}")
        return _build(annotation, value, key + ".", where)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"{where}: '{key}' must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise UserError(f"{where}: '{key}' must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise UserError(f"{where}: '{key}' must be an integer, got {value!r}") from None
        if as_float != int(as_float):
            raise UserError(f"{where}: '{key}' must be an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        try:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError):
            raise UserError(f"{where}: '{key}' must be a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise UserError(f"{where}: '{key}' must be a string, got {value!r}")
        return str(value)
    if annotation is list or origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}: '{key}' must be a list, got {value!r}")
        return list(value)
    return value


def _build(cls, raw: dict, prefix: str, where: str):
    types = _field_types(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in types or key == "source_path":
            raise UserError(
                f"{where}: unknown key '{prefix}{key}'.{_closest(key, types)} "
                f"Valid keys under '{prefix.rstrip('.') or 'top level'}': {', '.join(k for k in types if k != 'source_path')}"
            )
        kwargs[key] = _coerce(value, types[key], prefix + key, where)
    obj = cls(**kwargs)
    if cls is DataConfig:
        for attr in ("sources", "val_sources"):
            setattr(obj, attr, [
                _build(DataSource, s, f"data.{attr}.{i}.", where) if isinstance(s, dict)
                else _coerce(s, DataSource, f"data.{attr}.{i}", where)
                for i, s in enumerate(getattr(obj, attr))
            ])
    return obj


def _validate(cfg: Config, where: str) -> None:
    if cfg.preference.loss == "dpo":  # the name users know for DPO's sigmoid loss
        cfg.preference.loss = "sigmoid"
    for dotted, allowed in CHOICES.items():
        value = _get(cfg, dotted)
        if value is None and dotted == "preference.loss":  # unset: not a preference run
            continue
        if value not in allowed:
            raise UserError(
                f"{where}: '{dotted}' is {value!r}; allowed: {', '.join(allowed)}.{_closest(value, allowed)}"
            )
    for attr in ("sources", "val_sources"):
        for i, src in enumerate(getattr(cfg.data, attr)):
            _validate_source(src, f"data.{attr}.{i}", where)
    _validate_preference(cfg, where)
    if not 0 <= cfg.data.val_split < 1:
        raise UserError(f"{where}: 'data.val_split' must be in [0, 1) (e.g. 0.02), got {cfg.data.val_split}")
    if cfg.data.val_split and cfg.data.val_sources:
        raise UserError(f"{where}: set either data.val_sources or data.val_split, not both")
    if cfg.train.keep_best not in (None, "none", "eval_loss"):
        raise UserError(f"{where}: 'train.keep_best' is {cfg.train.keep_best!r}; allowed: eval_loss (or leave it unset)")
    if cfg.train.keep_best == "eval_loss" and not (cfg.data.val_sources or cfg.data.val_split):
        raise UserError(f"{where}: train.keep_best=eval_loss needs validation data; set data.val_sources or "
                        "data.val_split (e.g. 0.02)")
    from llava_ft.trainer_args import check_train_settings  # local import: it imports transformers lazily

    check_train_settings(cfg.train, where)
    from llava_ft.templates import ALIASES, TEMPLATES  # local import: templates import nothing from config

    names = list(TEMPLATES) + list(ALIASES) + ["hf"]  # XTuner spellings (phi3_chat, ...) are accepted too
    if cfg.data.template not in names:
        raise UserError(
            f"{where}: 'data.template' is {cfg.data.template!r}; allowed: {', '.join(names)}."
            f"{_closest(cfg.data.template, names)}"
        )
    positive = {
        "data.max_length": cfg.data.max_length,
        "data.video_frames": cfg.data.video_frames,
        "train.per_device_batch_size": cfg.train.per_device_batch_size,
        "train.gradient_accumulation_steps": cfg.train.gradient_accumulation_steps,
        "train.save_steps": cfg.train.save_steps,
        "train.logging_steps": cfg.train.logging_steps,
        "model.projector_depth": cfg.model.projector_depth,
        "evaluation.every_n_steps": cfg.evaluation.every_n_steps,
        "train.length_group_multiplier": cfg.train.length_group_multiplier,
    }
    for key, value in positive.items():
        if value <= 0:
            raise UserError(f"{where}: '{key}' must be > 0, got {value}")
    if cfg.train.loss_chunk_tokens < 0:
        raise UserError(f"{where}: 'train.loss_chunk_tokens' must be >= 0 (0: logits at every position, "
                        f"transformers' own loss), got {cfg.train.loss_chunk_tokens}")
    if cfg.train.max_nonfinite_steps < 0:
        raise UserError(f"{where}: 'train.max_nonfinite_steps' must be >= 0 (0 turns the NaN guard off), "
                        f"got {cfg.train.max_nonfinite_steps}")
    if cfg.train.learning_rate <= 0:
        raise UserError(f"{where}: 'train.learning_rate' must be > 0, got {cfg.train.learning_rate}")
    if not 0 <= cfg.train.warmup_ratio < 1:
        raise UserError(f"{where}: 'train.warmup_ratio' must be in [0, 1), got {cfg.train.warmup_ratio}")
    steps = cfg.train.warmup_steps
    if steps is not None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise UserError(f"{where}: 'train.warmup_steps' must be an integer >= 0 (optimizer steps), got {steps!r}")
        if cfg.train.warmup_ratio not in (0, TrainConfig.warmup_ratio):
            raise UserError(f"{where}: 'train.warmup_steps' ({steps}) and 'train.warmup_ratio' "
                            f"({cfg.train.warmup_ratio}) both set the warmup; set one of them "
                            "(train.warmup_ratio=0 with train.warmup_steps, or remove train.warmup_steps)")
    if cfg.model.image_aspect == "anyres" and cfg.data.pad_image_to_square:
        raise UserError(f"{where}: 'data.pad_image_to_square' does not apply with model.image_aspect=anyres "
                        "(AnyRes keeps the aspect ratio by tiling); set one of them")
    if cfg.model.max_image_tiles is not None and cfg.model.max_image_tiles <= 0:
        raise UserError(f"{where}: 'model.max_image_tiles' must be > 0, got {cfg.model.max_image_tiles}")
    if cfg.model.llava:
        # model.llava (a released LLaVA) brings its own trained 2-layer projector.
        if cfg.model.pretrained_pth:
            raise UserError(f"{where}: model.llava already brings a trained projector; remove model.pretrained_pth "
                            "(a pretrain checkpoint) or model.llava")
        if cfg.model.image_aspect != "pad":
            raise UserError(f"{where}: model.llava continues a LLaVA-1.5 style checkpoint (one view per image); "
                            "model.image_aspect=anyres needs a tower and projector trained for it, so start from "
                            "model.llm + model.visual_encoder instead")
        if cfg.model.projector_depth != 2:
            raise UserError(f"{where}: model.llava checkpoints have transformers' 2-layer projector "
                            f"(Linear-GELU-Linear); model.projector_depth is {cfg.model.projector_depth}, set it to 2")
    if cfg.model.quantization != "none" and not cfg.model.llm_lora.enabled and not cfg.model.freeze_llm:
        raise UserError(
            f"{where}: a {cfg.model.quantization} LLM cannot be trained fully; set model.llm_lora.enabled=true "
            "(QLoRA) or model.freeze_llm=true (e.g. LLaVA pretrain), or model.quantization=none for full training"
        )


def _validate_preference(cfg: Config, where: str) -> None:
    p = cfg.preference
    if p.loss is None:
        if cfg.phase == "preference":
            raise UserError(f"{where}: phase 'preference' needs preference.loss (one of "
                            f"{', '.join(PREFERENCE_LOSSES)}; dpo = sigmoid)")
        return
    if p.beta <= 0:
        raise UserError(f"{where}: 'preference.beta' must be > 0, got {p.beta}")
    if p.label_smoothing and p.loss != "robust":
        raise UserError(f"{where}: 'preference.label_smoothing' applies to preference.loss=robust only "
                        f"(got loss {p.loss}); set the loss to robust or the smoothing to 0")
    if not 0 <= p.label_smoothing < 0.5:
        raise UserError(f"{where}: 'preference.label_smoothing' must be in [0, 0.5), got {p.label_smoothing}")
    if p.sft_weight < 0:
        raise UserError(f"{where}: 'preference.sft_weight' must be >= 0, got {p.sft_weight}")
    if p.max_prompt_length is not None and not 0 < p.max_prompt_length < cfg.data.max_length:
        raise UserError(f"{where}: 'preference.max_prompt_length' must be > 0 and below data.max_length "
                        f"({cfg.data.max_length}), got {p.max_prompt_length}")
    reference_free = p.loss in ("orpo", "simpo")
    if reference_free and p.reference not in ("auto", "none"):
        raise UserError(f"{where}: preference.loss={p.loss} uses no reference model; remove "
                        f"preference.reference={p.reference} (or set it to none)")
    if not reference_free and p.reference == "none":
        raise UserError(f"{where}: preference.loss={p.loss} needs a reference; set preference.reference to auto, "
                        "adapter, copy or precompute (or use loss orpo / simpo)")
    if p.reference == "adapter" and not cfg.model.llm_lora.enabled:
        raise UserError(f"{where}: preference.reference=adapter needs LoRA (model.llm_lora.enabled=true); a full "
                        "fine-tune uses reference copy or precompute")


def _validate_source(src: DataSource, key: str, where: str) -> None:
    if src.format not in DATA_FORMATS + PAIR_FORMATS:
        raise UserError(
            f"{where}: '{key}.format' is {src.format!r}; allowed: {', '.join(DATA_FORMATS + PAIR_FORMATS)}."
            f"{_closest(src.format, DATA_FORMATS + PAIR_FORMATS)}"
        )
    if not src.path:
        raise UserError(f"{where}: '{key}.path' is empty; set it to a .json/.jsonl/.parquet file, a dataset "
                        "folder or a Hub dataset id")
    if src.repeat < 1:
        raise UserError(f"{where}: '{key}.repeat' must be >= 1, got {src.repeat}")
    if src.subset and src.name and src.subset != src.name:
        raise UserError(f"{where}: '{key}' sets both subset ({src.subset!r}) and name ({src.name!r}); "
                        "they are the same setting, keep one")
    if not isinstance(src.columns, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in src.columns.items()):
        raise UserError(f"{where}: '{key}.columns' must map llava_ft names to the dataset's column names, "
                        f"e.g. {{messages: conversations, images: image}}; got {src.columns!r}")


def _get(cfg: Any, dotted: str) -> Any:
    obj = cfg
    for part in dotted.split("."):
        obj = obj[int(part)] if isinstance(obj, list) else getattr(obj, part)
    return obj


def apply_override(raw: dict, override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a raw config dict in place."""
    if "=" not in override:
        raise UserError(f"override '{override}' must look like section.key=value (e.g. train.learning_rate=1e-4)")
    dotted, text = override.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    parts = dotted.strip().split(".")
    node: Any = raw
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise UserError(f"override '{override}': '{'.'.join(parts[:depth + 1])}' is not a valid list index")
            node = node[int(part)]
        else:
            node = node.setdefault(part, {})
            if node is None:
                node = {}
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"override '{override}': '{last}' is not a valid list index")
        node[int(last)] = value
    else:
        node[last] = value


def config_from_dict(raw: dict, where: str = "config") -> Config:
    """Build and validate a Config from a plain dict (as loaded from YAML)."""
    raw = copy.deepcopy(raw or {})
    if not isinstance(raw, dict):
        raise UserError(f"{where}: the top level must be a mapping with model/data/train/evaluation sections")
    cfg = _build(Config, raw, "", where)
    _validate(cfg, where)
    return cfg


def resolve_config_path(path_or_name: str) -> Path:
    """A path to a YAML file, or the name of a built-in recipe (as `list-cfg` prints it)."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    for candidate in CONFIG_ROOT.rglob("*.yaml"):
        if candidate.stem == path_or_name or candidate.stem == path.stem and not path.exists():
            return candidate
    names = [p.stem for p in CONFIG_ROOT.rglob("*.yaml")]
    raise UserError(
        f"config '{path_or_name}' not found: no such file and no built-in recipe of that name."
        f"{_closest(path.stem, names)} Run `llava_ft list-cfg` to see the recipes."
    )


def load_config(path_or_name: str, overrides: Optional[list] = None) -> Config:
    """Load a YAML recipe (file path or built-in name), apply overrides, validate."""
    from llava_ft.utf8 import decode_utf8

    path = resolve_config_path(path_or_name)
    try:
        raw = yaml.safe_load(decode_utf8(path.read_bytes(), path)) or {}  # not the locale's encoding
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML: {err}") from None
    for override in overrides or []:
        apply_override(raw, override)
    cfg = config_from_dict(raw, where=str(path))
    if not cfg.name:
        cfg.name = path.stem
    cfg.source_path = str(path)
    return cfg


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (`name` or `org/name`): absolute, ./ or ~, or nested deeper."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1
            or os.sep != "/" and os.sep in name)


def check_model_paths(cfg: Config, where: str = "config") -> None:
    """Every local path of the model section exists: run before the data pass (training reads all the data
    first), so a mistyped folder fails in seconds, naming its key. Only what is unmistakably a path is
    checked: hub ids (org/name) and open_clip names (ViT-L-14-336) are resolved when the model loads."""
    m = cfg.model
    keys = [("model.llm", m.llm), ("model.tokenizer", m.tokenizer), ("model.llava", m.llava),
            ("model.visual_encoder", m.visual_encoder), ("model.open_clip_pretrained", m.open_clip_pretrained)]
    for key, value in keys:
        if not value:
            continue
        value = str(value)
        if key == "model.visual_encoder" and value.startswith(("hf-hub:", "local-dir:")):
            if not value.startswith("local-dir:"):
                continue
            value = value[len("local-dir:"):]  # open_clip's reference to a local folder
        elif key == "model.open_clip_pretrained" and not (looks_like_path(value) or Path(value).suffix):
            continue  # a pretrained tag (openai, laion2b_s32b_b82k), not a file
        elif not looks_like_path(value):
            continue
        if not os.path.exists(os.path.expanduser(value)):
            raise UserError(f"{where}: '{key}' path {value} does not exist; check the path (a Hugging Face hub "
                            "id is written org/name)")
    if m.pretrained_pth and not os.path.exists(os.path.expanduser(str(m.pretrained_pth))):
        raise UserError(f"{where}: 'model.pretrained_pth' path {m.pretrained_pth} does not exist; give the "
                        "pretrain run's work dir or one of its iter_N.pth files")


def config_to_dict(cfg: Config) -> dict:
    out = dataclasses.asdict(cfg)
    out.pop("source_path", None)
    return out


def save_config(cfg: Config, path: Union[str, os.PathLike]) -> None:
    """Write the resolved config as YAML (atomically)."""
    write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def list_configs(pattern: Optional[str] = None) -> list[str]:
    """Names of built-in recipes whose name contains `pattern` (case-insensitive)."""
    names = sorted(p.stem for p in CONFIG_ROOT.rglob("*.yaml"))
    if pattern:
        names = [n for n in names if pattern.lower() in n.lower()]
    return names
