"""Standalone script: same as `llava_ft data replace` (run with --help for the flags).

    python data_tools/replace.py ...
"""
import sys

from llava_ft.commands.data import main

if __name__ == "__main__":
    raise SystemExit(main(["replace", *sys.argv[1:]]))
