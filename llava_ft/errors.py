"""User-facing error type.

Raise `UserError` for anything the user can fix (bad config key, missing file, malformed data line).
The CLI prints its message on one line (no traceback) and exits with status 2. Messages should name the
file/line/key/sample id and say what to do.
"""


class UserError(Exception):
    """An error caused by user input; printed without a traceback by the CLI."""
