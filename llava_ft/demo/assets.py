"""Old import path of `llava_ft.testing.assets` (tiny models, tokenizer and demo data); kept for one release."""
from llava_ft.testing.assets import *  # noqa: F401,F403
