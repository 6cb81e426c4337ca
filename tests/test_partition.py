"""Dirichlet non-IID split: a partition of the indices, skewed for small alpha, seeded."""

import numpy as np
import pytest

from hetune.data.partition import dirichlet_split
from hetune.errors import ConfigError


def _labels(n=2000, classes=10):
    return np.arange(n) % classes


def test_split_is_a_partition_and_every_client_has_data():
    parts = dirichlet_split(_labels(), num_clients=10, alpha=0.3, seed=1, min_size=5)
    joined = np.concatenate(parts)
    assert len(parts) == 10 and min(len(p) for p in parts) >= 5
    assert np.array_equal(np.sort(joined), np.arange(2000))


def test_small_alpha_is_skewed_large_alpha_is_near_iid():
    labels = _labels()

    def dominant_share(alpha):
        parts = dirichlet_split(labels, num_clients=10, alpha=alpha, seed=2)
        return np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts])

    assert dominant_share(0.1) > 0.5 > 0.2 > dominant_share(1000.0)


def test_split_is_reproducible_and_seed_dependent():
    a = dirichlet_split(_labels(), 5, 0.5, seed=3)
    b = dirichlet_split(_labels(), 5, 0.5, seed=3)
    c = dirichlet_split(_labels(), 5, 0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("kwargs, word", [
    (dict(num_clients=0, alpha=0.3), "num_clients"),
    (dict(num_clients=3, alpha=0.0), "alpha"),
    (dict(num_clients=3000, alpha=0.3), "3000 clients"),
])
def test_bad_split_arguments_are_named(kwargs, word):
    with pytest.raises(ConfigError, match=word):
        dirichlet_split(_labels(), **kwargs)
