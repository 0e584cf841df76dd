"""Shared by every test: settings read from the environment never point at the
repo's ``./data`` (a SQLite job store would be created there), and every model
the tests load keeps OpenVINO's converted graphs in one cache for the run (as a
restarted server does: each model is converted once, not at every start)."""

import pytest

OPENVINO_CACHE = "MASKRCNN_OPENVINO_CACHE_DIR"  # servers the tests start keep it too


@pytest.fixture(autouse=True)
def _data_dir_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKRCNN_DATA_DIR", str(tmp_path / "data"))


@pytest.fixture(scope="session", autouse=True)
def _one_openvino_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(OPENVINO_CACHE, str(tmp_path_factory.mktemp("openvino")))
        yield
