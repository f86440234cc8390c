"""Standalone script: same as `llava_ft data check` (run with --help for the flags).

    python data_tools/check.py ...
"""
import sys

from llava_ft.commands.data import main

if __name__ == "__main__":
    raise SystemExit(main(["check", *sys.argv[1:]]))
