"""The built-in CPU demo: every stage of the toolkit, end to end, on tiny local models (`llava_ft demo`).

    from llava_ft.demo.pipeline import run_demo
    report = run_demo("demo_workspace")              # about 10 minutes on 2 CPU cores
    report = run_demo("demo_workspace", fast=True)   # a few steps per stage (the test suite's smoke run)
    print(report.table())

Stages, in order (each writes into the workspace and records itself in `<workspace>/stages/<name>.json`):
  workspace       demo data (coloured-shape images, captions, QA, raw text), tokenizer, tiny LLM, tiny CLIP
  text_pretrain   incremental pretraining of the tiny LLM on raw text (configs/demo/tiny_incremental_pretrain),
                  exported with convert pth_to_hf as a full HF model: the LLM of the LLaVA stages
  llava_pretrain  projector only, LLM loaded 4-bit (configs/demo/tiny_llava_pretrain)
  eval_before     held-out colour questions answered by the pretrain-stage model (before finetuning)
  llava_finetune  projector + QLoRA on the LLM + LoRA on the vision tower (configs/demo/tiny_llava_finetune_qlora)
  eval_after      the same questions answered by the finetuned model
  convert         pth_to_hf: XTuner layout (projector/, llm_adapter/, visual_encoder_adapter/) and llava-hf
  chat            one answer about a held-out demo image from the llava-hf export
  preference      DPO after the finetune (configs/demo/tiny_llava_dpo_qlora) on pairs made from the finetune
                  images: chosen = the right colour / shape, rejected = a wrong colour / a shape not there
  eval_preference held-out pairs' reward accuracy (and which answer the policy prefers) and the held-out
                  answers' accuracy, before (the finetuned model) and after the preference stage
  corner_pad      finetune on wide images with a small coloured square at one end, one view per image
  corner_anyres   the same with model.image_aspect=anyres (overview + tiles at the tower's resolution)
  eval_corner     held-out "what colour is the small square?" answered by both: in the single view (the
                  recipe pads the 96x32 image to square, then the tower sees 32x32) the 12 px square is
                  4 px; AnyRes tiles see it at full resolution

A stage whose record matches its settings and whose outputs still exist is skipped ("reused"), so an
interrupted demo continues where it stopped; `force=True` redoes everything. The recipes are the YAML
files in configs/demo/ with the workspace's absolute paths and the demo's step counts put in.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from llava_ft import fileio
from llava_ft.config import CONFIG_ROOT, Config, load_config
from llava_ft.errors import UserError

RECIPES = CONFIG_ROOT / "demo"
COLOUR_QUESTION = "What colour is the shape?"
SHAPE_QUESTION = "What shape is it?"


@dataclass(frozen=True)
class DemoSettings:
    """Model sizes, data amounts and step counts. FULL reaches >= 90 % colour accuracy; FAST only runs."""

    # workspace (llava_ft.demo.assets.build_demo_workspace / make_demo_data)
    seed: int = 0
    llm_hidden_size: int = 64
    llm_layers: int = 2
    image_size: int = 32
    n_pretrain: int = 200
    n_finetune: int = 200
    n_eval: int = 60
    n_text: int = 200
    # steps per training stage and batch sizes
    text_steps: int = 150
    text_batch: int = 4
    pretrain_steps: int = 100
    pretrain_batch: int = 8
    finetune_steps: int = 300
    finetune_batch: int = 8
    eval_batch: int = 16
    # AnyRes stages: a small square at one end of a wide image, finetuned with one view vs AnyRes tiles
    n_corner: int = 160
    n_corner_eval: int = 40
    corner_steps: int = 300
    # preference stage (DPO after the finetune, llava_ft.demo.preference)
    pref_steps: int = 50
    pref_batch: int = 8

    def key(self) -> str:
        return hashlib.sha1(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()[:12]


FULL = DemoSettings()
FAST = DemoSettings(n_pretrain=16, n_finetune=16, n_eval=6, n_text=16, text_steps=3, text_batch=2,
                    pretrain_steps=3, pretrain_batch=4, finetune_steps=3, finetune_batch=4, eval_batch=6,
                    n_corner=8, n_corner_eval=4, corner_steps=3, pref_steps=3, pref_batch=4)


@dataclass
class StageResult:
    name: str
    status: str  # "done" | "reused"
    seconds: float  # wall time of the run that produced it (a reused stage shows the original time)
    result: str  # one line for the table
    artifacts: list = field(default_factory=list)
    data: dict = field(default_factory=dict)  # numbers for programs (accuracy, answer, ...)


@dataclass
class DemoReport:
    workspace: str
    stages: list
    summary_path: str = ""

    def stage(self, name: str) -> StageResult:
        return next(s for s in self.stages if s.name == name)

    @property
    def total_seconds(self) -> float:
        return sum(s.seconds for s in self.stages if s.status == "done")

    def table(self) -> str:
        rows = [("stage", "status", "time", "result", "artifacts")]
        for s in self.stages:
            rows.append((s.name, s.status, f"{s.seconds:.1f}s", s.result,
                         ", ".join(_rel(a, self.workspace) for a in s.artifacts)))
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = []
        for i, r in enumerate(rows):
            lines.append("  ".join(r[j].ljust(widths[j]) for j in range(4)) + "  " + r[4])
            if i == 0:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 9)
        lines.append(f"total (stages run now): {self.total_seconds:.1f}s; workspace: {self.workspace}")
        return "\n".join(lines)


def _rel(path: str, root: str) -> str:
    try:
        return os.path.relpath(path, root)
    except ValueError:
        return path


# ----------------------------------------------------------------------------------------------------
# stage bookkeeping


class _Stages:
    """Records `<ws>/stages/<name>.json` after a stage completes; a stage is reused when its record
    matches (same settings key and inputs) and every artifact it names still exists."""

    def __init__(self, ws: Path, settings: DemoSettings, force: bool, log: Callable[[str], None]):
        self.dir = ws / "stages"
        self.settings = settings
        self.force = force
        self.log = log
        self.results: list[StageResult] = []
        # A redone stage invalidates every later one (their inputs changed).
        self._redone = force

    def run(self, name: str, fn: Callable[[], tuple], inputs: Optional[dict] = None) -> StageResult:
        record_path = self.dir / f"{name}.json"
        key = {"settings": self.settings.key(), "inputs": inputs or {}}
        if not self._redone and record_path.is_file():
            try:
                rec = json.loads(record_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError:
                rec = {}
            if rec.get("key") == key and all(Path(a).exists() for a in rec.get("artifacts", [])):
                res = StageResult(name, "reused", rec["seconds"], rec["result"], rec["artifacts"], rec.get("data", {}))
                self.log(f"[demo] {name}: reused ({res.result})")
                self.results.append(res)
                return res
        self._redone = True
        if record_path.exists():
            record_path.unlink()
        self.log(f"[demo] {name}: running ...")
        start = time.perf_counter()
        result, artifacts, data = fn()
        seconds = time.perf_counter() - start
        res = StageResult(name, "done", seconds, result, [str(a) for a in artifacts], data)
        self.dir.mkdir(parents=True, exist_ok=True)
        fileio.write_json(record_path, {"key": key, "seconds": seconds, "result": result,
                                        "artifacts": res.artifacts, "data": data}, indent=1)
        self.log(f"[demo] {name}: done in {seconds:.1f}s ({result})")
        self.results.append(res)
        return res


# ----------------------------------------------------------------------------------------------------
# helpers


def _recipe(name: str, ws: Path, paths: dict, llm: str, steps: int, batch: int) -> Config:
    """A configs/demo recipe with the workspace's absolute paths and the demo's step counts."""
    cfg = load_config(str(RECIPES / f"{name}.yaml"))
    cfg.model.llm = llm
    cfg.model.tokenizer = None
    if cfg.is_llava:
        cfg.model.visual_encoder = paths["visual_encoder"]
        cfg.evaluation.images = [str(Path(paths["image_folder"]) / "eval" / "eval_00000.png")]
    src = cfg.data.sources[0]
    if src.format == "text":
        src.path = paths["text"]
    elif cfg.resolved_phase == "pretrain":
        src.path, src.image_folder = paths["pretrain"], paths["image_folder"]
    elif cfg.is_llava:
        src.path, src.image_folder = paths["finetune"], paths["image_folder"]
    else:
        src.path = paths["self_cognition"]
    cfg.data.cache_dir = str(ws / "cache")  # the demo keeps everything inside its workspace
    cfg.train.max_steps = steps
    cfg.train.per_device_batch_size = batch
    cfg.train.save_steps = steps  # one iter_<steps>.pth at the end
    cfg.evaluation.every_n_steps = max(steps, 1)
    return cfg


def write_chat_text(paths: dict, template: str, out) -> str:
    """The demo's LLaVA conversations rendered with `template` as raw text (images left out) -> {"text"} jsonl.

    Why: the tiny LLM starts from random weights, and in the QLoRA stages its lm_head stays frozen, so a
    token the LLM never learned to predict (the template's markers, the answer words) stays out of reach
    of the LoRA adapter. Incremental pretraining on these transcripts teaches the words and the chat format;
    which colour an image shows can only come from the image (the text holds every colour equally often).
    """
    from transformers import AutoTokenizer

    from llava_ft import IMAGE_TOKEN
    from llava_ft.config import DataSource
    from llava_ft.data.encode import encode_records
    from llava_ft.data.formats import iter_records

    tok = AutoTokenizer.from_pretrained(paths["tokenizer"])
    records = []
    for key in ("pretrain", "finetune"):
        for rec in iter_records(DataSource(path=paths[key], format="llava", image_folder=paths["image_folder"])):
            msgs = [dict(m, content=m["content"].replace(IMAGE_TOKEN, "").strip()) for m in rec["messages"]]
            records.append({"id": rec["id"], "messages": msgs, "images": []})
    rows = []
    for res in encode_records(records, tok, template, max_length=100_000):
        if res.sample is not None:
            rows.append({"text": tok.decode(res.sample["input_ids"], skip_special_tokens=True)})
    fileio.write_jsonl(out, rows)
    return str(out)


def _train(cfg: Config, work_dir: Path, command: str) -> tuple[str, dict]:
    from llava_ft.engine.run import run_training

    if work_dir.exists():
        shutil.rmtree(work_dir)  # a half-finished run must not be resumed with other settings
    result = run_training(cfg, work_dir=str(work_dir), command=command)
    if not result.last_checkpoint:
        raise UserError(f"{work_dir}: training finished without writing an iter_*.pth")
    losses = [h["loss"] for h in result.log_history if "loss" in h]
    info = {"steps": result.global_step, "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None, "train_loss": result.train_loss}
    return str(Path(work_dir) / Path(result.last_checkpoint).name), info


def _loss_text(info: dict) -> str:
    if info.get("first_loss") is not None:
        return f"{info['steps']} steps, loss {info['first_loss']:.2f} -> {info['last_loss']:.2f}"
    return f"{info['steps']} steps, mean loss {info['train_loss']:.2f}"


def eval_items(paths: dict) -> list:
    """Held-out QA items (llava_ft.inference.evaluate.QAItem) of the demo's eval split."""
    from llava_ft.inference.evaluate import load_qa

    return load_qa(paths["eval"], image_folder=paths["image_folder"])


def score(chat_model, items: list, batch_size: int) -> dict:
    """Exact-match accuracy on the colour questions and on the shape questions (greedy answers)."""
    from llava_ft.inference import GenerationSettings
    from llava_ft.inference.evaluate import evaluate

    report = evaluate(chat_model, items, GenerationSettings(max_new_tokens=8, temperature=0.0), batch_size=batch_size)
    out: dict = {"predictions": report.predictions}
    for label, question in (("colour", COLOUR_QUESTION), ("shape", SHAPE_QUESTION)):
        rows = [p for p in report.predictions if p["question"] == question]
        out[f"{label}_n"] = len(rows)
        out[f"{label}_accuracy"] = sum(p["exact_match"] for p in rows) / len(rows) if rows else None
        # "mentions": the right word anywhere in the answer (a caption-style answer before finetuning)
        out[f"{label}_mentions"] = sum(p["contains"] for p in rows) / len(rows) if rows else None
    return out


def _acc_text(d: dict) -> str:
    def pct(x):
        return "n/a" if x is None else f"{x:.0%}"

    return (f"colour accuracy {pct(d['colour_accuracy'])} ({d['colour_n']} questions, chance 20%; "
            f"{pct(d['colour_mentions'])} mention the colour), shape {pct(d['shape_accuracy'])} ({d['shape_n']})")


def _eval_stage(model_path: str, paths: dict, settings: DemoSettings, ws: Path, name: str):
    from llava_ft.inference import load_chat_model
    from llava_ft.inference.evaluate import write_predictions

    cm = load_chat_model(model_path)
    d = score(cm, eval_items(paths), settings.eval_batch)
    out = ws / "eval" / f"{name}.predictions.jsonl"
    write_predictions(d.pop("predictions"), out)
    return _acc_text(d), [out], d


# ----------------------------------------------------------------------------------------------------
# the demo


def run_demo(workspace="demo_workspace", fast: bool = False, force: bool = False,
             settings: Optional[DemoSettings] = None, log: Callable[[str], None] = print) -> DemoReport:
    """Run (or resume) every demo stage in `workspace`; writes summary.md and summary.json there."""
    from llava_ft.demo.assets import build_demo_workspace

    settings = settings or (FAST if fast else FULL)
    ws = Path(workspace).resolve()
    if ws.exists() and not ws.is_dir():
        raise UserError(f"--workspace {workspace}: exists and is not a folder; choose another path")
    ws.mkdir(parents=True, exist_ok=True)
    stages = _Stages(ws, settings, force, log)
    s = settings

    def workspace_stage():
        paths = build_demo_workspace(ws, seed=s.seed, hidden_size=s.llm_hidden_size, num_layers=s.llm_layers,
                                     image_size=s.image_size, force=force,
                                     data_sizes={"n_pretrain": s.n_pretrain, "n_finetune": s.n_finetune,
                                                 "n_eval": s.n_eval, "n_text": s.n_text})
        paths = {k: str(Path(v).resolve()) for k, v in paths.items()}
        n_img = sum(1 for _ in Path(paths["image_folder"]).rglob("*.png"))
        return (f"{n_img} images, tiny LLM ({s.llm_layers} layers, hidden {s.llm_hidden_size}), tiny CLIP",
                [paths["llm"], paths["visual_encoder"], paths["image_folder"]], {"paths": paths})

    paths = stages.run("workspace", workspace_stage).data["paths"]

    text_dir = ws / "work_dirs" / "tiny_incremental_pretrain"
    llm_pretrained = ws / "llm_pretrained"

    def text_stage():
        from llava_ft.convert import pth_to_hf

        cfg = _recipe("tiny_incremental_pretrain", ws, paths, paths["llm"], s.text_steps, s.text_batch)
        chat_text = write_chat_text(paths, cfg.data.template, Path(paths["text"]).with_name("chat_text.jsonl"))
        cfg.data.sources.append(dataclasses.replace(cfg.data.sources[0], path=chat_text))
        pth, info = _train(cfg, text_dir, "train")
        pth_to_hf(cfg, pth, llm_pretrained)  # full training -> a full HF model + tokenizer
        return _loss_text(info), [pth, llm_pretrained], info

    stages.run("text_pretrain", text_stage)

    pre_dir = ws / "work_dirs" / "tiny_llava_pretrain"

    def pretrain_stage():
        cfg = _recipe("tiny_llava_pretrain", ws, paths, str(llm_pretrained), s.pretrain_steps, s.pretrain_batch)
        pth, info = _train(cfg, pre_dir, "pretrain")
        info["pth"] = pth
        return _loss_text(info), [pth], info

    pre_pth = stages.run("llava_pretrain", pretrain_stage).data["pth"]
    before = stages.run("eval_before", lambda: _eval_stage(pre_pth, paths, s, ws, "eval_before"))

    ft_dir = ws / "work_dirs" / "tiny_llava_finetune_qlora"

    def finetune_stage():
        cfg = _recipe("tiny_llava_finetune_qlora", ws, paths, str(llm_pretrained), s.finetune_steps,
                      s.finetune_batch)
        cfg.model.pretrained_pth = pre_pth
        pth, info = _train(cfg, ft_dir, "finetune")
        info["pth"] = pth
        return _loss_text(info), [pth], info

    ft_pth = stages.run("llava_finetune", finetune_stage).data["pth"]
    after = stages.run("eval_after", lambda: _eval_stage(ft_pth, paths, s, ws, "eval_after"))

    xtuner_dir, hf_dir = ws / "export" / "xtuner", ws / "export" / "llava_hf"

    def convert_stage():
        from llava_ft.convert import pth_to_hf

        pth_to_hf(None, ft_pth, xtuner_dir)  # None: the config saved inside the checkpoint
        pth_to_hf(None, ft_pth, hf_dir, fmt="llava-hf")
        parts = sorted(p.name for p in xtuner_dir.iterdir() if p.is_dir())
        return f"XTuner layout ({', '.join(parts)}) + llava-hf", [xtuner_dir, hf_dir], {}

    stages.run("convert", convert_stage)

    def chat_stage():
        from llava_ft.inference import GenerationSettings, load_chat_model

        item = next(it for it in eval_items(paths) if it.question == COLOUR_QUESTION)
        cm = load_chat_model(str(hf_dir))
        res = cm.chat([{"role": "user", "content": f"<image>\n{COLOUR_QUESTION}"}], images=item.images,
                      settings=GenerationSettings(max_new_tokens=8, temperature=0.0))
        image = _rel(item.images[0], str(ws))
        return (f"{image}: '{COLOUR_QUESTION}' -> '{res.text}' (truth: {item.answer})", [],
                {"image": item.images[0], "answer": res.text, "truth": item.answer})

    stages.run("chat", chat_stage)
    pref = _preference_stages(stages, ws, paths, s, str(llm_pretrained), ft_pth, after.data)
    corner = _corner_stages(stages, ws, paths, s, str(llm_pretrained), pre_pth)

    report = DemoReport(str(ws), stages.results)
    report.summary_path = _write_summary(report, before.data, after.data, corner.data, pref.data)
    return report


def _preference_stages(stages: "_Stages", ws: Path, paths: dict, s: DemoSettings, llm: str, ft_pth: str,
                       after: dict):
    """DPO from the finetune on the demo's pairs, then held-out reward and answer accuracy before / after."""
    from llava_ft.demo.preference import pair_metrics, reward_accuracy, write_demo_pairs

    work_dir = ws / "work_dirs" / "tiny_llava_dpo_qlora"
    files = write_demo_pairs(paths, Path(paths["finetune"]).parent, seed=s.seed)

    def preference_stage():
        cfg = _recipe("tiny_llava_dpo_qlora", ws, paths, llm, s.pref_steps, s.pref_batch)
        cfg.model.pretrained_pth = ft_pth  # the reference is this finetuned policy
        cfg.data.sources[0].path, cfg.data.sources[0].image_folder = files["train"], paths["image_folder"]
        pth, info = _train(cfg, work_dir, "train")
        info["pth"] = pth
        return f"{_loss_text(info)}, {files['n_train']} pairs", [pth], info

    pth = stages.run("preference", preference_stage, inputs={"finetune": ft_pth}).data["pth"]

    def eval_preference():
        from llava_ft.inference import load_chat_model
        from llava_ft.inference.evaluate import write_predictions

        reference = load_chat_model(ft_pth)
        ref = pair_metrics(reference, files["heldout"], paths["image_folder"])
        del reference
        policy = load_chat_model(pth)
        pol = pair_metrics(policy, files["heldout"], paths["image_folder"])
        d = score(policy, eval_items(paths), s.eval_batch)
        out = ws / "eval" / "eval_preference.predictions.jsonl"
        write_predictions(d.pop("predictions"), out)
        data = {"reward_accuracy_before": 0.0, "reward_accuracy_after": reward_accuracy(pol, ref),
                "prefers_chosen_before": ref["prefers_chosen"], "prefers_chosen_after": pol["prefers_chosen"],
                "heldout_pairs": pol["n"],
                **{f"{k}_{w}": v for w, src in (("before", after), ("after", d))
                   for k, v in src.items() if k.endswith("_accuracy")}}

        def pct(x):
            return "n/a" if x is None else f"{x:.0%}"

        text = (f"{pol['n']} held-out pairs: reward accuracy 0% -> {pct(data['reward_accuracy_after'])} "
                f"(prefers chosen {pct(ref['prefers_chosen'])} -> {pct(pol['prefers_chosen'])}); answers: colour "
                f"{pct(data['colour_accuracy_before'])} -> {pct(data['colour_accuracy_after'])}, shape "
                f"{pct(data['shape_accuracy_before'])} -> {pct(data['shape_accuracy_after'])}")
        return text, [out], data

    return stages.run("eval_preference", eval_preference, inputs={"preference": pth})


def _corner_stages(stages: "_Stages", ws: Path, paths: dict, s: DemoSettings, llm: str, pre_pth: str):
    """AnyRes vs one view on a question only high resolution answers; returns the eval_corner result."""
    from llava_ft.demo.assets import make_corner_data

    corner = make_corner_data(ws / "data" / "corner", seed=s.seed, n_train=s.n_corner, n_eval=s.n_corner_eval,
                              tile=s.image_size, square=max(4, s.image_size * 3 // 8))
    pths = {}
    for aspect in ("pad", "anyres"):
        work_dir = ws / "work_dirs" / f"tiny_llava_corner_{aspect}"

        def corner_stage(aspect=aspect, work_dir=work_dir):
            cfg = _recipe("tiny_llava_finetune_qlora", ws, paths, llm, s.corner_steps, s.finetune_batch)
            cfg.model.pretrained_pth = pre_pth
            cfg.model.image_aspect = aspect
            cfg.data.sources[0].path, cfg.data.sources[0].image_folder = corner["finetune"], corner["image_folder"]
            if aspect == "anyres":
                cfg.data.pad_image_to_square = False  # AnyRes keeps the aspect ratio by tiling
            cfg.evaluation.images = [str(Path(corner["image_folder"]) / "eval" / "corner_eval_00000.png")]
            pth, info = _train(cfg, work_dir, "finetune")
            info["pth"] = pth
            return _loss_text(info), [pth], info

        pths[aspect] = stages.run(f"corner_{aspect}", corner_stage).data["pth"]

    def eval_corner():
        from llava_ft.inference import GenerationSettings, load_chat_model
        from llava_ft.inference.evaluate import evaluate, load_qa, write_predictions

        items = load_qa(corner["eval"], image_folder=corner["image_folder"])
        acc, outs = {}, []
        for aspect, pth in pths.items():
            report = evaluate(load_chat_model(pth), items, GenerationSettings(max_new_tokens=8, temperature=0.0),
                              batch_size=s.eval_batch)
            acc[aspect] = sum(p["exact_match"] for p in report.predictions) / len(report.predictions)
            out = ws / "eval" / f"corner_{aspect}.predictions.jsonl"
            write_predictions(report.predictions, out)
            outs.append(out)
        return (f"small-square colour: one view {acc['pad']:.0%} -> AnyRes {acc['anyres']:.0%} "
                f"({len(items)} questions, chance 20%)", outs, {"pad_accuracy": acc["pad"],
                                                               "anyres_accuracy": acc["anyres"]})

    return stages.run("eval_corner", eval_corner)


def _write_summary(report: DemoReport, before: dict, after: dict, corner: dict, pref: dict) -> str:
    ws = Path(report.workspace)
    summary = {
        "workspace": report.workspace,
        "total_seconds_run_now": report.total_seconds,
        "colour_accuracy_before": before.get("colour_accuracy"),
        "colour_accuracy_after": after.get("colour_accuracy"),
        "corner_accuracy_one_view": corner.get("pad_accuracy"),
        "corner_accuracy_anyres": corner.get("anyres_accuracy"),
        **{f"preference_{k}": v for k, v in pref.items()},
        "stages": [dataclasses.asdict(s) for s in report.stages],
    }
    fileio.write_json(ws / "summary.json", summary, indent=1)
    md = ws / "summary.md"
    fileio.write_text(md, "# llava_ft demo summary\n\n```\n" + report.table() + "\n```\n")
    return str(md)
