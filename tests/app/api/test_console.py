"""The console's page and files over HTTP: served from the package, a strict
Content-Security-Policy the markup keeps to, nothing fetched from another host,
and the docs token (``PROTECT_DOCS``) as for ``/docs``. What it does in a browser
is ``test_console_page.py``."""

import re
from html.parser import HTMLParser
from importlib.resources import files

import pytest

from tests.app.conftest import bearer, fake_client

CONSOLE = files("app") / "console"
ASSET_TYPES = {".js": "javascript", ".css": "text/css", ".svg": "image/svg+xml"}


class Markup(HTMLParser):
    """What a Content-Security-Policy without 'unsafe-inline' would refuse, and
    every file the page names."""

    def __init__(self):
        super().__init__()
        self.inline: list[str] = []
        self.references: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for name in attributes:
            if name == "style" or name.startswith("on"):
                self.inline.append(f"<{tag} {name}=...>")
        if tag == "style":
            self.inline.append("<style>")
        if tag == "script":
            if "src" not in attributes:
                self.inline.append("<script> without src")
            else:
                self.references.append(attributes["src"])
        if tag == "link" and attributes.get("href"):
            self.references.append(attributes["href"])


def console_files() -> list[str]:
    return sorted(entry.name for entry in CONSOLE.iterdir() if entry.name != "__pycache__")


@pytest.fixture(scope="module")
def client():
    with fake_client() as client:
        yield client


def test_the_console_is_served_at_the_root_with_a_strict_policy(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    policy = response.headers["content-security-policy"]
    directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["connect-src"] == "'self'" and "frame-ancestors" in directives
    markup = Markup()
    markup.feed(response.text)
    assert markup.inline == []
    assert markup.references, "the page names its script and styles"
    for reference in markup.references:
        assert not re.match(r"^([a-z]+:)?//", reference), f"{reference}: another host"
        assert not reference.startswith("/"), f"{reference}: relative, for a proxy's prefix"


@pytest.mark.parametrize("name", [n for n in console_files() if not n.endswith(".html")])
def test_every_console_file_is_served_with_its_type(client, name):
    response = client.get(f"/console/{name}")
    assert response.status_code == 200
    suffix = name[name.rindex(".") :]
    assert ASSET_TYPES[suffix] in response.headers["content-type"]
    assert response.content == (CONSOLE / name).read_bytes()


def test_the_scripts_import_only_console_files_and_call_no_other_host():
    names = set(console_files())
    for name in names:
        text = (CONSOLE / name).read_text()
        for module in re.findall(r"""(?:import|from)\s*\(?\s*["']([^"']+)["']""", text):
            assert module.startswith("./") and module[2:] in names, f"{name} imports {module}"
        # an SVG's namespace is a name, never fetched
        urls = set(re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text)) - {
            "http://www.w3.org"
        }
        assert urls == set(), f"{name} names {urls}"
        assert "eval(" not in text and "new Function" not in text and "innerHTML =" not in text


def test_the_docs_token_guards_the_console_as_it_guards_docs():
    with fake_client(api_tokens="api-secret-12", protect_docs=True) as client:
        for path in ("/", "/docs"):
            assert client.get(path).status_code == 401
            assert client.get(path, headers=bearer("api-secret-12")).status_code == 200
        assert client.get("/console/main.js").status_code == 200  # public files, no data
    with fake_client(api_tokens="api-secret-12") as client:
        assert client.get("/").status_code == 200  # tokens, but the pages are open
