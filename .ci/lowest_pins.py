"""Print `name==X` for every `name>=X` dependency in pyproject.toml: the lowest versions we promise.

`.ci/run` installs these into a virtual environment and runs the smoke tests (`-m smoke`) there, so CI
proves the lower bounds pyproject.toml declares (upper bounds are caps on the next major version).

    python .ci/lowest_pins.py            # -> transformers==5.20 peft==0.20 ...
    python .ci/lowest_pins.py --dev      # -> the dev extra's tools the smoke subset runs with

The lowest-versions venv gets the dev extra's test tools but not the ones in NOT_WITH_LOWEST: they need
newer versions of our own dependencies than the lower bounds we promise (TRL 1.16 needs datasets>=4.7 and
accelerate>=1.10.1), so pip could not resolve them beside the pins; the tests that use them skip without
them (pytest.importorskip) and none of them is a smoke test.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement


NOT_WITH_LOWEST = {"trl"}


def dev_tools(pyproject: Path) -> list[str]:
    """The dev extra's requirements, less NOT_WITH_LOWEST."""
    dev = tomllib.loads(pyproject.read_text())["project"]["optional-dependencies"]["dev"]
    return [line for line in dev if Requirement(line).name not in NOT_WITH_LOWEST]


def lowest_pins(pyproject: Path) -> list[str]:
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    pins = []
    for line in deps:
        req = Requirement(line)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        if lower:
            pins.append(f"{req.name}=={lower[0]}")
    return pins


if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    if "--dev" in sys.argv[1:]:
        print("\n".join(dev_tools(root / "pyproject.toml")))  # one a line: specifiers hold no spaces
    else:
        print(" ".join(lowest_pins(root / "pyproject.toml")))
    sys.exit(0)
