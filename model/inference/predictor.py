"""Batched prediction: a list of images and per-image options in, detections out.

``Predictor`` wraps a torchvision ``MaskRCNN`` and adds, over calling the network:

* per-image options (score / NMS IoU / mask thresholds, class filter, top-k,
  mask format) applied after one batched forward of the whole list;
* batched mask pasting and thresholding on the model's device instead of
  torchvision's per-mask loop, and COCO RLE encoding from run lengths found on
  the device (see ``model.inference.masks`` and ``model.inference.rle``);
* boxes and masks in the pixel frame of each input image, class ids and names
  from the model's metadata.

The work is split in two stages so a caller can overlap them: ``forward`` (the
network and everything on the device) and ``finish`` (string encoding on the CPU).
``predict`` runs both.
"""

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.image_list import ImageList

from model.errors import InvalidOptionError
from model.geometry import input_geometry, padded_side
from model.inference.boxes import scale_boxes
from model.inference.fusion import fuse_network
from model.inference.heads import predict_masks, select_boxes
from model.inference.images import check_image, normalize
from model.inference.masks import encode_masks
from model.inference.options import MaskFormat, PredictOptions, check_options
from model.inference.proposals import AnchorCache, propose
from model.inference.rle import pack_runs, polygons_at
from model.inference.runtimes import Runtime, choose_runtime
from model.inference.runtimes.torch_eager import TorchRuntime, keep_float_outputs
from model.inference.static import StaticDetector, StaticSizes
from model.info import ModelInfo

__all__ = ["Detection", "ImageResult", "MaskFormat", "PendingBatch", "PredictOptions", "Predictor"]

_AUTOCAST_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}
# Most mask pixels (bool bytes) pasted at once: on a GPU a whole batch of
# 640x480 images with 100 detections each; on the CPU about one such image,
# as larger buffers cost more in page faults than fewer calls save.
_GROUP_BYTES_DEVICE = 2**30
_GROUP_BYTES_CPU = 2**25


@dataclass
class Detection:
    """One instance. ``box`` is ``(x1, y1, x2, y2)`` in input-image pixels.

    ``mask`` is a COCO compressed RLE ``{"size": [h, w], "counts": str}`` for
    ``rle``, a list of polygons ``[[x0, y0, x1, y1, ...], ...]`` for ``polygon``,
    ``None`` for ``none``.
    """

    class_id: int
    class_name: str
    score: float
    box: tuple[float, float, float, float]
    mask: dict | list | None = None


@dataclass
class ImageResult:
    width: int
    height: int
    detections: list[Detection] = field(default_factory=list)


@dataclass
class PendingBatch:
    """What ``Predictor.forward`` hands to ``Predictor.finish``: everything already
    on the CPU, only string and polygon encoding left."""

    sizes: list[tuple[int, int]]
    options: list[PredictOptions]
    labels: list[list[int]]
    scores: list[list[float]]
    boxes: list[list[list[float]]]
    runs: list[list[np.ndarray]]  # per image, per detection (rle)
    crops: list[list[tuple[np.ndarray, tuple[int, int]]]]  # per detection: (crop, (x, y))


class Predictor:
    """Runs a torchvision ``MaskRCNN`` on a list of images with per-image options.

    Args:
        network: a ``MaskRCNN`` (any backbone); it is moved to ``device``, eval mode.
        info: its ``ModelInfo`` (class ids and names).
        device: where the network runs.
        precision: ``fp32``, or ``fp16`` / ``bf16`` autocast on CUDA (ignored on
            the CPU): convolutions and linear layers in half precision, while box
            decoding, NMS and mask probabilities stay float32 (for the RPN through
            a forward hook on ``network.rpn.head``, see ``keep_float_outputs``);
            with the ``openvino`` runtime, ``fp32``, ``bf16`` or ``int8`` on the CPU
            (``int8`` calibrated on ``calibration``: uint8 images like those served).
        runtime: ``torch``, ``openvino`` (CPU only) or ``auto`` (OpenVINO on the CPU):
            what runs the dense parts (``model.inference.runtimes``); ``threads``
            and ``cache_dir`` (graphs kept across restarts) are OpenVINO's.
        vectorized: filter proposals and select detections for the whole batch
            in tensor operations (``model.inference.proposals``,
            ``model.inference.heads``) instead of torchvision's loop over images;
            the same detections. Default: on CUDA, where the loop's host syncs
            and small kernels set the pace; on the CPU the loop is cheaper.
        fused: run a rewritten copy of ``network`` (``model.inference.fusion``): batch norms
            folded into the convolutions, convolution and linear weights stored
            in the autocast precision, the backbone channels-last, its residual
            blocks' bias, add and ReLUs inside cuDNN's fused convolutions. The
            same detections up to float rounding. Default: with ``fp16`` / ``bf16`` on
            CUDA, where autocast would otherwise cast every weight and convert
            every activation's layout on every batch.
        static: run the forward with fixed shapes and no host sync
            (``model.inference.static``, sizes ``static_sizes`` or derived from the
            network), falling back to the dynamic path for a batch whose static
            result is not exact: the same detections. For CUDA (host syncs gone,
            what ``capture_graphs`` needs); off until measured there (slower on the CPU).

    ``input_geometry`` is the network transform's resize-and-pad arithmetic
    (``model.geometry``; ``None`` without a torchvision transform).

    ``predict`` takes ``images``: ``uint8`` tensors ``[3, H, W]`` (RGB, any sizes,
    any device) and one ``PredictOptions`` per image, and returns one
    ``ImageResult`` per image, in order, boxes ``(x1, y1, x2, y2)`` in that
    image's pixels, highest scores first.
    """

    def __init__(
        self,
        network: MaskRCNN,
        info: ModelInfo,
        *,
        device: str | torch.device = "cpu",
        precision: str = "fp32",
        vectorized: bool | None = None,
        fused: bool | None = None,
        static: bool = False,
        static_sizes: StaticSizes | None = None,
        runtime: str = "torch",
        threads: int | None = None,
        cache_dir: Path | None = None,
        calibration: Sequence[torch.Tensor] | None = None,
    ):
        self.device = torch.device(device)
        self.info = info
        if choose_runtime(runtime, self.device) == "openvino":
            if static:
                raise InvalidOptionError("static shapes run on the torch runtime only")
            self._open_openvino(network, precision, vectorized, threads, cache_dir, calibration)
            return
        if precision not in _AUTOCAST_DTYPES:
            raise InvalidOptionError(
                f"precision must be one of {sorted(_AUTOCAST_DTYPES)}, got {precision!r}"
            )
        on_gpu = self.device.type == "cuda"
        precision = precision if on_gpu else "fp32"  # what runs, not what was asked
        half = _AUTOCAST_DTYPES[precision]
        self.fused = half is not None if fused is None else fused
        if self.fused:  # the caller's network stays as it was
            network = fuse_network(copy.deepcopy(network).eval(), dtype=half, channels_last=True)
        self._setup(network, precision, vectorized, self.fused)
        self.runtime = TorchRuntime(self.network, precision=self.precision, fused=self.fused)
        if _AUTOCAST_DTYPES[precision] is not None:
            keep_float_outputs(self.network.rpn.head)
        if static:
            sizes = static_sizes or StaticSizes.for_network(self.network)
            self.static = StaticDetector(self.network, sizes, fused=self.fused)

    def _open_openvino(self, network, precision, vectorized, threads, cache_dir, calibration):
        """The dense parts compiled by OpenVINO; for int8, calibrated first."""
        from model.inference.runtimes import openvino_cpu, quantize  # imports OpenVINO

        self.runtime: Runtime = openvino_cpu.OpenVINORuntime(
            network.eval(), precision=precision, threads=threads, cache_dir=cache_dir
        )
        self._setup(openvino_cpu.without_dense_parts(network), precision, vectorized, False)
        self.calibration_seconds = None
        if precision == "int8":
            images = calibration or []
            self.calibration_seconds = quantize.quantize(
                self.runtime, self.predict, images, cache_dir
            )

    def _setup(self, network: MaskRCNN, precision: str, vectorized: bool | None, fused: bool):
        """What every runtime shares: the network on the device, the transform's
        constants and geometry, the anchors' cache."""
        self.precision = precision
        self.vectorized = self.device.type == "cuda" if vectorized is None else vectorized
        self.fused = fused
        self.network = network.to(self.device).eval()
        self._normalization: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.input_geometry = input_geometry(self.network)
        self._anchors = AnchorCache()
        self.static: StaticDetector | None = None

    def predict(
        self, images: Sequence[torch.Tensor], options: Sequence[PredictOptions] | None = None
    ) -> list[ImageResult]:
        return self.finish(self.forward(images, options))

    @torch.inference_mode()
    def forward(
        self, images: Sequence[torch.Tensor], options: Sequence[PredictOptions] | None = None
    ) -> PendingBatch:
        """The network and all device work for one batch; blocking."""
        options = list(options) if options is not None else [PredictOptions()] * len(images)
        if len(options) != len(images):
            raise InvalidOptionError(
                f"expected one PredictOptions per image, got {len(options)} for {len(images)}"
            )
        for opts in options:
            check_options(opts)
        for image in images:
            check_image(image)
            if self.input_geometry is not None:
                self.input_geometry.check(int(image.shape[1]), int(image.shape[2]))
        if self.static is None:
            batch = [image.to(self.device, non_blocking=True) for image in images]  # uint8
        else:  # from pinned memory on a copy stream once graphed
            batch = self.static.upload(images, self.device)
        sizes = [output_size(image, opts) for image, opts in zip(batch, options, strict=True)]
        if not batch:
            return PendingBatch([], [], [], [], [], [], [])
        with self._autocast():
            detections = self._detect(batch, options)
        return self._postprocess(detections, sizes, options)

    def finish(self, pending: PendingBatch) -> list[ImageResult]:
        """Encode masks and build the results; CPU only."""
        results = []
        for i, (height, width) in enumerate(pending.sizes):
            fmt = pending.options[i].mask_format
            if fmt == "rle":
                masks = pack_runs(pending.runs[i], (height, width))
            elif fmt == "polygon":
                masks = [polygons_at(crop, offset) for crop, offset in pending.crops[i]]
            else:
                masks = [None] * len(pending.labels[i])
            detections = [
                Detection(
                    class_id=self.info.class_ids[label],
                    class_name=self.info.class_names[label],
                    score=score,
                    box=tuple(box),
                    mask=mask,
                )
                for label, score, box, mask in zip(
                    pending.labels[i], pending.scores[i], pending.boxes[i], masks, strict=True
                )
            ]
            results.append(ImageResult(width=width, height=height, detections=detections))
        return results

    def _autocast(self, cache: bool = True):
        dtype = _AUTOCAST_DTYPES.get(self.precision)  # int8: OpenVINO's, no autocast
        enabled = dtype is not None and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=dtype, enabled=enabled, cache_enabled=cache)

    def _detect(self, batch: list[torch.Tensor], options: list[PredictOptions]) -> list[dict]:
        """Transform, backbone, RPN and box head as torchvision does, then per-image
        selection with each image's options, then the mask head on the kept boxes."""
        original_sizes = [output_size(im, opts) for im, opts in zip(batch, options, strict=True)]
        image_list = self._transform(batch)
        if self.static is not None:
            found = self.static.detect(image_list, original_sizes, options)
            if found is not None:  # None: not exact, the dynamic path decides
                return found
        heads, runtime = self.network.roi_heads, self.runtime
        dense = runtime.features(image_list.tensors)
        proposals = propose(
            self.network.rpn, image_list, dense, self._anchors, vectorized=self.vectorized
        )
        sizes = image_list.image_sizes
        kept = select_boxes(
            heads, runtime.classify, dense.maps, proposals, sizes, options, self.vectorized
        )
        mask_probs = predict_masks(heads, runtime.segment, dense.maps, kept, sizes)
        boxes = [det["boxes"].float() for det in kept]
        scaled = scale_boxes(boxes, image_list.image_sizes, original_sizes)
        for det, probs, image_boxes in zip(kept, mask_probs, scaled, strict=True):
            det["boxes"], det["mask_probs"] = image_boxes, probs.float()
        return kept

    @torch.inference_mode()
    def capture_graphs(self, image_sizes: Sequence[tuple[int, int]], batch_sizes: Sequence[int]):
        """Capture the static forward in CUDA graphs (``model.inference.graphs``) for
        batches of ``batch_sizes`` images of each ``(height, width)`` in
        ``image_sizes`` (each stands for its padded canvas); CUDA and ``static`` only."""
        if self.static is None or self.device.type != "cuda":
            raise InvalidOptionError("CUDA graphs need static=True on a CUDA device")
        for height, width in image_sizes:
            blank = [torch.zeros((3, height, width), dtype=torch.uint8, device=self.device)]
            for size in sorted(set(batch_sizes)):
                with self._autocast(cache=False):  # a graph outlives cached casts
                    self.static.capture(self._transform(blank * size), [(height, width)] * size)

    def _transform(self, batch: list[torch.Tensor]) -> ImageList:
        """``network.transform`` of the uint8 images scaled to ``[0, 1]`` (normalise,
        resize, pad into one tensor), the same numbers, with the mean and std kept
        on the device: torchvision copies them there for every image, and each
        copy waits for the device's queue. With ``vectorized`` (the CUDA default),
        images of one size (the usual batch: the queue batches by size) go through
        each step together, a kernel per step rather than one per image; on the
        CPU, one image at a time stays in the cache (the whole batch at once made
        the demo model's transform of 8 images 1.4x slower), and one channel at a
        time bounds the float copies of a large image."""
        transform = self.network.transform
        key = (torch.float32, batch[0].device)
        if key not in self._normalization:
            self._normalization[key] = tuple(
                torch.as_tensor(values, dtype=key[0], device=key[1])[:, None, None]
                for values in (transform.image_mean, transform.image_std)
            )
        mean, std = self._normalization[key]
        if not self.vectorized or any(image.shape != batch[0].shape for image in batch):
            # a channel at a time: a float copy of a 6000x6000 photo is 432 MB, a
            # plane of it 144 (the numbers are the same: each channel is alone)
            images = [
                torch.cat(
                    [
                        transform.resize(normalize(image[c : c + 1], mean[c], std[c]), None)[0]
                        for c in range(len(image))
                    ]
                )
                for image in batch
            ]
            sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
            return ImageList(transform.batch_images(images, transform.size_divisible), sizes)
        count, channels, height, width = len(batch), *batch[0].shape
        # every image's channels as the channels of one: the resize treats each alike
        stacked = normalize(torch.stack(batch), mean, std).view(count * channels, height, width)
        resized = transform.resize(stacked, None)[0]
        size = (int(resized.shape[-2]), int(resized.shape[-1]))
        padded = torch.empty(
            (count, channels, *(padded_side(s, transform.size_divisible) for s in size)),
            dtype=resized.dtype,
            device=resized.device,
            # the fused backbone's layout, or it would convert the batch again
            memory_format=torch.channels_last if self.fused else torch.contiguous_format,
        ).zero_()
        padded[:, :, : size[0], : size[1]].copy_(resized.view(count, channels, *size))
        return ImageList(padded, [size] * count)

    def _postprocess(
        self, detections: list[dict], sizes: list[tuple[int, int]], options: list[PredictOptions]
    ) -> PendingBatch:
        """Masks pasted and coded (``encode_masks``), and one transfer of every box,
        score and label: a few host syncs per batch rather than a few per image
        (each one stalls the device's queue)."""
        counts = [len(det["boxes"]) for det in detections]
        limit = _GROUP_BYTES_CPU if self.device.type == "cpu" else _GROUP_BYTES_DEVICE
        runs, crops = encode_masks(detections, sizes, options, limit)
        columns = [
            torch.cat([det[name] for det in detections]) for name in ("boxes", "scores", "labels")
        ]
        table = torch.cat([columns[0], columns[1][:, None], columns[2][:, None]], 1)
        table = table.to("cpu", torch.float64)
        pending = PendingBatch(sizes, options, [], [], [], runs, crops)
        for rows in table.split(counts):
            pending.boxes.append(rows[:, :4].tolist())
            pending.scores.append(rows[:, 4].tolist())
            pending.labels.append(rows[:, 5].to(torch.int64).tolist())
        return pending


def output_size(image: torch.Tensor, options: PredictOptions) -> tuple[int, int]:
    """The frame an image's boxes and masks are given in: ``options.output_size``
    (its file's size, when it was decoded smaller), else its own."""
    return options.output_size or (int(image.shape[-2]), int(image.shape[-1]))
