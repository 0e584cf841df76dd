"""The interactive API pages: ``/docs`` (Swagger UI) and ``/redoc`` (ReDoc).

Their scripts and styles come from this server (the ``fastapi-offline`` package
ships them), never from a CDN: the pages work on an offline or air-gapped
machine. A Content-Security-Policy lets the browser load nothing from another
host either (ReDoc's sidebar links a logo on redoc.ly: it is not fetched, the
page hides it). The pages take the
docs token (``MASKRCNN_PROTECT_DOCS``) like ``/openapi.json``; the assets are
the public Swagger UI and ReDoc files and stay open.
"""

from importlib.resources import files

from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from app.api.auth import DocsToken

ASSETS = "/docs/assets"
# inline: Swagger UI's start-up script and both pages' computed styles; blob:
# ReDoc's search worker
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)
DOCS, REDOC, OAUTH2_REDIRECT = "/docs", "/redoc", "/docs/oauth2-redirect"


def install_docs(app: FastAPI) -> None:
    """Add the pages and their assets to an app built with ``docs_url=None`` and
    ``redoc_url=None`` (FastAPI's own pages load their assets from a CDN)."""
    assets = files("fastapi_offline") / "static"
    app.mount(ASSETS, StaticFiles(directory=str(assets)), name="docs_assets")

    def root(request: Request) -> str:
        return request.scope.get("root_path", "")

    @app.get(DOCS, include_in_schema=False, dependencies=[DocsToken])
    async def swagger_ui(request: Request) -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=root(request) + app.openapi_url,
            title=f"{app.title} - Swagger UI",
            oauth2_redirect_url=root(request) + OAUTH2_REDIRECT,
            swagger_js_url=f"{root(request)}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root(request)}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root(request)}{ASSETS}/favicon.png",
        )
        return same_origin_only(page)

    @app.get(OAUTH2_REDIRECT, include_in_schema=False, dependencies=[DocsToken])
    async def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC, include_in_schema=False, dependencies=[DocsToken])
    async def redoc(request: Request) -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=root(request) + app.openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root(request)}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root(request)}{ASSETS}/favicon.png",
            with_google_fonts=False,
        )
        return same_origin_only(page)


def same_origin_only(page: HTMLResponse) -> HTMLResponse:
    page.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    return page
