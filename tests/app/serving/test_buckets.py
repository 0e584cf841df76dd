"""Size buckets agree with torchvision's own resize-and-pad."""

import pytest
import torch
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from app.serving.buckets import bucket_key_from
from model import input_geometry


class Net(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.transform = GeneralizedRCNNTransform(
            image_mean=[0.5] * 3, image_std=[0.25] * 3, **kwargs
        ).eval()


@pytest.mark.parametrize(("min_size", "max_size"), [(128, 128), (128, 200), (800, 1333)])
def test_bucket_is_the_padded_network_input_size(min_size, max_size):
    network = Net(min_size=min_size, max_size=max_size)
    key = bucket_key_from(input_geometry(network))
    generator = torch.Generator().manual_seed(0)
    for _ in range(25):
        height, width = torch.randint(17, 700, (2,), generator=generator).tolist()
        image = torch.zeros(3, height, width)
        with torch.no_grad():
            batch, _ = network.transform([image])
        assert key(image) == tuple(batch.tensors.shape[-2:]), (height, width)


def test_without_a_transform_images_bucket_by_their_size():
    key = bucket_key_from(None)
    assert key(torch.zeros(3, 10, 20)) == (10, 20)
