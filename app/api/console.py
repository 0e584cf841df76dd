"""The web console: one page at ``/``, its scripts and styles under ``/console/``.

The files ship inside the package (``app/console``), so the console works on an
offline machine, and a Content-Security-Policy lets the page run only its own
scripts (no inline script or style) and talk only to this server. The page holds
no data of its own: everything it shows comes from the public API with the
tokens the user types in. ``/`` takes the docs token (``MASKRCNN_PROTECT_DOCS``)
as ``/docs`` does; the assets are public files and stay open.
"""

from importlib.resources import files

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from app.api.auth import DocsToken

ASSETS = "/console"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def install_console(app: FastAPI) -> None:
    directory = files("app") / "console"
    app.mount(ASSETS, StaticFiles(directory=str(directory)), name="console_assets")

    @app.get("/", include_in_schema=False, dependencies=[DocsToken])
    async def console() -> FileResponse:
        return FileResponse(
            str(directory / "index.html"),
            media_type="text/html; charset=utf-8",
            headers={
                "Content-Security-Policy": CONTENT_SECURITY_POLICY,
                "Cache-Control": "no-cache",
            },
        )
