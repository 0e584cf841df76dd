"""``docker-compose.yml`` has the services, health checks, volumes and
required variables the deployment needs, and its environment is a configuration
the service accepts. Parsed with PyYAML: CI has no Docker engine or compose plugin."""

import os
import re

import pytest
import yaml

from app.server import DRAIN_MARGIN_S
from app.settings import Settings, load_settings
from tests.app.conftest import REPO

REQUIRED = {"MASKRCNN_ADMIN_TOKEN", "MASKRCNN_API_TOKENS", "POSTGRES_PASSWORD"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::([?-])([^}]*))?\}")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` (error when
    unset or empty)."""

    def one(match: re.Match) -> str:
        name, kind, rest = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise KeyError(f"{name}: {rest}")
        return rest if kind == "-" else ""

    return _VARIABLE.sub(one, value)


def seconds(duration: str) -> float:
    return sum(
        int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in re.findall(r"(\d+)([hms])", duration)
    )


def test_services_and_replicas(compose):
    assert set(compose["services"]) == {"api", "worker", "postgres", "nginx"}
    api, worker = compose["services"]["api"], compose["services"]["worker"]
    assert api["deploy"]["replicas"] == 2
    assert api["environment"]["MASKRCNN_RUN_WORKER"] == "false"  # training is the worker's
    assert worker["command"] == ["worker"]
    assert worker["image"] == api["image"]
    for service in (api, worker):
        [gpu] = service["deploy"]["resources"]["reservations"]["devices"]
        assert gpu["capabilities"] == ["gpu"] and gpu["count"] == 1


def test_api_and_worker_wait_for_a_healthy_postgres(compose):
    postgres = compose["services"]["postgres"]
    assert "pg_isready" in postgres["healthcheck"]["test"]
    for name in ("api", "worker"):
        assert compose["services"][name]["depends_on"]["postgres"] == {
            "condition": "service_healthy"
        }
    nginx = compose["services"]["nginx"]
    assert nginx["depends_on"]["api"] == {"condition": "service_healthy"}
    assert compose["services"]["worker"]["healthcheck"] == {"disable": True}  # no HTTP


def test_one_data_volume_is_shared_by_the_replicas_and_the_worker(compose):
    for name in ("api", "worker"):
        service = compose["services"][name]
        assert "data:/data" in service["volumes"]
        assert service["environment"]["MASKRCNN_DATA_DIR"] == "/data"
    assert "data" in compose["volumes"]
    assert any(v.startswith("postgres:") for v in compose["services"]["postgres"]["volumes"])


def test_nginx_runs_the_config_under_deploy(compose):
    nginx = compose["services"]["nginx"]
    [mount] = nginx["volumes"]
    source, target, mode = mount.split(":")
    assert (REPO / source).is_file() and target == "/etc/nginx/nginx.conf" and mode == "ro"
    # deploy/nginx.conf's `server ... resolve` needs open-source nginx 1.27.3 or later
    version = tuple(map(int, re.search(r":(\d+)\.(\d+)\.(\d+)", nginx["image"]).groups()))
    assert version >= (1, 27, 3)


def test_images_are_pinned(compose):
    for name in ("postgres", "nginx"):
        image = compose["services"][name]["image"]
        assert re.search(r":\d+\.\d+", image), image


def test_replicas_get_time_to_drain(compose):
    longest = Settings().request_timeout_s + DRAIN_MARGIN_S
    assert seconds(compose["services"]["api"]["stop_grace_period"]) > longest


def variables(node) -> list[tuple[str, str | None]]:
    if isinstance(node, dict):
        return [v for item in node.values() for v in variables(item)]
    if isinstance(node, list):
        return [v for item in node for v in variables(item)]
    return [(m[0], m[1] or None) for m in _VARIABLE.findall(str(node))]


def test_secrets_must_be_set_and_have_no_defaults(compose):
    found = variables(compose)
    assert {name for name, kind in found if kind == "?"} == REQUIRED
    assert all(kind == "?" for name, kind in found if name in REQUIRED)
    api_env = compose["services"]["api"]["environment"]
    with pytest.raises(KeyError, match="MASKRCNN_ADMIN_TOKEN"):
        interpolate(api_env["MASKRCNN_ADMIN_TOKEN"], {})


def test_the_replicas_environment_is_a_valid_service_configuration(compose, monkeypatch):
    env = {name: f"{name.lower()}-0123456789" for name in REQUIRED}
    for name in ("api", "worker"):
        with monkeypatch.context() as patch:
            for key in [k for k in os.environ if k.startswith("MASKRCNN_")]:
                patch.delenv(key)
            for key, value in compose["services"][name]["environment"].items():
                patch.setenv(key, interpolate(str(value), env))
            settings = load_settings()
        assert settings.database_url.startswith("postgresql://maskrcnn:")
        assert "@postgres:5432/" in settings.database_url
        assert settings.admin_token.get_secret_value() == env["MASKRCNN_ADMIN_TOKEN"]
        assert settings.run_worker is (name != "api")
