"""The OpenAPI document, with one adjustment for client generators."""

from typing import Any

from fastapi import FastAPI


def mark_binary_fields(schema: dict[str, Any]) -> dict[str, Any]:
    """Add ``format: binary`` next to OpenAPI 3.1's ``contentMediaType`` on file
    fields: generators such as openapi-python-client only type the former as files."""

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("contentMediaType") == "application/octet-stream":
                node.setdefault("format", "binary")
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(schema.get("components", {}))
    return schema


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = mark_binary_fields(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi
