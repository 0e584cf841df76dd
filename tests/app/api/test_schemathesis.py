"""Property-based conformance of a live ``maskrcnn serve`` to its own OpenAPI
document (schemathesis): no 5xx, every response as documented, every error in
the one error shape.

The server runs the tiny random-weight checkpoint with both kinds of token set and
URL input off (generated URLs must not send this machine's resolver or network
anywhere); requests carry the admin token, which every route takes. Examples are
bounded and derandomized so a run is repeatable and takes about a minute.
"""

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    ignored_auth,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.app.conftest import running_server

pytestmark = pytest.mark.slow

API = "inference-token-1"
ADMIN = "admin-token-123"
AUTH = {"Authorization": f"Bearer {ADMIN}"}
MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def live_schema(checkpoint, tmp_path_factory):
    env = {"api_tokens": API, "admin_token": ADMIN, "url_fetch": "false", "run_worker": "false"}
    with running_server(checkpoint, tmp_path_factory.mktemp("schemathesis"), **env) as server:
        server.wait_ready()
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")


@schemathesis.check
def error_shape(ctx, response, case) -> None:
    """Every non-2xx body is ``{"error": {"code", "message", "request_id"}}``."""
    if response.status_code < 400:
        return
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "request_id"}, error
    assert all(isinstance(error[k], str) and error[k] for k in error), error
    assert [error["request_id"]] == response.headers.get("x-request-id"), response.headers


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    ignored_auth,
    error_shape,
]


def test_the_live_server_keeps_to_its_openapi_document(live_schema):
    """Each operation, with valid (positive) and invalid (negative) generated input;
    negative cases include requests without the token. (Hypothesis runs here
    directly: schemathesis's pytest plugin does not run under pytest 9.)"""
    failures, statuses = [], Counter()
    for result in live_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                derandomize=True,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def run(case):
                response = case.call_and_validate(headers=AUTH, checks=CHECKS, timeout=30)
                statuses[response.status_code] += 1

            try:
                run()
            except Unsatisfiable:
                assert mode == GenerationMode.NEGATIVE  # nothing to get wrong (no input)
            except Exception as e:
                failures.append(f"{operation.label} [{mode.value}]: {e}")
    print("statuses:", dict(sorted(statuses.items())))
    assert not failures, "\n\n".join(failures)
    assert sum(statuses.values()) > 100 and statuses[200] and statuses[422]
