"""The dense parts as the modules OpenVINO converts, and their conversion.

Three graphs, each with dynamic sizes (batch, height and width; number of boxes):

* ``DenseGraph``: the backbone, its FPN and the RPN head on a padded batch (the
  runtime gives it one image at a time); the FPN levels come out as one table of
  channels-last rows (``[rows, C]``, level after level), the layout the CPU's ROI
  pooling reads without a copy (``model.inference.pooling.feature_rows``);
* ``BoxGraph``: the box head and predictor on channels-last pooled boxes;
* ``MaskGraph``: the mask head and predictor on channels-last pooled boxes, and
  each box's own label's logits picked from them.

``convert_graph`` traces one with example inputs and converts it; ``cached_graph``
keeps the converted model on disk under a key of its weights and code, so a
restart (or another process) reads it back instead of converting again.
"""

import hashlib
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from torchvision.models.detection import MaskRCNN

from model.inference.runtimes.quiet_openvino import ov

log = logging.getLogger(__name__)

# changes whenever the graphs below change what they compute or take: part of the key
GRAPHS_VERSION = 1


class DenseGraph(nn.Module):
    def __init__(self, network: MaskRCNN):
        super().__init__()
        self.backbone = network.backbone
        self.head = network.rpn.head

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        levels = list(self.backbone(images).values())
        objectness, deltas = self.head(levels)
        channels = levels[0].shape[1]
        rows = torch.cat([level.permute(0, 2, 3, 1).reshape(-1, channels) for level in levels])
        return (rows, *objectness, *deltas)


class BoxGraph(nn.Module):
    def __init__(self, network: MaskRCNN):
        super().__init__()
        self.head = network.roi_heads.box_head
        self.predictor = network.roi_heads.box_predictor

    def forward(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predictor(self.head(pooled.permute(0, 3, 1, 2)))


class MaskGraph(nn.Module):
    def __init__(self, network: MaskRCNN):
        super().__init__()
        self.head = network.roi_heads.mask_head
        self.predictor = network.roi_heads.mask_predictor

    def forward(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self.predictor(self.head(pooled.permute(0, 3, 1, 2)))
        picked = labels[:, None, None, None].expand(-1, 1, logits.shape[2], logits.shape[3])
        return logits.gather(1, picked)[:, 0]


def graph_inputs(network: MaskRCNN) -> dict[str, tuple[list[torch.Tensor], list[list[int]]]]:
    """Each graph's example inputs (small: tracing runs them) and input shapes
    (``-1``: dynamic)."""
    channels = network.backbone.out_channels
    heads = network.roi_heads
    box = _side(heads.box_roi_pool.output_size)
    mask = _side(heads.mask_roi_pool.output_size)
    return {
        "dense": ([torch.rand(2, 3, 128, 160)], [[-1, 3, -1, -1]]),
        "box": ([torch.rand(3, box, box, channels)], [[-1, box, box, channels]]),
        "mask": (
            [torch.rand(3, mask, mask, channels), torch.tensor([1, 0, 1])],
            [[-1, mask, mask, channels], [-1]],
        ),
    }


GRAPHS = {"dense": DenseGraph, "box": BoxGraph, "mask": MaskGraph}


def _side(size: int | tuple[int, ...] | list[int]) -> int:
    if isinstance(size, int):
        return size
    if len(set(size)) != 1:
        raise ValueError(f"square pooling expected, got {size}")
    return int(size[0])


def convert_graph(
    module: nn.Module, example: list[torch.Tensor], shapes: list[list[int]]
) -> ov.Model:
    """``module`` traced on ``example`` and converted, with ``shapes`` as its
    inputs' shapes. Float32 weights, as the network's.

    Traced with TorchScript, which torch 2.14 deprecates but OpenVINO's converter
    still takes best: ``torch.export`` with dynamic sizes also converts the
    dense graph, but took 10 s where tracing took under 2 s (R50-FPN)."""
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module="torch.jit")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(module.eval(), tuple(example), check_trace=False)
    return ov.convert_model(traced, example_input=tuple(example), input=shapes)


def cached_graph(name: str, network: MaskRCNN, cache_dir: Path | None) -> ov.Model | Path:
    """Graph ``name`` of ``network``, converted (``ov.Model``), or the path of its
    converted copy under ``cache_dir`` (written there first if missing).

    The file name holds a hash of the graph's weights, its structure, the shapes,
    and the OpenVINO and torch versions: another model, or the same one changed
    by training, never reads a stale copy."""
    module = GRAPHS[name](network)
    example, shapes = graph_inputs(network)[name]
    if cache_dir is None:
        return convert_graph(module, example, shapes)
    path = Path(cache_dir) / f"{name}-{graph_key(module, shapes)}.xml"
    if path.is_file() and path.with_suffix(".bin").is_file():
        return path
    started = time.perf_counter()
    save_graph(convert_graph(module, example, shapes), path)
    log.info("converted the %s graph in %.1f s: %s", name, time.perf_counter() - started, path)
    return path


def save_graph(model: ov.Model, path: Path) -> None:
    """``model`` as ``path`` (``.xml``, and its ``.bin``), float32 weights kept as
    they are: written under a temporary name, then renamed (the weights first), so
    a reader finds the whole model or none, whoever else writes it at the time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".writing-") as scratch:
        staged = Path(scratch) / path.name
        ov.save_model(model, staged, compress_to_fp16=False)
        os.replace(staged.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(staged, path)


def graph_key(module: nn.Module, shapes: list[list[int]]) -> str:
    digest = hashlib.sha256()
    versions = (GRAPHS_VERSION, ov.__version__, torch.__version__, shapes, str(module))
    digest.update(repr(versions).encode())
    for key, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()[:24]
