"""The served model behind one contract, ``ServedPredictor``, whatever runs it: a
``Predictor`` in this process (``InProcessPredictor``) or a pool of model
processes (``app.serving.modelprocess.ModelPool``). ``build_predictor`` picks
one from the settings."""

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import torch

from app.inputs.decoding import EncodedJpeg
from app.serving.loading import ModelSpec, load_predictor
from app.serving.modelchild import ChildOptions
from app.serving.modelprocess import ModelPool
from app.settings import Settings
from model import (
    ImageResult,
    InputGeometry,
    ModelInfo,
    PredictOptions,
    Predictor,
)

# MODEL_PROCESSES=auto on a GPU. On an H200, r50 fp16, MAX_BATCH_SIZE=8, served/bare
# was 0.74 in process, 0.91 with 2, 1.02 with 3 and 1.05 with 4 (bench/RESULTS.md);
# each child keeps a CPU core busy and holds a CUDA context and a copy of the model.
GPU_MODEL_PROCESSES = 2


class ServedPredictor(Protocol):
    """What the queue, warm-up, activation and the routes need of a served model."""

    info: ModelInfo  # which model answers
    device: torch.device  # where the model runs
    precision: str  # fp32, fp16 or bf16
    runtime: str  # what runs the dense parts: torch or openvino
    input_device: torch.device  # where uploads are decoded to
    decodes_jpeg: bool  # JPEG uploads travel encoded, decoded where the model runs
    input_geometry: InputGeometry | None  # the queue's size buckets
    concurrency: int  # batches forwarded at once

    def forward(
        self, images: list[torch.Tensor | EncodedJpeg], options: list[PredictOptions]
    ) -> Any:
        """The network and device work of a batch; returns what ``finish`` takes."""

    def finish(self, pending: Any) -> list[ImageResult | BaseException]:
        """The batch's results in order; an exception in an image's place is its
        error (a model process could not decode that image)."""

    def predict(
        self, images: list[torch.Tensor], options: list[PredictOptions] | None = None
    ) -> list[ImageResult]:
        """``forward`` then ``finish`` (warm-up, tests)."""

    def watch(self, on_exit: Callable[[], None]) -> None:
        """Call ``on_exit`` (from any thread) if the model goes away by itself."""

    def close(self) -> None:
        """Stop what runs the model (blocking); later calls fail with 503."""


class InProcessPredictor:
    """A ``model.inference.predictor.Predictor`` in this process: uploads are
    decoded straight onto its device (by nvJPEG on a GPU); it never exits by
    itself and has nothing to stop."""

    concurrency = 1
    decodes_jpeg = False

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    @property
    def info(self) -> ModelInfo:
        return self.predictor.info

    @property
    def device(self) -> torch.device:
        return self.predictor.device

    @property
    def input_device(self) -> torch.device:
        return self.predictor.device

    @property
    def precision(self) -> str:
        return self.predictor.precision

    @property
    def runtime(self) -> str:
        return self.predictor.runtime.name

    @property
    def input_geometry(self) -> InputGeometry | None:
        return self.predictor.input_geometry

    def forward(self, images: list[torch.Tensor], options: list[PredictOptions]) -> Any:
        return self.predictor.forward(images, options)

    def finish(self, pending: Any) -> list[ImageResult]:
        return self.predictor.finish(pending)

    def predict(
        self, images: list[torch.Tensor], options: list[PredictOptions] | None = None
    ) -> list[ImageResult]:
        return self.predictor.predict(images, options)

    def watch(self, on_exit: Callable[[], None]) -> None:
        pass

    def close(self) -> None:
        pass


def model_processes(settings: Settings) -> int:
    """``MODEL_PROCESSES``, ``auto`` resolved: ``GPU_MODEL_PROCESSES`` when the model
    runs on a GPU, 0 (in this process) on the CPU (no gain measured there)."""
    if settings.model_processes != "auto":
        return settings.model_processes
    return GPU_MODEL_PROCESSES if on_gpu(settings.device) else 0


def on_gpu(device: str) -> bool:
    """Whether ``DEVICE`` is a GPU, ``auto`` resolved as ``model.loading`` does
    (creating no CUDA context)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device).type == "cuda"


def build_predictor(spec: ModelSpec, settings: Settings) -> ServedPredictor:
    """The model ``spec`` describes, as the settings run it: with ``MODEL_PROCESSES``,
    that many copies in child processes (the children load it, not this process;
    on the CPU they share its cores: each runs OpenVINO on its part of them);
    else in this one."""
    if processes := model_processes(settings):
        if not on_gpu(spec.device):
            spec = replace(spec, threads=max(1, torch.get_num_threads() // processes))
        options = ChildOptions(settings.log_level, settings.log_format, settings.max_image_pixels)
        return ModelPool(spec, processes, options)
    return InProcessPredictor(load_predictor(spec))


def warm_up(predictor: ServedPredictor) -> float:
    """One inference on a synthetic 640×480 image (one per model process: a pool's
    children take turns); returns the last one's seconds."""
    generator = torch.Generator().manual_seed(0)
    image = torch.randint(0, 256, (3, 480, 640), dtype=torch.uint8, generator=generator)
    for _ in range(predictor.concurrency):
        start = time.perf_counter()
        predictor.predict([image], [PredictOptions()])
    return time.perf_counter() - start
