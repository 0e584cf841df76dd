"""Builders for the Mask R-CNN architectures the service can run.

Every builder is keyword-only and returns an untrained ``torchvision`` ``MaskRCNN``
in eval mode; weights come from ``model.weights`` (torchvision) or
``model.checkpoint`` (our files). The architecture name plus its keyword arguments
is what a checkpoint records, so ``build_network(name, **kwargs)`` rebuilds it.
"""

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision.models.detection import (
    MaskRCNN,
    maskrcnn_resnet50_fpn,
    maskrcnn_resnet50_fpn_v2,
)

from model.errors import CheckpointError

Builder = Callable[..., MaskRCNN]

ARCHITECTURES: dict[str, Builder] = {}


def register_architecture(name: str) -> Callable[[Builder], Builder]:
    def wrap(builder: Builder) -> Builder:
        ARCHITECTURES[name] = builder
        return builder

    return wrap


@register_architecture("maskrcnn_resnet50_fpn")
def build_resnet50_fpn(*, num_classes: int = 91, **kwargs: Any) -> MaskRCNN:
    return maskrcnn_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
    )


@register_architecture("maskrcnn_resnet50_fpn_v2")
def build_resnet50_fpn_v2(*, num_classes: int = 91, **kwargs: Any) -> MaskRCNN:
    return maskrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=num_classes, **kwargs
    )


def build_network(architecture: str, **kwargs: Any) -> MaskRCNN:
    """Build ``architecture`` with random weights; ``kwargs`` go to its builder."""
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        known = ", ".join(sorted(ARCHITECTURES))
        raise CheckpointError(
            f"unknown architecture {architecture!r}; expected one of: {known}"
        ) from None
    network = builder(**kwargs)
    return network.eval()


def count_parameters(network: nn.Module) -> int:
    return sum(p.numel() for p in network.parameters())


def _small_resnet(widths: tuple[int, ...], blocks: tuple[int, ...]) -> nn.Sequential:
    """A narrow ResNet (BasicBlocks, trainable BatchNorm) for training from scratch.

    Children are ``stem`` (stride 4) and ``layer1``..``layerN`` (strides 4, 8, 16, ...).
    """
    from torchvision.models.resnet import BasicBlock

    stem_width = widths[0] // 2
    layers: dict[str, nn.Module] = {
        "stem": nn.Sequential(
            nn.Conv2d(3, stem_width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, widths[0], 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
    }
    in_width = widths[0]
    for index, (width, count) in enumerate(zip(widths, blocks, strict=True)):
        stride = 1 if index == 0 else 2
        downsample = None
        if stride != 1 or in_width != width:
            downsample = nn.Sequential(
                nn.Conv2d(in_width, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width)
            )
        stage = [BasicBlock(in_width, width, stride, downsample)]
        stage += [BasicBlock(width, width) for _ in range(count - 1)]
        layers[f"layer{index + 1}"] = nn.Sequential(*stage)
        in_width = width
    return nn.Sequential(OrderedDict(layers))


@register_architecture("maskrcnn_small_fpn")
def build_small_fpn(
    *,
    num_classes: int = 6,
    widths: tuple[int, ...] = (32, 64, 128, 256),
    blocks: tuple[int, ...] = (1, 2, 2, 1),
    fpn_channels: int = 64,
    representation_size: int = 256,
    mask_channels: int = 64,
    min_size: int = 256,
    max_size: int = 384,
    **kwargs: Any,
) -> MaskRCNN:
    """The bundled ``demo`` architecture: a small Mask R-CNN for CPUs (~3.2 M parameters).

    A narrow ResNet backbone trained from scratch, an FPN on strides 8, 16 and 32
    (plus max-pool level 64) with ``fpn_channels`` channels, a two-layer box MLP of
    ``representation_size`` and a four-conv mask head of ``mask_channels``.
    ``kwargs`` go to ``torchvision``'s ``MaskRCNN`` (``box_score_thresh``, ...).
    """
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
    from torchvision.models.detection.rpn import RPNHead
    from torchvision.ops import MultiScaleRoIAlign

    widths, blocks = tuple(widths), tuple(blocks)
    levels = len(widths) - 1  # every stage but the first (stride 4) feeds the FPN
    backbone = BackboneWithFPN(
        _small_resnet(widths, blocks),
        return_layers={f"layer{i + 2}": str(i) for i in range(levels)},
        in_channels_list=list(widths[1:]),
        out_channels=fpn_channels,
    )
    names = [str(i) for i in range(levels)]
    anchors = AnchorGenerator(
        sizes=tuple((16 * 2**i,) for i in range(levels + 1)),
        aspect_ratios=((0.5, 1.0, 2.0),) * (levels + 1),
    )
    defaults: dict[str, Any] = {
        "rpn_pre_nms_top_n_train": 1000,
        "rpn_post_nms_top_n_train": 500,
        "rpn_pre_nms_top_n_test": 500,
        "rpn_post_nms_top_n_test": 300,
        "box_batch_size_per_image": 256,
    }
    return MaskRCNN(
        backbone,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        rpn_head=RPNHead(fpn_channels, 3),
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes),
        mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
        mask_head=MaskRCNNHeads(fpn_channels, (mask_channels,) * 4, 1),
        mask_predictor=MaskRCNNPredictor(mask_channels, mask_channels, num_classes),
        **{**defaults, **kwargs},
    )
