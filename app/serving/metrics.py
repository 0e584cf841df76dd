"""Prometheus metrics (``/metrics``), in a registry owned by one app, so
several apps in one process (tests) never share counters."""

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


def batch_size_buckets(max_batch_size: int) -> tuple[float, ...]:
    sizes = {1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch_size}
    return tuple(float(s) for s in sorted(s for s in sizes if s <= max_batch_size))


class Metrics:
    """Every collector the service exports; ``render`` gives the exposition text."""

    def __init__(self, *, max_batch_size: int = 8):
        self.registry = CollectorRegistry()
        self._add_http(self.registry)
        self._add_queue(self.registry, max_batch_size)
        self._add_model(self.registry)

    def _add_http(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "maskrcnn_http_requests",
            "HTTP requests answered",
            ["route", "method", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "maskrcnn_http_request_duration_seconds",
            "HTTP request latency",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "maskrcnn_http_requests_in_flight", "HTTP requests being handled", registry=r
        )
        self.rejected = Counter(
            "maskrcnn_rejected_requests",
            "Requests refused before or instead of inference, by error code",
            ["reason"],
            registry=r,
        )

    def _add_queue(self, r: CollectorRegistry, max_batch_size: int) -> None:
        self.queue_depth = Gauge(
            "maskrcnn_queue_depth", "Images admitted and waiting for a batch", registry=r
        )
        self.batch_size = Histogram(
            "maskrcnn_batch_size",
            "Images per model forward",
            buckets=batch_size_buckets(max_batch_size),
            registry=r,
        )
        self.forwards = Counter("maskrcnn_forwards", "Model forward passes", registry=r)
        self.images_forwarded = Counter(
            "maskrcnn_images_forwarded", "Images that went through the model", registry=r
        )
        self.dropped_images = Counter(
            "maskrcnn_dropped_images",
            "Queued images dropped before the model (deadline passed, client gone)",
            ["reason"],
            registry=r,
        )
        self.oom_retries = Counter(
            "maskrcnn_oom_retries",
            "Batches split after a device out-of-memory error",
            registry=r,
        )
        self.queue_seconds = Histogram(
            "maskrcnn_queue_wait_seconds",
            "Time an image waited for its batch",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "maskrcnn_inference_seconds",
            "Model forward time per batch (device work included)",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.postprocess_seconds = Histogram(
            "maskrcnn_postprocess_seconds",
            "Mask encoding time per batch",
            buckets=_STAGE_BUCKETS,
            registry=r,
        )

    def _add_model(self, r: CollectorRegistry) -> None:
        self.ready = Gauge("maskrcnn_ready", "1 when /readyz answers 200", registry=r)
        self.database_up = Gauge(
            "maskrcnn_database_up",
            "1 when the last database poll (every MODEL_POLL_S) was answered; /readyz "
            "does not depend on it: inference works without the database",
            registry=r,
        )
        self.model = Gauge(
            "maskrcnn_model_info",
            "The model this replica serves now, by id, and how it runs (value is always 1)",
            ["id", "architecture", "device", "runtime", "precision"],
            registry=r,
        )
        self.model_switches = Counter(
            "maskrcnn_model_switches",
            "Model activations applied on this replica (loaded, warmed, swapped in), by result",
            ["result"],
            registry=r,
        )
        self.training_jobs = Gauge(
            "maskrcnn_training_jobs",
            "Training jobs by state, in the shared database (refreshed every MODEL_POLL_S)",
            ["state"],
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
