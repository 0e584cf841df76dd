"""Inference-only rewrites of a ``MaskRCNN`` that change how it runs, not what it
computes (up to float rounding):

* batch norms folded into the convolutions they follow (``fold_batch_norms``):
  one kernel and one pass over the activations less per norm, and under autocast
  no float32 norm between two half-precision convolutions;
* convolution and linear weights stored in the autocast precision: autocast
  casts them on every call otherwise (a copy kernel per layer per batch);
* the backbone in channels-last memory, the layout cuDNN's half-precision
  kernels use: otherwise every convolution converts its input and output;
* in the backbone's residual blocks, the folded bias, the residual add and the
  ReLU applied inside the convolution on CUDA (``FusedBlock``: cuDNN's fused
  convolution + bias (+ add) + ReLU), where each would otherwise be a pass over
  the activations of its own (a folded bias alone is one: cuDNN convolutions add
  no bias);
* likewise each ``Conv2d`` + ``ReLU`` pair of the heads (the RPN's convolution,
  the mask head's four: torchvision's ``Conv2dNormActivation`` without a norm):
  ``ConvReLU``, one cuDNN call instead of a convolution, a bias pass and a ReLU.

Only the pairs this module knows to be "convolution, then norm" are folded: the
consecutive children of an ``nn.Sequential`` or of torchvision's
``IntermediateLayerGetter`` (both run their children in order), and
``convK``/``bnK`` of torchvision's ResNet blocks. A norm anywhere else is left as
it is.
"""

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops.misc import FrozenBatchNorm2d

__all__ = [
    "ConvReLU",
    "FusedBlock",
    "fold_batch_norms",
    "fuse_blocks",
    "fuse_conv_relus",
    "fuse_network",
    "to_backbone_input",
]

_NORMS = (nn.BatchNorm2d, FrozenBatchNorm2d)
_IN_ORDER = (nn.Sequential, IntermediateLayerGetter)  # forward runs the children in order
_WEIGHTED = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)


def fuse_network(
    network: nn.Module, *, dtype: torch.dtype | None, channels_last: bool
) -> nn.Module:
    """``network`` rewritten in place for inference (see the module docstring):
    norms folded, weights of convolutions and linear layers in ``dtype`` (``None``:
    left as they are; use the dtype autocast will run them in), the backbone
    channels-last, its residual blocks ``FusedBlock``s, the heads' convolution +
    ReLU pairs ``ConvReLU``s. Feed the backbone
    ``to_backbone_input(tensors, channels_last)``."""
    fold_batch_norms(network)
    fuse_blocks(network.backbone)
    fuse_conv_relus(network)
    if dtype is not None:
        for module in network.modules():
            if isinstance(module, _WEIGHTED):
                module.to(dtype)
    if channels_last:
        network.backbone.to(memory_format=torch.channels_last)
    return network


def to_backbone_input(tensors: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return tensors.contiguous(memory_format=torch.channels_last) if channels_last else tensors


@torch.no_grad()
def fold_batch_norms(module: nn.Module) -> int:
    """Fold each known convolution + norm pair under ``module`` (in place): the
    convolution takes the norm's scale and shift, the norm becomes ``nn.Identity``.
    Norms in training mode or without running statistics are left alone.
    Returns the number folded."""
    folded = 0
    for parent in module.modules():
        for conv_name, norm_name in _pairs(parent):
            conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
            if _foldable(conv, norm):
                _fold(conv, norm)
                setattr(parent, norm_name, nn.Identity())
                folded += 1
    return folded


def _pairs(parent: nn.Module) -> list[tuple[str, str]]:
    if isinstance(parent, _IN_ORDER):
        names = list(parent._modules)
        return list(itertools.pairwise(names))
    if isinstance(parent, (BasicBlock, Bottleneck)):
        return _block_layers(parent)
    return []


def _block_layers(block: BasicBlock | Bottleneck) -> list[tuple[str, str]]:
    """A ResNet block's ``(convK, bnK)`` names, in the order its forward runs them."""
    return [(f"conv{k}", f"bn{k}") for k in (1, 2, 3) if hasattr(block, f"conv{k}")]


def _foldable(conv: nn.Module, norm: nn.Module) -> bool:
    if type(conv) is not nn.Conv2d or not isinstance(norm, _NORMS):
        return False
    if isinstance(norm, nn.BatchNorm2d) and (norm.training or norm.running_var is None):
        return False
    return norm.running_mean is not None and len(norm.running_mean) == conv.out_channels


def _fold(conv: nn.Conv2d, norm: nn.Module) -> None:
    """``norm(conv(x)) == conv'(x)``, computed in float64 and stored in the
    convolution's dtype."""
    weight = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    shift = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    scale = weight.double() / (norm.running_var.double() + norm.eps).sqrt()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(scale)
    new_bias = (bias - norm.running_mean.double()) * scale + shift.double()
    conv.weight.copy_((conv.weight.double() * scale.view(-1, 1, 1, 1)).to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(
            conv.weight.new_empty(conv.out_channels), requires_grad=conv.weight.requires_grad
        )
    conv.bias.copy_(new_bias.to(conv.bias.dtype))


class FusedBlock(nn.Module):
    """A torchvision ResNet block (``BasicBlock`` or ``Bottleneck``) whose norms
    are folded: each convolution but the last is followed by a ReLU, the last by
    the residual add and a ReLU, all inside the convolution on CUDA
    (``conv_relu``). The same function as the block."""

    def __init__(self, block: BasicBlock | Bottleneck):
        super().__init__()
        self.convs = nn.ModuleList(getattr(block, conv) for conv, _ in _block_layers(block))
        self.downsample = block.downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        for conv in self.convs[:-1]:
            x = conv_relu(conv, x)
        return conv_relu(self.convs[-1], x, add=identity)


def conv_relu(conv: nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(conv(x) + add)``: one cuDNN call on CUDA, in the weights' dtype
    (step by step where cuDNN is off or absent, as on ROCm)."""
    if not (x.is_cuda and torch.backends.cudnn.enabled and torch.version.hip is None):
        out = conv(x)
        return F.relu(out if add is None else out.add_(add), inplace=True)
    x = x.to(conv.weight.dtype)
    geometry = (conv.stride, conv.padding, conv.dilation, conv.groups)
    if add is None:
        return torch.cudnn_convolution_relu(x, conv.weight, conv.bias, *geometry)
    z = add.to(x.dtype)
    return torch.cudnn_convolution_add_relu(x, conv.weight, z, 1.0, conv.bias, *geometry)


class ConvReLU(nn.Module):
    """``relu(conv(x))`` in one cuDNN call on CUDA (``conv_relu``); replaces an
    ``nn.Sequential`` of a ``Conv2d``, folded norms (``nn.Identity``) and a ReLU."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_relu(self.conv, x)


def fuse_conv_relus(module: nn.Module) -> int:
    """Replace (in place) each ``nn.Sequential`` under ``module`` that is exactly a
    zero-padded ``Conv2d`` with a bias, any ``nn.Identity``s and an ``nn.ReLU`` by
    a ``ConvReLU``; returns how many."""
    return _replace_children(
        module, lambda child: ConvReLU(child[0]) if _conv_then_relu(child) else None
    )


def _conv_then_relu(child: nn.Module) -> bool:
    if not isinstance(child, nn.Sequential):
        return False
    layers = list(child)
    return (
        len(layers) >= 2
        and _zero_padded_conv(layers[0])
        and layers[0].bias is not None
        and all(type(layer) is nn.Identity for layer in layers[1:-1])
        and type(layers[-1]) is nn.ReLU
    )


def fuse_blocks(module: nn.Module) -> int:
    """Replace (in place) each folded torchvision ResNet block under ``module`` by a
    ``FusedBlock``; returns how many. A block with a norm left, or whose
    convolutions pad other than with explicit zeros, stays as it is."""
    return _replace_children(module, lambda child: FusedBlock(child) if _fusable(child) else None)


def _fusable(child: nn.Module) -> bool:
    if type(child) not in (BasicBlock, Bottleneck):
        return False
    layers = _block_layers(child)
    return (
        all(isinstance(getattr(child, norm), nn.Identity) for _, norm in layers)
        and all(_zero_padded_conv(getattr(child, conv)) for conv, _ in layers)
        and isinstance(child.relu, nn.ReLU)
    )


def _zero_padded_conv(module: nn.Module) -> bool:
    """A plain ``Conv2d`` padding with explicit zeros (not "same" / "valid"), the
    kind cuDNN's fused calls are given the same geometry for."""
    return (
        type(module) is nn.Conv2d
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
    )


def _replace_children(module: nn.Module, rewrite: Callable[[nn.Module], nn.Module | None]) -> int:
    """Replace (in place) each module under ``module`` for which ``rewrite`` gives a
    replacement rather than ``None``; returns how many."""
    replaced = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if (new := rewrite(child)) is not None:
                setattr(parent, name, new)
                replaced += 1
    return replaced
