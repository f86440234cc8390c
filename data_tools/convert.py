"""Standalone script: same as `llava_ft data convert` (run with --help for the flags).

    python data_tools/convert.py ...
"""
import sys

from llava_ft.commands.data import main

if __name__ == "__main__":
    raise SystemExit(main(["convert", *sys.argv[1:]]))
