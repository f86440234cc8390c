"""Model loading: `llm` (causal LM + LoRA), `vision`, `projector`, `llava` (the wrapper), `builder`.

Import the submodules directly (`from llava_ft.model.builder import build_model`); this package file
imports nothing heavy so that `llava_ft.model.llm` can be used without the vision stack.
"""
