"""The OpenAPI document, shaped for client generators: binary file fields, the
bearer tokens each operation needs, and a name for every schema a client gets a
class for (``SegmentForm``, ``ImageUrl``, ``ImageData``, ...; none is left to the
generator to call ``BodySegment`` or ``ImageSourceType0``).

Two HTTP bearer schemes, ``apiToken`` (``MASKRCNN_API_TOKENS``) and ``adminToken``
(``MASKRCNN_ADMIN_TOKEN``), and each operation's ``security`` says which it takes,
read from its auth dependencies (``app.api.auth.required_token``): admin routes list
``adminToken`` alone, other protected routes either one (the admin token grants
them too), open routes (``/healthz``, ``/readyz``, ``/metrics`` unless
``MASKRCNN_PROTECT_METRICS``) have no ``security``. The document describes the
server that serves it: where ``MASKRCNN_API_TOKENS`` is unset, inference is open
and its operations have no ``security`` either (a generated client then calls
them with a plain ``Client``).
"""

import json
from typing import Any

from fastapi import FastAPI

from app.api.auth import required_token
from app.api.routing import served_routes
from app.api.schemas import IMAGE_SHAPES

SECURITY_SCHEMES = {
    "apiToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "an inference token (MASKRCNN_API_TOKENS); the admin token works too",
    },
    "adminToken": {
        "type": "http",
        "scheme": "bearer",
        "description": "the admin token (MASKRCNN_ADMIN_TOKEN): datasets, training, activation",
    },
}
_ERROR = {"$ref": "#/components/schemas/ErrorPublic"}  # app.api.schemas.ErrorPublic
_SECURITY = {
    "admin": [{"adminToken": []}],
    "api": [{"apiToken": []}, {"adminToken": []}],
}


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


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def add_security(schema: dict[str, Any], app: FastAPI) -> dict[str, Any]:
    """``security`` (and the 401/403 answers that go with it) on each operation
    whose route has a token dependency."""
    settings = app.state.service.settings
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for route in served_routes(app):
        if getattr(route, "dependant", None) is None or not route.include_in_schema:
            continue
        needed = required_token(route, app, settings)
        if needed == "api" and not settings.api_tokens:
            needed = None  # inference is open on this server
        operations = schema["paths"].get(route.path_format, {})
        for method in route.methods:
            operation = operations.get(method.lower())
            if needed is None or operation is None:
                continue
            operation["security"] = _SECURITY[needed]
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", _error("no token, or not a valid one"))
            if needed == "admin":
                responses.setdefault("403", _error("admin routes disabled, or not the admin token"))
    return schema


def add_bad_request(schema: dict[str, Any]) -> dict[str, Any]:
    """A 400 on every operation: any request whose URL holds control characters is
    refused before its route (``app.api.middleware``)."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            responses = operation.setdefault("responses", {})
            responses.setdefault("400", _error("a malformed request, or control characters in it"))
    return schema


def use_error_shape(schema: dict[str, Any]) -> dict[str, Any]:
    """422s are answered in the one error shape (``app.errors``), not FastAPI's
    default ``HTTPValidationError`` body: document what is sent."""
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            answer = operation.get("responses", {}).get("422")
            if answer is not None and "HTTPValidationError" in json.dumps(answer):
                answer["content"] = {"application/json": {"schema": _ERROR}}
    models = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):  # the second is the first's part
        if f"#/components/schemas/{unused}" not in json.dumps(schema):
            models.pop(unused, None)
    return schema


# FastAPI names a multipart body Body_<operation id>
_FORM_NAMES = {
    "Body_segment": "SegmentForm",
    "Body_segment_visualize": "VisualizeForm",
    "Body_create_dataset": "DatasetUpload",
}


def _flattened(form: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    """A form whose options come from a form model (``allOf: [SegmentOptions]``
    beside its file fields) as one flat object: generators then give it one class
    with every field."""
    if "allOf" not in form:
        return form
    properties, required = dict(form.get("properties", {})), list(form.get("required", []))
    for part in form.pop("allOf"):
        model = components[part["$ref"].rsplit("/", 1)[1]]
        properties |= model.get("properties", {})
        required += [name for name in model.get("required", []) if name not in required]
    return {**form, "properties": properties, "required": required}


def name_schemas(schema: dict[str, Any]) -> dict[str, Any]:
    """The multipart bodies renamed (``_FORM_NAMES``) and flattened, and the two
    shapes of an image source added (``app.api.schemas.IMAGE_SHAPES``)."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for old, new in _FORM_NAMES.items():
        if old in components:
            components[new] = {**_flattened(components.pop(old), components), "title": new}
    components.update(IMAGE_SHAPES)
    if '"#/components/schemas/SegmentOptions"' not in json.dumps(schema):  # the forms' only
        components.pop("SegmentOptions", None)
    text = json.dumps(schema)
    for old, new in _FORM_NAMES.items():
        text = text.replace(f'"#/components/schemas/{old}"', f'"#/components/schemas/{new}"')
    return json.loads(text)


def install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = name_schemas(mark_binary_fields(FastAPI.openapi(app)))
            app.openapi_schema = use_error_shape(add_bad_request(add_security(schema, app)))
        return app.openapi_schema

    app.openapi = openapi
