"""``deploy/nginx.conf`` agrees with the service it fronts: its limits sit above
the service's own (so the service, not nginx, answers in its JSON error shape),
only idempotent work is retried after it was sent, and the renderer used by the
topology test keeps every proxy setting."""

import re
import subprocess
from dataclasses import dataclass, field

import pytest
import uvicorn

from app.server import DRAIN_ACCEPT_S, DRAIN_MARGIN_S
from app.settings import Settings
from deploy.topology import NGINX_CONF, RenderError, render_nginx_conf, write_config

_TOKEN = re.compile(r"""'[^']*'|"[^"]*"|[{};]|[^\s{};'"]+""")


@dataclass
class Directive:
    name: str
    args: list[str]
    children: list["Directive"] = field(default_factory=list)

    def all(self, name: str) -> list["Directive"]:
        return [d for d in self.children if d.name == name]

    def one(self, name: str, *args: str) -> "Directive":
        [found] = [d for d in self.all(name) if d.args[: len(args)] == list(args)]
        return found

    def value(self, name: str) -> str:
        return self.one(name).args[0]


def parse(text: str) -> Directive:
    """nginx's syntax: ``name args;`` and ``name args { ... }``, ``#`` comments."""
    text = "\n".join(re.sub(r"#.*$", "", line) for line in text.splitlines())
    root, stack, words = Directive("main", []), [], []
    stack.append(root)
    for token in _TOKEN.findall(text):
        if token in (";", "{"):
            name, *args = [w.strip("'\"") for w in words]
            directive = Directive(name, args)
            stack[-1].children.append(directive)
            if token == "{":
                stack.append(directive)
            words = []
        elif token == "}":
            stack.pop()
        else:
            words.append(token)
    assert len(stack) == 1 and not words, "unbalanced braces"
    return root


def megabytes(size: str) -> float:
    number, unit = re.fullmatch(r"(\d+)([kmg]?)", size.lower()).groups()
    return int(number) * {"": 2**-20, "k": 2**-10, "m": 1, "g": 1024}[unit]


def seconds(time: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)?", time).groups()
    return int(number) * {"ms": 0.001, "s": 1, None: 1, "m": 60, "h": 3600}[unit]


@pytest.fixture(scope="module")
def http() -> Directive:
    return parse(NGINX_CONF.read_text()).one("http")


@pytest.fixture(scope="module")
def server(http) -> Directive:
    return http.one("server")


def test_body_limits_sit_above_the_services_own(server):
    settings = Settings()
    assert megabytes(server.value("client_max_body_size")) > settings.max_upload_mb
    datasets = server.one("location", "/v1/datasets")
    assert megabytes(datasets.value("client_max_body_size")) > settings.max_dataset_mb


def test_nginx_waits_longer_than_the_services_deadline(server):
    longest = Settings().request_timeout_s + DRAIN_MARGIN_S
    assert seconds(server.value("proxy_read_timeout")) > longest
    events = server.one("location", "~", "^/v1/training-jobs/[^/]+/events$")
    assert events.value("proxy_buffering") == "off"
    assert seconds(events.value("proxy_read_timeout")) >= 3600


def test_only_segmentation_is_retried_after_it_was_sent(server):
    retried = [
        location.args
        for location in server.all("location")
        for d in location.all("proxy_next_upstream")
        if "non_idempotent" in d.args
    ]
    assert retried == [["/v1/segment"]]
    assert "non_idempotent" not in server.one("proxy_next_upstream").args
    for d in [server.one("proxy_next_upstream")] + [
        d for location in server.all("location") for d in location.all("proxy_next_upstream")
    ]:
        assert {"error", "timeout", "http_502", "http_503"} <= set(d.args)


def test_state_changing_requests_never_ride_a_reused_connection(http, server):
    """A POST that is not retried must not go out on a pooled connection that a
    replica closes at that moment: POST/PUT/PATCH/DELETE use an upstream with no pool."""
    [methods] = [m for m in http.all("map") if m.args[1] == "$maskrcnn_upstream"]
    route = {d.name: d.args[0] for d in methods.children}
    assert {route[m] for m in ("POST", "PUT", "PATCH", "DELETE")} == {"api_fresh"}
    assert route["default"] == "api"
    assert http.one("upstream", "api_fresh").all("keepalive") == []
    for location in server.all("location"):
        target = location.value("proxy_pass")
        if location.args != ["/v1/segment"] and "events" not in location.args[-1]:
            assert target == "http://$maskrcnn_upstream", location.args


def test_both_upstreams_are_the_same_replicas_with_passive_health(http):
    pooled, fresh = http.one("upstream", "api"), http.one("upstream", "api_fresh")
    assert [d.args for d in pooled.all("server")] == [d.args for d in fresh.all("server")]
    [replicas] = pooled.all("server")
    assert replicas.args[:2] == ["api:8000", "resolve"]
    assert any(a.startswith("max_fails=") for a in replicas.args)
    assert any(a.startswith("fail_timeout=") for a in replicas.args)


def test_pooled_connections_expire_before_the_replica_would_close_them(http):
    """nginx reusing a connection the replica is closing loses the request: its
    keep-alive must end first, and before a draining replica closes its listener."""
    pooled = seconds(http.one("upstream", "api").value("keepalive_timeout"))
    assert pooled < uvicorn.Config("app.main:create_app").timeout_keep_alive
    assert pooled < DRAIN_ACCEPT_S


def test_request_ids_are_passed_on(http, server):
    [ids] = [m for m in http.all("map") if m.args == ["$http_x_request_id", "$maskrcnn_request_id"]]
    assert {d.name: d.args[0] for d in ids.children} == {
        "default": "$http_x_request_id",
        "": "$request_id",
    }
    assert server.one("proxy_set_header", "X-Request-ID").args[1] == "$maskrcnn_request_id"


def test_rendering_for_loopback_changes_addresses_and_paths_only(tmp_path):
    text = NGINX_CONF.read_text()
    ports = {"replica_ports": [9001, 9002], "listen_port": 9000}
    rendered = render_nginx_conf(text, **ports, prefix=tmp_path)
    http = parse(rendered).one("http")
    servers = [d.args for d in http.one("upstream", "api").all("server")]
    assert [s[0] for s in servers] == ["127.0.0.1:9001", "127.0.0.1:9002"]
    assert all("resolve" not in s for s in servers)
    assert http.one("server").value("listen") == "127.0.0.1:9000"
    assert http.value("proxy_temp_path") == str(tmp_path / "temp" / "proxy")
    before = parse(text).one("http").one("server")
    assert http.one("server").all("location") == before.all("location")


def test_rendering_refuses_a_config_without_a_line_it_swaps(tmp_path):
    text = NGINX_CONF.read_text().replace("listen 80;", "listen 8080;")
    with pytest.raises(RenderError, match="listen"):
        render_nginx_conf(text, replica_ports=[9001], listen_port=9000, prefix=tmp_path)


def test_nginx_accepts_the_rendered_config(nginx_binary, tmp_path):
    conf = write_config(tmp_path, replica_ports=[9001, 9002, 9003], listen_port=9000)
    result = subprocess.run(
        [nginx_binary, "-t", "-p", f"{tmp_path}/", "-c", str(conf), "-e", "stderr"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr
