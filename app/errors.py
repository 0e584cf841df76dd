"""The service's errors: each ``AppError`` subclass carries its HTTP status and
error code. ``app.api.error_handlers`` turns them, ``model``'s errors and the
framework's into the one error shape clients see."""

import math


class AppError(Exception):
    status_code = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message = message
        self.code = code or self.code
        self.headers = headers or {}


class BadRequestError(AppError):
    status_code, code = 400, "bad_request"


class UnauthorizedError(AppError):
    status_code, code = 401, "unauthorized"


class ForbiddenError(AppError):
    status_code, code = 403, "forbidden"


class NotFoundError(AppError):
    status_code, code = 404, "not_found"


class ConflictError(AppError):
    """The resource's state forbids it (e.g. cancelling a finished job)."""

    status_code, code = 409, "conflict"


class UnprocessableError(AppError):
    """Well formed, but past what this deployment can do."""

    status_code, code = 422, "validation_error"


class PayloadTooLargeError(AppError):
    status_code, code = 413, "payload_too_large"


class UnsupportedMediaTypeError(AppError):
    status_code, code = 415, "unsupported_media_type"


class QuotaError(AppError):
    """A limit on what the server stores or queues (``MAX_QUEUED_JOBS``,
    ``MAX_DATASETS``); it lasts until something is removed or finished."""

    status_code, code = 429, "too_many_requests"


class UnavailableError(AppError):
    """503 with ``Retry-After`` (seconds, at least 1)."""

    status_code, code = 503, "unavailable"

    def __init__(self, message: str, *, retry_after: float = 1.0, code: str | None = None):
        seconds = max(1, math.ceil(retry_after))
        super().__init__(message, code=code, headers={"Retry-After": str(seconds)})
        self.retry_after = seconds


class DatabaseUnavailableError(UnavailableError):
    """The database refused, failed or did not answer in time: routes that need it
    answer 503; inference never does."""

    code = "database_unavailable"

    def __init__(self, message: str):
        super().__init__(message, retry_after=5)


class QueueFullError(UnavailableError):
    code = "queue_full"


class NotReadyError(UnavailableError):
    code = "not_ready"


class DeadlineExceededError(AppError):
    status_code, code = 504, "deadline_exceeded"
