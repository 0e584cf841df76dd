"""The dense parts compiled by OpenVINO for the CPU (``model.inference.runtimes.graphs``).

Each call runs on a fresh infer request (creating one costs microseconds) whose
outputs the returned tensors keep alive: a forward holds its feature maps while
another forward runs, with no copy and no lock. Figures: ``bench/cpu.py`` and
docs/performance.md.

Precision: ``fp32`` asks OpenVINO's CPU plugin for float32 explicitly (on CPUs with
bfloat16 units it would pick bfloat16 by itself); ``bf16`` needs such units
(``amx_bf16`` or ``avx512_bf16``) and refuses to start without them rather than run
float32 under a bfloat16 name; ``int8`` (``model.inference.runtimes.quantize``)
needs ``amx_int8`` or ``avx512_vnni`` and images to calibrate on.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN

from model.errors import InvalidOptionError
from model.inference.pooling import image_row_views
from model.inference.runtimes import DenseFeatures
from model.inference.runtimes.graphs import cached_graph
from model.inference.runtimes.quiet_openvino import ov

# precision -> OpenVINO's inference precision hint (int8: for what stays unquantized)
PRECISIONS = {"fp32": "f32", "bf16": "bf16", "int8": "bf16"}
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
INT8_FLAGS = ("amx_int8", "avx512_vnni")
# the CPU units a precision needs, any one of them (Linux's /proc/cpuinfo names)
UNITS = {"bf16": ("bfloat16", BF16_FLAGS), "int8": ("int8 dot-product", INT8_FLAGS)}
GRAPH_NAMES = ("dense", "box", "mask")


class OpenVINORuntime:
    """``network``'s dense parts compiled for the CPU in ``precision`` (``fp32`` or
    ``bf16``; ``int8`` runs ``fp32`` until ``use_graphs`` gets the quantized graphs),
    on ``threads`` threads (default: torch's intra-op threads). ``cache_dir``: where
    converted graphs are kept across restarts (``None``: converted anew, kept
    nowhere, as training's validation wants)."""

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
        self.precision = "fp32" if precision == "int8" else precision
        self.threads = threads or torch.get_num_threads()
        with torch.no_grad():  # the FPN levels' names (the graph returns them in order)
            self.level_names = list(network.backbone(torch.zeros(1, 3, 64, 64)))
        # no OpenVINO CACHE_DIR for the compiled blobs: compiling a converted graph
        # takes 0.1-0.2 s (R50-FPN), and two processes writing one blob at once
        # failed (model processes starting together); the converted graphs are
        # cached (``cached_graph``), written atomically
        self.core = ov.Core()
        self.graphs = {name: cached_graph(name, network, cache_dir) for name in GRAPH_NAMES}
        self._compiled = self._compile(self.graphs, self.precision)
        self._recorded: dict[str, list] | None = None

    def _compile(self, graphs: dict, precision: str) -> dict:
        hint = ov.properties.hint
        config = {
            hint.inference_precision: PRECISIONS[precision],
            ov.properties.inference_num_threads: self.threads,
            ov.properties.num_streams: 1,
            hint.performance_mode: hint.PerformanceMode.LATENCY,
        }
        if precision == "int8" and not cpu_flags() & set(BF16_FLAGS):
            config[hint.inference_precision] = "f32"  # what is not quantized stays float32
        compile_model = self.core.compile_model
        return {name: compile_model(graph, "CPU", config) for name, graph in graphs.items()}

    def use_graphs(self, graphs: dict, precision: str) -> None:
        """Run ``graphs`` (models or files, by name) from now on, in ``precision``."""
        self._compiled = self._compile(graphs, precision)
        self.precision = precision

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, list]]:
        """Within the block, each graph's inputs (copies, as OpenVINO takes them),
        by graph name: calibration samples for ``quantize``."""
        self._recorded = {name: [] for name in GRAPH_NAMES}
        try:
            yield self._recorded
        finally:
            self._recorded = None

    def features(self, images: torch.Tensor) -> DenseFeatures:
        """The dense graph one image at a time, each image's outputs written by
        OpenVINO straight into its slice of the batch's: as fast as the whole batch
        at once, and its peak memory that of one image's activations (a batch of
        4 at 800x1088, R50-FPN: 0.6 GB instead of 1.9 in float32)."""
        request = self._compiled["dense"].create_infer_request()
        count, outputs = len(images), []
        for index in range(count):
            for slot, batch in enumerate(outputs):
                rows = len(batch) // count  # what one image has of this output
                part = batch[index * rows : (index + 1) * rows]
                request.set_output_tensor(slot, ov.Tensor(part, shared_memory=True))
            image = images[index : index + 1].numpy()
            if self._recorded is not None:
                self._recorded["dense"].append([image.copy()])
            single = request.infer([image], share_inputs=True, share_outputs=True)
            if not outputs:  # the first image's outputs tell the batch's shapes
                for slot in range(len(single)):
                    first = single[slot]
                    outputs.append(np.empty((count * len(first), *first.shape[1:]), first.dtype))
                    outputs[-1][: len(first)] = first
        rows, *heads = (torch.from_numpy(output) for output in outputs)
        objectness, deltas = heads[: len(heads) // 2], heads[len(heads) // 2 :]
        # each level's size: its objectness map's
        sizes = {
            name: tuple(scores.shape[2:])
            for name, scores in zip(self.level_names, objectness, strict=True)
        }
        return DenseFeatures(image_row_views(rows, sizes, count), objectness, deltas)

    def classify(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, regression = self._run("box", _rows(pooled))
        return logits, regression

    def segment(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        [picked] = self._run("mask", _rows(pooled), labels)
        return picked

    def _run(self, name: str, *inputs: torch.Tensor) -> list[torch.Tensor]:
        arrays = [t.numpy() for t in inputs]
        if self._recorded is not None:
            self._recorded[name].append([array.copy() for array in arrays])
        request = self._compiled[name].create_infer_request()
        outputs = request.infer(arrays, share_inputs=True, share_outputs=True)
        return [torch.from_numpy(np.asarray(outputs[i])) for i in range(len(outputs))]


def without_dense_parts(network: MaskRCNN) -> MaskRCNN:
    """A shallow copy of ``network`` without the modules OpenVINO runs (backbone,
    RPN head, box and mask heads and predictors): what the predictor still needs
    (transform, anchors, box coders, poolers, thresholds) without a second copy
    of the weights (R50-FPN: 170 MB), which go once the caller lets ``network``
    go. ``network`` itself is left whole."""
    copies = {}
    for name, dense in (("", ("backbone",)), ("rpn", ("head",)), ("roi_heads", _HEADS)):
        module = network.get_submodule(name) if name else network
        copy = copies[name] = _shallow(module)
        for part in dense:
            copy._modules[part] = None
    copies[""]._modules["rpn"] = copies["rpn"]
    copies[""]._modules["roi_heads"] = copies["roi_heads"]
    return copies[""]


_HEADS = ("box_head", "box_predictor", "mask_head", "mask_predictor")


def _shallow(module: torch.nn.Module) -> torch.nn.Module:
    copy = object.__new__(type(module))
    copy.__dict__ = dict(module.__dict__)
    copy._modules = dict(module._modules)
    return copy


def _rows(pooled: torch.Tensor) -> torch.Tensor:
    """``[K, C, P, P]`` as the graphs take it, ``[K, P, P, C]`` (a view when the
    pooling gave channels-last)."""
    return pooled.permute(0, 2, 3, 1).contiguous()


def check_precision(precision: str, flags: set[str] | None = None) -> None:
    """``InvalidOptionError`` for a precision OpenVINO cannot run here: an unknown
    one, or ``bf16`` / ``int8`` on a CPU with none of the units it needs (``UNITS``)."""
    if precision not in PRECISIONS:
        raise InvalidOptionError(
            f"the openvino runtime runs {', '.join(PRECISIONS)}, not {precision!r}"
        )
    if precision not in UNITS:
        return
    units, needed = UNITS[precision]
    flags = cpu_flags() if flags is None else flags
    if not flags & set(needed):
        raise InvalidOptionError(
            f"{precision} on the CPU needs {units} units ({' or '.join(needed)} in "
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
