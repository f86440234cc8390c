"""OpenAI-style API errors for the serve app.

Raise `ApiError(status, message, ...)` anywhere in request handling; `llava_ft.serve.app` turns it into
`{"error": {"message", "type", "param", "code"}}` with that HTTP status (and headers such as Retry-After),
the body shape the official `openai` client parses into its exception classes.
"""
from __future__ import annotations

from typing import Optional

# HTTP status -> OpenAI error "type" (what the official API uses for each class of failure)
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_overloaded",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[dict] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
