"""NonFiniteGuard: stop a run whose loss or gradients went NaN/inf, and never save NaN weights.

    callbacks.append(NonFiniteGuard(cfg.train.max_nonfinite_steps))     # in run_training

transformers.Trainer keeps going when training diverges: its `logging_nan_inf_filter` replaces a NaN loss
by the running mean in the logs, the gradient norm is only shown every `logging_steps`, and the run exits
0 having written NaN weights into `iter_<step>.pth`. This callback watches every optimizer step:

  * loss: each training forward's `loss` (a forward hook on the model, so every micro-batch of gradient
    accumulation counts; the value is kept on the device and read once per step);
  * gradient norm: NaN/inf exactly when a gradient is, checked just before the optimizer step (after
    clipping, which spreads a NaN norm over every gradient, so it is still seen). A step the fp16 loss scaler
    skipped (`optimizer.step_was_skipped`) does not count: skipping overflowing steps is its job. Under
    DeepSpeed the gradients are not in `.grad`; the loss check still applies.

`max_nonfinite_steps` consecutive bad steps raise UserError naming the steps and what to check, before
anything is saved. Independently, at every step that is about to save, the trainable weights must be
finite, or UserError: a finished `iter_<step>.pth` never holds NaN/inf. `max_nonfinite_steps: 0` turns
both checks off. ZeRO-3 partitions (`ds_id`) are not inspected; their loss still is.
With several processes, the verdict is agreed across ranks (one all-reduce per step) so all stop together.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Optional

import torch
from transformers import TrainerCallback

from llava_ft.errors import UserError

WHAT_TO_CHECK = ("check train.learning_rate (lower it, or add warmup), model.dtype (fp16 overflows easily; bf16 "
                 "or fp32 do not) and the data (samples with no supervised tokens or extreme lengths)")


def _output_loss(output) -> Optional[torch.Tensor]:
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) else None


def _all_finite(tensors: list) -> bool:
    """Whether every element is finite: one fused max-abs norm (NaN and inf propagate, nothing overflows)."""
    tensors = [t for t in tensors if t is not None and t.numel()]
    if not tensors:
        return True
    norm = torch.nn.utils.get_total_norm(tensors, norm_type=float("inf"), error_if_nonfinite=False)
    return bool(torch.isfinite(norm))


def _any_rank(flag: bool, device) -> bool:
    """`flag` OR-ed over the ranks of a distributed run (every rank must call this at the same point)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


class NonFiniteGuard(TrainerCallback):
    def __init__(self, max_nonfinite_steps: int = 3):
        self.limit = int(max_nonfinite_steps)
        self.bad_steps: list[tuple[int, str]] = []  # the current run of consecutive bad steps
        self._bad_loss: Optional[torch.Tensor] = None  # OR of "loss not finite" over this step's forwards
        self._bad_grad = False
        self._hook = None

    # ---- observation --------------------------------------------------------------------------------
    def _on_forward(self, module, args, output):
        if not module.training:
            return  # mid-training generation (eval chat) is not a training step
        loss = _output_loss(output)
        if loss is None:
            return
        bad = ~torch.isfinite(loss.detach()).all()
        self._bad_loss = bad if self._bad_loss is None else self._bad_loss | bad

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.limit > 0 and model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._on_forward)

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.limit > 0 and model is not None:
            self._bad_grad = not _all_finite([p.grad for p in model.parameters() if p.requires_grad])

    # ---- verdict ------------------------------------------------------------------------------------
    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.limit <= 0:
            return
        step = state.global_step
        bad_loss = bool(self._bad_loss) if self._bad_loss is not None else False
        bad_grad = self._bad_grad and not getattr(optimizer, "step_was_skipped", False)
        self._bad_loss, self._bad_grad = None, False
        what = " and ".join(w for w, b in (("loss", bad_loss), ("gradient norm", bad_grad)) if b)
        if _any_rank(bool(what), args.device):
            self.bad_steps.append((step, what or "loss or gradient norm (on another rank)"))
        else:
            self.bad_steps = []
        if len(self.bad_steps) >= self.limit:
            self._stop(args, state, f"training stopped at step {step}: {self._describe()} was NaN/inf for "
                                    f"{len(self.bad_steps)} consecutive steps (train.max_nonfinite_steps="
                                    f"{self.limit}); {WHAT_TO_CHECK}.{self._last_good(args)}")
        # DefaultFlowCallback (first in the list) has decided by now whether this step saves.
        if control.should_save and model is not None:
            params = [p.detach() for p in model.parameters() if p.requires_grad and not hasattr(p, "ds_id")]
            if _any_rank(not _all_finite(params), args.device):
                self._stop(args, state, f"training stopped at step {step}: the trainable weights hold NaN/inf, "
                                        f"so iter_{step}.pth was not saved; {WHAT_TO_CHECK}."
                                        f"{self._last_good(args)}")

    def on_train_end(self, args, state, control, **kwargs):
        self._remove_hook()

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _stop(self, args, state, message: str) -> None:
        self._remove_hook()  # the model may live on (library use): leave no hook behind
        if state.is_local_process_zero and not args.disable_tqdm:
            print(file=sys.stderr, flush=True)  # end the progress bar's line: the error gets its own
        raise UserError(message)

    def _describe(self) -> str:
        steps = [s for s, _ in self.bad_steps]
        kinds = sorted({w for _, w in self.bad_steps})
        span = f"steps {steps[0]}-{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"
        return f"the {' / '.join(kinds)} ({span})"

    @staticmethod
    def _last_good(args) -> str:
        pointer = os.path.join(args.output_dir, "last_checkpoint")
        if os.path.isfile(pointer):
            with open(pointer, encoding="utf-8") as f:
                return f" The last saved checkpoint is {f.read().strip()}"
        return " No checkpoint was saved"
