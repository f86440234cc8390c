"""Trainer callbacks that write the work dir's human-facing files (rank 0 only).

    JsonlLogCallback(work_dir)        -> train_log.jsonl: {step, loss, lr, grad_norm, tokens_per_s, elapsed},
                                         and {step, eval_loss, eval_runtime, epoch} after each validation
    LossPlotCallback(work_dir)        -> loss.png (training loss, eval_loss points, lr), redrawn at every save
                                         and at the end (matplotlib Agg)
    EvalChatCallback(work_dir, cfg, tokenizer) -> eval_outputs_iter_<step>.txt: the recipe's
                                         evaluation.prompts answered every evaluation.every_n_steps and at the end

The progress bar with ETA is transformers' own `ProgressCallback` (tqdm, already rank-0 only).
On resume, `train_log.jsonl` keeps only the lines up to the resumed step, so the file reads as one
uninterrupted run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from transformers import TrainerCallback

from llava_ft.errors import UserError
from llava_ft.fileio import atomic_path, write_text

LOG_NAME = "train_log.jsonl"
PLOT_NAME = "loss.png"
PREFERENCE_METRICS = ("rewards/", "logps/", "sft_loss", "eval_rewards/", "eval_logps/", "eval_sft_loss")


def read_train_log(work_dir) -> list[dict]:
    path = Path(work_dir) / LOG_NAME
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash mid-write: skip it
                continue
    return rows


class JsonlLogCallback(TrainerCallback):
    """Append one JSON line per logged step; the trainer adds tokens_per_s and elapsed to the logs."""

    def __init__(self, work_dir):
        self.path = Path(work_dir) / LOG_NAME

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        # Fresh run: start an empty log. Resume at step k: drop what the interrupted run logged after k.
        kept = [r for r in read_train_log(self.path.parent) if r.get("step", 0) <= state.global_step]
        write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept) if state.global_step else "")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        if "loss" in logs:
            row = {"step": state.global_step, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                   "grad_norm": logs.get("grad_norm"), "tokens_per_s": logs.get("tokens_per_s"),
                   "elapsed": logs.get("elapsed"), "epoch": logs.get("epoch")}
        elif "eval_loss" in logs:  # validation (llava_ft.engine.validation): its own line
            row = {"step": state.global_step, "eval_loss": logs["eval_loss"],
                   "eval_runtime": logs.get("eval_runtime"), "epoch": logs.get("epoch")}
        else:
            return
        # preference runs (llava_ft.engine.preference): rewards/*, logps/*, sft_loss and their eval_ forms
        row.update({k: v for k, v in logs.items() if k.startswith(PREFERENCE_METRICS)})
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")


def plot_loss(work_dir) -> Optional[Path]:
    """Draw loss (and lr) against step from train_log.jsonl into loss.png; None when nothing is logged."""
    rows = read_train_log(work_dir)
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    evals = [r for r in rows if "eval_loss" in r]
    rows = [r for r in rows if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["loss"] for r in rows], color="tab:blue", label="loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], color="tab:green", marker="o",
                label="eval_loss")
        ax.legend(loc="upper right")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if any(r.get("lr") is not None for r in rows):
        ax2 = ax.twinx()
        ax2.plot(steps, [r.get("lr") or 0.0 for r in rows], color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
    margins = [r for r in rows if "rewards/margins" in r]
    if margins:  # preference run: reward margin and accuracy beside the loss
        ax.plot([r["step"] for r in margins], [r["rewards/margins"] for r in margins], color="tab:red",
                label="rewards/margins")
        ax.plot([r["step"] for r in margins], [r["rewards/accuracies"] for r in margins], color="tab:purple",
                linestyle="--", label="rewards/accuracies")
        ax.legend(loc="upper right")
    ax.set_title(Path(work_dir).resolve().name)
    fig.tight_layout()
    out = Path(work_dir) / PLOT_NAME
    with atomic_path(out, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out


class LossPlotCallback(TrainerCallback):
    def __init__(self, work_dir):
        self.work_dir = work_dir

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss(self.work_dir)

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_loss(self.work_dir)


def keep_4bit_training_layout(model) -> None:
    """Stop bitsandbytes (CPU, AVX512-BF16) from repacking 4-bit weights for inference in eval mode.

    bitsandbytes 0.50 repacks a Linear4bit's weight into a CPU inference layout on the first eval-mode
    forward and never unpacks it when training resumes; the next training step then fails with "a view
    of a leaf Variable that requires grad is being used in an in-place operation". Mid-training
    generation therefore keeps the training layout (slightly slower generation, correct training).
    """
    try:
        import bitsandbytes as bnb
    except Exception:  # no bitsandbytes: nothing is 4-bit
        return
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


class EvalChatCallback(TrainerCallback):
    """Answer `evaluation.prompts` (with `evaluation.images` for LLaVA) and write them to a text file.

    Generation runs on every rank when distributed (ZeRO-3 shards need all ranks in the forward), and
    only rank 0 writes the file.
    """

    def __init__(self, work_dir, cfg, tokenizer):
        self.work_dir = Path(work_dir)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.done_steps: set = set()

    def _images(self, model, index: int) -> list:
        images = self.cfg.evaluation.images
        if not images or getattr(model, "visual_encoder", None) is None:
            return []
        return [images[index] if len(images) > 1 else images[0]]

    def answers(self, model) -> list[tuple[str, str]]:
        """Greedy answers through the same ChatModel that `llava_ft chat` uses (prompt, images, stop words)."""
        from llava_ft.inference.chat_model import GenerationSettings
        from llava_ft.inference.loader import chat_model_for_run

        settings = GenerationSettings(max_new_tokens=self.cfg.evaluation.max_new_tokens, temperature=0.0)
        out = []
        keep_4bit_training_layout(model)
        was_training = model.training
        chat = chat_model_for_run(model, self.tokenizer, self.cfg)  # puts the model in eval mode
        try:
            for i, prompt in enumerate(self.cfg.evaluation.prompts):
                images = self._images(model, i)
                try:
                    answer = chat.chat([{"role": "user", "content": prompt}], images, settings)
                except UserError as err:
                    raise UserError(f"evaluation.prompts[{i}]: {err}") from None
                out.append((prompt, answer.text))
        finally:
            model.train(was_training)
        return out

    def write(self, model, step: int, is_main: bool) -> Optional[Path]:
        if not self.cfg.evaluation.prompts or step in self.done_steps:
            return None
        self.done_steps.add(step)
        pairs = self.answers(model)
        if not is_main:
            return None
        images = self.cfg.evaluation.images
        blocks = []
        for i, (prompt, answer) in enumerate(pairs):
            head = f"### prompt {i + 1}"
            if images:
                head += f" (image: {images[i] if len(images) > 1 else images[0]})"
            blocks.append(f"{head}\n{prompt}\n### answer\n{answer}\n")
        path = self.work_dir / f"eval_outputs_iter_{step}.txt"
        write_text(path, f"step {step}\n\n" + "\n".join(blocks))
        return path

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.cfg.evaluation.every_n_steps == 0:
            self.write(model, state.global_step, state.is_world_process_zero)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.write(model, state.global_step, state.is_world_process_zero)
