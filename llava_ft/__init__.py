"""llava_ft: train LLaVA-style vision-language models and fine-tune LLMs with an XTuner-like workflow.

Entry point for users is the `llava_ft` command (see `llava_ft.cli`). Library users import the pieces:
`llava_ft.config.load_config`, `llava_ft.engine.run_training`, `llava_ft.inference.load_model`.
"""

__version__ = "0.1.0"

# Sentinel id placed in `input_ids` where an image's features are spliced in (same value XTuner and
# LLaVA use, so `log-dataset --json` output is comparable across tools).
IMAGE_TOKEN_INDEX = -200
IMAGE_TOKEN = "<image>"
IGNORE_INDEX = -100
