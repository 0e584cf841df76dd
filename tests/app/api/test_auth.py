"""Bearer tokens on every route the live OpenAPI document lists.

An operation's ``security`` in the document says which token it takes (``app.api.openapi``
derives it from the route's auth dependencies); these tests hold every operation to
what its entry says, and hold the entries to the security rules: every ``/v1`` route takes
a token, and dataset, training-job, activation, export and model deletion routes take
the admin one.
"""

import asyncio
import re

import pytest

from app.main import create_app
from app.settings import load_settings
from tests.app.conftest import bearer, fake_client

API = "inference-token-1"
OTHER_API = "inference-token-2"
ADMIN = "admin-token-123"
TOKENS = {"api_tokens": f"{API},{OTHER_API}", "admin_token": ADMIN}
OPEN_PATHS = {"/healthz", "/readyz", "/metrics"}
ADMIN_PATHS = re.compile(r"^/v1/(datasets|training-jobs)(/|$)|^/v1/models/[^/]+/(activate|export)$")
ADMIN_OPERATIONS = {("DELETE", "/v1/models/{model_id}")}  # its GET takes an inference token
DOCS = ("/openapi.json", "/docs", "/redoc")


def operations(client) -> list[tuple[str, str, str]]:
    """``(method, concrete path, kind)`` for every operation of the live document;
    kind is ``open``, ``api`` or ``admin``, read from its ``security``."""
    schema = client.get("/openapi.json", headers=bearer(ADMIN)).json()
    found = []
    for template, entries in schema["paths"].items():
        path = re.sub(r"\{[^}]+\}", "no-such-id", template)
        for method, operation in entries.items():
            schemes = {name for entry in operation.get("security", []) for name in entry}
            kind = {frozenset(): "open", frozenset({"adminToken"}): "admin"}.get(
                frozenset(schemes), "api"
            )
            assert schemes in (set(), {"adminToken"}, {"apiToken", "adminToken"}), template
            found.append((method.upper(), path, kind, template))
    return found


def call(client, method: str, path: str, headers=None):
    return client.request(method, path, headers=headers or {})


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, (response.request.url, response.text)
    error = response.json()["error"]
    assert set(error) == {"code", "message", "request_id"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def test_the_document_marks_every_route_as_spec_9_says():
    with fake_client(**TOKENS) as client:
        ops = operations(client)
    kinds = {(method, template): kind for method, _, kind, template in ops}
    templates = {template for _, template in kinds}
    assert {"/v1/segment", "/v1/segment/json", "/v1/models", "/healthz"} <= templates
    assert set(kinds) >= ADMIN_OPERATIONS
    for (method, template), kind in kinds.items():
        if template in OPEN_PATHS:
            assert kind == "open", template
        elif ADMIN_PATHS.search(template) or (method, template) in ADMIN_OPERATIONS:
            assert kind == "admin", (method, template)  # an admin route without AdminToken
        else:
            assert template.startswith("/v1/") and kind == "api", (method, template)


def test_every_operation_answers_as_its_security_says():
    with fake_client(**TOKENS) as client:
        for method, path, kind, _ in operations(client):
            if kind == "open":
                for headers in (None, bearer("not-a-token")):
                    assert call(client, method, path, headers).status_code not in (401, 403)
                continue
            missing = call(client, method, path)
            assert_error(missing, 401, "unauthorized")
            assert missing.headers["www-authenticate"].startswith("Bearer")
            assert_error(call(client, method, path, bearer("wrong-token-xyz")), 401)
            assert_error(call(client, method, path, {"Authorization": f"Basic {API}"}), 401)
            assert_error(call(client, method, path, bearer(API[:-1])), 401)
            admin = call(client, method, path, bearer(ADMIN))
            assert admin.status_code not in (401, 403), (method, path, admin.text)
            for token in (API, OTHER_API):
                answer = call(client, method, path, bearer(token))
                if kind == "admin":
                    assert_error(answer, 403, "forbidden")
                else:
                    assert answer.status_code not in (401, 403), (method, path, answer.text)


def test_without_admin_token_admin_routes_are_403_saying_how_to_enable_them():
    with fake_client(api_tokens=API) as client:
        admin_ops = [(m, p) for m, p, kind, _ in operations(client) if kind == "admin"]
        assert admin_ops
        for method, path in admin_ops:
            error = assert_error(call(client, method, path, bearer(API)), 403, "admin_disabled")
            assert "MASKRCNN_ADMIN_TOKEN" in error["message"]


def test_without_api_tokens_inference_is_open_and_admin_still_needs_its_token():
    with fake_client(admin_token=ADMIN) as client:
        for method, path, kind, _ in operations(client):
            answer = call(client, method, path)
            if kind == "admin":
                assert_error(answer, 401, "unauthorized")
            else:
                assert answer.status_code not in (401, 403), (method, path, answer.text)


@pytest.mark.parametrize("protect", [False, True])
def test_metrics_and_docs_protection_is_a_setting(protect):
    with fake_client(**TOKENS, protect_metrics=protect, protect_docs=protect) as client:
        for path in ("/metrics", *DOCS):
            assert call(client, "GET", path, bearer(API)).status_code == 200
            answer = call(client, "GET", path)
            if protect:
                assert_error(answer, 401, "unauthorized")
            else:
                assert answer.status_code == 200, path
        for path in ("/healthz", "/readyz"):
            assert call(client, "GET", path).status_code == 200
        metrics = client.get("/openapi.json", headers=bearer(API)).json()["paths"]["/metrics"]
        assert ("security" in metrics["get"]) is protect


def test_a_request_without_a_token_is_refused_before_its_body_is_read():
    """FastAPI parses a body before it solves dependencies; the gate must not
    let a client with no token make the server read (or parse) one."""
    app = create_app(load_settings(**TOKENS))
    reads = []

    async def receive():
        reads.append(1)
        return {"type": "http.request", "body": b"{" * 1000, "more_body": True}

    sent = []

    async def send(message):
        sent.append(message)

    for path, content_type in (
        ("/v1/segment/json", b"application/json"),
        ("/v1/segment", b"multipart/form-data; boundary=x"),
        ("/v1/datasets", b"multipart/form-data; boundary=x"),
    ):
        reads.clear(), sent.clear()
        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "scheme": "http",
            "query_string": b"",
            "headers": [(b"content-type", content_type), (b"content-length", b"1000000")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        asyncio.run(app(scope, receive, send))
        assert sent[0]["status"] == 401 and reads == [], path


def test_an_unauthenticated_bad_body_is_401_not_422():
    with fake_client(**TOKENS) as client:
        answer = client.post(
            "/v1/segment/json", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert_error(answer, 401, "unauthorized")
