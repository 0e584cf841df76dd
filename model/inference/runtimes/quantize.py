"""int8: the OpenVINO graphs quantized by NNCF's post-training quantization.

Calibration runs the float32 predictor on images like those the model will serve,
recording what each graph takes (``OpenVINORuntime.recording``), and gives NNCF
those samples: the backbone graph one per image, the heads one per batch. The
quantized graphs are kept beside the converted ones (``cache_dir``), named by a
hash of the float32 graphs, the calibration images and the NNCF version: a
restart reads them back without calibrating again.

On the bundled demo model, calibrated on 32 synthetic scenes of another seed than
its held-out set, segm AP stayed 0.776 (float32: 0.776) on 60 held-out images, and
R50-FPN served 1.45x its bfloat16 images/s on the 2-core VM (``bench/cpu.py``).
NNCF is an optional dependency (``pip install maskrcnn-service[int8]``).
"""

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

import torch

from model.errors import InvalidOptionError
from model.inference.runtimes.graphs import save_graph
from model.inference.runtimes.openvino_cpu import GRAPH_NAMES, OpenVINORuntime

CALIBRATION_BATCH = 4
# changes whenever the calibration or NNCF's settings here change: part of the key
QUANTIZE_VERSION = 1


def quantize(
    runtime: OpenVINORuntime,
    predict: Callable[[list[torch.Tensor]], object],
    images: Sequence[torch.Tensor],
    cache_dir: Path | None,
) -> float | None:
    """Make ``runtime`` (in float32) run int8 graphs calibrated on ``images`` (uint8
    ``[3, H, W]``) through ``predict`` (the predictor's, on that runtime), or read
    from ``cache_dir`` when they were quantized before with these images. Returns
    the seconds calibration took, ``None`` when the graphs came from the cache."""
    if not images:
        raise InvalidOptionError("int8 needs images to calibrate on; none were given")
    paths = None
    if cache_dir is not None and all(isinstance(g, Path) for g in runtime.graphs.values()):
        key = calibration_key(runtime.graphs, images)
        paths = {name: Path(cache_dir) / f"{name}-int8-{key}.xml" for name in GRAPH_NAMES}
        if all(path.is_file() and path.with_suffix(".bin").is_file() for path in paths.values()):
            runtime.use_graphs(paths, "int8")
            return None
    nncf = _nncf()
    started = time.perf_counter()
    with runtime.recording() as samples:
        for start in range(0, len(images), CALIBRATION_BATCH):
            predict(list(images[start : start + CALIBRATION_BATCH]))
    quantized = {}
    for name in GRAPH_NAMES:
        graph = runtime.graphs[name]
        model = runtime.core.read_model(graph) if isinstance(graph, Path) else graph
        data = samples[name]
        quantized[name] = nncf.quantize(
            model,
            nncf.Dataset(data),
            subset_size=len(data),
            # the heads' activations are not all positive (MIXED: symmetric weights,
            # asymmetric activations); the backbone's, after ReLUs, mostly are
            preset=nncf.QuantizationPreset.PERFORMANCE
            if name == "dense"
            else nncf.QuantizationPreset.MIXED,
        )
        if paths is not None:
            save_graph(quantized[name], paths[name])
    runtime.use_graphs(quantized, "int8")
    return time.perf_counter() - started


def calibration_key(graphs: dict[str, Path], images: Sequence[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    names = sorted(path.name for path in graphs.values())
    digest.update(repr((QUANTIZE_VERSION, _nncf_version(), names)).encode())
    for image in images:
        digest.update(repr(tuple(image.shape)).encode())
        digest.update(image.contiguous().reshape(-1).numpy())
    return digest.hexdigest()[:24]


def _nncf():
    # NNCF imports torch.utils.cpp_extension, which warns on a machine without CUDA
    # that it found no CUDA runtime: nothing the service uses
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    try:
        import nncf
    except ImportError:
        raise InvalidOptionError(
            "int8 needs NNCF to quantize the model: pip install 'maskrcnn-service[int8]' "
            "(or nncf)"
        ) from None
    return nncf


def _nncf_version() -> str:
    try:
        return version("nncf")
    except Exception:
        return "none"
