"""The wheel is a complete library: recipes, DeepSpeed JSONs and the server ship inside `llava_ft`.

Builds the wheel from a copy of the checkout, installs it with `pip install --target` into an empty folder
outside the checkout and, from a third folder with only that folder on PYTHONPATH, runs what a user of a
plain `pip install .` runs: list-cfg, copy-cfg, a recipe by name with `--deepspeed zero2`, and the server
import. Nothing is downloaded (no build isolation, no dependencies).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Build outputs and work folders of the checkout must not leak into the wheel (setuptools packs a stale
# build/lib too), so the wheel is built from a copy without them.
_SKIP = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", "work_dirs", "demo_workspace",
                               ".pytest_cache", "tests", "benchmarks", "docs")


def _run(cmd: list[str], cwd: Path, env: dict) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, symlinks=True, ignore=_SKIP)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    _run([sys.executable, "-m", "pip", "wheel", str(src), "-w", str(tmp / "whl"), "--no-deps",
          "--no-build-isolation", "-q"], tmp, env)
    wheel = next((tmp / "whl").glob("llava_ft-*.whl"))
    site = tmp / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(site), "-q", str(wheel)], tmp, env)
    return wheel


def test_wheel_holds_recipes_and_server_under_llava_ft(installed):
    names = zipfile.ZipFile(installed).namelist()
    assert "llava_ft/recipes/deepspeed/zero2.json" in names
    assert "llava_ft/recipes/demo/tiny_llava_pretrain.yaml" in names
    assert {"llava_ft/serve/app.py", "llava_ft/serve/static/index.html"} <= set(names)
    # Only `llava_ft` at the top: no generic `serve` (or `configs`) package to collide with others.
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"llava_ft"}, tops
    # One copy of each recipe: the wheel's files are the repository's configs/ files.
    for path in (REPO / "configs").rglob("*"):
        if path.is_file():
            packed = zipfile.ZipFile(installed).read(f"llava_ft/recipes/{path.relative_to(REPO / 'configs')}")
            assert packed == path.read_bytes(), path


def test_installed_wheel_works_from_any_folder(installed, tmp_path):
    site = installed.parent.parent / "site"
    env = dict(os.environ, PYTHONPATH=str(site))  # the installed copy only
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _run([sys.executable, "-c", "import llava_ft; print(llava_ft.__file__)"], elsewhere, env)
    assert where.strip().startswith(str(site)), where  # the installed copy, not the checkout

    names = _run([sys.executable, "-m", "llava_ft", "list-cfg"], elsewhere, env).split()
    assert "qwen2_5_0_5b_instruct_qlora_alpaca_e3" in names and "tiny_llava_pretrain" in names
    assert "zero2" not in names  # DeepSpeed JSONs are not recipes

    out = _run([sys.executable, "-m", "llava_ft", "copy-cfg", "tiny_text_sft_qlora", "mine"], elsewhere, env)
    copied = elsewhere / "mine" / "tiny_text_sft_qlora_copy.yaml"
    assert str(copied.relative_to(elsewhere)) in out
    assert copied.read_bytes() == (REPO / "configs" / "demo" / "tiny_text_sft_qlora.yaml").read_bytes()

    out = _run([sys.executable, "-m", "llava_ft", "train", "qwen2_5_0_5b_instruct_qlora_alpaca_e3",
                "--deepspeed", "zero2", "--dry-run"], elsewhere, env)
    assert f"{site}/llava_ft/recipes/qwen2_5/qwen2_5_0_5b_instruct_qlora_alpaca_e3.yaml" in out, out
    assert f"deepspeed {site}/llava_ft/recipes/deepspeed/zero2.json" in out, out

    pytest.importorskip("fastapi")
    app_file = _run([sys.executable, "-c", "import llava_ft.serve.app as m; print(m.__file__)"], elsewhere, env)
    assert app_file.strip() == f"{site}/llava_ft/serve/app.py"
