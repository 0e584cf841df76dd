"""The runtimes of the dense parts (``model.inference.runtimes``) on the CPU.

OpenVINO's float32 against torchvision is ``test_predictor.py`` (every test there
runs on it too). Here: bfloat16 against float32 by the GPU precision tests' rule,
the converted graphs' disk cache, and which runtime and precision a predictor
gets where.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.errors import InvalidOptionError
from model.inference.options import PredictOptions
from model.inference.predictor import Predictor
from model.inference.runtimes import choose_runtime
from model.inference.runtimes import graphs as graphs_module
from model.inference.runtimes import quantize as quantize_module
from model.inference.runtimes.graphs import DenseGraph
from model.inference.runtimes.openvino_cpu import (
    BF16_FLAGS,
    INT8_FLAGS,
    check_precision,
    cpu_flags,
)
from model.loading import load_model
from model.training.dataset import CocoDataset
from model.training.evaluation import evaluate_predictor
from model.training.synthetic import generate_dataset, render_scenes
from tests.model.conftest import make_network, random_image
from tests.model.inference.precision_cases import (
    PARTNER_SCORE,
    assert_partners,
    assert_sane,
    demo_case,
    r50_case,
)

needs_bf16 = pytest.mark.skipif(
    not cpu_flags() & set(BF16_FLAGS),
    reason=f"this CPU has no bfloat16 units ({' or '.join(BF16_FLAGS)})",
)

REPO = Path(__file__).resolve().parents[3]
SMALL = "maskrcnn_small_fpn"  # the demo's architecture: converted in a second or two

# ||bf16 - fp32|| / ||fp32|| of the FPN levels (bf16's unit roundoff is 3.9e-3, and
# ~50 layers accumulate it); as test_precision.py allows on CUDA
BF16_FEATURE_TOLERANCE = 5e-2


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino")


@needs_bf16
def test_bf16_demo_detections_match_fp32(cache):
    network, info, images = demo_case()
    options = [PredictOptions(score_threshold=PARTNER_SCORE)] * len(images)
    runs = {
        precision: Predictor(
            network, info, runtime="openvino", precision=precision, cache_dir=cache
        ).predict(images, options)
        for precision in ("fp32", "bf16")
    }
    assert_partners(runs["fp32"], runs["bf16"])


@needs_bf16
def test_bf16_r50_features_and_detections(cache):
    """R50-FPN with random weights: features within bfloat16's rounding of torch's
    float32 (its near-tie detections compare nothing but noise), detections sane."""
    network, info, images = r50_case()
    predictor = Predictor(network, info, runtime="openvino", precision="bf16", cache_dir=cache)
    assert (predictor.runtime.name, predictor.precision) == ("openvino", "bf16")
    with torch.inference_mode():
        image_list, _ = network.transform([image.float() / 255 for image in images])
        reference = network.backbone(image_list.tensors)
        reduced = predictor.runtime.features(image_list.tensors).maps
    for name, ref in reference.items():
        error = ((reduced[name] - ref).norm() / ref.norm()).item()
        assert error <= BF16_FEATURE_TOLERANCE, f"level {name}: relative error {error:.2e}"
    assert_sane(images, predictor.predict(images))


def test_fp32_features_are_torchs(cache):
    """Float32 is asked for, not left to the CPU plugin (which picks bfloat16 on
    CPUs that have it): the levels agree with torch's to float32 rounding."""
    network, info, images = r50_case()
    predictor = Predictor(network, info, runtime="openvino", cache_dir=cache)
    # OpenVINO holds the weights: the predictor keeps no torch copy, the caller's stays whole
    assert predictor.network.backbone is None and predictor.network.roi_heads.mask_head is None
    assert network.backbone is not None and network.roi_heads.mask_head is not None
    with torch.inference_mode():
        image_list, _ = network.transform([image.float() / 255 for image in images[:2]])
        reference = network.backbone(image_list.tensors)
        converted = predictor.runtime.features(image_list.tensors).maps
    for name, ref in reference.items():
        error = ((converted[name] - ref).norm() / ref.norm()).item()
        assert error <= 1e-5, f"level {name}: relative error {error:.2e}"


def test_converted_graphs_are_read_back_from_the_cache(info, tmp_path, monkeypatch, caplog):
    """A second predictor of the same weights converts nothing; other weights (a
    model trained further) never read the first one's graphs."""
    network = make_network(SMALL)
    images = [random_image(100, 130, 1)]
    with caplog.at_level(logging.INFO, logger=graphs_module.__name__):
        first = Predictor(network, info, runtime="openvino", cache_dir=tmp_path).predict(images)
    assert sum("converted the" in r.message for r in caplog.records) == 3
    written = sorted(p.name for p in tmp_path.glob("*.xml"))
    assert [name.split("-")[0] for name in written] == ["box", "dense", "mask"]

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(graphs_module, "convert_graph", no_conversion)
    again = Predictor(network, info, runtime="openvino", cache_dir=tmp_path).predict(images)
    assert again == first
    monkeypatch.undo()

    changed = make_network(SMALL, seed=1)
    Predictor(changed, info, runtime="openvino", cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.xml"))) == 6
    assert not list(tmp_path.glob(".writing-*")), "a temporary folder was left behind"


def test_no_cache_dir_writes_nothing(info, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    network = make_network(SMALL)
    predictor = Predictor(network, info, runtime="openvino")
    assert predictor.predict([random_image(100, 130, 0)])
    assert not list(tmp_path.iterdir())


def test_dense_graph_keeps_every_level_in_one_table():
    """What the pooling reads without a copy: the levels, channels-last, one after
    another, in the backbone's order."""
    network = make_network()
    images = torch.rand(2, 3, 128, 160)
    with torch.no_grad():
        rows, *_ = DenseGraph(network)(images)
        levels = network.backbone(images)
    expected = torch.cat(
        [lv.permute(0, 2, 3, 1).reshape(-1, lv.shape[1]) for lv in levels.values()]
    )
    assert torch.equal(rows, expected)


def test_which_runtime_runs_where(info):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_runtime("auto", cpu) == "openvino"
    assert choose_runtime("auto", cuda) == "torch"
    assert choose_runtime("torch", cpu) == "torch"
    with pytest.raises(InvalidOptionError, match="runs on the CPU"):
        choose_runtime("openvino", cuda)
    with pytest.raises(InvalidOptionError, match="auto, torch, openvino"):
        choose_runtime("onnx", cpu)
    network = make_network(min_size=64, max_size=64)
    assert Predictor(network, info).runtime.name == "torch"  # the library's default
    with pytest.raises(InvalidOptionError, match="static shapes"):
        Predictor(network, info, runtime="openvino", static=True)
    with pytest.raises(InvalidOptionError, match="fp32, bf16, int8, not 'fp16'"):
        Predictor(network, info, runtime="openvino", precision="fp16")


def test_bf16_needs_bfloat16_units():
    """A CPU without them refuses bf16, naming the flags, rather than run float32
    under its name."""
    with pytest.raises(InvalidOptionError, match="amx_bf16 or avx512_bf16"):
        check_precision("bf16", flags={"avx2", "avx512f", "fma"})
    check_precision("bf16", flags={"avx512f", "avx512_bf16"})
    check_precision("bf16", flags={"amx_bf16"})
    check_precision("fp32", flags=set())


def test_openvino_sends_no_telemetry(tmp_path):
    """Converting a model loads no telemetry module and writes no client id under
    $HOME (OpenVINO's converter would send each conversion to Google Analytics)."""
    code = (
        "import sys\n"
        "from model.inference.predictor import Predictor\n"
        "from tests.model.conftest import make_network, random_image\n"
        "from model.info import ModelInfo\n"
        "info = ModelInfo('t', 'a', (0, 1, 2, 3, 4), ('bg', 'a', 'b', 'c', 'd'))\n"
        "p = Predictor(make_network('maskrcnn_small_fpn'), info, runtime='openvino')\n"
        "p.predict([random_image(64, 80, 0)])\n"
        "assert sys.modules.get('openvino_telemetry') is None, 'telemetry loaded'\n"
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, check=True, timeout=300)
    assert list(tmp_path.iterdir()) == []


needs_int8 = pytest.mark.skipif(
    not cpu_flags() & set(INT8_FLAGS),
    reason=f"this CPU has no int8 dot-product units ({' or '.join(INT8_FLAGS)})",
)
# the demo model's held-out scenes (tests/model/test_demo_model.py) and the int8 bound
HELD_OUT_SEED, MAX_AP_DROP = 7001, 0.01


@needs_int8
@pytest.mark.slow
def test_int8_keeps_the_demo_models_accuracy(cache, tmp_path):
    """Quantized by NNCF on 32 synthetic scenes of another seed, the demo model
    loses at most one point of segm AP on its held-out scenes."""
    loaded = load_model("demo")
    generate_dataset(tmp_path / "held-out", num_images=60, image_size=256, seed=HELD_OUT_SEED)
    dataset = CocoDataset(tmp_path / "held-out")
    calibration = render_scenes(32, 256, seed=2026)
    metrics = {}
    for precision in ("fp32", "int8"):
        predictor = Predictor(
            loaded.network,
            loaded.info,
            runtime="openvino",
            precision=precision,
            calibration=calibration,
            cache_dir=cache,
        )
        assert predictor.precision == predictor.runtime.precision == precision
        metrics[precision] = evaluate_predictor(predictor, dataset)["segm"]["AP"]
    assert metrics["int8"] >= metrics["fp32"] - MAX_AP_DROP, metrics
    assert metrics["fp32"] >= 0.7, metrics  # the comparison means something


@needs_int8
def test_int8_graphs_are_read_back_without_calibrating(info, tmp_path, monkeypatch):
    network = make_network(SMALL)
    calibration = [random_image(100, 130, seed) for seed in range(4)]

    def int8_predictor() -> Predictor:
        return Predictor(
            network,
            info,
            runtime="openvino",
            precision="int8",
            calibration=calibration,
            cache_dir=tmp_path,
        )

    first = int8_predictor()
    assert first.calibration_seconds > 0
    assert len(list(tmp_path.glob("*-int8-*.xml"))) == 3
    monkeypatch.setattr(quantize_module, "_nncf", lambda: pytest.fail("calibrated again"))
    again = int8_predictor()
    assert again.calibration_seconds is None and again.runtime.precision == "int8"
    images = [random_image(100, 130, 9)]
    assert again.predict(images) == first.predict(images)
    with pytest.raises(InvalidOptionError, match="images to calibrate on"):
        Predictor(network, info, runtime="openvino", precision="int8", cache_dir=tmp_path)


def test_int8_needs_int8_units():
    expected = r"int8 dot-product units \(amx_int8 or avx512_vnni"
    with pytest.raises(InvalidOptionError, match=expected):
        check_precision("int8", flags={"avx2", "avx512_bf16"})
    check_precision("int8", flags={"avx512_vnni"})
