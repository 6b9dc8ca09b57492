"""load_source on tiny datasets written in their real on-disk formats.

Every fixture writes the files the way the official distributions (or torchvision's
download, or Hugging Face ``datasets``) lay them out, then reads them back through
:func:`soupsearch.data.sources.load_source` and checks pixels and labels exactly.
"""

from __future__ import annotations

import io
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from soupsearch.data.sources import load_source
from soupsearch.errors import DataError

RNG = np.random.default_rng(0)


def _imgs(n, h=32, w=32, c=3):
    shape = (n, h, w, c) if c > 1 else (n, h, w)
    return RNG.integers(0, 256, size=shape, dtype=np.uint8)


# --------------------------------------------------------------------------- CIFAR


def _cifar_batch(path, imgs_hwc, labels, label_key=b"labels", protocol=2, extra=None):
    """A CIFAR python batch: dict with bytes keys, data N x 3072 uint8 channel-major."""
    d = {
        b"batch_label": b"testing batch 1 of 1",
        label_key: [int(v) for v in labels],
        b"data": imgs_hwc.transpose(0, 3, 1, 2).reshape(len(imgs_hwc), 3072).copy(),
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    d.update(extra or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=protocol)


@pytest.fixture
def cifar10_root(tmp_path):
    root = tmp_path / "cifar"
    batches = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        imgs, labels = _imgs(3 + i), RNG.integers(0, 10, 3 + i)
        # protocol 2 is what python-2 era files look like; 5 pickles arrays via _frombuffer
        _cifar_batch(root / "cifar-10-batches-py" / name, imgs, labels, protocol=[2, 4, 5][i % 3])
        batches[name] = (imgs, labels)
    return root, batches


def test_cifar10_test_split_round_trips_channel_major(cifar10_root):
    root, batches = cifar10_root
    x, y, src = load_source("torchvision", root=root, name="cifar10", split="test")
    imgs, labels = batches["test_batch"]
    assert x.dtype == np.uint8 and y.dtype == np.int64
    assert x.shape == (len(imgs), 3, 32, 32) and x.flags.c_contiguous
    np.testing.assert_array_equal(x, imgs.transpose(0, 3, 1, 2))  # [N,3,32,32] is the original image
    np.testing.assert_array_equal(x[0, 0], imgs[0, :, :, 0])  # channel 0 is red
    np.testing.assert_array_equal(y, labels)
    assert src == f"torchvision:cifar10/test@{root}"


def test_cifar10_train_concatenates_batches_in_order_and_limit(cifar10_root):
    root, batches = cifar10_root
    x, y, _ = load_source("torchvision", root=str(root), name="CIFAR-10", split="train")
    names = [f"data_batch_{k}" for k in range(1, 6)]
    np.testing.assert_array_equal(x, np.concatenate([batches[n][0] for n in names]).transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, np.concatenate([batches[n][1] for n in names]))
    x2, y2, _ = load_source("torchvision", root=root, name="cifar10", split="train", limit=5)
    np.testing.assert_array_equal(x2, x[:5])
    np.testing.assert_array_equal(y2, y[:5])


def test_cifar100_fine_labels(tmp_path):
    root = tmp_path / "c100"
    imgs, fine = _imgs(4), np.array([0, 99, 42, 7])
    _cifar_batch(root / "cifar-100-python" / "test", imgs, fine, label_key=b"fine_labels",
                 extra={b"coarse_labels": [1, 2, 3, 4]})
    x, y, _ = load_source("torchvision", root=root, name="cifar100", split="test")
    np.testing.assert_array_equal(x, imgs.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, fine)


def test_cifar_missing_files_name_root_and_expected_file(tmp_path):
    with pytest.raises(DataError) as e:
        load_source("torchvision", root=tmp_path / "nowhere", name="cifar10", split="test")
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "nowhere") in msg and "does not exist" in msg
    assert str(tmp_path / "nowhere" / "cifar-10-batches-py" / "test_batch") in msg and "never downloads" in msg

    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"")
    with pytest.raises(DataError) as e:
        load_source("torchvision", root=tmp_path, name="cifar10", split="test")
    msg = str(e.value)
    assert f"no CIFAR-10 python batches under {tmp_path}" in msg
    assert str(tmp_path / "cifar-10-batches-py" / "test_batch") in msg and "extract" in msg


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_forbidden_global_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, f, protocol=protocol)
    with pytest.raises(DataError) as e:
        load_source("torchvision", root=tmp_path, name="cifar10", split="test")
    msg = str(e.value)
    assert "refused to unpickle global" in msg and "system" in msg and str(path) in msg
    assert not marker.exists()


def test_cifar_malformed_batch(tmp_path):
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(DataError, match=r"expected uint8 \[N, 3072\]"):
        load_source("torchvision", root=tmp_path, name="cifar10", split="test")
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a readable CIFAR python batch"):
        load_source("torchvision", root=tmp_path, name="cifar10", split="test")


# --------------------------------------------------------------------------- MNIST


def _write_idx(path, arr):
    """idx format: 0, 0, type (0x08 = uint8), ndim; big-endian int32 dims; raw data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(bytes([0, 0, 0x08, arr.ndim]))
        f.write(struct.pack(f">{arr.ndim}i", *arr.shape))
        f.write(np.ascontiguousarray(arr, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_round_trip(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    imgs, labels = _imgs(5, 28, 28, 1), np.array([3, 1, 4, 1, 5], np.uint8)
    _write_idx(raw / "t10k-images-idx3-ubyte", imgs)
    _write_idx(raw / "t10k-labels-idx1-ubyte", labels)
    # only the test files exist: torchvision.datasets.MNIST would insist on all four
    x, y, src = load_source("torchvision", root=tmp_path, name=name, split="test")
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.uint8
    np.testing.assert_array_equal(x[:, 0], imgs)
    np.testing.assert_array_equal(y, labels.astype(np.int64))
    assert src == f"torchvision:{name}/test@{tmp_path}"

    with pytest.raises(DataError) as e:
        load_source("torchvision", root=tmp_path, name=name, split="train")
    assert str(raw / "train-images-idx3-ubyte") in str(e.value) and "never downloads" in str(e.value)


def test_mnist_gz_only_hints_gunzip_and_bad_file(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte.gz").write_bytes(b"")
    (raw / "t10k-labels-idx1-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError, match="gunzip"):
        load_source("torchvision", root=tmp_path, name="mnist", split="test")
    _write_idx(raw / "t10k-images-idx3-ubyte", _imgs(2, 28, 28, 1)[:, 0])  # 2-D: not an idx3 file
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))
    with pytest.raises(DataError, match="not a uint8 idx3 image file"):
        load_source("torchvision", root=tmp_path, name="mnist", split="test")


# --------------------------------------------------------------------------- SVHN


@pytest.mark.parametrize("split", ["test", "extra"])
def test_svhn_mat_round_trip_and_label_10_is_0(tmp_path, split):
    import scipy.io

    imgs = _imgs(4)  # N, H, W, 3
    labels = np.array([[10], [1], [9], [10]], np.uint8)
    scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": imgs.transpose(1, 2, 3, 0), "y": labels})
    x, y, _ = load_source("torchvision", root=tmp_path, name="svhn", split=split)
    assert x.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(x, imgs.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, [0, 1, 9, 0])
    with pytest.raises(DataError, match=str(tmp_path / "train_32x32.mat")):
        load_source("torchvision", root=tmp_path, name="svhn", split="train")


def test_torchvision_resize_and_class_map(cifar10_root):
    root, batches = cifar10_root
    x, y, _ = load_source("torchvision", root=root, name="cifar10", split="test", image_size=[16, 8],
                          class_map={str(i): 9 - i for i in range(10)})
    imgs, labels = batches["test_batch"]
    assert x.shape == (len(imgs), 3, 16, 8)
    ref = np.asarray(Image.fromarray(imgs[0]).resize((8, 16), Image.BILINEAR))
    np.testing.assert_array_equal(x[0], ref.transpose(2, 0, 1))
    np.testing.assert_array_equal(y, 9 - labels)


def test_torchvision_bad_arguments(tmp_path):
    with pytest.raises(DataError, match="unknown torchvision dataset 'imagenet'"):
        load_source("torchvision", root=tmp_path, name="imagenet", split="test")
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_source("torchvision", root=tmp_path, name="cifar10", split="val")
    with pytest.raises(DataError, match="needs 'root'"):
        load_source("torchvision", name="cifar10", split="test")
    with pytest.raises(DataError, match="unknown dataset kind"):
        load_source("webdataset", path=tmp_path)


# --------------------------------------------------------------------------- ImageFolder


def _png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


@pytest.fixture
def folder_tree(tmp_path):
    root = tmp_path / "imgs"
    items = {}
    for cls in ("zebra", "cat", "dog"):
        for k in range(2):
            arr = _imgs(1, 6, 8)[0]
            _png(root / cls / f"{k}.png", arr)
            items[f"{cls}/{k}.png"] = arr
    grey = _imgs(1, 6, 8, 1)[0]
    _png(root / "dog" / "2_grey.png", grey)
    items["dog/2_grey.png"] = np.repeat(grey[:, :, None], 3, axis=2)
    (root / "cat" / "notes.txt").write_text("not an image")
    return root, items


def test_imagefolder_sorted_classes_and_greyscale_promoted(folder_tree):
    root, items = folder_tree
    x, y, src = load_source("imagefolder", root=root)
    order = ["cat/0.png", "cat/1.png", "dog/0.png", "dog/1.png", "dog/2_grey.png", "zebra/0.png", "zebra/1.png"]
    assert x.shape == (7, 3, 6, 8) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, np.stack([items[k].transpose(2, 0, 1) for k in order]))
    np.testing.assert_array_equal(y, [0, 0, 1, 1, 1, 2, 2])
    assert src == f"imagefolder:{root}"


def test_imagefolder_all_greyscale_is_one_channel(tmp_path):
    a, b = _imgs(2, 5, 7, 1)
    _png(tmp_path / "a" / "x.png", a)
    _png(tmp_path / "b" / "y.png", b)
    x, y, _ = load_source("imagefolder", root=tmp_path)
    assert x.shape == (2, 1, 5, 7)
    np.testing.assert_array_equal(x[:, 0], np.stack([a, b]))
    np.testing.assert_array_equal(y, [0, 1])


def test_imagefolder_class_map(folder_tree):
    root, _ = folder_tree
    # ImageNet-R style: the folders are a subset of a larger label space
    cmap = {"dog": 207, "cat": 281, "zebra": 340, "goldfish": 1}
    _, y, _ = load_source("imagefolder", root=root, class_map=cmap)
    np.testing.assert_array_equal(y, [281, 281, 207, 207, 207, 340, 340])
    with pytest.raises(DataError) as e:
        load_source("imagefolder", root=root, class_map={"cat": 0})
    assert "folders not in class_map: dog, zebra" in str(e.value)


def test_imagefolder_resize_limit_and_size_mismatch(folder_tree):
    root, items = folder_tree
    x, y, _ = load_source("imagefolder", root=root, image_size=4, limit=3)
    assert x.shape == (3, 3, 4, 4)
    ref = np.asarray(Image.fromarray(items["cat/0.png"]).resize((4, 4), Image.BILINEAR))
    np.testing.assert_array_equal(x[0], ref.transpose(2, 0, 1))
    np.testing.assert_array_equal(y, [0, 0, 1])

    _png(root / "dog" / "big.png", _imgs(1, 9, 9)[0])
    with pytest.raises(DataError) as e:
        load_source("imagefolder", root=root)
    msg = str(e.value)
    assert "dog/big.png is 9x9" in msg and "cat/0.png is 6x8" in msg and "image_size" in msg
    x, _, _ = load_source("imagefolder", root=root, image_size=[6, 8])
    assert x.shape == (8, 3, 6, 8)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match=f"directory {tmp_path / 'missing'} does not exist"):
        load_source("imagefolder", root=tmp_path / "missing")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(DataError, match="has 0 examples"):
        load_source("imagefolder", root=tmp_path)
    (tmp_path / "empty_class" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot decode image empty_class/broken.png"):
        load_source("imagefolder", root=tmp_path)


# --------------------------------------------------------------------------- Parquet


def _png_bytes(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def parquet_dir(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "shards"
    d.mkdir()
    imgs, labels = _imgs(7, 5, 6), RNG.integers(0, 10, 7)
    # written out of order: shards are read in sorted name order
    pq.write_table(pa.table({"image": [_png_bytes(a) for a in imgs[4:]], "label": labels[4:]}),
                   d / "test-00001-of-00002.parquet")
    pq.write_table(pa.table({"image": [_png_bytes(a) for a in imgs[:4]], "label": labels[:4]}),
                   d / "test-00000-of-00002.parquet", row_group_size=2)
    (d / "README.md").write_text("not a shard")
    return d, imgs, labels


def test_parquet_shards_round_trip(parquet_dir):
    d, imgs, labels = parquet_dir
    x, y, src = load_source("parquet", path=d)
    assert x.shape == (7, 3, 5, 6) and x.dtype == np.uint8
    np.testing.assert_array_equal(x, imgs.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, labels)
    assert src == f"parquet:{d}"
    x, y, _ = load_source("parquet", path=str(d / "test-*.parquet"), limit=5)  # glob; limit spans shards
    np.testing.assert_array_equal(x, imgs[:5].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, labels[:5])
    x, _, _ = load_source("parquet", path=d / "test-00001-of-00002.parquet")  # one file
    np.testing.assert_array_equal(x, imgs[4:].transpose(0, 3, 1, 2))


def test_parquet_hf_struct_and_string_labels_with_class_map(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    imgs = _imgs(3, 4, 4, 1)
    names = ["cat", "dog", "cat"]
    image = pa.array([{"bytes": _png_bytes(a), "path": f"{i}.png"} for i, a in enumerate(imgs)],
                     type=pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"img": image, "fine": names}), tmp_path / "data.parquet")
    x, y, _ = load_source("parquet", path=tmp_path / "data.parquet", image_column="img", label_column="fine",
                          class_map={"cat": 3, "dog": 5})
    assert x.shape == (3, 1, 4, 4)
    np.testing.assert_array_equal(x[:, 0], imgs)
    np.testing.assert_array_equal(y, [3, 5, 3])
    with pytest.raises(DataError, match="labels not in class_map: dog"):
        load_source("parquet", path=tmp_path / "data.parquet", image_column="img", label_column="fine",
                    class_map={"cat": 3})
    with pytest.raises(DataError, match="expected integers \\(or give class_map\\)"):
        load_source("parquet", path=tmp_path / "data.parquet", image_column="img", label_column="fine")


def test_parquet_int_labels_class_map_keys_as_int_or_str(parquet_dir):
    d, _, labels = parquet_dir
    cmap = {int(k): 100 + int(k) for k in range(5)} | {str(k): 100 + k for k in range(5, 10)}
    _, y, _ = load_source("parquet", path=d, class_map=cmap)
    np.testing.assert_array_equal(y, labels + 100)


def test_parquet_errors(parquet_dir, tmp_path):
    d, _, _ = parquet_dir
    with pytest.raises(DataError) as e:
        load_source("parquet", path=d, label_column="fine_label")
    msg = str(e.value)
    assert "test-00000-of-00002.parquet has no column 'fine_label'" in msg
    assert "columns present: image, label" in msg
    with pytest.raises(DataError, match=f"path {tmp_path / 'nope.parquet'} does not exist"):
        load_source("parquet", path=tmp_path / "nope.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \*\.parquet files"):
        load_source("parquet", path=tmp_path / "empty")
    with pytest.raises(DataError, match="has 0 examples"):
        load_source("parquet", path=d, limit=0)
    with pytest.raises(DataError, match="needs 'path'"):
        load_source("parquet", root=d)


def _py2_style_pickle(obj) -> bytes:
    """A protocol-2 pickle as python 2's cPickle wrote the official batches: byte strings
    as BINSTRING (python-2 ``str``) and arrays via ``numpy.core.multiarray._reconstruct``."""

    class Py2Pickler(pickle._Pickler):
        dispatch = dict(pickle._Pickler.dispatch)

        def save_str2(self, b):
            if len(b) < 256:
                self.write(pickle.SHORT_BINSTRING + bytes([len(b)]) + b)
            else:
                self.write(pickle.BINSTRING + struct.pack("<i", len(b)) + b)
            self.memoize(b)

        dispatch[bytes] = save_str2

    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    out = buf.getvalue().replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    assert b"_codecs" not in out and b"numpy.core.multiarray\n_reconstruct" in out
    return out


def test_cifar_python2_style_batch(tmp_path):
    imgs, labels = _imgs(3), [7, 0, 2]
    d = {b"batch_label": b"testing batch 1 of 1", b"labels": labels,
         b"data": imgs.transpose(0, 3, 1, 2).reshape(3, 3072).copy(), b"filenames": [b"a.png", b"b.png", b"c.png"]}
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.parent.mkdir(parents=True)
    path.write_bytes(_py2_style_pickle(d))
    x, y, _ = load_source("torchvision", root=tmp_path, name="cifar10", split="test")
    np.testing.assert_array_equal(x, imgs.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, labels)


def test_many_images_keep_their_order_across_decode_chunks(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 300  # several decode chunks run in parallel threads
    imgs = _imgs(n, 3, 2)
    imgs[:, 0, 0, 0] = np.arange(n) % 256
    for i, a in enumerate(imgs):
        _png(tmp_path / "tree" / f"c{i // 100}" / f"{i:04d}.png", a)
    x, y, _ = load_source("imagefolder", root=tmp_path / "tree")
    np.testing.assert_array_equal(x, imgs.transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, np.arange(n) // 100)

    pq.write_table(pa.table({"image": [_png_bytes(a) for a in imgs], "label": np.arange(n)}),
                   tmp_path / "one.parquet", row_group_size=70)
    x, y, _ = load_source("parquet", path=tmp_path / "one.parquet", limit=250)
    np.testing.assert_array_equal(x, imgs[:250].transpose(0, 3, 1, 2))
    np.testing.assert_array_equal(y, np.arange(250))

    # the first odd file in order is reported, whichever thread hits one first
    _png(tmp_path / "tree" / "c2" / "0299.png", _imgs(1, 5, 5)[0])
    _png(tmp_path / "tree" / "c0" / "0070.png", _imgs(1, 4, 4)[0])
    with pytest.raises(DataError, match="c0/0070.png is 4x4"):
        load_source("imagefolder", root=tmp_path / "tree")
