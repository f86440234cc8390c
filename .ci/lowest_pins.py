"""Print `name==X` for every `name>=X` dependency in pyproject.toml: the lowest versions we promise.

`.ci/run` installs these into a virtual environment and runs the smoke tests (`-m smoke`) there, so CI
proves the lower bounds pyproject.toml declares (upper bounds are caps on the next major version).

    python .ci/lowest_pins.py            # -> transformers==5.20 peft==0.20 ...
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement


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
    print(" ".join(lowest_pins(root / "pyproject.toml")))
    sys.exit(0)
