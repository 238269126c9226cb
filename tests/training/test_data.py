"""Datasets: IDX and CIFAR files written here in their real formats, digits, loaders."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from opnorm.training.data import (
    DATASETS,
    DatasetNotFoundError,
    IndexedTensorDataset,
    RestrictedUnpickler,
    load_cifar_batch,
    load_dataset,
    make_loader,
    read_idx,
)

IDX_NAMES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


# ----------------------------------------------------------------------------- writers


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    """IDX as specified: 0x00 0x00 type ndim, big-endian uint32 dims, big-endian data."""
    big = {0x08: ">u1", 0x0C: ">i4"}[code]
    head = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(big).tobytes()


def write_idx_dataset(d: Path, rng: np.random.Generator, n_train=7, n_test=5, hw=(28, 28), gz=False):
    d.mkdir(parents=True, exist_ok=True)
    arrays = {
        IDX_NAMES[0]: rng.integers(0, 256, (n_train, *hw), dtype=np.uint8),
        IDX_NAMES[1]: rng.integers(0, 10, n_train, dtype=np.uint8),
        IDX_NAMES[2]: rng.integers(0, 256, (n_test, *hw), dtype=np.uint8),
        IDX_NAMES[3]: rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, arr in arrays.items():
        data = idx_bytes(arr)
        if gz:
            (d / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (d / name).write_bytes(data)
    return arrays


def cifar_batch(rng: np.random.Generator, n: int) -> dict:
    """A batch as the real files hold it: bytes keys, (N, 3072) uint8 rows, list of int labels."""
    return {
        b"batch_label": b"testing batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }


def py2_style_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """The opcodes python 2's cPickle wrote into the real CIFAR files (protocol 2,
    numpy.core.multiarray._reconstruct, python-2 str for keys and the pixel buffer)."""

    def s(b: bytes) -> bytes:  # python-2 str: SHORT_BINSTRING / BINSTRING
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def i(v: int) -> bytes:  # BININT
        return b"J" + struct.pack("<i", v)

    dtype = (
        b"cnumpy\ndtype\n" + s(b"u1") + b"\x89\x88\x87R" + b"(" + i(3) + s(b"|") + b"NNN" + i(-1) + i(-1) + i(0) + b"tb"
    )
    array = (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + i(0)
        + b"\x85"
        + s(b"b")
        + b"\x87R"
        + b"("
        + i(1)
        + i(data.shape[0])
        + i(data.shape[1])
        + b"\x86"
        + dtype
        + b"\x89"
        + s(data.tobytes())
        + b"tb"
    )
    lab = b"](" + b"".join(i(v) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"batch_label") + s(b"py2 batch") + s(b"data") + array + s(b"labels") + lab + b"u."


def write_cifar(d: Path, rng: np.random.Generator, sizes=(3, 2, 4, 1, 2), n_test=3, protocol=pickle.DEFAULT_PROTOCOL):
    d.mkdir(parents=True, exist_ok=True)
    batches = []
    for k, n in enumerate(sizes, start=1):
        b = cifar_batch(rng, n)
        (d / f"data_batch_{k}").write_bytes(pickle.dumps(b, protocol=protocol))
        batches.append(b)
    test = cifar_batch(rng, n_test)
    (d / "test_batch").write_bytes(pickle.dumps(test, protocol=protocol))
    return batches, test


class Evil:
    """Pickles as a call to os.system; unpickling it with plain pickle would run the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def isolated_home(tmp_path, monkeypatch):
    """No OPNORM_DATA and an empty home, so default directories hold nothing."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("OPNORM_DATA", raising=False)
    return home


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_dataset_round_trip(tmp_path, rng, gz, name):
    arrays = write_idx_dataset(tmp_path, rng, gz=gz)
    s = load_dataset(name, tmp_path)
    assert s.name == name and s.num_classes == 10 and s.input_shape == (1, 28, 28)
    assert s.train.x.shape == (7, 1, 28, 28) and s.test.x.shape == (5, 1, 28, 28)
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64
    for x, images in ((s.train.x, arrays[IDX_NAMES[0]]), (s.test.x, arrays[IDX_NAMES[2]])):
        assert 0.0 <= x.min() and x.max() <= 1.0
        # Element by element: pixel (n, h, w) of the file is x[n, 0, h, w].
        for n, h, w in [(0, 0, 0), (1, 0, 27), (2, 27, 0), (6 if len(x) > 6 else 4, 13, 17)]:
            assert x[n, 0, h, w].item() == pytest.approx(images[n, h, w] / 255.0)
        np.testing.assert_allclose(x[:, 0].numpy(), images / 255.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(s.train.y.numpy(), arrays[IDX_NAMES[1]])
    np.testing.assert_array_equal(s.test.y.numpy(), arrays[IDX_NAMES[3]])
    # mean / std are per-channel statistics of the train images.
    ref = arrays[IDX_NAMES[0]].astype(np.float64) / 255.0
    assert s.mean == pytest.approx((ref.mean(),)) and s.std == pytest.approx((ref.std(),))


def test_idx_pixel_order_small_image(tmp_path):
    img = np.arange(6, dtype=np.uint8).reshape(1, 2, 3)  # rows [0 1 2], [3 4 5]
    p = tmp_path / "img"
    p.write_bytes(idx_bytes(img))
    out = read_idx(p)
    assert out.shape == (1, 2, 3) and out[0, 1, 0] == 3 and out[0, 0, 2] == 2


def test_read_idx_big_endian_int32(tmp_path):
    arr = np.array([1, 256, -2, 70000], dtype=np.int32)
    p = tmp_path / "ints"
    p.write_bytes(idx_bytes(arr, code=0x0C))
    np.testing.assert_array_equal(read_idx(p), arr)


def test_torchvision_layout(tmp_path, rng):
    arrays = write_idx_dataset(tmp_path / "FashionMNIST" / "raw", rng, gz=True)
    s = load_dataset("fashion_mnist", tmp_path)
    np.testing.assert_array_equal(s.test.y.numpy(), arrays[IDX_NAMES[3]])
    write_idx_dataset(tmp_path / "MNIST" / "raw", rng)
    assert load_dataset("MNIST", tmp_path).train.x.shape == (7, 1, 28, 28)


def test_idx_bad_magic_names_file(tmp_path, rng):
    write_idx_dataset(tmp_path, rng)
    bad = tmp_path / IDX_NAMES[0]
    bad.write_bytes(b"\x12\x34\x56\x78" + bad.read_bytes()[4:])
    with pytest.raises(ValueError, match="not an IDX file") as info:
        load_dataset("mnist", tmp_path)
    assert IDX_NAMES[0] in str(info.value)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_truncated_names_file(tmp_path, rng, gz):
    write_idx_dataset(tmp_path, rng, gz=gz)
    name = IDX_NAMES[2] + (".gz" if gz else "")
    p = tmp_path / name
    p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2])
    with pytest.raises(ValueError, match="truncated") as info:
        load_dataset("mnist", tmp_path)
    assert name in str(info.value)


def test_idx_trailing_bytes_and_count_mismatch(tmp_path, rng):
    write_idx_dataset(tmp_path, rng)
    p = tmp_path / IDX_NAMES[3]
    p.write_bytes(p.read_bytes() + b"\x00")
    with pytest.raises(ValueError, match="after the data"):
        load_dataset("mnist", tmp_path)
    p.write_bytes(idx_bytes(np.zeros(4, np.uint8)))  # 5 test images, 4 labels
    with pytest.raises(ValueError, match="5 images .* 4 labels"):
        load_dataset("mnist", tmp_path)
    p.write_bytes(idx_bytes(np.full(5, 10, np.uint8)))  # label out of range
    with pytest.raises(ValueError, match="labels must lie in 0..9"):
        load_dataset("mnist", tmp_path)


def test_missing_dir_raises_not_found_with_path(tmp_path, isolated_home):
    missing = tmp_path / "nowhere"
    for name in ("mnist", "fashion-mnist", "cifar10"):
        with pytest.raises(DatasetNotFoundError) as info:
            load_dataset(name, missing)
        msg = str(info.value)
        assert str(missing) in msg and "--data-dir" in msg and "--download" in msg
        assert isinstance(info.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", missing)


def test_partial_files_are_not_found(tmp_path, rng, isolated_home):
    write_idx_dataset(tmp_path, rng)
    (tmp_path / IDX_NAMES[1]).unlink()
    with pytest.raises(DatasetNotFoundError, match=IDX_NAMES[1]):
        load_dataset("mnist", tmp_path)


def test_default_dir_from_env(tmp_path, rng, isolated_home, monkeypatch):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("mnist")
    assert str(isolated_home / ".cache" / "opnorm" / "mnist") in str(info.value)
    arrays = write_idx_dataset(tmp_path / "root" / "mnist", rng)
    monkeypatch.setenv("OPNORM_DATA", str(tmp_path / "root"))
    np.testing.assert_array_equal(load_dataset("mnist").train.y.numpy(), arrays[IDX_NAMES[1]])


def test_download_without_torchvision_is_a_clear_error(tmp_path, isolated_home, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    monkeypatch.setitem(sys.modules, "torchvision.datasets", None)
    with pytest.raises(DatasetNotFoundError, match="torchvision"):
        load_dataset("mnist", tmp_path, download=True)


def test_download_goes_through_torchvision_only_when_asked(tmp_path, rng, isolated_home, monkeypatch):
    calls = []

    def fake(cls_name, subdir):
        def init(root, train=True, download=False):
            calls.append((cls_name, root, download))
            write_idx_dataset(Path(root) / subdir, rng, gz=True)

        return init

    tv = types.ModuleType("torchvision")
    tv.datasets = types.ModuleType("torchvision.datasets")
    tv.datasets.MNIST = fake("MNIST", "MNIST/raw")
    tv.datasets.FashionMNIST = fake("FashionMNIST", "FashionMNIST/raw")
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.datasets", tv.datasets)

    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", tmp_path / "a")  # download=False: never calls torchvision
    assert calls == []
    s = load_dataset("mnist", tmp_path / "a", download=True)
    assert calls == [("MNIST", str(tmp_path / "a"), True)] and s.train.x.shape == (7, 1, 28, 28)
    load_dataset("mnist", tmp_path / "a", download=True)  # files present: no second download
    assert len(calls) == 1
    load_dataset("mnist", download=True)  # default root under the (isolated) home
    assert calls[-1] == ("MNIST", str(isolated_home / ".cache" / "opnorm" / "mnist"), True)
    load_dataset("fashion-mnist", tmp_path / "b", download=True)
    assert calls[-1] == ("FashionMNIST", str(tmp_path / "b"), True)


# ----------------------------------------------------------------------------- CIFAR-10


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("subdir", [False, True])
def test_cifar_round_trip(tmp_path, rng, protocol, subdir):
    d = tmp_path / "cifar-10-batches-py" if subdir else tmp_path
    batches, test = write_cifar(d, rng, protocol=protocol)
    s = load_dataset("cifar10", tmp_path)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10
    assert s.train.x.shape == (12, 3, 32, 32) and s.test.x.shape == (3, 3, 32, 32)
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64
    data = np.concatenate([b[b"data"] for b in batches])
    labels = sum((b[b"labels"] for b in batches), [])
    assert s.train.y.tolist() == labels and s.test.y.tolist() == test[b"labels"]
    # Rows are channel-major: R plane (1024 values, row by row), then G, then B.
    for n in range(len(data)):
        for c, h, w in [(0, 0, 0), (0, 0, 1), (1, 5, 7), (2, 31, 31), (2, 0, 31), (1, 31, 0)]:
            assert s.train.x[n, c, h, w].item() == pytest.approx(data[n, c * 1024 + h * 32 + w] / 255.0)
    assert 0.0 <= s.train.x.min() and s.train.x.max() <= 1.0
    ref = data.astype(np.float64).reshape(-1, 3, 1024) / 255.0
    assert s.mean == pytest.approx(tuple(ref.mean(axis=(0, 2))))
    assert s.std == pytest.approx(tuple(ref.std(axis=(0, 2))))


def test_cifar_channel_planes(tmp_path):
    row = np.concatenate([np.full(1024, 255), np.zeros(1024), np.full(1024, 51)]).astype(np.uint8)
    p = tmp_path / "batch"
    p.write_bytes(pickle.dumps({b"data": row[None], b"labels": [3]}))
    images, labels = load_cifar_batch(p)
    assert images.shape == (1, 3, 32, 32) and labels.tolist() == [3]
    assert (images[0, 0] == 255).all() and (images[0, 1] == 0).all() and (images[0, 2] == 51).all()


def test_cifar_python2_pickle(tmp_path, rng):
    data = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    p = tmp_path / "batch"
    p.write_bytes(py2_style_pickle(data, [7, 1]))
    images, labels = load_cifar_batch(p)
    np.testing.assert_array_equal(images.reshape(2, -1), data)
    assert labels.tolist() == [7, 1] and labels.dtype == np.int64


def test_restricted_unpickler_refuses_os_system(tmp_path, rng):
    marker = tmp_path / "pwned"
    write_cifar(tmp_path, rng)
    batch = cifar_batch(rng, 2)
    batch[b"labels"] = Evil(marker)
    (tmp_path / "test_batch").write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match="refusing to load global .*system") as info:
        load_dataset("cifar10", tmp_path)
    assert "test_batch" in str(info.value)
    assert not marker.exists()
    # The same bytes through the unpickler directly.
    with pytest.raises(pickle.UnpicklingError, match="system"):
        with open(tmp_path / "test_batch", "rb") as f:
            RestrictedUnpickler(f).load()
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [
        b"cbuiltins\neval\n(Vprint(1)\ntR.",
        b"\x80\x02cbuiltins\ngetattr\n.",
    ],
)
def test_restricted_unpickler_refuses_other_globals(tmp_path, payload):
    p = tmp_path / "batch"
    p.write_bytes(payload)
    with pytest.raises(ValueError, match="refusing to load global builtins"):
        load_cifar_batch(p)


def test_cifar_malformed(tmp_path, rng):
    p = tmp_path / "batch"
    good = pickle.dumps(cifar_batch(rng, 2))
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="not a valid CIFAR-10 batch") as info:
        load_cifar_batch(p)
    assert str(p) in str(info.value)
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        load_cifar_batch(p)
    p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}))
    with pytest.raises(ValueError, match="'labels' must be 2 integers"):
        load_cifar_batch(p)
    p.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(ValueError, match="expected a dict"):
        load_cifar_batch(p)


# ----------------------------------------------------------------------------- digits


def test_digits_split():
    from sklearn.datasets import load_digits

    s = load_dataset("digits")
    assert s.name == "digits" and s.input_shape == (1, 8, 8) and s.num_classes == 10
    assert len(s.train) == 1437 and len(s.test) == 360
    assert s.train.x.dtype == torch.float32 and s.train.y.dtype == torch.int64
    assert s.train.x.min() == 0.0 and s.train.x.max() == 1.0
    # Train and test together are exactly sklearn's images / 16 with their labels.
    ref = load_digits()
    ref_rows = np.concatenate([ref.images.reshape(len(ref.target), -1) / 16.0, ref.target[:, None]], axis=1)
    x = torch.cat([s.train.x, s.test.x]).reshape(1797, -1).double().numpy()
    ours = np.concatenate([x, torch.cat([s.train.y, s.test.y]).numpy()[:, None]], axis=1)
    np.testing.assert_allclose(ours[np.lexsort(ours.T)], ref_rows[np.lexsort(ref_rows.T)], atol=1e-7)
    # Stratified: each class's share of the test set is within one example of 360/1797.
    counts = np.bincount(ref.target, minlength=10)
    test_counts = np.bincount(s.test.y.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - counts * 360 / 1797) <= 1)
    # Deterministic.
    again = load_dataset("digits")
    assert torch.equal(again.train.x, s.train.x) and torch.equal(again.test.y, s.test.y)
    assert s.mean == pytest.approx((s.train.x.double().mean().item(),))
    assert s.std == pytest.approx((s.train.x.double().std(unbiased=False).item(),))


def test_limits_and_bad_arguments():
    s = load_dataset("digits", limit_train=100, limit_test=10)
    full = load_dataset("digits")
    assert len(s.train) == 100 and len(s.test) == 10
    assert torch.equal(s.train.x, full.train.x[:100])
    assert s.mean == pytest.approx((full.train.x[:100].double().mean().item(),))
    with pytest.raises(ValueError, match="limit_train"):
        load_dataset("digits", limit_train=0)
    with pytest.raises(ValueError, match="valid names: " + ", ".join(DATASETS)):
        load_dataset("svhn")


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist(isolated_home):
    s = load_dataset("fashion-mnist")  # found in the Debian directory by default
    assert len(s.train) == 60000 and len(s.test) == 10000
    assert s.input_shape == (1, 28, 28) and s.train.x.shape == (60000, 1, 28, 28)
    assert s.train.x.min() == 0.0 and s.train.x.max() == 1.0
    assert torch.bincount(s.train.y).tolist() == [6000] * 10
    assert torch.bincount(s.test.y).tolist() == [1000] * 10
    # The published statistics of Fashion-MNIST's train images.
    assert s.mean[0] == pytest.approx(0.2860, abs=1e-4) and s.std[0] == pytest.approx(0.3530, abs=1e-4)


# ----------------------------------------------------------------------------- dataset, loader


def test_indexed_dataset():
    x, y = torch.randn(10, 2, 3, 3), torch.arange(10) % 3
    ds = IndexedTensorDataset(x, y)
    assert len(ds) == 10 and ds.x is x and ds.y is y
    xi, yi, i = ds[4]
    assert torch.equal(xi, x[4]) and yi == y[4] and i == 4
    seen = []
    for xb, yb, ib in make_loader(ds, 4, shuffle=True, seed=1):
        assert torch.equal(xb, x[ib]) and torch.equal(yb, y[ib])
        seen += ib.tolist()
    assert sorted(seen) == list(range(10))
    with pytest.raises(ValueError, match="same N"):
        IndexedTensorDataset(x, y[:9])
    with pytest.raises(TypeError):
        IndexedTensorDataset(x.numpy(), y)


def order(loader):
    return torch.cat([b[2] for b in loader]).tolist()


def test_loader_order_depends_only_on_seed_and_epoch():
    ds = IndexedTensorDataset(torch.zeros(50, 1), torch.zeros(50, dtype=torch.long))
    torch.manual_seed(0)
    a = order(make_loader(ds, 8, shuffle=True, seed=3, epoch=2))
    torch.manual_seed(12345)  # the global RNG does not matter
    torch.rand(7)
    b = order(make_loader(ds, 8, shuffle=True, seed=3, epoch=2))
    assert a == b and sorted(a) == list(range(50)) and a != list(range(50))
    assert order(make_loader(ds, 8, shuffle=True, seed=3, epoch=3)) != a
    assert order(make_loader(ds, 8, shuffle=True, seed=4, epoch=2)) != a
    assert order(make_loader(ds, 8, shuffle=False, seed=3)) == list(range(50))
    assert len(make_loader(ds, 8, shuffle=False, seed=0, drop_last=True)) == 6


def test_loader_arguments():
    ds = IndexedTensorDataset(torch.zeros(5, 1), torch.zeros(5, dtype=torch.long))
    sampler = torch.utils.data.SequentialSampler(ds)
    assert order(make_loader(ds, 2, shuffle=False, seed=0, sampler=sampler)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="shuffle must be False"):
        make_loader(ds, 2, shuffle=True, seed=0, sampler=sampler)
    with pytest.raises(ValueError, match="batch_size"):
        make_loader(ds, 0, shuffle=True, seed=0)
    with pytest.raises(ValueError, match="seed"):
        make_loader(ds, 2, shuffle=True, seed=-1)
