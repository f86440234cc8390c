"""Old import path of `llava_ft.testing.server` (`serve_in_thread`); kept for one release."""
from llava_ft.testing.server import serve_in_thread  # noqa: F401
