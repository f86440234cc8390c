"""`python -m llava_ft ...` is the same as the `llava_ft` command."""
from llava_ft.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
