"""Shared by every test: settings read from the environment never point at the
repo's ``./data`` (a SQLite job store would be created there)."""

import pytest


@pytest.fixture(autouse=True)
def _data_dir_outside_the_repo(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKRCNN_DATA_DIR", str(tmp_path / "data"))
