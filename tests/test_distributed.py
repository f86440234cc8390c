"""Scale-out tests: launch env mapping, DeepSpeed config checks, and real 2-process runs on the CPU.

    pytest tests/test_distributed.py -m "not multiprocess"   # unit tests, ~2 s
    pytest tests/test_distributed.py                         # + 2-process runs (gloo), several minutes on 2 cores

The multi-process tests train the tiny demo LLaVA (and a QLoRA text model) with 2 processes under
ZeRO-2 / ZeRO-3 and compare against one process with the same global batch (2 processes x 3 x accum 1
== 1 x 3 x accum 2): same loss at every step, same trainable weights at the end (fp32 on CPU, so only summation
order differs); under ZeRO-3 also AnyRes (its newline partitioned, persistence threshold 0) and a full text
fine-tune. The first DeepSpeed run on a machine compiles a small op (~2 min), later ones reuse it.
Helpers here are shared with tests/test_resume_exact.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml

from llava_ft.engine import distributed as dist
from llava_ft.engine import launch
from llava_ft.errors import UserError

# ---- helpers shared with test_resume_exact.py -------------------------------------------------------

# Global batch 6 both ways: 2 processes x 3 x accum 1, or 1 process x 3 x accum 2. 66 LLaVA samples / 6 = 11
# whole steps an epoch, so STEPS=12 crosses an epoch; a partial last batch would not compare, because
# accelerate pads it on the other ranks with samples from the epoch's start (even_batches).
ONE_PROCESS = "train.gradient_accumulation_steps=2"
STEPS, SAVE = 12, 4


def write_configs(root: Path) -> dict:
    """Tiny LLaVA QLoRA finetune and QLoRA text configs over the demo workspace."""
    from llava_ft.demo.assets import build_demo_workspace

    p = build_demo_workspace(root / "ws")
    train = {"per_device_batch_size": 3, "gradient_accumulation_steps": 1, "max_steps": STEPS,
             "save_steps": SAVE, "save_total_limit": 2, "logging_steps": 1, "learning_rate": 1e-3,
             "warmup_ratio": 0.1}
    lora = {"enabled": True, "r": 8, "alpha": 16, "dropout": 0.0}
    # XTuner's finetune shape: 4-bit LLM + LoRA, LoRA on the vision tower, projector trained fully.
    llava = {"name": "llava", "model": {"llm": p["llm"], "visual_encoder": p["visual_encoder"], "freeze_llm": True,
                                        "quantization": "4bit", "llm_lora": lora,
                                        "visual_encoder_lora": dict(lora, r=4, alpha=8)},
             "data": {"sources": [{"path": p["finetune"], "format": "llava", "image_folder": p["image_folder"]},
                                  {"path": p["self_cognition"], "format": "openai"}],  # text-only rows mixed in
                      "template": "qwen_chat", "max_length": 256, "cache_dir": str(root / "cache")},
             "train": train}
    text = {"name": "text", "model": {"llm": p["llm"], "quantization": "4bit", "llm_lora": lora},
            "data": {"sources": [{"path": p["self_cognition"], "format": "openai", "repeat": 4}],
                     "template": "qwen_chat", "max_length": 128, "cache_dir": str(root / "cache")},
            "train": dict(train, max_steps=4, save_steps=4)}
    out = {}
    for name, cfg in (("llava", llava), ("text", text)):
        out[name] = str(root / f"{name}.yaml")
        Path(out[name]).write_text(yaml.safe_dump(cfg))
    return out


def run_cli(args: list, env: dict | None = None, nproc: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`llava_ft ARGS` in a subprocess (under torchrun when nproc > 1); fails the test with the log tail."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "llava_ft", *args]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={launch.free_port()}", "-m", "llava_ft", *args]
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc


def zero3_config(tmp_path: Path, persistence="auto") -> str:
    """The built-in zero3.json with stage3_param_persistence_threshold set (0: every weight partitioned, even
    the tiny models' small ones, which `auto` keeps whole on every rank)."""
    from llava_ft.engine.run import resolve_deepspeed

    ds = json.loads(Path(resolve_deepspeed("zero3")).read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = persistence
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps(ds))
    return str(path)


def losses(work_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in Path(work_dir, "train_log.jsonl").read_text().splitlines()]


def iter_state(work_dir, step: int) -> dict:
    return torch.load(Path(work_dir) / f"iter_{step}.pth", map_location="cpu", weights_only=True)["state_dict"]


def assert_same_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].shape == b[key].shape, key
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=key)


# ---- unit tests (fast) ---------------------------------------------------------------------------------

def test_nproc_per_node_builds_torchrun_command():
    cmd = launch.torchrun_command(["train", "cfg.yaml", "--deepspeed", "zero2"],
                                  env={"NPROC_PER_NODE": "4", "PORT": "29501"})
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc_per_node=4" in cmd and "--nnodes=1" in cmd and "--master_port=29501" in cmd
    assert cmd[-6:] == ["-m", "llava_ft", "train", "cfg.yaml", "--deepspeed", "zero2"]
    multi = launch.torchrun_command(["train", "c"], env={"NPROC_PER_NODE": "8", "NNODES": "2", "NODE_RANK": "1",
                                                         "ADDR": "10.0.0.1", "PORT": "29500"})
    assert {"--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.1"} <= set(multi)


def test_no_relaunch_for_one_process_or_inside_a_launcher():
    assert launch.torchrun_command(["train", "c"], env={}) is None
    assert launch.torchrun_command(["train", "c"], env={"NPROC_PER_NODE": "1"}) is None
    # torchrun's workers see RANK/LOCAL_RANK and must not start torchrun again (fork bomb).
    assert launch.torchrun_command(["train", "c"], env={"NPROC_PER_NODE": "2", "LOCAL_RANK": "0"}) is None


@pytest.mark.parametrize("env, words", [
    ({"NPROC_PER_NODE": "two"}, "NPROC_PER_NODE"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2"}, "ADDR"),
    ({"NPROC_PER_NODE": "2", "NNODES": "2", "NODE_RANK": "2", "ADDR": "h", "PORT": "1"}, "NODE_RANK"),
])
def test_bad_launch_env_is_a_user_error(env, words):
    with pytest.raises(UserError, match=words):
        launch.torchrun_command(["train", "c"], env=env)


def test_slurm_env_maps_to_torch_distributed():
    env = {"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "8",
           "SLURM_NODELIST": "gpu[03-04,09],cpu1", "PATH": ""}  # no scontrol on PATH: parse the list
    launch.setup_slurm(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("9", "16", "1", "8")
    assert env["MASTER_ADDR"] == "gpu03" and env["MASTER_PORT"] == "29500"
    assert launch.first_slurm_host("node7") == "node7"
    with pytest.raises(UserError, match="srun"):
        launch.setup_slurm({})


def test_deepspeed_conflicts_name_each_disagreeing_value(tmp_path):
    from llava_ft.config import config_from_dict
    from llava_ft.engine.run import resolve_deepspeed

    cfg = config_from_dict({"model": {"llm": "x"}, "train": {"per_device_batch_size": 4, "learning_rate": 1e-4}})
    for name in ("zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"):  # built-ins are all "auto"
        assert dist.deepspeed_conflicts(dist.load_deepspeed_config(resolve_deepspeed(name)), cfg, 2) == []
    assert dist.zero_stage(resolve_deepspeed("zero3_offload")) == 3 and dist.zero_stage(None) == 0
    user = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": "auto", "gradient_clipping": 1.0,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}}}
    problems = dist.deepspeed_conflicts(user, cfg, 2)
    assert len(problems) == 2
    assert "train_micro_batch_size_per_gpu=2" in problems[0] and "optimizer.params.lr" in problems[1]
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(user))
    with pytest.warns(UserWarning, match="disagrees"):
        dist.check_deepspeed_config(str(path), cfg)


def test_single_process_helpers_are_no_ops():
    assert dist.init_distributed() is False
    with dist.main_process_first():  # no process group: nothing to wait for
        pass
    assert dist.is_main_process()


def test_train_command_accepts_launcher_and_deepspeed(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llava_ft", "train", "--help"], capture_output=True, text=True)
    assert "--launcher" in proc.stdout and "--deepspeed" in proc.stdout


# ---- 2-process runs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> dict:
    return write_configs(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def single_llava(configs, tmp_path_factory) -> str:
    """One process, per-device batch 3 x accum 2 = global batch 6 (the reference run)."""
    work = str(tmp_path_factory.mktemp("single") / "w")
    run_cli(["finetune", configs["llava"], ONE_PROCESS, "--work-dir", work])
    return work


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero2_llava_via_nproc_per_node_matches_single_process(configs, single_llava, tmp_path):
    """NPROC_PER_NODE=2 `llava_ft finetune --deepspeed zero2` (~40 s): same losses and weights."""
    work = str(tmp_path / "w")
    cache = str(tmp_path / "fresh_cache")  # an empty cache: rank 0 must tokenize, rank 1 load its result
    proc = run_cli(["finetune", configs["llava"], f"data.cache_dir={cache}", "--work-dir", work,
                    "--deepspeed", "zero2"], env={"NPROC_PER_NODE": "2"})
    out = proc.stdout + proc.stderr
    assert "launching: -m torch.distributed.run --nproc_per_node=2" in out
    assert out.count("tokenizing finetune.json:   0%") == 1  # data prepared once
    assert out.count("[llava_ft] done") == 1  # only rank 0 prints
    assert losses(work) == pytest.approx(losses(single_llava), rel=1e-5)
    assert_same_weights(iter_state(work, STEPS), iter_state(single_llava, STEPS))


@pytest.mark.multiprocess
@pytest.mark.slow
def test_zero3_llava_matches_single_process_and_writes_the_same_iter_file(configs, single_llava, tmp_path,
                                                                         monkeypatch):
    """torchrun -m llava_ft finetune --deepspeed zero3 (~40 s): shards gathered into the same iter file."""
    work = str(tmp_path / "w")
    run_cli(["finetune", configs["llava"], "--work-dir", work, "--deepspeed", "zero3"], nproc=2)
    assert losses(work) == pytest.approx(losses(single_llava), rel=1e-5)
    assert_same_weights(iter_state(work, STEPS), iter_state(single_llava, STEPS))
    # convert accepts the DeepSpeed folder: the iter file beside it, or the weights gathered from its shards.
    from llava_ft.engine.resume import iter_from_trainer_checkpoint

    folder = Path(work) / f"checkpoint-{STEPS}"
    assert iter_from_trainer_checkpoint(folder, out_dir=tmp_path / "unused") == str(Path(work) / f"iter_{STEPS}.pth")
    os.rename(Path(work) / f"iter_{STEPS}.pth", tmp_path / "moved.pth")
    gathered = iter_from_trainer_checkpoint(folder, out_dir=tmp_path / "gathered")
    assert_same_weights(torch.load(gathered, weights_only=True)["state_dict"], iter_state(single_llava, STEPS))
    from llava_ft.cli import main

    scratch = tmp_path / "scratch"  # where convert gathers the shards; it must not stay behind
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    assert main(["convert", "pth_to_hf", "-", str(folder), str(tmp_path / "hf")]) == 0  # config from the work dir
    assert list(scratch.iterdir()) == []
    assert {"projector", "llm_adapter", "visual_encoder_adapter"} <= {p.name for p in (tmp_path / "hf").iterdir()}


# AnyRes on the same run, shortened (tiled images make each step several times longer).
ANYRES = ["model.image_aspect=anyres", "train.max_steps=4", "train.save_steps=4"]


@pytest.fixture(scope="module")
def single_anyres(configs, tmp_path_factory) -> str:
    work = str(tmp_path_factory.mktemp("single_anyres") / "w")
    run_cli(["finetune", configs["llava"], *ANYRES, ONE_PROCESS, "--work-dir", work])
    return work


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("persistence", ["auto", 0])
def test_zero3_anyres_matches_single_process(configs, single_anyres, tmp_path, persistence):
    """AnyRes under ZeRO-3 (~60 s each): the projector's newline is gathered by the projector's own forward.
    With stage3_param_persistence_threshold 0 it is partitioned like every weight (with `auto` a vector this
    small stays whole on every rank); losses and saved weights, newline included, equal one process."""
    work = str(tmp_path / "w")
    ds = zero3_config(tmp_path, persistence)
    run_cli(["finetune", configs["llava"], *ANYRES, "--work-dir", work, "--deepspeed", ds], nproc=2)
    assert losses(work) == pytest.approx(losses(single_anyres), rel=1e-5)
    multi, single = iter_state(work, 4), iter_state(single_anyres, 4)
    assert "projector.image_newline" in single
    assert_same_weights(multi, single)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_deepspeed_launcher_runs_llava_ft_and_matches_single_process(configs, single_llava, tmp_path):
    """`deepspeed --num_gpus 2 --module llava_ft finetune ...` (the launcher users know from LLaVA's scripts; on
    the CPU it starts 2 processes): --local_rank is accepted and the run equals one process."""
    launcher = shutil.which("deepspeed")
    if launcher is None:
        pytest.skip("the deepspeed launcher script is not on PATH")
    work = str(tmp_path / "w")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(launch.free_port()), "--module",
                           "llava_ft", "finetune", configs["llava"], "--work-dir", work, "--deepspeed", "zero2"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert losses(work) == pytest.approx(losses(single_llava), rel=1e-5)
    assert_same_weights(iter_state(work, STEPS), iter_state(single_llava, STEPS))


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("tuning", ["lora", "full"])
def test_text_zero3_builds_sharded_and_matches_single_process(configs, tmp_path, tuning):
    """A non-quantized LLM under ZeRO-3 is built in deepspeed.zero.Init (no rank holds it whole), and the
    new LoRA weights start as in one process (seeded after loading), so losses and weights match. A full
    fine-tune saves every weight, gathered module by module: the same iter file as one process."""
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    overrides = ["model.quantization=none"] + (["model.llm_lora.enabled=false", "train.learning_rate=1e-4"]
                                               if tuning == "full" else [])
    run_cli(["train", configs["text"], *overrides, ONE_PROCESS, "--work-dir", single])
    proc = run_cli(["train", configs["text"], *overrides, "--work-dir", multi, "--deepspeed", "zero3"], nproc=2)
    assert "built sharded (deepspeed.zero.Init)" in proc.stdout + proc.stderr
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5)
    multi_state, single_state = iter_state(multi, 4), iter_state(single, 4)
    if tuning == "full":
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(yaml.safe_load(Path(configs["text"]).read_text())["model"]["llm"])
        assert set(single_state) == {f"llm.{n}" for n, _ in base.named_parameters()}  # every weight saved
    assert_same_weights(multi_state, single_state)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_qlora_text_zero2_matches_single_process(configs, tmp_path):
    """4-bit NF4 + LoRA under ZeRO-2 with 2 processes (~35 s) vs one process with accum 2."""
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    run_cli(["train", configs["text"], ONE_PROCESS, "--work-dir", single])
    run_cli(["train", configs["text"], "--work-dir", multi, "--deepspeed", "zero2"], nproc=2)
    assert losses(multi) == pytest.approx(losses(single), rel=1e-5)
    assert_same_weights(iter_state(multi, 4), iter_state(single, 4))


@pytest.mark.gpu
def test_flash_attention_chosen_on_a_gpu_when_installed():
    from llava_ft.model.llm import resolve_attn_implementation

    pytest.importorskip("flash_attn")
    impl, why = resolve_attn_implementation("auto")
    assert impl == "flash_attention_2" and "GPU" in why


def test_sdpa_chosen_without_a_gpu_with_the_reason():
    from llava_ft.model.llm import resolve_attn_implementation

    if torch.cuda.is_available():
        pytest.skip("CPU-only behaviour")
    impl, why = resolve_attn_implementation("auto")
    assert impl == "sdpa" and "no CUDA GPU" in why
