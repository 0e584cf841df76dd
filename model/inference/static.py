"""A forward of the whole detector with fixed shapes and no host sync.

For a batch padded to one canvas (the serving queue batches images of one padded
network input size, ``model.geometry``), every tensor's shape follows from the
batch size, the canvas and ``StaticSizes``:

* proposals: per level the top ``pre_nms_top_n`` anchors, clipped to each image's
  size (a tensor), small and low-scoring ones masked, NMS within each level in a
  fixed number of rounds, the best ``post_nms_top_n`` per image (masked slots
  where an image has fewer);
* the box head on all ``B * post_nms_top_n`` ROIs, pooled on every pyramid level
  and each ROI's own level kept (``model.inference.fixed.pool_fixed``);
* per-image options as tensors (score and IoU thresholds, max detections, class
  filter); candidates as the best ``candidates`` (proposal, class) pairs by score,
  class-aware NMS in a fixed number of rounds, ``slots`` detection slots;
* the mask head on the detection slots.

Nothing waits for the device until the end, where one transfer reads each image's
detection count and whether the result is exact: every NMS settled, and no image
had more candidates than the cap could decide. When it is not exact the caller
runs the dynamic path for the batch, so the detections are always torchvision's.
``StaticDetector`` runs it, through CUDA graphs where captured
(``model.inference.graphs``).
"""

import threading
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.rpn import concat_box_prediction_layers

from model.inference.boxes import decode_boxes
from model.inference.fixed import Constants, fixed_proposals, pool_fixed, roi_rows, select_fixed
from model.inference.fusion import to_backbone_input
from model.inference.nms import device_tensor, iou_threshold_for
from model.inference.options import PredictOptions
from model.inference.proposals import NMS_ROUNDS as RPN_ROUNDS
from model.inference.proposals import AnchorCache, clip_boxes

__all__ = ["StaticDetector", "StaticInputs", "StaticSizes", "static_forward"]


@dataclass(frozen=True)
class StaticSizes:
    """The fixed sizes of the static forward (``for_network`` derives them).

    ``post_nms_top_n``: proposals per image; ``candidates``: (proposal, class)
    pairs per image that enter the box head's NMS; ``detections``: detection
    slots per image of a captured graph (an eager run takes the batch's largest
    ``max_detections``); ``rpn_rounds`` / ``box_rounds``: NMS rounds."""

    post_nms_top_n: int
    candidates: int
    detections: int
    rpn_rounds: int = RPN_ROUNDS
    box_rounds: int = 8

    @classmethod
    def for_network(cls, network: MaskRCNN, **overrides: int) -> "StaticSizes":
        """From the network's own settings (eval mode): the RPN's testing
        ``post_nms_top_n``; as many candidates (enough at a score threshold of 0.5
        or more, where a softmax leaves at most one class per proposal; at lower
        thresholds, enough when the best ones hold ``max_detections`` NMS keeps);
        the ROI heads' ``detections_per_img`` slots."""
        post = int(network.rpn.post_nms_top_n())
        sizes = cls(post, post, int(network.roi_heads.detections_per_img))
        return replace(sizes, **overrides)


@dataclass
class StaticInputs:
    """One batch's tensors on the device: ``images`` ``[B, 3, H, W]`` (normalised,
    padded to the canvas); per image ``limits`` ``[B, 4]`` (its resized ``(w, h, w,
    h)``), ``ratios`` ``[B, 4]`` (input over resized size, ``(x, y, x, y)``),
    ``score_thresholds`` and ``iou_thresholds`` ``[B]`` float32, ``max_detections``
    ``[B]`` int64, ``classes`` ``[B, L]`` bool (which network labels 1..L it wants)."""

    images: torch.Tensor
    limits: torch.Tensor
    ratios: torch.Tensor
    score_thresholds: torch.Tensor
    iou_thresholds: torch.Tensor
    max_detections: torch.Tensor
    classes: torch.Tensor

    def tensors(self) -> list[torch.Tensor]:
        return [getattr(self, f.name) for f in fields(self)]

    def copy_(self, other: "StaticInputs") -> None:
        for mine, theirs in zip(self.tensors(), other.tensors(), strict=True):
            mine.copy_(theirs, non_blocking=True)

    def clone(self) -> "StaticInputs":
        return StaticInputs(*(t.clone(memory_format=torch.preserve_format) for t in self.tensors()))

    def padded(self, size: int) -> "StaticInputs":
        """``size`` images: these, then blank ones that want nothing (no class)."""
        extra = size - len(self.images)
        if extra <= 0:
            return self
        grown = [torch.cat([t, t[-1:].expand(extra, *t.shape[1:])]) for t in self.tensors()]
        grown[0][-extra:] = 0
        grown[-1][-extra:] = False
        return StaticInputs(*grown)


def static_forward(
    network: MaskRCNN,
    inputs: StaticInputs,
    sizes: StaticSizes,
    slots: int,
    *,
    fused: bool,
    anchors: AnchorCache,
    constants: Constants,
) -> dict[str, torch.Tensor]:
    """The detector on ``inputs``, fixed shapes, no host sync (see the module
    docstring). Returns ``boxes`` ``[B, S, 4]`` (input-image pixels), ``scores``,
    ``labels`` ``[B, S]``, ``mask_probs`` ``[B, S, M, M]`` float32, ``counts``
    ``[B]`` (valid slots, first) and ``exact`` ``[B]`` bool."""
    images = inputs.images
    canvas = (int(images.shape[-2]), int(images.shape[-1]))
    features = network.backbone(to_backbone_input(images, fused))
    rpn = network.rpn
    levels = list(features.values())
    objectness, deltas = rpn.head(levels)
    image_list = ImageList(images, [canvas] * len(images))
    reference = anchors.get(rpn.anchor_generator, image_list, levels)[0]
    per_level = [o[0].numel() for o in objectness]
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    proposals = decode_boxes(rpn.box_coder, deltas.view(len(images), -1, 4), reference)
    boxes, valid, settled = fixed_proposals(
        rpn,
        proposals,
        objectness,
        inputs.limits.to(proposals.dtype),
        per_level,
        post_nms_top_n=sizes.post_nms_top_n,
        rounds=sizes.rpn_rounds,
        constants=constants,
    )
    if fused:  # the ROI heads' pooling reads the standard layout
        features = {name: level.contiguous() for name, level in features.items()}
    found = detect_boxes(network, features, boxes, valid, inputs, sizes, slots, canvas)
    found["exact"] &= settled
    found["mask_probs"] = mask_probs(network, features, found["boxes"], found["labels"], canvas)
    found["boxes"] = found["boxes"].float() * inputs.ratios[:, None, :]
    return found


def detect_boxes(
    network: MaskRCNN,
    features: dict[str, torch.Tensor],
    proposals: torch.Tensor,
    valid: torch.Tensor,
    inputs: StaticInputs,
    sizes: StaticSizes,
    slots: int,
    canvas: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """The box head on every proposal slot, then ``select_fixed`` with each image's
    options (``heads._candidates``'s tests, as tensors)."""
    heads = network.roi_heads
    num_images, per_image = valid.shape
    pooled = pool_fixed(heads.box_roi_pool, features, roi_rows(proposals), canvas)
    # float32 from here on, also under autocast (see heads.select_boxes)
    class_logits, regression = (t.float() for t in heads.box_predictor(heads.box_head(pooled)))
    decoded = decode_boxes(
        heads.box_coder, regression.unflatten(1, (-1, 4)), proposals.reshape(-1, 1, 4)
    )
    classes = decoded.shape[1]
    decoded = clip_boxes(decoded.view(num_images, -1, 4), inputs.limits.to(decoded.dtype))
    decoded = decoded.view(num_images, per_image, classes, 4)[:, :, 1:]
    scores = F.softmax(class_logits, -1).view(num_images, per_image, classes)[:, :, 1:]
    candidate = scores >= inputs.score_thresholds[:, None, None]
    candidate &= inputs.classes[:, None, :] & valid[:, :, None]
    candidate &= decoded[..., 2] - decoded[..., 0] >= 1e-2
    candidate &= decoded[..., 3] - decoded[..., 1] >= 1e-2
    return select_fixed(
        decoded,
        scores,
        candidate,
        inputs.iou_thresholds,
        inputs.max_detections,
        candidates=sizes.candidates,
        slots=slots,
        rounds=sizes.box_rounds,
    )


def mask_probs(
    network: MaskRCNN,
    features: dict[str, torch.Tensor],
    boxes: torch.Tensor,
    labels: torch.Tensor,
    canvas: tuple[int, int],
) -> torch.Tensor:
    """``heads.predict_masks`` on every detection slot: ``[B, S, M, M]`` float32."""
    heads = network.roi_heads
    pooled = pool_fixed(heads.mask_roi_pool, features, roi_rows(boxes), canvas)
    logits = heads.mask_predictor(heads.mask_head(pooled))
    flat = labels.reshape(-1)
    picked = logits[torch.arange(len(flat), device=flat.device), flat]
    return picked.float().sigmoid().view(*labels.shape, *picked.shape[-2:])


def static_inputs(
    images: ImageList,
    original_sizes: Sequence[tuple[int, int]],
    options: Sequence[PredictOptions],
    num_labels: int,
) -> StaticInputs:
    """The batch's ``StaticInputs``: host values in a few non-blocking copies."""
    device = images.tensors.device
    limits = [[w, h, w, h] for h, w in images.image_sizes]
    ratios = []
    for (height, width), (in_height, in_width) in zip(
        images.image_sizes, original_sizes, strict=True
    ):  # float32 ratios as torchvision's resize_boxes divides them
        ratio_y, ratio_x = (
            np.float32(in_height) / np.float32(height),
            np.float32(in_width) / np.float32(width),
        )
        ratios.append([ratio_x, ratio_y, ratio_x, ratio_y])
    wanted = [
        [o.classes is None or label in o.classes for label in range(1, num_labels + 1)]
        for o in options
    ]
    return StaticInputs(
        images.tensors,
        device_tensor(limits, device, torch.float32),
        device_tensor(np.array(ratios, dtype=np.float32), device, torch.float32),
        device_tensor([o.score_threshold for o in options], device, torch.float32),
        device_tensor(
            [iou_threshold_for(o.iou_threshold, device) for o in options], device, torch.float32
        ),
        device_tensor([o.max_detections for o in options], device, torch.int64),
        device_tensor(wanted, device, torch.bool),
    )


class StaticDetector:
    """Runs ``static_forward`` for a ``Predictor``: eagerly, or by replaying a CUDA
    graph captured for the batch's shapes (``capture``, CUDA only). ``detect``
    returns each image's detections, or ``None`` where the static result is not
    exact (the caller then runs the dynamic path). ``runs`` and ``fallbacks``
    count the batches."""

    def __init__(self, network: MaskRCNN, sizes: StaticSizes, *, fused: bool):
        self.network = network
        self.sizes = sizes
        self.fused = fused
        self.num_labels = int(network.roi_heads.box_predictor.cls_score.out_features) - 1
        self.anchors = AnchorCache()
        self.constants = Constants()
        self.graphs = None  # a model.inference.graphs.GraphedForward, once captured
        self.uploader = None  # and its model.inference.graphs.Uploader
        self.runs = 0
        self.fallbacks = 0
        self._lock = threading.Lock()

    def forward(self, inputs: StaticInputs, slots: int) -> dict[str, torch.Tensor]:
        return static_forward(
            self.network,
            inputs,
            self.sizes,
            slots,
            fused=self.fused,
            anchors=self.anchors,
            constants=self.constants,
        )

    def detect(
        self,
        images: ImageList,
        original_sizes: Sequence[tuple[int, int]],
        options: Sequence[PredictOptions],
    ) -> list[dict[str, torch.Tensor]] | None:
        inputs = static_inputs(images, original_sizes, options, self.num_labels)
        wanted = max(1, max(o.max_detections for o in options))
        with self._lock:
            found = None
            if self.graphs is not None and wanted <= self.sizes.detections:
                found = self.graphs.run(inputs, self.sizes.detections)
            if found is None:
                found = self.forward(inputs, min(wanted, self.sizes.candidates))
            count = len(options)
            # the only host read: each image's count and whether all are exact
            host = torch.cat([found["counts"][:count], found["exact"][:count].all()[None]])
            host = host.tolist()
            self.runs += 1
            if not host.pop():
                self.fallbacks += 1
                return None
            names = ("boxes", "scores", "labels", "mask_probs")
            return [
                {name: found[name][i, :length].clone() for name in names}
                for i, length in enumerate(host)
            ]

    def upload(self, images: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """The images on ``device``: once graphs are captured, host images go through
        the graphs' pinned-memory ``Uploader``."""
        if self.uploader is None:
            return [image.to(device, non_blocking=True) for image in images]
        return self.uploader.upload(list(images))

    def capture(self, images: ImageList, original_sizes: Sequence[tuple[int, int]]) -> None:
        """Capture a CUDA graph for this batch's shapes (and ``sizes.detections``
        slots), after warm-up runs; the first call creates the graphs' owner."""
        from model.inference.graphs import GraphedForward, Uploader  # CUDA only

        if self.graphs is None:
            self.graphs = GraphedForward(self.forward)
            self.uploader = Uploader(images.tensors.device)
        options = [PredictOptions()] * len(original_sizes)
        inputs = static_inputs(images, original_sizes, options, self.num_labels)
        with self._lock:
            self.graphs.capture(inputs, self.sizes.detections)
