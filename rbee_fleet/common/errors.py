"""Typed errors, raised anywhere and rendered once, in OpenAI's error JSON shape."""

from __future__ import annotations

from typing import Any

from rbee_fleet.contracts.errors import error_body


class ApiError(Exception):
    """An error with an HTTP status and an OpenAI-style type and code."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.message, type=self.type, code=self.code, param=self.param)

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after)))}


class BadRequest(ApiError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class ContextOverflow(BadRequest):
    code = "context_length_exceeded"


class Unauthorized(ApiError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(ApiError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(ApiError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(ApiError):
    status = 409
    type = "invalid_request_error"
    code = "conflict"


class PayloadTooLarge(ApiError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class UpstreamFailed(ApiError):
    status = 502
    type = "server_error"
    code = "worker_failed"


class Unavailable(ApiError):
    status = 503
    type = "server_error"
    code = "no_capacity"


class OperationFailed(Exception):
    """A job's operation could not be carried out; the message says why, for a human."""


_STATUS_CLASSES: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    429: RateLimited,
    502: UpstreamFailed,
    503: Unavailable,
}


def error_from_body(status: int, body: Any, retry_after: str | None = None) -> ApiError:
    """Rebuild a typed error from another component's error response."""
    cls = _STATUS_CLASSES.get(status, ApiError)
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        err = cls(f"HTTP {status}: {str(body)[:300]}")
    else:
        err = cls(str(detail.get("message", "")), param=detail.get("param"), code=detail.get("code"))
    if retry_after:
        try:
            err.retry_after = float(retry_after)
        except ValueError:
            pass
    return err
