"""The batched RPN's anchor cache: torchvision's anchors for every batch geometry,
each computed once while it stays among the recent ones."""

import torch

from model.inference.proposals import AnchorCache, propose
from model.inference.runtimes import DenseFeatures
from tests.model.conftest import random_image


def batch_of(network, sizes: list[tuple[int, int]], seed: int = 0):
    images = [random_image(h, w, seed + i).float() / 255 for i, (h, w) in enumerate(sizes)]
    with torch.no_grad():
        image_list, _ = network.transform(images)
        features = network.backbone(image_list.tensors)
    return image_list, list(features.values())


def test_anchors_are_torchvisions_for_each_batch_geometry(network):
    generator = network.rpn.anchor_generator
    cache = AnchorCache(size=2)
    small = batch_of(network, [(90, 70), (64, 80), (96, 96)])
    large = batch_of(network, [(130, 200)])
    assert small[0].tensors.shape[-2:] != large[0].tensors.shape[-2:]
    for image_list, levels in [small, large, small]:
        got = cache.get(generator, image_list, levels)
        expected = generator(image_list, levels)
        assert len(got) == len(expected) == len(image_list.image_sizes)
        for g, e in zip(got, expected, strict=True):
            assert torch.equal(g, e)
    # computed once per geometry: every image, and every later batch, gets that tensor
    first = cache.get(generator, *small)
    assert first[0] is first[2] and cache.get(generator, *small)[0] is first[0]
    # beyond `size` geometries, the least recently used one is computed again
    wide = batch_of(network, [(64, 256)])
    cache.get(generator, *large)
    cache.get(generator, *wide)  # evicts `small`
    assert cache.get(generator, *wide)[0] is cache.get(generator, *wide)[0]
    assert cache.get(generator, *small)[0] is not first[0]


def test_proposals_with_and_without_the_cache_are_torchvisions(network):
    cache = AnchorCache()
    for sizes in [[(90, 70), (64, 80)], [(130, 200)], [(90, 70), (64, 80)]]:
        image_list, levels = batch_of(network, sizes)
        features = dict(zip(map(str, range(len(levels))), levels, strict=True))
        with torch.no_grad():
            expected, _ = network.rpn(image_list, features)
            dense = DenseFeatures(features, *network.rpn.head(levels))
            cached = propose(network.rpn, image_list, dense, cache)
            computed = propose(network.rpn, image_list, dense)  # a tensor per image
            looped = propose(network.rpn, image_list, dense, cache, vectorized=False)
        assert len(cached) == len(computed) == len(looped) == len(expected)
        for c, g, lo, e in zip(cached, computed, looped, expected, strict=True):
            assert torch.equal(c, e) and torch.equal(g, e) and torch.equal(lo, e)
