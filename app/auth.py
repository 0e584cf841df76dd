"""Bearer tokens (SPEC §9).

- ``MASKRCNN_API_TOKENS`` set: every ``/v1`` route needs ``Authorization: Bearer
  <token>`` with one of them (or the admin token); unset: inference is open.
- Admin routes (datasets, training jobs, model activation) need
  ``MASKRCNN_ADMIN_TOKEN``; when it is unset they are refused with 403 saying how to
  enable them. An inference token never grants them (403), an unknown one is 401.

Tokens are compared with ``hmac.compare_digest`` against every configured token,
so the time taken says nothing about which one (or how much of one) matched.
"""

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import ForbiddenError, UnauthorizedError
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


def check_api_token(request: Request) -> None:
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


def check_admin_token(request: Request) -> None:
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


ApiToken = Depends(check_api_token)
AdminToken = Depends(check_admin_token)
AdminDep = Annotated[None, AdminToken]
