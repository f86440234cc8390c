"""The start-up version check: libraries outside the tested ranges stop `llava_ft` with one actionable line."""
from __future__ import annotations

from importlib import metadata

import pytest

from llava_ft import cli
from llava_ft.versions import CHECKED, required_ranges, version_problems


def test_ranges_come_from_pyproject_and_this_environment_is_inside_them():
    ranges = required_ranges()
    assert {"torch", "transformers", "peft", "bitsandbytes", "deepspeed"} <= set(ranges)
    assert ranges["transformers"].count(",") == 1  # a lower and an upper bound
    assert version_problems(CHECKED) == []


def test_old_transformers_is_named_with_the_range():
    old = {"transformers": "4.46.0", "peft": "0.21.2"}
    problems = version_problems(installed=lambda name: old.get(name, metadata.version(name)))
    assert problems == ["transformers 4.46.0 is installed; llava_ft needs transformers>=5.20,<6"]


def test_cli_refuses_to_start_and_says_how_to_fix(monkeypatch, capsys):
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "6.1.0" if name == "transformers" else real(name))
    assert cli.main(["list-cfg"]) == 2
    err = capsys.readouterr().err
    assert "transformers 6.1.0 is installed; llava_ft needs transformers>=5.20,<6" in err
    assert "pip install 'transformers>=5.20,<6'" in err and "LLAVA_FT_SKIP_VERSION_CHECK=1" in err
    monkeypatch.setenv("LLAVA_FT_SKIP_VERSION_CHECK", "1")
    assert cli.main(["list-cfg"]) == 0


@pytest.mark.parametrize("name,version", [("transformers", "5.23.0"), ("transformers", "5.99.1.dev0"),
                                          ("torch", "2.15.0+cu132")])
def test_versions_inside_the_range_pass(name, version):
    assert version_problems(names=(name,), installed=lambda _: version) == []
    assert version_problems(names=(name,), installed=lambda _: "1.0") != []  # control: below every range
