"""Built-in CPU demo: tiny random-init models, a locally trained tokenizer and synthetic shape data.

`llava_ft.demo.assets` builds them (used by `llava_ft demo`, `llava_ft data demo` and tests/conftest.py).
"""
from llava_ft.demo.assets import (  # noqa: F401
    build_demo_workspace,
    build_tiny_clip,
    build_tiny_llm,
    build_tiny_siglip,
    build_tokenizer,
    make_demo_data,
)
