import numpy as np
import pytest

from soupsearch.data.corruptions import corrupt, list_corruptions, parse_shift_name
from soupsearch.errors import ConfigError


@pytest.fixture(scope="module")
def images():
    from soupsearch.data.digits import load_digits_arrays

    x, _ = load_digits_arrays()
    return x[:64]


@pytest.mark.parametrize("name", list_corruptions())
def test_each_corruption_is_deterministic_bounded_and_grows_with_severity(images, name):
    a = corrupt(images, name, 3, seed=0)
    assert a.shape == images.shape and a.dtype == np.float32
    assert np.array_equal(a, corrupt(images, name, 3, seed=0))
    assert a.min() >= 0 and a.max() <= 1
    dist = [float(np.abs(corrupt(images, name, s) - images).mean()) for s in (1, 3, 5)]
    assert dist[0] > 0 and dist[0] < dist[1] < dist[2], dist


def test_at_least_the_five_named_corruptions():
    assert {"gaussian_noise", "blur", "rotation", "contrast", "pixelate"} <= set(list_corruptions())


def test_parse_shift_name():
    assert parse_shift_name("blur@3") == ("blur", 3)
    with pytest.raises(ConfigError, match="expected '<name>@<1-5>'"):
        parse_shift_name("blur@9")
