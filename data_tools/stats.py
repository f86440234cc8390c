"""Standalone script: same as `llava_ft data stats` (run with --help for the flags).

    python data_tools/stats.py ...
"""
import sys

from llava_ft.commands.data import main

if __name__ == "__main__":
    raise SystemExit(main(["stats", *sys.argv[1:]]))
