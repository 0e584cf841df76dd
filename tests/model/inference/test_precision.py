"""``PRECISION=fp16|bf16`` against float32 on CUDA (skipped without it).

Detections: on the bundled demo model (trained, so its detections are confident
and well separated), every detection with score >= 0.5 in one precision has a
partner in the other: same class, box IoU >= 0.95, mask IoU >= 0.9. Partners are
looked for down to score 0.3, so a score moving across 0.5 by rounding is not a
missing detection.

The production architecture, R50-FPN, is checked on its features: with random
weights its proposals are near-ties that any rounding reorders (on the CPU, bf16
autocast left no detection of 62 with its float32 partner while the features
differed by only 1.1%), so detections of a random R50-FPN compare nothing but
noise. Its FPN features must agree with float32 to the rounding of the format,
and its detections must be finite and inside the image.
"""

import numpy as np
import pytest
import torch

from model.inference.fusion import to_backbone_input
from model.inference.options import PredictOptions
from model.inference.predictor import Predictor
from tests.model.inference.precision_cases import (
    PARTNER_SCORE,
    assert_partners,
    assert_sane,
    demo_case,
    r50_case,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_demo_detections_match_fp32(precision):
    network, info, images = demo_case()
    options = [PredictOptions(score_threshold=PARTNER_SCORE)] * len(images)
    reference = Predictor(network, info, device="cuda", precision="fp32").predict(images, options)
    reduced = Predictor(network, info, device="cuda", precision=precision).predict(images, options)
    assert_partners(reference, reduced)


# ||reduced - fp32|| / ||fp32|| of the FPN outputs; unit roundoff is 4.9e-4 (fp16)
# and 3.9e-3 (bf16), and ~50 layers accumulate it (bf16 on the CPU: 1.1e-2)
FEATURE_TOLERANCE = {"fp16": 1e-2, "bf16": 5e-2}


@pytest.fixture
def no_tf32():
    """A float32 reference computed in float32, not TF32 (cuDNN's default)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.usefixtures("no_tf32")
def test_r50_features_and_detections(precision):
    network, info, images = r50_case()
    predictor = Predictor(network, info, device="cuda", precision=precision)
    batch = [image.cuda().float() / 255 for image in images]
    assert predictor.fused  # folded norms, half weights, channels-last: what serving runs
    with torch.inference_mode():
        image_list, _ = network.to("cuda").transform(batch)
        reference = network.backbone(image_list.tensors)
        with torch.autocast("cuda", dtype=_DTYPES[precision]):
            reduced = predictor.network.backbone(to_backbone_input(image_list.tensors, True))
    for name, ref in reference.items():
        assert reduced[name].dtype == _DTYPES[precision]
        error = ((reduced[name].float() - ref).norm() / ref.norm()).item()
        assert error <= FEATURE_TOLERANCE[precision], f"level {name}: relative error {error:.2e}"
    results = predictor.predict(images)
    assert_sane(images, results)
    assert all(d.score >= 0.5 for result in results for d in result.detections)


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def test_reduced_precision_runs_reduced():
    """The speed-up is real: the backbone's convolutions run in half precision on
    channels-last activations, with no norm left between them, and no weight
    of the caller's network changed."""
    network, info, images = demo_case()
    predictor = Predictor(network, info, device="cuda", precision="fp16")
    convolutions = [m for m in predictor.network.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(m.weight.dtype == torch.float16 for m in convolutions)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in predictor.network.modules())
    assert all(p.dtype == torch.float32 for p in network.parameters())
    seen = []
    hook = predictor.network.backbone.register_forward_hook(
        lambda module, args, output: seen.append(next(iter(output.values())))
    )
    try:
        predictor.predict(images[:1])
    finally:
        hook.remove()
    assert [level.dtype for level in seen] == [torch.float16]
    assert seen[0].is_contiguous(memory_format=torch.channels_last)
    assert np.isfinite([d.score for d in predictor.predict(images[:1])[0].detections]).all()
