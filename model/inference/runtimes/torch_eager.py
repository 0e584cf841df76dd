"""The dense parts as the network's own torch modules."""

import torch
from torchvision.models.detection import MaskRCNN

from model.inference.fusion import to_backbone_input
from model.inference.pooling import as_row_views
from model.inference.runtimes import DenseFeatures


class TorchRuntime:
    """``network``'s modules, called as torchvision's ``MaskRCNN.forward`` calls them.

    ``fused``: the network was rewritten by ``model.inference.fusion`` (its backbone
    takes channels-last input). ``precision``: what the predictor's autocast runs."""

    name = "torch"

    def __init__(self, network: MaskRCNN, *, precision: str = "fp32", fused: bool = False):
        self.network = network
        self.precision = precision
        self.fused = fused

    def features(self, images: torch.Tensor) -> DenseFeatures:
        maps = self.network.backbone(to_backbone_input(images, self.fused))
        objectness, deltas = self.network.rpn.head(list(maps.values()))
        if images.device.type == "cpu":  # the CPU's ROI pooling reads rows of channels
            maps = as_row_views(maps)
        elif self.fused:  # torchvision's roi_align reads the standard layout
            maps = {name: level.contiguous() for name, level in maps.items()}
        return DenseFeatures(maps, objectness, deltas)

    def classify(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        heads = self.network.roi_heads
        return heads.box_predictor(heads.box_head(pooled))

    def segment(self, pooled: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        heads = self.network.roi_heads
        logits = heads.mask_predictor(heads.mask_head(pooled))
        return logits[torch.arange(len(labels), device=labels.device), labels]


def keep_float_outputs(rpn_head: torch.nn.Module) -> None:
    """Make the RPN head hand float32 objectness and box deltas to the proposal
    stage, also under autocast: anchors decoded in half precision would put
    proposal corners on a 0.5 px (fp16) or 4 px (bf16) grid at 800 px. A no-op
    in float32; registered once per module."""
    if getattr(rpn_head, "_float_outputs", False):
        return
    rpn_head.register_forward_hook(
        lambda module, args, output: tuple([t.float() for t in part] for part in output)
    )
    rpn_head._float_outputs = True
