"""Bearer tokens.

- ``MASKRCNN_API_TOKENS`` set: every ``/v1`` route needs ``Authorization: Bearer
  <token>`` with one of them (or the admin token); unset: inference is open.
- Admin routes (datasets, training jobs, model activation) need
  ``MASKRCNN_ADMIN_TOKEN``; when it is unset they are refused with 403 saying how to
  enable them. An inference token never grants them (403), an unknown one is 401.
- ``/healthz`` and ``/readyz`` are always open; ``/metrics`` needs an API token
  when ``MASKRCNN_PROTECT_METRICS`` is true, ``/openapi.json``, ``/docs`` and
  ``/redoc`` when ``MASKRCNN_PROTECT_DOCS`` is.

Tokens are compared with ``hmac.compare_digest`` against every configured token,
so the time taken says nothing about which one (or how much of one) matched.

The route dependencies below are the declaration: the OpenAPI document
(``app.api.openapi``) and ``AuthGate`` both read them (``served_routes``). The gate runs
the same checks before the body is read, since FastAPI parses a body before it
solves dependencies: without it a client with no token could still make the server
parse ``MAX_UPLOAD_MB`` of JSON or multipart.
"""

import hmac
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from fastapi import Depends, FastAPI, Request
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.error_handlers import error_response, request_id_of
from app.api.routing import served_routes
from app.errors import AppError, ForbiddenError, UnauthorizedError
from app.settings import Settings

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="maskrcnn"'}


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else ``None``."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def matches_any(token: str, secrets: list[str]) -> bool:
    """Constant-time membership: every secret is compared, whatever matched."""
    given = token.encode()
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(given, secret.encode())
    return found


def _settings(request: Request) -> Settings:
    return request.app.state.service.settings


def _admin_secret(settings: Settings) -> list[str]:
    return [settings.admin_token.get_secret_value()] if settings.admin_token else []


def _api_secrets(settings: Settings) -> list[str]:
    return [token.get_secret_value() for token in settings.api_tokens]


async def check_api_token(request: Request) -> None:
    """For inference and read-only ``/v1`` routes (and, where the settings say so,
    ``/metrics`` and the docs)."""
    settings = _settings(request)
    secrets = _api_secrets(settings)
    if not secrets:
        return
    token = bearer_token(request)
    if token is None:
        raise UnauthorizedError(
            "this server needs `Authorization: Bearer <token>` (MASKRCNN_API_TOKENS)",
            headers=_CHALLENGE,
        )
    if not matches_any(token, secrets + _admin_secret(settings)):
        raise UnauthorizedError("the bearer token is not valid", headers=_CHALLENGE)


async def check_admin_token(request: Request) -> None:
    """For dataset upload, training jobs and model activation."""
    settings = _settings(request)
    admin = _admin_secret(settings)
    if not admin:
        raise ForbiddenError(
            "admin routes are disabled on this server; set MASKRCNN_ADMIN_TOKEN to enable "
            "dataset upload, training jobs and model activation",
            code="admin_disabled",
        )
    token = bearer_token(request)
    if token is None:
        raise UnauthorizedError(
            "this route needs `Authorization: Bearer <admin token>` (MASKRCNN_ADMIN_TOKEN)",
            headers=_CHALLENGE,
        )
    if matches_any(token, admin):
        return
    if matches_any(token, _api_secrets(settings)):
        raise ForbiddenError("an inference token does not grant admin routes")
    raise UnauthorizedError("the bearer token is not valid", headers=_CHALLENGE)


async def check_metrics_token(request: Request) -> None:
    if _settings(request).protect_metrics:
        await check_api_token(request)


async def check_docs_token(request: Request) -> None:
    if _settings(request).protect_docs:
        await check_api_token(request)


ApiToken = Depends(check_api_token)
AdminToken = Depends(check_admin_token)
MetricsToken = Depends(check_metrics_token)
DocsToken = Depends(check_docs_token)

Check = Callable[[Request], Awaitable[None]]
CHECKS: tuple[Check, ...] = (
    check_api_token,
    check_admin_token,
    check_metrics_token,
    check_docs_token,
)


def docs_paths(app: FastAPI) -> set[str]:
    urls = (app.openapi_url, app.docs_url, app.redoc_url, app.swagger_ui_oauth2_redirect_url)
    return {url for url in urls if url}


def route_checks(route: Any, app: FastAPI) -> tuple[Check, ...]:
    """The token checks among ``route``'s dependencies (its router's included), in
    the order FastAPI runs them; the docs routes FastAPI adds get ``check_docs_token``."""
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return (check_docs_token,) if getattr(route, "path", None) in docs_paths(app) else ()
    found: list[Check] = []
    pending = list(dependant.dependencies)
    while pending:
        dependant = pending.pop(0)
        if dependant.call in CHECKS and dependant.call not in found:
            found.append(dependant.call)
        pending[:0] = dependant.dependencies
    return tuple(found)


def required_token(route: Any, app: FastAPI, settings: Settings) -> Literal["admin", "api"] | None:
    """Which token ``route`` asks for where tokens are configured (``None``: open)."""
    checks = route_checks(route, app)
    if check_admin_token in checks:
        return "admin"
    if check_api_token in checks:
        return "api"
    if check_metrics_token in checks and settings.protect_metrics:
        return "api"
    if check_docs_token in checks and settings.protect_docs:
        return "api"
    return None


class AuthGate:
    """Runs the matched route's token checks before anything reads the body."""

    def __init__(self, app: ASGIApp):
        self.app = app
        self._routes: list[tuple[Any, tuple[Check, ...]]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                for check in self._checks_for(scope):
                    await check(Request(scope))
            except AppError as e:
                response = error_response(
                    e.status_code, e.code, e.message, request_id_of(scope), e.headers
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _checks_for(self, scope: Scope) -> tuple[Check, ...]:
        if self._routes is None:  # routes are all in place by the first request
            app = scope["app"]
            self._routes = [(route, route_checks(route, app)) for route in served_routes(app)]
        for route, checks in self._routes:
            if route.matches(scope)[0] == Match.FULL:
                return checks
        return ()
