"""The fine-tuning API's errors, in OpenAI's ``{"error": {...}}`` body.

Its own module because the routes (``http_api.py``) and the admission code behind them
(``serving_files.py``, ``serving_jobs.py``) all raise them.
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

# How long a client told "busy" (503) waits before it tries again: the work that holds the
# server (a dataset being checked, a lock another writer holds) takes seconds.
RETRY_AFTER_S = 5


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = (
            status,
            message,
            param,
            code,
            type,
        )
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return JSONResponse({"error": body}, status_code=self.status, headers=self.headers)


def busy(message: str, code: str, retry_after_s: int = RETRY_AFTER_S) -> ApiError:
    """A 503 the client should retry (OpenAI's clients do, after ``Retry-After``)."""
    return ApiError(
        503, message, code=code, type="server_error", headers={"Retry-After": str(retry_after_s)}
    )


def shown(value: Any) -> str:
    """A client's value in a message, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:40] + "..."
