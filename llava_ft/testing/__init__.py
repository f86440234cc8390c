"""Tiny, offline building blocks for tests and benchmarks.

Random checkpoints, servers on a loopback port, model-family tokenizers and InternLM2 builds, made on the
CPU with no downloads. The tiny models, tokenizer and shape data themselves belong to the demo
(`llava_ft.demo.assets`, which `llava_ft demo` and `data demo` build); these modules build on them.
"""
