"""Model cards (README.md) for every folder `llava_ft convert` writes.

    facts = run_facts(cfg, "work_dirs/x/iter_500.pth", step=500)   # what the run was, read from its work dir
    write_model_card(out_dir, facts, export="peft_adapter")         # README.md with Hub metadata + a summary

The card says what a user of the export needs to know: base model(s), vision tower, prompt template (and
whether `apply_chat_template` gives the training ids), data sources and their sizes, recipe, steps, final
training loss, eval loss / eval answers when the run logged them, and the commands that trained and
exported it. The facts come from the checkpoint's config and the files of its work dir
(`run_info.json` written at training start: command and data counts; `train_log.jsonl`;
`eval_outputs_iter_<step>.txt`), and are stored in `llava_ft.json` under `card`, so `convert merge` can
write the merged folder's card from the adapter's facts. The Hub metadata block is written by
huggingface_hub's ModelCardData (the format the Hub reads).
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Optional

RUN_INFO = "run_info.json"  # written in the work dir by run_training (command, data counts)
_EVAL_CHARS = 2000  # eval answers shown in the card at most (the full file stays in the work dir)


def current_command() -> str:
    """The command line of this process, as a user would type it again."""
    argv = list(sys.argv)
    if argv:
        exe = Path(argv[0])
        if exe.name == "llava_ft" or (exe.name == "__main__.py" and exe.parent.name == "llava_ft"):
            argv[0] = "llava_ft"  # the console script or `python -m llava_ft`
    return shlex.join(argv)


def run_info(command: str, data_stats: dict) -> dict:
    """The `run_info.json` record run_training writes: how the run was started and what data it saw."""
    keep = ("records", "samples", "tokens", "dropped_total", "sources")
    return {"command": command, "data": {k: data_stats[k] for k in keep if k in data_stats}}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def _log_rows(work_dir: Path, step: Optional[int]) -> list:
    rows = []
    path = work_dir / "train_log.jsonl"
    if not path.is_file():
        return rows
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if step is None or row.get("step", 0) <= step:
            rows.append(row)
    return rows


def _last(rows: list, key: str):
    for row in reversed(rows):
        if row.get(key) is not None:
            return row[key], row.get("step")
    return None, None


def run_facts(cfg, pth, step: Optional[int]) -> dict:
    """Everything the card shows about the run that produced `pth` (see module docstring)."""
    work_dir = Path(pth).parent
    info = _read_json(work_dir / RUN_INFO)
    rows = _log_rows(work_dir, step)
    loss, loss_step = _last(rows, "loss")
    eval_loss, eval_step = _last(rows, "eval_loss")
    m = cfg.model
    sources = (info.get("data") or {}).get("sources") or [
        {"path": getattr(s, "path", None) or (s.get("path") if isinstance(s, dict) else str(s))}
        for s in cfg.data.sources]
    evals = work_dir / f"eval_outputs_iter_{step}.txt"
    facts = {
        "recipe": cfg.name or None, "config": cfg.source_path, "phase": cfg.resolved_phase,
        "llm": m.llm, "llava": getattr(m, "llava", None), "visual_encoder": m.visual_encoder,
        "quantization": m.quantization,
        "llm_lora": {"r": m.llm_lora.r, "alpha": m.llm_lora.alpha} if m.llm_lora.enabled else None,
        "llm_trained": "lora" if m.llm_lora.enabled else ("frozen" if m.freeze_llm else "full"),
        "template": cfg.data.template, "system": cfg.data.system, "max_length": cfg.data.max_length,
        "data": {"sources": sources, **{k: v for k, v in (info.get("data") or {}).items() if k != "sources"}},
        "step": step, "final_loss": loss, "final_loss_step": loss_step,
        "eval_loss": eval_loss, "eval_loss_step": eval_step,
        "eval_outputs": evals.read_text(encoding="utf-8")[:_EVAL_CHARS] if evals.is_file() else None,
        "train_command": info.get("command"), "checkpoint": str(pth),
    }
    return facts


_PIPELINES = {"llava-hf": "image-text-to-text", "xtuner": "image-text-to-text"}  # else text-generation


def _model_lines(facts: dict, merged_from: Optional[dict]) -> list:
    lines = []
    if facts.get("llava"):
        lines.append(f"- Started from the released LLaVA: `{facts['llava']}` (its LLM, vision tower and projector)")
    llm = "the LLaVA's LLM" if facts.get("llava") else f"`{facts.get('llm')}`"
    how = [f"trained: {facts['llm_trained']}"] if facts.get("llm_trained") else []
    if facts.get("llm_lora"):
        how.append(f"LoRA r={facts['llm_lora']['r']} alpha={facts['llm_lora']['alpha']}")
    if facts.get("quantization"):
        how.append(f"quantization: {facts['quantization']}")
    lines.append(f"- Base LLM: {llm}" + (f" ({', '.join(how)})" if how else ""))
    if facts.get("visual_encoder") and not facts.get("llava"):
        lines.append(f"- Vision tower: `{facts['visual_encoder']}`")
    if merged_from:
        lines.append(f"- Merged: adapter `{merged_from['adapter']}` into base `{merged_from['base']}`")
    return lines


def _prompt_lines(facts: dict, tokenizer_saved: bool, note: Optional[str]) -> list:
    if not facts.get("template"):
        return ["- Template: unknown (the adapter was not exported by llava_ft)"]
    system = f", system prompt: {facts['system']!r}" if facts.get("system") else ""
    lines = [f"- Template: `{facts['template']}`{system}"]
    if not tokenizer_saved:
        lines.append("- No tokenizer in this folder: `llava_ft chat` reads the template from `llava_ft.json`.")
    elif note is None:
        lines.append("- The tokenizer's `chat_template` is the training template: `apply_chat_template` builds "
                     "the token ids the model was trained on.")
    else:
        lines.append(f"- The tokenizer's `chat_template` is the training template. Note: {note}.")
    return lines


def _data_lines(facts: dict) -> list:
    d = facts.get("data") or {}
    lines = []
    for src in d.get("sources") or []:
        size = f": {src['records']} records, {src.get('kept', src['records'])} kept" if "records" in src else ""
        repeat = f", repeated x{src['repeat']}" if src.get("repeat", 1) != 1 else ""
        lines.append(f"- `{src.get('path')}`{size}{repeat}")
    if "samples" in d:
        lines.append(f"- In all: {d.get('records')} records -> {d['samples']} training samples, {d.get('tokens')} "
                     f"tokens (max_length {facts.get('max_length')})")
    return lines or ["- Not recorded"]


def _training_lines(facts: dict, export_command: str) -> list:
    lines = []
    if facts.get("recipe") or facts.get("config"):
        lines.append(f"- Recipe: `{facts.get('recipe')}`" + (f" ({facts['config']})" if facts.get("config") else ""))
    if facts.get("step") is not None:
        lines.append(f"- Steps: {facts['step']}")
    if facts.get("final_loss") is not None:
        lines.append(f"- Final training loss: {facts['final_loss']:.4f} (step {facts.get('final_loss_step')})")
    if facts.get("eval_loss") is not None:
        lines.append(f"- Eval loss: {facts['eval_loss']:.4f} (step {facts.get('eval_loss_step')})")
    if facts.get("train_command"):
        lines.append(f"- Trained with: `{facts['train_command']}`")
    lines.append(f"- Exported with: `{export_command}`")
    return lines


def render_model_card(facts: dict, export: str, export_command: str, tokenizer_saved: bool = True,
                      chat_template_note: Optional[str] = None, merged_from: Optional[dict] = None) -> str:
    """README.md text: Hub metadata block, then the run summary (see module docstring)."""
    from huggingface_hub import ModelCardData

    base = [facts["llava"]] if facts.get("llava") else [b for b in (facts.get("llm"), facts.get("visual_encoder")) if b]
    tags = ["llava_ft"] + (["llava", "vision-language"] if facts.get("visual_encoder") or facts.get("llava") else [])
    if facts.get("llm_lora"):
        tags += ["lora"] + (["qlora"] if facts.get("quantization") == "4bit" else [])
    data = ModelCardData(
        base_model=base[0] if len(base) == 1 else (base or None),
        library_name="peft" if export == "peft_adapter" else "transformers",
        pipeline_tag=_PIPELINES.get(export, "text-generation"), tags=tags,
    )
    title = facts.get("recipe") or Path(str(facts.get("checkpoint") or "model")).parent.name or "model"
    phase = f" ({facts['phase']})" if facts.get("phase") else ""
    lines = ["---", data.to_yaml(), "---", "", f"# {title}", "",
             f"Fine-tuned with llava_ft{phase}; exported as `{export}`.",
             "", "## Model", "", *_model_lines(facts, merged_from),
             "", "## Prompt", "", *_prompt_lines(facts, tokenizer_saved, chat_template_note),
             "", "## Training data", "", *_data_lines(facts),
             "", "## Training", "", *_training_lines(facts, export_command)]
    if facts.get("eval_outputs"):
        lines += ["", "## Eval answers at this step", "", "```", facts["eval_outputs"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def write_model_card(folder, meta: dict, export: str, tokenizer=None, merged_from: Optional[dict] = None,
                     export_command: Optional[str] = None) -> Optional[Path]:
    """Write `folder/README.md` from `meta["card"]` (atomically, replacing the boilerplate card PEFT or
    transformers may have saved). With the `tokenizer` saved beside it, its chat template is checked
    against the training ids (llava_ft.convert.chat_template.chat_template_mismatch) and any difference
    is printed and noted in the card. None when there is nothing to say (no card facts, not a merge)."""
    from jinja2 import TemplateError

    from llava_ft.convert.chat_template import chat_template_mismatch
    from llava_ft.errors import UserError
    from llava_ft.fileio import write_text

    facts = meta.get("card") or {}
    if not facts and merged_from:  # an adapter from elsewhere: say at least what was merged
        facts = {"llm": merged_from["base"], "checkpoint": merged_from["adapter"]}
    if not facts:
        return None
    note = None
    template = meta.get("template") or facts.get("template")
    if tokenizer is not None and template and getattr(tokenizer, "chat_template", None):
        try:
            note = chat_template_mismatch(tokenizer, template, meta.get("system"))
        except (UserError, TemplateError, ValueError) as err:  # e.g. an `hf` template refusing a system turn
            note = f"its ids could not be compared with training ({type(err).__name__}: {str(err).splitlines()[0]})"
        if note:
            print(f"[llava_ft] note: {note}", flush=True)
    path = Path(folder) / "README.md"
    write_text(path, render_model_card(facts, export, export_command or current_command(),
                                              tokenizer is not None, note, merged_from))
    return path
