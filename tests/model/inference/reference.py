"""What the predictor is checked against: torchvision's own ``model(images)`` on the
same weights, and how far a pasted mask may differ from torchvision's (shared by
``test_predictor.py`` and ``test_static.py``)."""

import numpy as np
import torch
from pycocotools import mask as mask_utils

# Largest fraction of a mask's pixels that differs from torchvision's pasted mask,
# measured in tests/model/inference/test_masks.py over 12,000 random masks: at most
# 8.6e-6 (one float tie at the threshold); the tests assert the 0.5% bound of the issue.
MAX_MASK_MISMATCH = 0.005


def torchvision_reference(network, images, *, score=0.05, iou=0.5, top=100):
    heads = network.roi_heads
    saved = heads.score_thresh, heads.nms_thresh, heads.detections_per_img
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = score, iou, top
    try:
        with torch.no_grad():
            return network([image.float() / 255 for image in images])
    finally:
        heads.score_thresh, heads.nms_thresh, heads.detections_per_img = saved


def decode(det) -> np.ndarray:
    return mask_utils.decode(det.mask).astype(bool)
