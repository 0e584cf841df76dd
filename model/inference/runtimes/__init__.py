"""How the network's dense parts run: the convolutions and matrix products of the
backbone with its FPN, the RPN head, the box head and the mask head. Everything
between them (anchors, box decoding, NMS, ROI pooling, mask pasting, RLE) is
``model.inference``'s own code, whatever the runtime.

``Runtime`` is the small contract ``Predictor`` calls; ``TorchRuntime``
(``torch_eager``) runs the network's own modules (on any device, under the
predictor's autocast), ``OpenVINORuntime`` (``openvino_cpu``) runs them compiled
by OpenVINO on the CPU, in float32, bfloat16 or int8.
"""

from typing import NamedTuple, Protocol

import torch

from model.errors import InvalidOptionError

RUNTIMES = ("auto", "torch", "openvino")


class DenseFeatures(NamedTuple):
    """The backbone's FPN levels ``{name: [N, C, H, W]}`` (on the CPU, channels-last
    in memory: what ``model.inference.pooling`` reads best) and the RPN head's
    outputs per level: ``objectness`` ``[N, A, H, W]`` and ``deltas`` ``[N, 4A, H, W]``."""

    maps: dict[str, torch.Tensor]
    objectness: list[torch.Tensor]
    deltas: list[torch.Tensor]


class Runtime(Protocol):
    """What ``Predictor`` needs of the dense parts."""

    name: str  # "torch" or "openvino"
    precision: str  # what runs: fp32, fp16, bf16 or int8

    def features(self, images: torch.Tensor) -> DenseFeatures:
        """Backbone, FPN and RPN head on a padded batch ``[N, 3, H, W]`` (normalised)."""

    def classify(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Box head and predictor on ``[K, C, 7, 7]`` pooled features: class logits
        ``[K, classes]`` and box regression ``[K, 4 * classes]``."""

    def segment(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mask head and predictor on ``[K, C, 14, 14]`` pooled features: each box's
        mask logits for its own label, ``[K, 28, 28]``."""


def choose_runtime(runtime: str, device: torch.device) -> str:
    """``auto``: OpenVINO where the model runs on the CPU, torch elsewhere."""
    if runtime not in RUNTIMES:
        raise InvalidOptionError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "auto":
        return "openvino" if device.type == "cpu" else "torch"
    if runtime == "openvino" and device.type != "cpu":
        raise InvalidOptionError(f"the openvino runtime runs on the CPU, not on {device}")
    return runtime
