"""Start-up check that the libraries llava_ft drives are within the versions it is tested with.

    from llava_ft.versions import check_versions
    check_versions()        # UserError naming each package, its version, the range and the pip command

XTuner and LLaVA broke silently when transformers moved (XTuner #727): a renamed argument or a changed
default turned into a traceback deep inside training, or worse into a run that trains the wrong thing.
The ranges live in one place, pyproject.toml's dependencies (read back from the installed package's
metadata, so nothing is written twice); `llava_ft` checks the core ones before any command runs, and
deepspeed when a run asks for --deepspeed (an old deepspeed that is installed but unused must not block
anything). Running from a source tree that was never installed skips the check.
LLAVA_FT_SKIP_VERSION_CHECK=1 lets an expert run anyway, at their own risk.
"""
from __future__ import annotations

import os
import re
from importlib import metadata

from llava_ft.errors import UserError

# The libraries whose APIs llava_ft calls into; small utilities (pyyaml, tqdm, ...) are left to pip.
CORE = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "open_clip_torch")
CHECKED = CORE + ("deepspeed",)
SKIP_ENV = "LLAVA_FT_SKIP_VERSION_CHECK"


def required_ranges() -> dict:
    """{package: specifier string} for CHECKED packages, from llava_ft's installed metadata ({} if not installed)."""
    try:
        requirements = metadata.requires("llava_ft") or []
    except metadata.PackageNotFoundError:
        return {}
    from packaging.requirements import Requirement

    ranges: dict = {}
    for line in requirements:
        req = Requirement(line)
        name = req.name.lower().replace("-", "_")
        if name in CHECKED and str(req.specifier) and name not in ranges:
            ranges[name] = str(req.specifier)
    return ranges


def out_of_range(names=CORE, installed=None) -> list:
    """(name, installed version, required range) for each package of `names` outside its range.
    `installed(name) -> version | None` is for tests."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    def lookup(name: str):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    installed = installed or lookup
    bad = []
    for name, spec in required_ranges().items():
        if name not in names:
            continue
        found = installed(name)
        if found is None:
            continue  # a missing core dependency fails at import with its own name; extras are optional
        try:
            ok = SpecifierSet(spec).contains(Version(found), prereleases=True)
        except InvalidVersion:
            continue  # a home-made build with a version packaging cannot read: trust the user
        if not ok:
            bad.append((name, found, _pretty(spec)))
    return bad


def version_problems(names=CORE, installed=None) -> list:
    """One readable line per package of `names` outside its range."""
    return [_describe(*item) for item in out_of_range(names, installed)]


def check_versions(names=CORE) -> None:
    if os.environ.get(SKIP_ENV) == "1":
        return
    bad = out_of_range(names)
    if bad:
        problems = "; ".join(_describe(*item) for item in bad)
        fix = " ".join(f"'{name}{spec}'" for name, _, spec in bad)
        raise UserError(f"{problems}. Fix with: pip install {fix} (these are the versions llava_ft is tested "
                        f"with; set {SKIP_ENV}=1 to run anyway at your own risk)")


def _describe(name: str, found: str, spec: str) -> str:
    return f"{name} {found} is installed; llava_ft needs {name}{spec}"


def _pretty(spec: str) -> str:
    """'<6,>=5.20' -> '>=5.20,<6' (lower bound first reads naturally)."""
    parts = sorted(spec.split(","), key=lambda s: 0 if re.match(r"\s*>", s) else 1)
    return ",".join(p.strip() for p in parts)
