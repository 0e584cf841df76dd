"""``model.inference.fusion``: folded norms, half weights and channels-last compute what the
network computed (float32 on the CPU here; the half-precision path on CUDA is in
``test_precision.py``)."""

import copy

import pytest
import torch
from pycocotools import mask as mask_utils
from torch import nn
from torchvision.models.detection import maskrcnn_resnet50_fpn
from torchvision.ops.misc import FrozenBatchNorm2d

from model.inference.fusion import (
    ConvReLU,
    FusedBlock,
    fold_batch_norms,
    fuse_network,
    to_backbone_input,
)
from model.inference.predictor import Predictor
from model.loading import load_model
from tests.model.conftest import make_network, shapes_images

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)


def randomize_norms(network: nn.Module, seed: int = 0) -> nn.Module:
    """Statistics and affine terms far from the identity, so a wrong fold shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for norm in (m for m in network.modules() if isinstance(m, _NORMS)):
            n = len(norm.running_mean)
            norm.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            norm.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            norm.weight.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            norm.bias.copy_(torch.randn(n, generator=g) * 0.1)
    return network.eval()


def count_norms(module: nn.Module) -> int:
    return sum(isinstance(m, _NORMS) for m in module.modules())


def r50_frozen():
    """R50-FPN as torchvision builds it with pretrained weights: frozen norms."""
    torch.manual_seed(0)
    network = maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=5,
        min_size=128,
        max_size=160,
        norm_layer=FrozenBatchNorm2d,
    )
    return randomize_norms(network)


NETWORKS = {
    "r50": lambda: randomize_norms(make_network()),
    "r50-frozen": r50_frozen,
    "r50-v2": lambda: randomize_norms(make_network("maskrcnn_resnet50_fpn_v2")),
    "demo": lambda: randomize_norms(load_model("demo").network),
}


@pytest.mark.parametrize("name", NETWORKS)
def test_folded_backbone_computes_the_same_features(name):
    network = NETWORKS[name]()
    assert count_norms(network.backbone) > 0
    fused = fuse_network(copy.deepcopy(network), dtype=None, channels_last=True)
    assert count_norms(fused.backbone) == 0
    x = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        reference = network.backbone(x)
        folded = fused.backbone(to_backbone_input(x, True))
    for level, ref in reference.items():
        assert folded[level].is_contiguous(memory_format=torch.channels_last)
        error = ((folded[level] - ref).norm() / ref.norm()).item()
        assert error < 1e-5, f"level {level}: relative error {error:.2e}"


def test_folds_every_norm_of_the_known_layouts():
    network = NETWORKS["r50-v2"]()  # norms in the backbone, the FPN and the heads
    before = count_norms(network)
    assert fold_batch_norms(network) == before
    assert count_norms(network) == 0
    assert fold_batch_norms(network) == 0


class PreActivation(nn.Module):
    """conv1 / bn1 by name, but the norm runs first: not a foldable pair."""

    def __init__(self):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(4)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv1(self.bn1(x))


@pytest.mark.parametrize(
    "module",
    [
        PreActivation().eval(),
        nn.Sequential(nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)).eval(),  # norm before the conv
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.BatchNorm2d(4)).eval(),  # not adjacent
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval(),
        nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)).train(),  # batch statistics
    ],
    ids=["pre-activation", "norm-first", "not-adjacent", "no-running-stats", "training"],
)
def test_leaves_pairs_it_cannot_fold(module):
    training = module.training
    with torch.no_grad():
        for norm in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
            if norm.running_var is not None:
                norm.running_var.uniform_(0.5, 1.5)
    x = torch.rand(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = module(x)
        assert fold_batch_norms(module) == 0
        assert torch.equal(module(x), before)
    assert module.training == training


def test_fused_predictor_gives_the_same_detections():
    """On the CPU in float32 (folding and layout only), on the demo model (trained,
    so its detections are not near-ties that any rounding reorders): the same
    detections as the plain predictor, and the caller's network left untouched."""
    loaded = load_model("demo")
    network, info = loaded.network, loaded.info
    norms = count_norms(network)
    images = shapes_images(256, 4)
    plain = Predictor(network, info).predict(images)
    fused = Predictor(network, info, fused=True)
    assert fused.fused and count_norms(fused.network) == 0
    assert count_norms(network) == norms
    assert Predictor(network, info).predict(images) == plain
    results = fused.predict(images)
    compared = 0
    for a, b in zip(plain, results, strict=True):
        assert [d.class_id for d in a.detections] == [d.class_id for d in b.detections]
        if not a.detections:
            continue
        scores = [torch.tensor([d.score for d in r.detections]) for r in (a, b)]
        assert torch.allclose(*scores, atol=1e-4)
        boxes = [torch.tensor([d.box for d in r.detections]) for r in (a, b)]
        assert torch.allclose(*boxes, atol=1e-3)
        masks = [[d.mask for d in r.detections] for r in (a, b)]
        mask_ious = [mask_utils.iou([p], [q], [0])[0][0] for p, q in zip(*masks, strict=True)]
        assert min(mask_ious) > 0.99
        compared += len(a.detections)
    assert compared >= 5


def test_default_is_off_on_the_cpu(network, info):
    assert not Predictor(network, info, precision="fp16").fused
    assert not Predictor(network, info).fused


def test_blocks_are_fused_and_compute_the_block():
    network = NETWORKS["r50"]()
    fused = fuse_network(copy.deepcopy(network), dtype=None, channels_last=False)
    assert sum(isinstance(m, FusedBlock) for m in fused.backbone.modules()) == 16
    x = torch.rand(2, 256, 20, 24, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        block, reference = fused.backbone.body.layer1[1], network.backbone.body.layer1[1]
        torch.testing.assert_close(block(x), reference(x), rtol=1e-4, atol=1e-5)


HEAD_PAIRS = {  # convolution + ReLU pairs of the heads, by where they are
    "r50": ["rpn.head.conv.0"] + [f"roi_heads.mask_head.{i}" for i in range(4)],
    "r50-v2": [f"rpn.head.conv.{i}" for i in range(2)]
    + [f"roi_heads.{head}.{i}" for head in ("box_head", "mask_head") for i in range(4)],
}


def heads_outputs(network: nn.Module, seed: int = 5) -> list[torch.Tensor]:
    """The RPN head's and the mask head's outputs for random features."""
    device = next(network.parameters()).device
    g = torch.Generator().manual_seed(seed)
    channels = network.backbone.out_channels
    features = [torch.rand(2, channels, size, size, generator=g).to(device) for size in (24, 12)]
    rois = torch.rand(6, channels, 14, 14, generator=g).to(device)
    with torch.inference_mode():
        objectness, deltas = network.rpn.head(features)
        return [*objectness, *deltas, network.roi_heads.mask_head(rois)]


@pytest.mark.parametrize("name", ["r50", "r50-v2"])
def test_head_conv_relu_pairs_are_fused_and_compute_the_pairs(name):
    network = NETWORKS[name]()
    fused = fuse_network(copy.deepcopy(network), dtype=None, channels_last=False)
    found = [where for where, m in fused.named_modules() if isinstance(m, ConvReLU)]
    assert found == HEAD_PAIRS[name]
    for got, expected in zip(heads_outputs(fused), heads_outputs(network), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_heads_on_cuda(monkeypatch):
    """cuDNN's fused convolution + bias + ReLU in the heads, in float32 (no TF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    network = NETWORKS["r50-v2"]().cuda()
    fused = fuse_network(copy.deepcopy(network), dtype=None, channels_last=True)
    for got, expected in zip(heads_outputs(fused), heads_outputs(network), strict=True):
        error = ((got - expected).norm() / expected.norm()).item()
        assert error < 1e-5, f"relative error {error:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["r50-frozen", "demo"])
def test_fused_backbone_on_cuda(name, monkeypatch):
    """cuDNN's fused convolution + bias (+ add) + ReLU, in float32 (no TF32)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    network = NETWORKS[name]().cuda()
    fused = fuse_network(copy.deepcopy(network), dtype=None, channels_last=True)
    x = torch.rand(2, 3, 128, 160, generator=torch.Generator().manual_seed(1)).cuda()
    with torch.inference_mode():
        reference = network.backbone(x)
        folded = fused.backbone(to_backbone_input(x, True))
    for level, ref in reference.items():
        error = ((folded[level] - ref).norm() / ref.norm()).item()
        assert error < 1e-5, f"level {level}: relative error {error:.2e}"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_block_without_cudnn_runs_step_by_step(monkeypatch):
    """A CUDA tensor where cuDNN's fused convolutions are not available (cuDNN
    off, ROCm); on the CPU ``test_blocks_are_fused_and_compute_the_block``."""
    network = NETWORKS["demo"]()
    fused = fuse_network(copy.deepcopy(network), dtype=None, channels_last=False)
    block, reference = fused.backbone.body.layer2[0], network.backbone.body.layer2[0]
    monkeypatch.setattr(torch.backends.cudnn, "enabled", False)
    channels = block.convs[0].in_channels
    x = torch.rand(1, channels, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        got, expected = block.cuda()(x.cuda()), reference.cuda()(x.cuda())
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
