"""The app's routes as they are served, for the code that reasons about them:
the token checks (``app.api.auth``), the OpenAPI security entries and the 405's
``Allow`` header."""

from typing import Any

import fastapi.routing
from fastapi import FastAPI
from starlette.routing import Match
from starlette.types import Scope


def served_routes(app: FastAPI) -> list[Any]:
    """Every route as served, included routers flattened: recent FastAPI keeps an
    included router whole in ``app.routes`` and lists its routes (``path_format``,
    ``methods``, ``dependant``, ``matches``) through ``iter_route_contexts``."""
    iter_contexts = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(iter_contexts(app.routes)) if iter_contexts else list(app.routes)


def allowed_methods(app: FastAPI, scope: Scope) -> list[str]:
    """Every method some route serves at ``scope``'s path (Starlette's 405 names
    only the first route's)."""
    methods: set[str] = set()
    for route in served_routes(app):
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)
