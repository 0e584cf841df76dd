"""A predictor stand-in for queue and route tests: no network, observable calls,
controllable speed and failures; and a ``Batcher`` driven over it."""

import asyncio
import threading
import time

import numpy as np
import torch
from pycocotools import mask as mask_utils

from app.serving.batching import Batcher
from model.inference.options import PredictOptions
from model.inference.predictor import Detection, ImageResult
from model.info import ModelInfo

INFO = ModelInfo("fake", "fake_arch", (0, 1, 2), ("background", "a", "b"))


class FakeRuntime:
    """What a ``model.inference.runtimes.Runtime`` tells about itself."""

    name = "fake"
    precision = "fp32"


def image_score(image: torch.Tensor) -> float:
    """What the fake 'detects': the image's mean value, so results identify images."""
    return float(image.float().mean()) / 255


class FakePredictor:
    """``forward`` records each batch; ``gate`` (when set) holds forwards until
    released; ``forward_s``/``finish_s`` sleep; ``oom_if`` decides per batch
    whether to raise a CUDA out-of-memory error."""

    def __init__(self, *, forward_s=0.0, finish_s=0.0, oom_if=None, fail_with=None):
        self.info = INFO
        self.device = torch.device("cpu")
        self.precision = "fp32"
        self.runtime = FakeRuntime()
        self.input_geometry = None  # batched by exact image size
        self.forward_s, self.finish_s = forward_s, finish_s
        self.oom_if = oom_if
        self.fail_with = fail_with
        self.batches: list[list[float]] = []  # scores of the images of each forward
        self.events: list[tuple[str, int, float]] = []  # (stage, batch no, time)
        self.gate: threading.Event | None = None
        self.forwards_started = 0  # counted before the gate: a held forward counts
        self.lock = threading.Lock()

    @property
    def images_forwarded(self) -> int:
        return sum(len(b) for b in self.batches)

    def forward(self, images, options):
        with self.lock:
            self.forwards_started += 1
        if self.gate is not None:
            self.gate.wait(10)
        if self.oom_if is not None and self.oom_if(images):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.fail_with is not None:
            raise self.fail_with
        with self.lock:
            number = len(self.batches)
            self.batches.append([image_score(i) for i in images])
        self.events.append(("forward_start", number, time.monotonic()))
        time.sleep(self.forward_s)
        self.events.append(("forward_end", number, time.monotonic()))
        return number, list(zip(images, options, strict=True))

    def finish(self, pending):
        number, pairs = pending
        self.events.append(("finish_start", number, time.monotonic()))
        time.sleep(self.finish_s)
        self.events.append(("finish_end", number, time.monotonic()))
        results = []
        for image, opts in pairs:
            height, width = image.shape[-2:]
            box, mask = fake_mask(int(height), int(width), opts.mask_format)
            detection = Detection(1, "a", image_score(image), box, mask)
            kept = [detection] if detection.score >= opts.score_threshold else []
            results.append(ImageResult(int(width), int(height), kept))
        return results

    def predict(self, images, options):
        return self.finish(self.forward(images, options))


def solid_image(value: int, height: int = 32, width: int = 32) -> torch.Tensor:
    return torch.full((3, height, width), value, dtype=torch.uint8)


def fake_mask(height: int, width: int, mask_format: str):
    """A rectangle over the middle half of the image, and its box."""
    y0, y1, x0, x1 = height // 4, height * 3 // 4, width // 4, width * 3 // 4
    box = (float(x0), float(y0), float(x1), float(y1))
    if mask_format == "none":
        return box, None
    if mask_format == "polygon":
        return box, [[x0, y0, x1, y0, x1, y1, x0, y1]]
    array = np.zeros((height, width), dtype=np.uint8, order="F")
    array[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(array)
    return box, {"size": [height, width], "counts": rle["counts"].decode()}


def load_fake(spec=None, *, oom_over: int | None = None, **kwargs) -> FakePredictor:
    """A ``FakePredictor`` built in another process (``app.serving.modelprocess``'s ``load``,
    with ``functools.partial`` for the keywords): more than ``oom_over`` images in
    one forward raise an out-of-memory error."""
    if oom_over is not None:
        kwargs["oom_if"] = lambda images: len(images) > oom_over
    return FakePredictor(**kwargs)


# -- driving a Batcher over fakes ----------------------------------------------

OPTS = PredictOptions(score_threshold=0.0)  # every fake detection kept


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 20))


async def started(predictor, **kwargs) -> Batcher:
    kwargs = {"max_batch_size": 4, "max_batch_delay_s": 0.02, "max_queue_size": 16, **kwargs}
    batcher = Batcher(predictor, **kwargs)
    await batcher.start()
    return batcher


async def submit(batcher, images, *, timeout=10.0, options=OPTS):
    with batcher.admit(len(images)) as ticket:
        return await ticket.submit(
            images, [options] * len(images), deadline=time.monotonic() + timeout
        )


async def until(condition, what: str, timeout: float = 10.0) -> None:
    """Poll ``condition()`` on the event loop, the batcher's tasks running
    meanwhile, until it holds; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not in {timeout:g} s: {what}"
        await asyncio.sleep(0.005)
