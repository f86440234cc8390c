"""Process-group helpers for multi-process training: who am I, who goes first, what DeepSpeed will do.

    from llava_ft.engine import distributed as dist
    dist.init_distributed(use_deepspeed=True)      # no-op in a single process
    with dist.main_process_first("tokenize"):      # rank 0 of each node tokenizes + caches, others wait
        prepared = prepare_dataset(...)            # ... then load the cache it wrote
    if dist.is_main_process(): print(...)
    dist.check_deepspeed_config("configs/deepspeed/zero2.json", cfg)   # warns about disagreeing values

Launchers (torchrun, `deepspeed`, `llava_ft` with NPROC_PER_NODE, srun with `--launcher slurm`, see
`llava_ft.engine.launch`) all end in the same env vars: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT. The backend is NCCL on CUDA and gloo on CPU. We open the process group ourselves, before
the model and data are built, because the data barrier is needed before transformers' Trainer (which
would otherwise open it) exists; accelerate and DeepSpeed reuse an already initialised group.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from typing import Iterator, Optional


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Rank 0 of the whole job: the one process that prints progress and writes the work dir."""
    return rank() == 0


def backend() -> str:
    import torch

    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(use_deepspeed: bool = False) -> bool:
    """Open the default process group when launched with WORLD_SIZE > 1; True when distributed.

    Through deepspeed.comm when DeepSpeed will run (it keeps its own handle on the group and would
    otherwise open a second one), plain torch.distributed otherwise.
    """
    if world_size() <= 1:
        return False
    import torch
    import torch.distributed as tdist

    if tdist.is_available() and tdist.is_initialized():
        return True
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend(), auto_mpi_discovery=False)
    else:
        tdist.init_process_group(backend=backend())
    return True


def barrier() -> None:
    import torch.distributed as tdist

    if world_size() > 1 and tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


@contextlib.contextmanager
def main_process_first(desc: str = "work", local: bool = True) -> Iterator[None]:
    """Rank 0 (of each node when `local`, since caches live on local disk) runs the block first.

    The other ranks wait at a barrier, then run the block themselves: for `prepare_dataset` that is a
    cache hit, so tokenization happens once per node and every rank trains on the same files.
    """
    first = (local_rank() if local else rank()) == 0
    if not first:
        barrier()
    try:
        yield
    finally:
        if first:
            barrier()


def gather_trainable_state(model, keep: bool) -> dict:
    """Trainable weights of a ZeRO-3 sharded `model` by `named_parameters()` name, as CPU copies on the
    ranks with `keep` (the ones that write the file), {} on the others. Every rank must call it.

    One module's own trainable parameters are gathered at a time (one collective each) and released
    before the next, so no rank ever holds more than the largest module gathered plus, where `keep`, the
    CPU copies. Hand-written rather than DeepSpeed's `_zero3_consolidated_16bit_state_dict` (which
    accelerate's `get_state_dict` calls): that one gathers frozen weights too (a LoRA run would gather
    the whole base model at every save), adds buffers, needs `stage3_gather_16bit_weights_on_model_save`,
    and on the CPU returns views into the gather buffer instead of copies.
    """
    import deepspeed

    out: dict = {}
    groups: list = []  # consecutive names with one owning module, in named_parameters() order
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rpartition(".")[0]
        if groups and groups[-1][0] == owner:
            groups[-1][1].append((name, p))
        else:
            groups.append((owner, [(name, p)]))
    for _, named in groups:
        with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
            if keep:
                out.update((n, p.detach().cpu().clone()) for n, p in named)
    return out


# ---- DeepSpeed config -------------------------------------------------------------------------------

def load_deepspeed_config(path: str) -> dict:
    from llava_ft.errors import UserError

    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"--deepspeed {path}: cannot read the JSON ({err})") from None


def zero_stage(path: Optional[str]) -> int:
    """ZeRO stage of a DeepSpeed JSON (0 when no DeepSpeed)."""
    if not path:
        return 0
    return int(load_deepspeed_config(path).get("zero_optimization", {}).get("stage", 0))


def deepspeed_conflicts(ds: dict, cfg, n_processes: int) -> list[str]:
    """Explicit (non-"auto") values of a DeepSpeed JSON that disagree with the llava_ft config.

    transformers fills "auto" from TrainingArguments and, for explicit values, silently lets
    DeepSpeed's win for some keys (accumulation) and raises for others; we name each one up front.
    """
    t = cfg.train
    expected = {
        "train_micro_batch_size_per_gpu": (t.per_device_batch_size, "train.per_device_batch_size"),
        "gradient_accumulation_steps": (t.gradient_accumulation_steps, "train.gradient_accumulation_steps"),
        "train_batch_size": (t.per_device_batch_size * t.gradient_accumulation_steps * n_processes,
                             f"train.per_device_batch_size x train.gradient_accumulation_steps x {n_processes} processes"),
        "gradient_clipping": (t.max_grad_norm, "train.max_grad_norm"),
    }
    problems = []
    for key, (want, source) in expected.items():
        value = ds.get(key, "auto")
        if value != "auto" and float(value) != float(want):
            problems.append(f"{key}={value} but {source} gives {want}")
    opt = (ds.get("optimizer") or {}).get("params") or {}
    lr = opt.get("lr", "auto")
    if lr != "auto" and float(lr) != float(t.learning_rate):
        problems.append(f"optimizer.params.lr={lr} but train.learning_rate is {t.learning_rate}")
    sched = (ds.get("scheduler") or {}).get("params") or {}
    for key in ("warmup_max_lr", "cos_max_lr"):
        value = sched.get(key, "auto")
        if value != "auto" and float(value) != float(t.learning_rate):
            problems.append(f"scheduler.params.{key}={value} but train.learning_rate is {t.learning_rate}")
    return problems


def check_deepspeed_config(path: Optional[str], cfg) -> list[str]:
    """Warn (once, on rank 0) about each explicit DeepSpeed value that disagrees with `cfg`."""
    if not path:
        return []
    problems = deepspeed_conflicts(load_deepspeed_config(path), cfg, world_size())
    if problems and is_main_process():
        warnings.warn(f"DeepSpeed config {path} disagrees with the llava_ft config: " + "; ".join(problems)
                      + '. Set these keys to "auto" so they follow the llava_ft config.', stacklevel=2)
    return problems
