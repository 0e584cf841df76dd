"""The dense parts compiled by OpenVINO for the CPU (``model.inference.runtimes.graphs``).

On the development machines (2 cores of a Xeon with AMX), OpenVINO ran R50-FPN's
backbone 1.9x faster than torch's eager float32 in float32 and 9x in bfloat16
(``bench/cpu.py``). Each call runs on a fresh infer request (creating one costs
microseconds) whose outputs the returned tensors keep alive: a forward holds its
feature maps while another forward runs, with no copy and no lock.

Precision: ``fp32`` asks OpenVINO's CPU plugin for float32 explicitly (on CPUs with
bfloat16 units it would pick bfloat16 by itself); ``bf16`` needs such units
(``amx_bf16`` or ``avx512_bf16``) and refuses to start without them rather than run
float32 under a bfloat16 name.
"""

import logging
import time
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN

from model.errors import InvalidOptionError
from model.inference.pooling import row_views
from model.inference.runtimes import DenseFeatures
from model.inference.runtimes.graphs import cached_graph
from model.inference.runtimes.quiet_openvino import ov

log = logging.getLogger(__name__)

# precision -> OpenVINO's inference precision hint
PRECISIONS = {"fp32": "f32", "bf16": "bf16"}
BF16_FLAGS = ("amx_bf16", "avx512_bf16")


class OpenVINORuntime:
    """``network``'s dense parts compiled for the CPU in ``precision`` (``fp32`` or
    ``bf16``), on ``threads`` threads (default: torch's intra-op threads).
    ``cache_dir``: where converted graphs are kept across restarts
    (``None``: converted anew, kept nowhere, as training's validation wants)."""

    name = "openvino"

    def __init__(
        self,
        network: MaskRCNN,
        *,
        precision: str = "fp32",
        threads: int | None = None,
        cache_dir: Path | None = None,
    ):
        check_precision(precision)
        self.precision = precision
        self.threads = threads or torch.get_num_threads()
        with torch.no_grad():  # the FPN levels' names (the graph returns them in order)
            self.level_names = list(network.backbone(torch.zeros(1, 3, 64, 64)))
        # no OpenVINO CACHE_DIR for the compiled blobs: compiling a converted graph
        # takes 0.1-0.2 s (R50-FPN), and two processes writing one blob at once
        # failed (model processes starting together); the converted graphs are
        # cached (``cached_graph``), written atomically
        core = ov.Core()
        hint = ov.properties.hint
        config = {
            hint.inference_precision: PRECISIONS[precision],
            ov.properties.inference_num_threads: self.threads,
            ov.properties.num_streams: 1,
            hint.performance_mode: hint.PerformanceMode.LATENCY,
        }
        started = time.perf_counter()
        self._compiled = {
            name: core.compile_model(cached_graph(name, network, cache_dir), "CPU", config)
            for name in ("dense", "box", "mask")
        }
        self.seconds_to_load = time.perf_counter() - started

    def features(self, images: torch.Tensor) -> DenseFeatures:
        rows, *heads = self._run("dense", images)
        objectness, deltas = heads[: len(heads) // 2], heads[len(heads) // 2 :]
        # each level's shape: the batch, the channels, the objectness map's size
        shapes = {
            name: torch.Size([len(images), rows.shape[1], *scores.shape[2:]])
            for name, scores in zip(self.level_names, objectness, strict=True)
        }
        return DenseFeatures(row_views(rows, shapes), objectness, deltas)

    def classify(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, regression = self._run("box", _rows(pooled))
        return logits, regression

    def segment(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        [picked] = self._run("mask", _rows(pooled), labels)
        return picked

    def _run(self, name: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        request = self._compiled[name].create_infer_request()
        outputs = request.infer([t.numpy() for t in inputs], share_inputs=True, share_outputs=True)
        return [torch.from_numpy(np.asarray(outputs[i])) for i in range(len(outputs))]


def _rows(pooled: torch.Tensor) -> torch.Tensor:
    """``[K, C, P, P]`` as the graphs take it, ``[K, P, P, C]`` (a view when the
    pooling gave channels-last)."""
    return pooled.permute(0, 2, 3, 1).contiguous()


def check_precision(precision: str, flags: set[str] | None = None) -> None:
    """``InvalidOptionError`` for a precision OpenVINO cannot run here: an unknown
    one, or ``bf16`` on a CPU with none of ``BF16_FLAGS``."""
    if precision not in PRECISIONS:
        raise InvalidOptionError(
            f"the openvino runtime runs {' or '.join(PRECISIONS)}, not {precision!r}"
        )
    if precision != "bf16":
        return
    flags = cpu_flags() if flags is None else flags
    if not flags & set(BF16_FLAGS):
        raise InvalidOptionError(
            f"bf16 on the CPU needs bfloat16 units ({' or '.join(BF16_FLAGS)} in "
            f"/proc/cpuinfo); this CPU has neither: use fp32"
        )


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux's ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()
