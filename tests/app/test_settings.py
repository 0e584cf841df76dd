"""Settings from the environment: defaults, parsing, refusals."""

import pytest

from app.settings import SettingsError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no stray .env
    for name in list(__import__("os").environ):
        if name.startswith("MASKRCNN_"):
            monkeypatch.delenv(name)


def test_defaults_follow_the_spec():
    s = load_settings()
    assert (s.model, s.device, s.precision) == ("auto", "auto", "fp32")
    assert s.model_processes == "auto"
    assert (s.max_batch_size, s.max_batch_delay_ms, s.max_queue_size) == (8, 5, 64)
    assert s.request_timeout_s == 30
    assert s.url_fetch and not s.url_allow_private and s.url_allowlist == ()
    assert s.api_tokens == () and s.admin_token is None and s.run_worker
    assert s.database_url_or_default.startswith("sqlite:///")


def test_environment_values_are_parsed(monkeypatch):
    monkeypatch.setenv("MASKRCNN_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("MASKRCNN_URL_FETCH", "off")
    monkeypatch.setenv("MASKRCNN_URL_ALLOWLIST", "example.com, 10.0.0.0/8")
    monkeypatch.setenv("MASKRCNN_API_TOKENS", "token-one-xyz,token-two-xyz")
    monkeypatch.setenv("MASKRCNN_DEVICE", "CUDA:1")
    monkeypatch.setenv("MASKRCNN_LOG_LEVEL", "debug")
    monkeypatch.setenv("MASKRCNN_MODEL_PROCESSES", "3")
    s = load_settings()
    assert s.max_batch_size == 16 and s.url_fetch is False and s.device == "cuda:1"
    assert s.model_processes == 3
    assert s.url_allowlist == ("example.com", "10.0.0.0/8")
    assert [t.get_secret_value() for t in s.api_tokens] == ["token-one-xyz", "token-two-xyz"]
    assert s.log_level == "DEBUG"
    assert "token-one" not in repr(s)


def test_dotenv_file_is_read(tmp_path):
    (tmp_path / ".env").write_text("MASKRCNN_MODEL=demo\n")
    assert load_settings().model == "demo"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("MAX_BATCH_SIZE", "0"),
        ("MAX_BATCH_SIZE", "many"),
        ("MAX_QUEUE_SIZE", "-1"),
        ("REQUEST_TIMEOUT_S", "0"),
        ("DEVICE", "tpu"),
        ("PRECISION", "fp8"),
        ("URL_FETCH", "maybe"),
        ("LOG_FORMAT", "xml"),
        ("API_TOKENS", "short"),
        ("MODEL_PROCESSES", "-1"),
        ("MODEL_PROCESSES", "17"),
        ("MODEL_PROCESSES", "some"),
        ("STORAGE_URL", "nosuchstore://bucket/prefix"),
        ("JOB_MAX_PROCESSES", "-1"),
    ],
)
def test_invalid_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(f"MASKRCNN_{name}", value)
    with pytest.raises(SettingsError, match=f"MASKRCNN_{name}"):
        load_settings()


def test_more_images_per_request_than_the_queue_holds_is_refused():
    with pytest.raises(SettingsError, match="MASKRCNN_MAX_IMAGES_PER_REQUEST"):
        load_settings(max_queue_size=4, max_images_per_request=8)


def test_every_setting_is_documented_in_configuration_md():
    from pathlib import Path

    from app.settings import ENV_PREFIX, Settings

    text = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    missing = [
        name for name in Settings.model_fields if f"`{ENV_PREFIX}{name.upper()}`" not in text
    ]
    assert missing == [], f"settings missing from docs/configuration.md: {missing}"


def test_static_shapes_and_graph_sizes(monkeypatch):
    assert load_settings().static_shapes is False and load_settings().cuda_graphs == "auto"
    monkeypatch.setenv("MASKRCNN_STATIC_SHAPES", "false")
    monkeypatch.setenv("MASKRCNN_CUDA_GRAPHS", "true")
    monkeypatch.setenv("MASKRCNN_GRAPH_BATCH_SIZES", "1, 8")
    monkeypatch.setenv("MASKRCNN_GRAPH_IMAGE_SIZES", "640x480,480x640")
    settings = load_settings()
    assert (settings.static_shapes, settings.cuda_graphs) == (False, True)
    assert settings.graph_batch_sizes == (1, 8)
    assert settings.graph_image_sizes == ("640x480", "480x640")
    monkeypatch.setenv("MASKRCNN_GRAPH_IMAGE_SIZES", "640*480")
    with pytest.raises(SettingsError, match="MASKRCNN_GRAPH_IMAGE_SIZES"):
        load_settings()


def test_an_unknown_setting_passed_in_code_is_refused():
    with pytest.raises(SettingsError, match="unknown settings: max_batch_delay_s"):
        load_settings(max_batch_delay_s=10.0)  # the setting is max_batch_delay_ms


def test_the_old_pixels_in_flight_setting_is_refused_naming_its_successor(monkeypatch):
    monkeypatch.setenv("MASKRCNN_MAX_PIXELS_IN_FLIGHT", "400000000")
    with pytest.raises(SettingsError, match="MASKRCNN_MAX_DECODE_MEMORY_MB"):
        load_settings()


def test_settings_written_for_a_child_process_read_back_the_same(monkeypatch, tmp_path):
    settings = load_settings(device="cpu", job_heartbeat_timeout_s=45, data_dir=tmp_path)
    written = settings.as_environment("device", "job_heartbeat_timeout_s", log_level="DEBUG")
    assert written == {
        "MASKRCNN_DEVICE": "cpu",
        "MASKRCNN_JOB_HEARTBEAT_TIMEOUT_S": "45.0",
        "MASKRCNN_LOG_LEVEL": "DEBUG",
    }
    for name, value in written.items():
        monkeypatch.setenv(name, value)
    child = load_settings()
    assert (child.device, child.job_heartbeat_timeout_s, child.log_level) == ("cpu", 45, "DEBUG")
    with pytest.raises(ValueError, match="classes_file"):  # None has no spelling
        settings.as_environment("classes_file")
    with pytest.raises(ValueError, match="unknown settings: nope"):
        settings.as_environment(nope=1)
