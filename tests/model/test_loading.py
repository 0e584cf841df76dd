"""Model specs: torchvision state dicts, our checkpoints, the hub cache,
and the errors for files that are wrong."""

import logging
import pickle
from urllib.error import URLError

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models.detection import maskrcnn_resnet50_fpn, maskrcnn_resnet50_fpn_v2

import model.loading as loading
import model.weights as weights
from model.checkpoint import read_checkpoint, save_checkpoint
from model.errors import CheckpointError, WeightsUnavailableError
from model.info import BASE_MODELS, BUILTIN_MODELS, MODEL_SPECS
from model.loading import load_model
from tests.model.conftest import make_network, random_image

SMALL = {"min_size": 96, "max_size": 128}


def outputs(network, image):
    with torch.no_grad():
        return network([image.float() / 255])[0]


def assert_same_outputs(a, b):
    image = random_image(80, 100, 5)
    out_a, out_b = outputs(a, image), outputs(b, image)
    for key in ("boxes", "labels", "scores"):
        torch.testing.assert_close(out_a[key], out_b[key])


@pytest.fixture(scope="module")
def pth_file(tmp_path_factory):
    torch.manual_seed(1)
    network = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=5, **SMALL)
    path = tmp_path_factory.mktemp("pth") / "five.pth"
    torch.save(network.state_dict(), path)
    return path, network.eval()


def test_pth_infers_number_of_classes(pth_file):
    path, original = pth_file
    loaded = load_model(str(path), **SMALL)
    assert loaded.info.num_classes == 5
    assert loaded.info.architecture == "maskrcnn_resnet50_fpn"
    assert loaded.info.id == "five"
    assert loaded.info.class_names == ("background", "class_1", "class_2", "class_3", "class_4")
    assert_same_outputs(loaded.network, original)


def test_pth_reference_script_layout_and_v2(tmp_path):
    network = maskrcnn_resnet50_fpn_v2(weights=None, weights_backbone=None, num_classes=3)
    path = tmp_path / "v2.pt"
    torch.save({"model": network.state_dict(), "epoch": 3}, path)
    loaded = load_model(str(path))
    assert loaded.info.architecture == "maskrcnn_resnet50_fpn_v2"
    assert loaded.info.num_classes == 3


def test_classes_file_renames(pth_file, tmp_path):
    path, _ = pth_file
    names = tmp_path / "classes.txt"
    names.write_text("background\ncat\ndog\n\nfox\nowl\n")
    loaded = load_model(str(path), classes_file=str(names), **SMALL)
    assert loaded.info.class_names == ("background", "cat", "dog", "fox", "owl")
    assert loaded.info.resolve_classes(["dog", 4]) == frozenset({2, 4})


def test_classes_file_with_wrong_count(pth_file, tmp_path):
    path, _ = pth_file
    names = tmp_path / "classes.txt"
    names.write_text("background\ncat\n")
    with pytest.raises(CheckpointError, match=r"classes\.txt.*2 names.*5 classes"):
        load_model(str(path), classes_file=str(names))


def test_corrupt_pth(tmp_path):
    path = tmp_path / "broken.pth"
    path.write_bytes(b"\x00not a zip archive" * 50)
    with pytest.raises(CheckpointError, match=r"broken\.pth.*not a readable"):
        load_model(str(path))


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the payload's, on purpose
def test_pickle_payload_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        load_model(str(path))
    assert not (tmp_path / "pwned").exists()


def test_mismatched_state_dict(pth_file, tmp_path):
    _, original = pth_file
    state = original.state_dict()
    state["roi_heads.mask_predictor.mask_fcn_logits.weight"] = torch.zeros(7, 256, 1, 1)
    bad = tmp_path / "mismatch.pth"
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"mismatch\.pth: does not fit the architecture"):
        load_model(str(bad))
    del state["backbone.body.conv1.weight"]
    torch.save(state, bad)
    with pytest.raises(CheckpointError, match=r"mismatch\.pth: does not fit"):
        load_model(str(bad))


def test_not_a_mask_rcnn(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match=r"other\.pth: not a Mask R-CNN"):
        load_model(str(path))


def test_unknown_spec_and_suffix(tmp_path):
    with pytest.raises(CheckpointError, match="not auto, demo, coco, coco-v2"):
        load_model(str(tmp_path / "missing.safetensors"))
    odd = tmp_path / "model.onnx"
    odd.write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"unknown model file type '\.onnx'"):
        load_model(str(odd))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    network = make_network("maskrcnn_resnet50_fpn", seed=2, num_classes=3, **SMALL)
    path = tmp_path_factory.mktemp("ckpt") / "shapes.safetensors"
    save_checkpoint(
        path, network, architecture="maskrcnn_resnet50_fpn",
        arch_kwargs={"num_classes": 3, **SMALL},
        classes=[{"id": 4, "name": "circle"}, {"id": 9, "name": "star"}],
        dataset_id="ds-1", metrics={"segm_map": 0.5},
    )
    return path, network


def test_safetensors_round_trip(checkpoint):
    path, original = checkpoint
    loaded = load_model(str(path))
    assert loaded.info.id == "shapes"
    assert loaded.info.class_ids == (0, 4, 9)
    assert loaded.info.class_names == ("background", "circle", "star")
    assert loaded.info.metadata["dataset_id"] == "ds-1"
    assert loaded.info.metadata["metrics"] == {"segm_map": 0.5}
    assert loaded.info.metadata["created_at"].endswith("+00:00")
    assert_same_outputs(loaded.network, original)
    assert not list(path.parent.glob(".*tmp*")), "no temporary file is left behind"


def test_safetensors_tampered_or_foreign(checkpoint, tmp_path):
    path, _ = checkpoint
    state, metadata = read_checkpoint(path)
    state["backbone.body.conv1.weight"][0, 0, 0, 0] += 1
    import json

    tampered = tmp_path / "tampered.safetensors"
    save_file(state, str(tampered), metadata={"maskrcnn": json.dumps(metadata)})
    with pytest.raises(CheckpointError, match=r"tampered\.safetensors: tensors do not match"):
        load_model(str(tampered))
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(CheckpointError, match=r"foreign\.safetensors: .*no 'maskrcnn' metadata"):
        load_model(str(foreign))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match=r"garbage\.safetensors: not a readable"):
        load_model(str(garbage))


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    """An empty torch hub cache and a network that refuses every download."""
    hub = tmp_path / "hub"
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))

    def offline(url, dst, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    yield hub
    torch.hub.set_dir(old)


def test_coco_strict_without_weights(empty_hub):
    with pytest.raises(WeightsUnavailableError, match="could not download coco weights"):
        load_model("coco")
    with pytest.raises(WeightsUnavailableError, match="not in the torch hub cache"):
        load_model("coco-v2", allow_download=False)


def test_auto_falls_back_to_demo(empty_hub, checkpoint, monkeypatch, caplog):
    path, original = checkpoint
    monkeypatch.setattr(loading, "DEMO_CHECKPOINT", path)
    with caplog.at_level(logging.WARNING, logger="model.loading"):
        loaded = load_model("auto")
    assert loaded.info.id == "demo"
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "demo model, which knows only synthetic shapes" in warning  # said once, short
    assert "maskrcnn download coco" in warning and len(warning) < 250
    assert_same_outputs(loaded.network, original)


def test_auto_without_demo_says_so(empty_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "DEMO_CHECKPOINT", tmp_path / "nope.safetensors")
    with pytest.raises(WeightsUnavailableError, match="demo model is missing"):
        load_model("auto")


@pytest.mark.slow
def test_coco_from_hub_cache(empty_hub):
    """A weights file already in torchvision's cache is used offline, with COCO names."""
    pretrained = weights.PRETRAINED["coco"]
    cached = weights.cached_weights_path(pretrained)
    cached.parent.mkdir(parents=True)
    torch.manual_seed(3)
    network = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **SMALL)
    torch.save(network.state_dict(), cached)
    loaded = load_model("auto", **SMALL)
    assert loaded.info.id == "coco"
    assert loaded.info.num_classes == 91
    assert loaded.info.class_names[1] == "person"
    assert loaded.info.resolve_classes(["person", "dog"]) == frozenset({1, 18})
    assert_same_outputs(loaded.network, network.eval())


def test_the_built_in_names_are_the_demo_and_each_pretrained_weight():
    assert set(BUILTIN_MODELS) == {"demo", *weights.PRETRAINED}
    assert set(MODEL_SPECS) - set(BUILTIN_MODELS) == {"auto"}
    assert set(BASE_MODELS) - set(BUILTIN_MODELS) == {"scratch"}
