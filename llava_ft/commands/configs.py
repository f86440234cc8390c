"""`llava_ft list-cfg [-p PATTERN]` and `llava_ft copy-cfg NAME DIR` (XTuner's workflow for recipes).

list-cfg prints the built-in recipe names (one a line, filtered by a case-insensitive substring);
copy-cfg writes DIR/NAME_copy.yaml, a byte-for-byte copy of the recipe, ready to edit and train with
`llava_ft train DIR/NAME_copy.yaml`.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.prog.endswith("copy-cfg"):
        parser.add_argument("name", help="recipe name as `llava_ft list-cfg` prints it (or a YAML path)")
        parser.add_argument("dir", help="folder to write NAME_copy.yaml into (created if missing)")
    else:
        parser.add_argument("-p", "--pattern", default=None, help="only names containing PATTERN (case-insensitive)")


def list_cfg(pattern: str | None) -> int:
    from llava_ft.config import list_configs

    names = list_configs(pattern)
    if not names:
        print(f"no built-in recipe matches '{pattern}'")
        return 1
    print("\n".join(names))
    return 0


def copy_cfg(name: str, out_dir: str) -> Path:
    """Copy a recipe to out_dir/<name>_copy.yaml atomically; returns the new path."""
    from llava_ft.config import resolve_config_path
    from llava_ft.fileio import write_bytes

    src = resolve_config_path(name)
    dest = Path(out_dir) / f"{src.stem}_copy.yaml"
    write_bytes(dest, src.read_bytes())
    return dest


def run(args: argparse.Namespace) -> int:
    if args.command == "copy-cfg":
        dest = copy_cfg(args.name, args.dir)
        print(f"Copy to {dest}")
        return 0
    return list_cfg(args.pattern)
