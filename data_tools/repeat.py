"""Standalone script: same as `llava_ft data repeat` (run with --help for the flags).

    python data_tools/repeat.py ...
"""
import sys

from llava_ft.commands.data import main

if __name__ == "__main__":
    raise SystemExit(main(["repeat", *sys.argv[1:]]))
