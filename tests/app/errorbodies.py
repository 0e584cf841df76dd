"""Every error body the in-process app sends in the whole suite is checked: no
path of this machine (temporary, home, checkout and install folders), no
traceback and no database URL in its message. ``tests/app/conftest.py`` watches
``error_response`` for every test and, when the whole suite ran, fails the run
if an error code the app can send was never sent by any test."""

import ast
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LEAKS = [
    tempfile.gettempdir(),
    str(Path.home()),
    str(REPO),
    sys.prefix,
    "Traceback",
    'File "',
    "sqlite://",
    "postgresql://",
]
# codes no in-process test can be answered with, and why
NOT_SENT = {
    "client_closed_request": "logged as 499 when the client is gone: nobody reads it",
    "too_many_requests": "QuotaError's default: each use names its own code",
    "unavailable": "UnavailableError's default: each use names its own code",
}


def leaks_in(message: str) -> list[str]:
    return [leak for leak in LEAKS if leak and leak in message]


def codes_in_source() -> set[str]:
    """The error codes ``app/`` can send: each ``code=`` argument, each class's
    ``code``, each ``error_response`` call's, and the model errors' table (the
    framework's statuses but 405 and 422 come through ``HTTPException``s the
    routes raise, with the code of their ``AppError``)."""
    codes = set()
    for path in (REPO / "app").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "error_response":
                if len(node.args) > 1 and isinstance(node.args[1], ast.Constant):
                    codes.add(node.args[1].value)
            elif isinstance(node, ast.keyword) and node.arg == "code":
                if isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
                    codes.add(node.value.value)
            elif isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Tuple | ast.Name) and "code" in ast.unparse(t)
                for t in node.targets
            ):
                codes.update(
                    c.value
                    for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant)
                    and isinstance(c.value, str)
                    and re.fullmatch(r"[a-z]+(_[a-z]+)+|[a-z]{5,}", c.value)
                )
    text = (REPO / "app" / "api" / "error_handlers.py").read_text()
    table = text[text.index("_MODEL_ERRORS") : text.index("_HTTP_CODES")]
    codes.update(re.findall(r'\(\d{3}, "([a-z_]+)"\)', table))
    return (codes | {"method_not_allowed"}) - set(NOT_SENT)
