"""The service's life cycle: one state at a time, changed in one place, where a
drain, a failure or a stop is never overridden by start-up's progress."""

import tempfile
import threading
from pathlib import Path

from fastapi.testclient import TestClient

from app.main import create_app
from app.serving.predictors import InProcessPredictor
from app.serving.service import State
from app.settings import load_settings
from tests.app.conftest import wait_for
from tests.app.fakes import FakePredictor


def gated_app(release: threading.Event, fail: bool = False):
    def load(_settings):
        release.wait(10)
        if fail:
            raise RuntimeError("no such weights")
        return InProcessPredictor(FakePredictor())

    data_dir = Path(tempfile.mkdtemp(prefix="maskrcnn-test-"))
    return create_app(load_settings(data_dir=data_dir), load_predictor=load)


def test_a_drain_that_begins_while_the_model_loads_wins():
    release = threading.Event()
    app = gated_app(release)
    with TestClient(app, raise_server_exceptions=False) as client:
        service = app.state.service
        wait_for(lambda: service.state == State.LOADING, 10, "loading")
        service.begin_drain()
        release.set()
        wait_for(lambda: service.predictor is not None, 10, "the model loaded")
        assert service.state == State.DRAINING
        assert service.metrics.ready._value.get() == 0
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "shutting down" in response.json()["error"]["message"]
    assert service.state == State.STOPPED


def test_a_model_that_cannot_load_fails_the_service_with_its_reason():
    release = threading.Event()
    release.set()
    app = gated_app(release, fail=True)
    fatal = []
    app.state.service.on_fatal = fatal.append
    with TestClient(app, raise_server_exceptions=False) as client:
        service = app.state.service
        wait_for(lambda: fatal, 10, "the fatal error")
        assert service.state == State.FAILED and "no such weights" in service.error
        said = client.get("/readyz").json()["error"]["message"]
        assert "failed to start" in said and "no such weights" not in said  # the log has it
    assert service.state == State.STOPPED
