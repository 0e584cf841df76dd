"""Service settings: environment variables prefixed ``MASKRCNN_`` or a
``.env`` file. Invalid values stop start-up with a message naming the variable."""

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from app.inputs.urlpolicy import Allowlist, FetchPolicy
from model import MODEL_SPECS, spec_names

ENV_PREFIX = "MASKRCNN_"
_DEVICE = re.compile(r"^(auto|cpu|cuda|cuda:\d+|mps)$")


class SettingsError(Exception):
    """One or more settings have invalid values; the message names each variable."""


def _split_list(value: Any) -> Any:
    """Comma-separated strings (``a,b``) become lists; lists pass through."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=".env", extra="ignore", frozen=True
    )

    # -- the model ------------------------------------------------------------------
    model: str = "auto"
    classes_file: Path | None = None
    device: str = "auto"
    # fp16/bf16: autocast on a GPU; bf16: OpenVINO in bfloat16 on a CPU with bfloat16
    # units; int8: OpenVINO quantized by NNCF (CPUs with int8 dot-product units),
    # calibrated on CALIBRATION_IMAGES, a registry model's dataset, or the demo's scenes
    precision: Literal["fp32", "fp16", "bf16", "int8"] = "fp32"
    calibration_images: Path | None = None
    # what runs the network's dense parts (model.inference.runtimes): auto is OpenVINO
    # where the model runs on the CPU, torch on a GPU
    runtime: Literal["auto", "torch", "openvino"] = "auto"
    # OpenVINO's converted and compiled graphs, kept across restarts (default DATA_DIR/openvino)
    openvino_cache_dir: Path | None = None
    # N: N copies of the model, each in a process of its own (app.serving.modelprocess),
    # share the device and forward N batches at once; 0: the model runs in the
    # HTTP server's process; auto: 2 on a GPU, 0 on the CPU (app.serving.service)
    model_processes: Annotated[int, Field(ge=0, le=16)] | Literal["auto"] = "auto"
    # models besides the served one kept loaded for the `model` option of
    # /v1/segment* (app.serving.ondemand); 0 refuses the option for other models
    model_cache_size: int = Field(2, ge=0, le=16)
    # the fixed-shape forward (model.inference.static; off until measured on a GPU)
    # and its CUDA graphs, captured at start-up for batches of GRAPH_BATCH_SIZES
    # images of GRAPH_IMAGE_SIZES (WIDTHxHEIGHT, each standing for its padded size
    # bucket); auto: whenever the static forward runs on a GPU
    static_shapes: bool = False
    cuda_graphs: bool | Literal["auto"] = "auto"
    graph_batch_sizes: Annotated[tuple[int, ...], NoDecode] = (1, 2, 4, 8)
    graph_image_sizes: Annotated[tuple[str, ...], NoDecode] = ("640x480",)
    # how often a replica reads the database: a model activated through another
    # replica, and the training-jobs gauge
    model_poll_s: float = Field(2.0, gt=0, le=3600)

    # -- the batching queue (app.serving.batching) -------------------------------------
    max_batch_size: int = Field(8, ge=1, le=256)
    max_batch_delay_ms: float = Field(5.0, ge=0, le=10_000)
    max_queue_size: int = Field(64, ge=1, le=100_000)
    max_images_per_request: int = Field(32, ge=1)  # after max_queue_size: checked against it

    # -- clients' connections and requests (app.api.connections): the headers in all,
    # their arrival, the gap between two chunks of a body, an idle keep-alive, and a
    # whole request
    max_header_kb: float = Field(16.0, gt=0, le=1024)
    header_timeout_s: float = Field(10.0, gt=0, le=600)
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    keep_alive_s: float = Field(5.0, gt=0, le=600)
    request_timeout_s: float = Field(30.0, gt=0, le=3600)

    # -- images (app.inputs) -----------------------------------------------------------
    max_upload_mb: float = Field(50.0, gt=0)
    max_image_pixels: int = Field(40_000_000, ge=1)
    # counted from the images' headers before any is decoded (app.inputs.memory):
    # pixels in one request (413); the memory the server's images take decoding and
    # decoded, in MB (503 busy)
    max_request_pixels: int = Field(120_000_000, ge=1)
    max_decode_memory_mb: float = Field(1536.0, gt=0)
    # image URLs the server fetches (app.inputs.urlpolicy); the last timeout covers
    # all hops of one URL
    url_fetch: bool = True
    url_allow_private: bool = False
    url_allowlist: Annotated[tuple[str, ...], NoDecode] = ()
    url_connect_timeout_s: float = Field(5.0, gt=0, le=300)
    url_read_timeout_s: float = Field(10.0, gt=0, le=300)
    url_total_timeout_s: float = Field(20.0, gt=0, le=3600)

    # -- datasets (POST /v1/datasets): the zip's size (instead of MAX_UPLOAD_MB), what
    # its files may unpack to in all, how many entries it may list; what its
    # annotations.json may list; how many datasets are kept (429)
    max_dataset_mb: float = Field(2048.0, gt=0)
    max_dataset_unpacked_mb: float = Field(8192.0, gt=0)
    max_dataset_files: int = Field(50_000, ge=1)
    max_dataset_images: int = Field(50_000, ge=1)
    max_dataset_annotations: int = Field(1_000_000, ge=1)
    max_dataset_categories: int = Field(1_000, ge=1)
    max_datasets: int = Field(100, ge=1)

    # -- training jobs (docs/training-jobs.md): a worker in the server (RUN_WORKER) or
    # apart; it heartbeats its running job every JOB_HEARTBEAT_S, and one silent for
    # JOB_HEARTBEAT_TIMEOUT_S is marked failed; jobs waiting for a worker (429)
    run_worker: bool = True
    job_heartbeat_s: float = Field(5.0, gt=0, le=600)
    job_heartbeat_timeout_s: float = Field(30.0, gt=0, le=86_400)
    worker_poll_s: float = Field(1.0, gt=0, le=600)
    job_threads: int = Field(0, ge=0, le=1024, description="torch threads per job; 0: half")
    # the most `processes` a job may ask for; 0: this machine's GPUs when jobs train
    # on CUDA, else its cores (set it on API replicas that run no worker)
    job_max_processes: int = Field(0, ge=0, le=1024)
    max_queued_jobs: int = Field(100, ge=1)

    # -- storage and the database: the timeout covers connecting, a pooled
    # connection, a statement, and every call the server makes: past it, routes that
    # need the database answer 503 database_unavailable. STORAGE_URL: where datasets
    # and checkpoints live (app.store.objects); empty: DATA_DIR itself, else DATA_DIR
    # is this process's cache
    data_dir: Path = Path("data")
    storage_url: str = ""
    database_url: str | None = None
    database_timeout_s: float = Field(5.0, gt=0, le=300)

    # -- access: inference and admin tokens; when true (and API_TOKENS is set),
    # /metrics resp. /docs, /redoc, /openapi.json need an API token too
    api_tokens: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    admin_token: SecretStr | None = None
    protect_metrics: bool = False
    protect_docs: bool = False

    # -- where `maskrcnn serve` listens: this machine only, unless told otherwise
    host: str = Field("127.0.0.1", min_length=1)
    port: int = Field(8000, ge=0, le=65535)

    # -- logging -------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        value = value.strip().lower()
        if not _DEVICE.match(value):
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return value

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        if not value.strip():
            raise ValueError(f"expected {spec_names(MODEL_SPECS)}, a file path or a model id")
        return value.strip()

    @field_validator("max_images_per_request")
    @classmethod
    def _fits_queue(cls, value: int, info: ValidationInfo) -> int:
        queue = info.data.get("max_queue_size")
        if queue is not None and value > queue:
            raise ValueError(f"must not exceed MASKRCNN_MAX_QUEUE_SIZE ({queue})")
        return value

    @field_validator("job_heartbeat_timeout_s")
    @classmethod
    def _outlasts_heartbeat(cls, value: float, info: ValidationInfo) -> float:
        beat = info.data.get("job_heartbeat_s")
        if beat is not None and value < 2 * beat:
            raise ValueError(f"must be at least twice MASKRCNN_JOB_HEARTBEAT_S ({beat})")
        return value

    @field_validator("storage_url")
    @classmethod
    def _known_store(cls, value: str) -> str:
        """A URL whose filesystem fsspec has and can import (s3fs for ``s3://``)."""
        if not value.strip():
            return ""
        import fsspec

        protocol, _ = fsspec.core.split_protocol(value.strip())
        try:
            fsspec.get_filesystem_class(protocol or "file")
        except (ValueError, ImportError) as e:
            raise ValueError(f"no filesystem for this URL: {e}") from None
        return value.strip()

    @field_validator("graph_batch_sizes")
    @classmethod
    def _check_graph_batches(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or not all(1 <= size <= 256 for size in value):
            raise ValueError("expected batch sizes from 1 to 256, e.g. 1,2,4,8")
        return value

    @field_validator("graph_image_sizes")
    @classmethod
    def _check_graph_sizes(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not all(re.fullmatch(r"[1-9]\d{0,4}x[1-9]\d{0,4}", size) for size in value):
            raise ValueError("expected WIDTHxHEIGHT sizes, e.g. 640x480,480x640")
        return value

    @field_validator(
        "url_allowlist", "api_tokens", "graph_batch_sizes", "graph_image_sizes", mode="before"
    )
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("url_allowlist")
    @classmethod
    def _check_allowlist(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        Allowlist.parse(value)  # raises ValueError naming the bad entry
        return value

    @field_validator("api_tokens", "admin_token")
    @classmethod
    def _check_tokens(cls, value: Any) -> Any:
        tokens = value if isinstance(value, tuple) else (value,) if value is not None else ()
        if any(len(token.get_secret_value()) < 8 for token in tokens):
            raise ValueError("every token needs at least 8 characters")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str | None) -> str | None:
        """SQLite or PostgreSQL (through psycopg 3), with a numeric port."""
        if value is None:
            return value
        from sqlalchemy.engine import make_url  # here: the CLI's --help does not need it

        expected = "sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE"
        try:
            url = make_url(value)
            url.port  # noqa: B018 - parsed lazily: a bad port raises here
        except Exception as e:
            raise ValueError(f"not a database URL ({e}); expected {expected}") from None
        if url.drivername not in ("sqlite", "postgresql", "postgres", "postgresql+psycopg"):
            raise ValueError(f"{url.drivername!r} is not supported; expected {expected}")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.strip().upper() if isinstance(value, str) else value

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_dataset_bytes(self) -> int:
        return int(self.max_dataset_mb * 1024 * 1024)

    @property
    def max_dataset_unpacked_bytes(self) -> int:
        return int(self.max_dataset_unpacked_mb * 1024 * 1024)

    @property
    def openvino_cache(self) -> Path:
        """``OPENVINO_CACHE_DIR``, or ``openvino`` under ``DATA_DIR``."""
        return self.openvino_cache_dir or self.data_dir / "openvino"

    @property
    def database_url_or_default(self) -> str:
        """``DATABASE_URL``, or a SQLite file under ``DATA_DIR``."""
        return self.database_url or f"sqlite:///{self.data_dir / 'maskrcnn.db'}"

    def fetch_policy(self) -> FetchPolicy:
        """What an image URL may reach and take: ``URL_ALLOW_PRIVATE``,
        ``URL_ALLOWLIST``, the URL timeouts and ``MAX_UPLOAD_MB``."""
        return FetchPolicy(
            max_bytes=self.max_upload_bytes,
            allow_private=self.url_allow_private,
            allowlist=Allowlist.parse(self.url_allowlist),
            connect_timeout_s=self.url_connect_timeout_s,
            read_timeout_s=self.url_read_timeout_s,
            total_timeout_s=self.url_total_timeout_s,
        )

    def as_environment(self, *names: str, **values: Any) -> dict[str, str]:
        """The settings ``names`` (and ``values``, settings given here) as the
        variables a child process reads them from: ``{"MASKRCNN_DEVICE": "cpu", ...}``."""
        values = {name: getattr(self, name) for name in names} | values
        if unknown := sorted(set(values) - set(type(self).model_fields)):
            raise ValueError(f"unknown settings: {', '.join(unknown)}")
        # None, lists and secrets have no one spelling here: pass them another way
        plain = str | int | float | Path
        if unwritable := sorted(n for n, v in values.items() if not isinstance(v, plain)):
            raise ValueError(f"not written as a variable: {', '.join(unwritable)}")
        return {f"{ENV_PREFIX}{name.upper()}": str(value) for name, value in values.items()}


def load_settings(**overrides: Any) -> Settings:
    """Read the environment (and ``.env``); ``overrides`` win over both.

    Raises ``SettingsError`` listing every invalid variable by its full name.
    """
    if unknown := sorted(set(overrides) - set(Settings.model_fields)):
        raise SettingsError(f"unknown settings: {', '.join(unknown)}")  # a caller's typo
    if f"{ENV_PREFIX}MAX_PIXELS_IN_FLIGHT" in os.environ:
        raise SettingsError(
            f"{ENV_PREFIX}MAX_PIXELS_IN_FLIGHT is gone: the limit is now in memory, "
            f"{ENV_PREFIX}MAX_DECODE_MEMORY_MB (docs/configuration.md)"
        )
    try:
        return Settings(**overrides)
    except ValidationError as e:
        problems = []
        for error in e.errors():
            field = str(error["loc"][0]) if error["loc"] else "?"
            shown = error.get("input")
            shown = "***" if "token" in field else shown
            if field == "database_url" and isinstance(shown, str):
                shown = re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", shown)  # no password
            problems.append(
                f"{ENV_PREFIX}{field.upper()}={shown!s}: {error['msg']}"
                if not isinstance(shown, dict)
                else f"{ENV_PREFIX}{field.upper()}: {error['msg']}"
            )
        raise SettingsError("invalid settings:\n  " + "\n  ".join(problems)) from None
