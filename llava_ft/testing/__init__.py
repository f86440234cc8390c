"""Tiny, offline building blocks for tests, benchmarks and the demo.

Random-init models in real Hugging Face folder layouts, local tokenizers and synthetic data, built on
the CPU with no downloads. Tests (`tests/conftest.py`), benchmarks and `llava_ft demo` all build on the
modules of this package, so there is one place that knows how a tiny model or dataset is made.
"""
