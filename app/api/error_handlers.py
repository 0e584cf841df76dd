"""One error shape for every non-2xx answer::

    {"error": {"code": "queue_full", "message": "...", "request_id": "..."}}

``AppError`` subclasses (``app.errors``) carry their status and code;
``model``'s errors and the framework's are mapped here, in one table each.
Tracebacks never reach clients, and neither do the server's paths: a model error
of the server's (5xx) answers with what failed and the request id, its detail in
the log, and any message naming a file under the server's own folders (its data,
temporary, home, install and working directories) names it by its file name only.
"""

import logging
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import Scope

from app.api.responses import OrjsonResponse
from app.api.routing import allowed_methods
from app.errors import AppError, DatabaseUnavailableError
from model import (
    CheckpointError,
    DatasetError,
    InvalidImageError,
    InvalidOptionError,
    ModelError,
    WeightsUnavailableError,
)

log = logging.getLogger(__name__)

_MODEL_ERRORS: dict[type[ModelError], tuple[int, str]] = {
    InvalidImageError: (400, "invalid_image"),
    DatasetError: (400, "invalid_dataset"),
    InvalidOptionError: (422, "invalid_option"),
    CheckpointError: (500, "model_error"),
    WeightsUnavailableError: (503, "weights_unavailable"),
}

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    503: "unavailable",
    504: "deadline_exceeded",
}


def request_id_of(scope_or_request) -> str:
    scope = getattr(scope_or_request, "scope", scope_or_request)
    return scope.get("state", {}).get("request_id", "")


def error_response(
    status_code: int, code: str, message: str, request_id: str, headers: dict | None = None
) -> Response:
    body = {"error": {"code": code, "message": without_paths(message), "request_id": request_id}}
    return OrjsonResponse(body, status_code=status_code, headers=headers)


_PRIVATE_ROOTS: set[str] = set()


def keep_private(folders: Iterable[Path | str]) -> None:
    """Folders whose paths no error body shows (besides the process's own)."""
    for folder in folders:
        root = os.path.realpath(folder).rstrip("/")
        if root:  # never "/": every path would go
            _PRIVATE_ROOTS.update({root, os.path.abspath(folder).rstrip("/")})


keep_private(
    [tempfile.gettempdir(), Path.home(), Path.cwd(), sys.prefix, Path(__file__).parents[2]]
)


def without_paths(message: str) -> str:
    """``message`` with every path under a private folder cut to its file name."""
    for root in sorted(_PRIVATE_ROOTS, key=len, reverse=True):
        if root in message:
            message = re.sub(
                r"(?<![\w./-])" + re.escape(root) + r"(?![^/\s'\"(),;:])(/[^\s'\"(),;:]*)?",
                lambda m: os.path.basename(m[0].rstrip("/")) or "(a server folder)",
                message,
            )
    return message


def model_error_status(error: ModelError) -> tuple[int, str]:
    for cls in type(error).__mro__:
        if cls in _MODEL_ERRORS:
            return _MODEL_ERRORS[cls]
    return 500, "model_error"


# what clients of a route most often get wrong, said with the error it causes
_HINTS = {
    ("/v1/segment", "images"): "send the files as the multipart field `images`, one or "
    "more; /v1/segment/visualize takes one `image`",
    ("/v1/segment/visualize", "image"): "send the file as the multipart field `image`; "
    "/v1/segment takes one or more `images`",
    ("/v1/segment/json", "body"): "to upload image files instead, send them as multipart "
    "to /v1/segment",
}
_SOURCES = ("body", "query", "path", "header", "cookie")


def field_path(loc: tuple) -> str:
    """One style for every field: ``images[0].url``; ``query parameter state``."""
    source, parts = ("body", loc) if not loc or loc[0] not in _SOURCES else (loc[0], loc[1:])
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else str(part)
    return f"{source} parameter {path}" if source != "body" else path or "body"


def describe_validation(error: RequestValidationError, request: Request) -> str:
    """Each problem as ``field: what was wrong``, with a hint for the usual
    mistakes (``image`` for ``images``, multipart where JSON is expected)."""
    parts = []
    for item in error.errors()[:10]:
        loc, kind = tuple(item.get("loc", ())), item.get("type")
        where, message = field_path(loc), item.get("msg", "invalid").removeprefix("Value error, ")
        if kind == "json_invalid":
            reason = (item.get("ctx") or {}).get("error", "invalid")
            where, message = "body", f"not valid JSON ({reason} at character {loc[-1]})"
        elif loc == ("body",) and kind in ("model_attributes_type", "dict_type"):
            got = request.headers.get("content-type", "none").split(";")[0]
            message = f"expected a JSON object (Content-Type: application/json), got {got}"
        if kind in ("missing", "model_attributes_type", "dict_type") and (
            hint := _HINTS.get((request.url.path, where))
        ):
            message += f" ({hint})"
        parts.append(f"{where}: {message}")
    return "; ".join(parts) or "invalid request"


_REJECTED = {413, 429, 503, 504}


async def _handle_app_error(request: Request, exc: AppError) -> Response:
    service = getattr(request.app.state, "service", None)
    if exc.status_code in _REJECTED and service is not None:
        service.metrics.rejected.labels(reason=exc.code).inc()
    return error_response(
        exc.status_code, exc.code, exc.message, request_id_of(request), exc.headers
    )


async def _handle_model_error(request: Request, exc: ModelError) -> Response:
    status, code = model_error_status(exc)
    message = str(exc)
    if isinstance(exc, DatasetError) and exc.problems:
        message = f"{message}: " + "; ".join(exc.problems)
    request_id = request_id_of(request)
    if status >= 500:  # the server's own files or settings: the log has them
        log.error("model error (request %s): %s", request_id, exc)
        message = f"the model could not be loaded or run; the server log has why ({request_id})"
    return error_response(status, code, message, request_id)


async def _handle_http(request: Request, exc: StarletteHTTPException) -> Response:
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
    headers = getattr(exc, "headers", None)
    if exc.status_code == 405 and (methods := allowed_methods(request.app, request.scope)):
        headers = {**(headers or {}), "Allow": ", ".join(methods)}
        message = (
            f"{request.method} is not served at {request.url.path}; allowed: {', '.join(methods)}"
        )
    return error_response(exc.status_code, code, message, request_id_of(request), headers)


async def _handle_validation(request: Request, exc: RequestValidationError) -> Response:
    message = describe_validation(exc, request)
    return error_response(422, "validation_error", message, request_id_of(request))


def internal_error_response(scope: Scope) -> Response:
    """The 500 for an exception nothing else answered; call it while handling that
    exception, whose traceback goes to the log and never to the client."""
    log.exception("unhandled error on %s %s", scope.get("method"), scope["path"])
    return error_response(
        500, "internal_error", "internal server error; see the server log", request_id_of(scope)
    )


async def _handle_database(request: Request, exc: SQLAlchemyError) -> Response:
    """A database that refuses, drops or times out is 503 (the routes that need it);
    any other database error is the server's (500)."""
    if not isinstance(exc, OperationalError | InterfaceError | PoolTimeoutError):
        return internal_error_response(request.scope)
    log.warning("database unavailable on %s: %s", request.url.path, exc)
    return await _handle_app_error(
        request, DatabaseUnavailableError("the database is unavailable; retry later")
    )


async def _handle_unexpected(request: Request, exc: Exception) -> Response:
    return internal_error_response(request.scope)


def install_error_handlers(app: FastAPI, private: Iterable[Path] = ()) -> None:
    """``private``: the server's folders (``DATA_DIR``, caches) no error body names."""
    keep_private(private)
    app.add_exception_handler(AppError, _handle_app_error)
    app.add_exception_handler(ModelError, _handle_model_error)
    app.add_exception_handler(SQLAlchemyError, _handle_database)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(Exception, _handle_unexpected)
