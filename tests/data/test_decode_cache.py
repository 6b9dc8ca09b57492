"""The decoded-image-folder cache (soupsearch.data.cache): a second read of the same folder with
the same preprocessing opens no image and gives the same array bit for bit; a changed file or
another preprocessing decodes again; a corrupt entry is rebuilt with one warning line."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SOUPSEARCH_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for c in ("ant", "bee"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            h, w = (int(v) for v in rng.integers(30, 60, 2))  # non-square, sizes vary
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg", quality=90)
    return root


@pytest.fixture
def opens(monkeypatch):
    """Counts PIL image opens (every decode opens its file)."""
    count = {"n": 0}
    real = Image.open

    def counting(*a, **k):
        count["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(Image, "open", counting)
    return count


def _load(root, transform):
    from soupsearch.data.sources import load_source

    return load_source("imagefolder", root=root, transform=transform)


def _transform(crop=32):
    from soupsearch.models.preprocess import PreprocessSpec, explicit

    return explicit(PreprocessSpec(resize=40, crop=crop, interpolation="bicubic"))


def test_second_read_opens_no_image_and_is_bit_identical(folder, opens, tmp_path, monkeypatch):
    x1, y1, _ = _load(folder, _transform())
    assert opens["n"] == 12
    x2, y2, _ = _load(folder, _transform())
    assert opens["n"] == 12  # nothing decoded
    assert x2.dtype == x1.dtype and x2.shape == x1.shape and np.array_equal(x1, x2) and np.array_equal(y1, y2)
    monkeypatch.setenv("SOUPSEARCH_CACHE_DIR", "off")  # and it is what decoding gives
    x3, _, _ = _load(folder, _transform())
    assert opens["n"] == 24 and np.array_equal(x1, x3)


def test_a_changed_file_or_preprocessing_decodes_again(folder, opens):
    x1, _, _ = _load(folder, _transform())
    _load(folder, _transform(crop=24))  # another preprocessing: another entry
    assert opens["n"] == 24
    f = folder / "bee" / "3.jpg"
    Image.fromarray(np.zeros((33, 47, 3), dtype=np.uint8)).save(f)
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    x2, _, _ = _load(folder, _transform())
    assert opens["n"] == 36 and not np.array_equal(x1, x2)
    assert not x2[9].any()  # bee/3.jpg is the 10th sample, now black


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete_record"])
def test_a_corrupt_entry_is_rebuilt_with_one_warning(folder, opens, tmp_path, capsys, damage):
    x1, _, _ = _load(folder, _transform())
    [npy] = (tmp_path / "cache").glob("*.npy")
    raw = npy.read_bytes()
    if damage == "truncate":
        npy.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        npy.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    else:
        npy.with_suffix(".json").unlink()
    capsys.readouterr()
    x2, _, _ = _load(folder, _transform())
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "decoded cache" in ln]
    assert len(warned) == 1 and "unreadable" in warned[0] and "decoding again" in warned[0], warned
    assert opens["n"] == 24 and np.array_equal(x1, x2)
    x3, _, _ = _load(folder, _transform())  # rewritten: read from the cache again
    assert opens["n"] == 24 and np.array_equal(x1, x3)
