"""The training loop on a tiny network and a tiny generated dataset."""

import json
import math

import pytest
import torch

from model.checkpoint import save_checkpoint
from model.loading import load_model
from model.networks import build_network
from model.training.dataset import CocoDataset
from model.training.loop import (
    TrainConfig,
    TrainingError,
    learning_rate_at,
    train,
    warmup_steps_for,
)
from model.training.synthetic import generate_dataset

TINY = {
    "num_classes": 6, "widths": (8, 16, 32, 64), "blocks": (1, 1, 1, 1), "fpn_channels": 16,
    "representation_size": 32, "mask_channels": 16, "min_size": 64, "max_size": 64,
}
FAST = {"batch_size": 2, "learning_rate": 0.02, "warmup_steps": 2, "amp": False}


def tiny_network(seed: int = 0):
    torch.manual_seed(seed)
    return build_network("maskrcnn_small_fpn", **TINY)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "ds"
    generate_dataset(root, num_images=4, image_size=64, seed=0, max_objects=3,
                     min_radius=0.15, max_radius=0.3)
    return CocoDataset(root)


def test_loss_decreases_and_progress_is_reported(shapes):
    reports = []
    network = tiny_network()
    result = train(network, shapes, config=TrainConfig(epochs=6, **FAST),
                   progress=reports.append)
    steps = [r for r in reports if r.event == "step"]
    losses = [r.losses["loss"] for r in steps]
    assert len(steps) == result.steps == 12
    assert sum(losses[-3:]) / 3 < 0.7 * sum(losses[:3]) / 3
    assert [r.step for r in steps] == list(range(1, 13))
    assert steps[-1].eta_s == 0 and steps[0].total_steps == 12
    epochs = [r for r in reports if r.event == "epoch"]
    assert [r.epoch for r in epochs] == list(range(1, 7))
    assert len(result.history) == 6 and "loss_mask" in result.history[0]["losses"]
    assert not network.training


def test_checkpoint_round_trips(shapes, tmp_path):
    network = tiny_network()
    train(network, shapes, config=TrainConfig(epochs=1, **FAST))
    path = tmp_path / "tiny.safetensors"
    save_checkpoint(path, network, architecture="maskrcnn_small_fpn", arch_kwargs=TINY,
                    classes=shapes.categories)
    loaded = load_model(str(path))
    assert loaded.info.class_ids == (0, 1, 2, 3, 4, 5)
    image = shapes.read_image(0).float() / 255
    with torch.no_grad():
        before, after = network([image])[0], loaded.network([image])[0]
    for key in ("boxes", "scores", "labels", "masks"):
        torch.testing.assert_close(before[key], after[key])


def test_empty_target_images_train(tmp_path):
    generate_dataset(tmp_path / "empty", num_images=2, image_size=64, seed=0,
                     min_objects=0, max_objects=0)
    dataset = CocoDataset(tmp_path / "empty")
    assert all(len(dataset[i][1]["labels"]) == 0 for i in range(2))
    result = train(tiny_network(), dataset, config=TrainConfig(epochs=1, **FAST))
    assert result.steps == 1 and math.isfinite(result.history[0]["losses"]["loss"])


def test_resume_continues_the_same_run(shapes, tmp_path):
    config = TrainConfig(epochs=2, **FAST)
    straight = tiny_network()
    train(straight, shapes, config=config)
    state = tmp_path / "run.resume.safetensors"

    def stop_after_first_epoch(report):
        if report.event == "epoch":
            raise Interrupted

    with pytest.raises(Interrupted):
        train(tiny_network(), shapes, config=config, state_path=state,
              progress=stop_after_first_epoch)
    resumed = tiny_network(seed=1)  # weights come from the state file
    result = train(resumed, shapes, config=config, state_path=state, resume=True)
    assert result.steps == 4 and [h["epoch"] for h in result.history] == [1, 2]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(),
                            strict=True):
        torch.testing.assert_close(a, b, msg=name)


class Interrupted(Exception):
    pass


def test_resume_refuses_other_settings(shapes, tmp_path):
    from model.errors import CheckpointError

    state = tmp_path / "run.resume.safetensors"
    train(tiny_network(), shapes, config=TrainConfig(epochs=1, **FAST), state_path=state)
    other = TrainConfig(epochs=2, **{**FAST, "learning_rate": 0.1})
    with pytest.raises(CheckpointError, match="learning_rate"):
        train(tiny_network(), shapes, config=other, state_path=state, resume=True)


def test_learning_rate_schedules():
    cosine = TrainConfig(learning_rate=1.0, warmup_steps=10, warmup_factor=0.1)
    assert learning_rate_at(0, 100, cosine) == pytest.approx(0.1)
    assert learning_rate_at(10, 100, cosine) == pytest.approx(0.5 * (1 + math.cos(0.1 * math.pi)))
    assert learning_rate_at(100, 100, cosine) == pytest.approx(0.0)
    step = TrainConfig(learning_rate=1.0, warmup_steps=0, schedule="step", gamma=0.1)
    rates = [learning_rate_at(s, 100, step) for s in (0, 74, 75, 90)]
    assert rates == pytest.approx([1.0, 1.0, 0.1, 0.01])


def test_the_default_warm_up_is_a_tenth_of_the_run_at_most_200_steps():
    config = TrainConfig(learning_rate=1.0)  # no warmup_steps: the default
    assert [warmup_steps_for(config, total) for total in (5, 30, 2000, 10**5)] == [1, 3, 200, 200]
    # a one-epoch fine-tune of 30 steps is past its warm-up by step 3, not at 0.0000
    assert learning_rate_at(15, 30, config) == pytest.approx(0.5 * (1 + math.cos(0.5 * math.pi)))
    assert warmup_steps_for(TrainConfig(warmup_steps=7), 30) == 7


def test_divergence_is_reported(shapes):
    network = tiny_network()
    with torch.no_grad():
        network.roi_heads.box_predictor.cls_score.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="not finite"):
        train(network, shapes, config=TrainConfig(epochs=1, **FAST))


def test_train_command_writes_a_checkpoint(shapes, tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "model.safetensors"
    code = main(["train", "--dataset", str(shapes.source), "--out", str(out), "--epochs", "1",
                 "--batch-size", "2", "--image-size", "64", "--val-fraction", "0.5",
                 "--device", "cpu", "--warmup-steps", "1"])
    assert code == 0
    assert "validation: 2 (run by openvino)" in capsys.readouterr().err  # the CPU's default
    loaded = load_model(str(out))
    meta = loaded.info.metadata
    assert meta["architecture"] == "maskrcnn_small_fpn"
    kwargs = meta["arch_kwargs"]
    assert {k: kwargs[k] for k in ("min_size", "max_size", "num_classes")} == {
        "min_size": 64, "max_size": 107, "num_classes": 6
    }
    assert kwargs["widths"] == [32, 64, 128, 256]  # defaults recorded too
    assert meta["classes"] == shapes.categories and meta["dataset_id"] == "ds"
    assert meta["dataset_info"]["seed"] == 0  # the generator's parameters travel along
    assert set(meta["metrics"]) == {"bbox", "segm"}
    assert meta["training"]["steps"] == 1 and meta["training"]["history"][0]["epoch"] == 1
    assert not (tmp_path / "model.safetensors.resume.safetensors").exists()


def test_fine_tuning_keeps_what_fits(shapes, tmp_path):
    from model.training.transfer import starting_network

    base = tmp_path / "base.safetensors"
    network = tiny_network()
    save_checkpoint(base, network, architecture="maskrcnn_small_fpn", arch_kwargs=TINY,
                    classes=shapes.categories)
    recorded = json.loads(json.dumps(TINY))  # tuples come back as lists
    same = starting_network(str(base), shapes.categories)
    assert same.copied == len(network.state_dict()) and same.arch_kwargs == recorded
    fewer = [{"id": 9, "name": "blob"}]
    other = starting_network(str(base), fewer, min_size=96)
    assert other.arch_kwargs == {**recorded, "num_classes": 2, "min_size": 96}
    assert other.network.roi_heads.box_predictor.cls_score.out_features == 2
    torch.testing.assert_close(
        other.network.backbone.body.stem[0].weight, network.backbone.body.stem[0].weight
    )
    assert other.copied == len(network.state_dict()) - 6  # box/mask predictors start fresh
