import pytest
import torch

from model.inference.predictor import Predictor
from model.info import ModelInfo
from model.networks import build_network
from model.training.synthetic import render_scenes

TEST_CLASSES = ((0, 3, 5, 7, 9), ("background", "circle", "square", "triangle", "star"))
# a test's device parameter: the CUDA case runs where there is a GPU
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ],
    ),
]


def make_network(architecture: str = "maskrcnn_resnet50_fpn", seed: int = 0, **kwargs):
    """A random-weight network whose classifier is biased towards the object classes,
    so that random weights still give dozens of detections on any image."""
    torch.manual_seed(seed)
    kwargs = {"num_classes": 5, "min_size": 128, "max_size": 160, **kwargs}
    network = build_network(architecture, **kwargs)
    with torch.no_grad():
        bias = network.roi_heads.box_predictor.cls_score.bias
        bias[1:] += torch.tensor([4.0, 2.0, 1.0, 0.5])[: len(bias) - 1]
    return network.eval()


@pytest.fixture(scope="session")
def network():
    return make_network()


@pytest.fixture(scope="session")
def info():
    return ModelInfo("test", "maskrcnn_resnet50_fpn", *TEST_CLASSES)


@pytest.fixture(scope="module")
def predictor(network, info):
    return Predictor(network, info)


def random_image(height: int, width: int, seed: int) -> torch.Tensor:
    """Noise with a few flat rectangles, so proposals land on some structure."""
    g = torch.Generator().manual_seed(seed)
    image = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=g)
    for _ in range(4):
        y, x = (torch.randint(0, max(1, s // 2), (1,), generator=g).item() for s in (height, width))
        colour = torch.randint(0, 256, (3, 1, 1), dtype=torch.uint8, generator=g)
        image[:, y : y + height // 3, x : x + width // 3] = colour
    return image


def shapes_images(size: int, count: int) -> list[torch.Tensor]:
    """Scenes of the synthetic shapes dataset the demo model was trained on."""
    return render_scenes(count, size, seed=99)
