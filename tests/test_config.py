"""Config schema behaviour users rely on: key=value overrides, errors naming key/allowed values/closest
match before any model loads, resolved config saved, and every shipped text recipe loads and documents
its command."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from llava_ft.config import CONFIG_ROOT, list_configs, load_config, save_config
from llava_ft.errors import UserError

TEXT_RECIPES = [p for p in CONFIG_ROOT.rglob("*.yaml") if p.parent.name not in ("llava", "demo", "deepspeed")]


def _write(tmp_path: Path, body: dict) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return str(path)


BASE = {"model": {"llm": "some/model"}, "data": {"sources": [{"path": "d.jsonl"}]}}


def test_override_sets_nested_values_with_yaml_types(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["train.learning_rate=1e-4", "model.llm_lora.enabled=true",
                                               "data.sources.0.format=alpaca", "train.max_steps=7"])
    assert cfg.train.learning_rate == pytest.approx(1e-4)
    assert cfg.model.llm_lora.enabled is True
    assert cfg.data.sources[0].format == "alpaca"
    assert cfg.train.max_steps == 7
    assert cfg.name == "recipe"


def test_unknown_key_names_key_and_closest_match(tmp_path):
    body = dict(BASE, train={"learning_rat": 1e-4})
    with pytest.raises(UserError) as err:
        load_config(_write(tmp_path, body))
    msg = str(err.value)
    assert "train.learning_rat" in msg and "Did you mean 'learning_rate'" in msg and "recipe.yaml" in msg


def test_unknown_key_via_override(tmp_path):
    with pytest.raises(UserError, match="Did you mean 'gradient_accumulation_steps'"):
        load_config(_write(tmp_path, BASE), ["train.gradient_acumulation_steps=4"])


def test_bad_enum_value_lists_allowed_values(tmp_path):
    with pytest.raises(UserError) as err:
        load_config(_write(tmp_path, BASE), ["model.quantization=4bits"])
    msg = str(err.value)
    assert "model.quantization" in msg and "none, 4bit, 8bit" in msg and "Did you mean '4bit'" in msg


def test_bad_type_and_bad_template(tmp_path):
    with pytest.raises(UserError, match="'train.max_steps' must be an integer"):
        load_config(_write(tmp_path, BASE), ["train.max_steps=ten"])
    with pytest.raises(UserError, match="Did you mean 'qwen_chat'"):
        load_config(_write(tmp_path, BASE), ["data.template=qwen_chatt"])


def test_loss_chunk_tokens(tmp_path):
    assert load_config(_write(tmp_path, BASE)).train.loss_chunk_tokens > 0  # chunked by default
    assert load_config(_write(tmp_path, BASE), ["train.loss_chunk_tokens=0"]).train.loss_chunk_tokens == 0
    with pytest.raises(UserError, match="'train.loss_chunk_tokens' must be >= 0"):
        load_config(_write(tmp_path, BASE), ["train.loss_chunk_tokens=-1"])


def test_full_training_of_quantized_model_is_refused(tmp_path):
    with pytest.raises(UserError, match="llm_lora.enabled=true"):
        load_config(_write(tmp_path, BASE), ["model.quantization=4bit"])


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["train.seed=7"])
    out = tmp_path / "wd" / "config.yaml"
    save_config(cfg, out)
    again = load_config(str(out))
    assert again.train.seed == 7 and again.model == cfg.model and again.data == cfg.data


@pytest.mark.parametrize("path", TEXT_RECIPES, ids=lambda p: p.stem)
def test_text_recipe_loads_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first.startswith("# llava_ft train ") and path.stem in first
    cfg = load_config(str(path))
    assert cfg.model.llm and cfg.data.sources


def test_required_recipes_are_shipped():
    names = list_configs()
    for model in ("internlm2_chat_1_8b", "internlm2_chat_7b", "qwen2_5_0_5b_instruct", "qwen2_5_1_5b_instruct",
                  "qwen2_5_7b_instruct", "llama3_1_8b_instruct"):
        for data in ("alpaca", "openai"):
            assert f"{model}_qlora_{data}_e3" in names
    full = [n for n in names if "_full_" in n and not n.startswith("llava")]
    phases = {load_config(n).resolved_phase for n in full}
    assert {"sft", "incremental_pretrain"} <= phases
    qlora = load_config("qwen2_5_7b_instruct_qlora_alpaca_e3")
    assert (qlora.model.quantization, qlora.model.llm_lora.r, qlora.model.llm_lora.alpha) == ("4bit", 64, 16)
    assert qlora.train.learning_rate == pytest.approx(2e-4) and qlora.train.gradient_accumulation_steps == 16


def test_absolute_warmup_steps_reach_training_arguments(tmp_path):
    """train.warmup_steps is an absolute count (transformers reads a float < 1 as a ratio, an int >= 1 as
    steps); train.warmup_ratio stays the default; setting both to different effects is refused."""
    from llava_ft.engine.run import training_arguments

    ratio = load_config(_write(tmp_path, BASE), ["train.warmup_ratio=0.1"])
    assert training_arguments(ratio, str(tmp_path / "a"), None).get_warmup_steps(1000) == 100
    steps = load_config(_write(tmp_path, BASE), ["train.warmup_steps=7"])
    assert steps.train.warmup_steps == 7
    assert training_arguments(steps, str(tmp_path / "b"), None).get_warmup_steps(1000) == 7
    off = load_config(_write(tmp_path, BASE), ["train.warmup_steps=0", "train.warmup_ratio=0"])
    assert training_arguments(off, str(tmp_path / "c"), None).get_warmup_steps(1000) == 0
    with pytest.raises(UserError, match=r"'train.warmup_steps' .* 'train.warmup_ratio' .*one of them"):
        load_config(_write(tmp_path, BASE), ["train.warmup_steps=7", "train.warmup_ratio=0.1"])
    with pytest.raises(UserError, match=r"'train.warmup_steps' must be an integer >= 0"):
        load_config(_write(tmp_path, BASE), ["train.warmup_steps=-3"])
    with pytest.raises(UserError, match=r"trainer_args.warmup_steps' is set by llava_ft; use train.warmup_steps"):
        load_config(_write(tmp_path, BASE), ["train.trainer_args={warmup_steps: 7}"])
