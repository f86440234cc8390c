"""Start the N training processes XTuner users expect, or adopt the ones a launcher already started.

    NPROC_PER_NODE=8 llava_ft train CFG                       # one node, 8 processes (torchrun underneath)
    NPROC_PER_NODE=8 NNODES=2 NODE_RANK=0 ADDR=10.0.0.1 PORT=29500 llava_ft train CFG   # node 0 of 2
    torchrun --nproc_per_node 8 -m llava_ft train CFG         # any launcher that sets RANK/LOCAL_RANK
    deepspeed --num_gpus 8 -m llava_ft train CFG --deepspeed zero2
    srun -N 2 --ntasks-per-node 8 llava_ft train CFG --launcher slurm

`maybe_relaunch(argv)` re-executes the command under `python -m torch.distributed.run` when
NPROC_PER_NODE or NNODES asks for more than one process and no launcher env (RANK / LOCAL_RANK) is set;
the current process is replaced (`os.execv`), so Ctrl-C and exit codes go straight to torchrun.
`setup_slurm()` maps srun's SLURM_* variables onto the torch.distributed ones.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from typing import Optional

from llava_ft.errors import UserError

LAUNCHERS = ("none", "pytorch", "slurm")


def _env_int(env, name: str, default: int) -> int:
    value = env.get(name, "")
    if not value:
        return default
    try:
        number = int(value)
    except ValueError:
        raise UserError(f"{name}={value!r} must be an integer") from None
    if number < (0 if name in ("NODE_RANK", "PORT") else 1):
        raise UserError(f"{name}={value!r} is out of range")
    return number


def inside_launcher(env: Optional[dict] = None) -> bool:
    env = os.environ if env is None else env
    return "RANK" in env or "LOCAL_RANK" in env


def free_port() -> int:
    # Only used on one node: several nodes must agree on a port, so NNODES > 1 needs PORT.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_command(argv: list[str], env: Optional[dict] = None) -> Optional[list[str]]:
    """The torchrun command line for NPROC_PER_NODE/NNODES/NODE_RANK/ADDR/PORT, or None for 1 process."""
    env = os.environ if env is None else env
    nproc, nnodes = _env_int(env, "NPROC_PER_NODE", 1), _env_int(env, "NNODES", 1)
    node_rank, port = _env_int(env, "NODE_RANK", 0), _env_int(env, "PORT", 0)
    if nproc * nnodes <= 1 or inside_launcher(env):
        return None
    if node_rank >= nnodes:
        raise UserError(f"NODE_RANK={node_rank} must be smaller than NNODES={nnodes}")
    if nnodes > 1 and not (env.get("ADDR") and port):
        raise UserError("NNODES > 1 needs ADDR (node 0's address) and PORT (a free port on it), the same on every node")
    addr = env.get("ADDR") or "127.0.0.1"
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
            f"--node_rank={node_rank}", f"--master_addr={addr}", f"--master_port={port or free_port()}",
            "-m", "llava_ft", *argv]


def maybe_relaunch(argv: list[str]) -> None:
    """Replace this process by torchrun running `llava_ft <argv>` N times when asked; else return."""
    cmd = torchrun_command(argv)
    if cmd is None:
        return
    print(f"[llava_ft] launching: {' '.join(cmd[1:])}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(cmd[0], cmd)


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: 'gpu[03-05,09],cpu1' -> 'gpu03' (scontrol preferred when present)."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 check=True, timeout=30).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass
    first = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\]", first)
    if not m:
        return first
    head = re.split(r"[,-]", m.group(2))[0]
    return m.group(1) + head


def setup_slurm(env: Optional[dict] = None) -> dict:
    """Map srun's variables to RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE/MASTER_ADDR/MASTER_PORT (in place)."""
    env = os.environ if env is None else env
    missing = [k for k in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_NODELIST") if k not in env]
    if missing:
        raise UserError(f"--launcher slurm: {', '.join(missing)} not set; start the command with srun")
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env["SLURM_LOCALID"]
    per_node = env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "")
    m = re.match(r"^(\d+)", per_node)
    if m:
        env["LOCAL_WORLD_SIZE"] = m.group(1)
    env.setdefault("MASTER_ADDR", env.get("ADDR") or first_slurm_host(env["SLURM_NODELIST"]))
    # Every task computes the port itself, so it must not be random: PORT, else a fixed default.
    env.setdefault("MASTER_PORT", env.get("PORT") or "29500")
    return env


def setup_launcher(launcher: str, argv: list[str]) -> None:
    """`--launcher`: none (re-exec under torchrun if NPROC_PER_NODE > 1), pytorch (env set by a launcher), slurm."""
    if launcher == "slurm":
        setup_slurm()
    elif launcher == "pytorch":
        if not inside_launcher():
            raise UserError("--launcher pytorch: RANK/LOCAL_RANK not set; start with torchrun or the deepspeed launcher")
    else:
        maybe_relaunch(argv)
