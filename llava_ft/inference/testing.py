"""Old import path of `llava_ft.testing.checkpoints` (`write_random_checkpoint`); kept for one release."""
from llava_ft.testing.checkpoints import write_random_checkpoint  # noqa: F401
