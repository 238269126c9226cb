"""Datasets as in-memory tensors, and reproducible loaders.

Every dataset comes back as float32 images in ``[0, 1]`` of shape ``(N, C, H, W)`` with
int64 labels, so attacks and norms act on pixels; normalization happens inside the model
(see ``models.Normalize``), using the per-channel ``mean`` / ``std`` reported here.

Sources (nothing is downloaded unless ``download=True`` and torchvision is installed):

* ``digits``: scikit-learn's 8x8 digits, split 1437 / 360 (stratified, fixed seed). Default.
* ``fashion-mnist`` / ``mnist``: the four standard IDX files (optionally ``.gz``), in
  ``data_dir``, ``data_dir/FashionMNIST/raw`` or ``data_dir/MNIST/raw`` (torchvision's layout).
* ``cifar10``: the python pickle batches ``data_batch_1..5`` and ``test_batch``, in
  ``data_dir`` or ``data_dir/cifar-10-batches-py``; read with a restricted unpickler.

Default directories when ``data_dir`` is None: ``$OPNORM_DATA/<name>`` when the variable is
set, ``/usr/share/datasets/fashion-mnist`` for fashion-mnist (Debian's
``dataset-fashion-mnist`` package), and ``~/.cache/opnorm/<name>``.

Example (loading digits imports scikit-learn, a few seconds)::

    splits = load_dataset("digits")
    splits.train.x.shape, splits.num_classes  # (torch.Size([1437, 1, 8, 8]), 10)
    x, y, index = next(iter(make_loader(splits.train, 64, shuffle=True, seed=0)))
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from opnorm.training.formats import RestrictedUnpickler, check_labels, load_cifar_batch, read_idx

__all__ = [
    "DATASETS",
    "canonical_dataset",
    "DatasetNotFoundError",
    "IndexedTensorDataset",
    "DatasetSplits",
    "load_dataset",
    "channel_stats",
    "data_fingerprint",
    "make_loader",
    "loader_seed",
    "default_data_dirs",
    "read_idx",
    "RestrictedUnpickler",
    "load_cifar_batch",
]

DATASETS = ("digits", "fashion-mnist", "mnist", "cifar10")

DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

# File names shared by MNIST and Fashion-MNIST; each may also end in ".gz".
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# Where torchvision's MNIST / FashionMNIST classes put the raw files under their root.
_TORCHVISION_RAW = {"mnist": "MNIST/raw", "fashion-mnist": "FashionMNIST/raw"}

CIFAR_DIRNAME = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"


class DatasetNotFoundError(FileNotFoundError):
    """The files of a dataset are not where they were looked for; the message says how to get them."""


class IndexedTensorDataset(Dataset):
    """In-memory dataset whose items are ``(x[i], y[i], i)``.

    The index lets regularizers keep per-example state (e.g. warm-started power-method
    vectors) across epochs.

    Args:
        x: inputs, shape ``(N, ...)``.
        y: labels, shape ``(N,)``.

    Example:
        >>> import torch
        >>> from opnorm.training.data import IndexedTensorDataset
        >>> ds = IndexedTensorDataset(torch.zeros(4, 1, 8, 8), torch.arange(4))
        >>> x, y, i = ds[2]
        >>> x.shape, y, i
        (torch.Size([1, 8, 8]), tensor(2), 2)
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"x and y must be torch.Tensors, got {type(x).__name__} and {type(y).__name__}")
        if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(
                f"x must have shape (N, ...) and y shape (N,) with the same N, "
                f"got x {tuple(x.shape)} and y {tuple(y.shape)}"
            )
        self.x = x
        self.y = y

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i], self.y[i], i


@dataclass
class DatasetSplits:
    """Train and test sets of one dataset and what a model needs to know about them.

    Attributes:
        name: canonical dataset name (one of ``DATASETS``).
        train, test: the splits, images float32 in [0, 1] of shape (N, C, H, W), labels int64
            (test None: a Dataset passed to ``opnorm.train`` without ``test_data``).
        num_classes: number of classes.
        input_shape: ``(C, H, W)``.
        mean, std: per-channel mean and standard deviation of the train images, length C.
    """

    name: str
    train: IndexedTensorDataset
    test: IndexedTensorDataset | None
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]


# --------------------------------------------------------------------------- public entry


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = False,
    limit_train: int | None = None,
    limit_test: int | None = None,
) -> DatasetSplits:
    """Load a dataset as in-memory tensors.

    Args:
        name: one of ``DATASETS`` (case-insensitive, ``_`` accepted for ``-``).
        data_dir: directory holding the files; None searches the default directories
            (see the module docstring). Ignored for ``digits``.
        download: fetch missing files through torchvision (must be installed) into
            ``data_dir`` (or ``$OPNORM_DATA/<name>`` / ``~/.cache/opnorm/<name>``).
        limit_train, limit_test: keep only the first n examples of each split
            (mean/std are computed on the kept train examples).

    Returns:
        DatasetSplits with images float32 in [0, 1], shape (N, C, H, W), labels int64.

    Raises:
        ValueError: unknown name, bad limit, or a malformed data file (the file is named).
        DatasetNotFoundError: files missing; the message lists where it looked and how to get them.

    Example (the Fashion-MNIST files must be on disk)::

        s = load_dataset("fashion-mnist", limit_train=1000)
        s.train.x.shape, s.input_shape  # (torch.Size([1000, 1, 28, 28]), (1, 28, 28))
    """
    key = canonical_dataset(name)
    for arg, value in (("limit_train", limit_train), ("limit_test", limit_test)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg} must be a positive int or None, got {value!r}")

    if key == "digits":
        (xtr, ytr), (xte, yte) = _load_digits()
    elif key in ("mnist", "fashion-mnist"):
        (xtr, ytr), (xte, yte) = _load_idx_dataset(key, data_dir, download)
    else:
        (xtr, ytr), (xte, yte) = _load_cifar10(data_dir, download)

    if limit_train is not None:
        xtr, ytr = xtr[:limit_train], ytr[:limit_train]
    if limit_test is not None:
        xte, yte = xte[:limit_test], yte[:limit_test]
    xtr, xte = xtr.contiguous(), xte.contiguous()

    mean, std = channel_stats(xtr)
    return DatasetSplits(
        name=key,
        train=IndexedTensorDataset(xtr, ytr),
        test=IndexedTensorDataset(xte, yte),
        num_classes=10,
        input_shape=tuple(int(s) for s in xtr.shape[1:]),  # type: ignore[arg-type]
        mean=mean,
        std=std,
    )


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of ``x`` (N, C, ...), each a tuple of C floats.

    Example::

        >>> channel_stats(torch.ones(4, 1, 8, 8))
        ((1.0,), (0.0,))
    """
    # in float64: float32 sums over 50k images lose digits
    flat = x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)
    return tuple(float(v) for v in flat.mean(dim=1)), tuple(float(v) for v in flat.std(dim=1, unbiased=False))


def data_fingerprint(data: IndexedTensorDataset) -> str:
    """sha256 of a dataset's tensors (``data.x``, ``data.y``: dtype, shape and bytes), recorded in
    a run's checkpoint so that a resume on other data is refused.

    Example:
        >>> import torch
        >>> from opnorm.training.data import IndexedTensorDataset, data_fingerprint
        >>> a = data_fingerprint(IndexedTensorDataset(torch.zeros(4, 2), torch.arange(4)))
        >>> b = data_fingerprint(IndexedTensorDataset(torch.zeros(4, 2), torch.arange(4).flip(0)))
        >>> len(a), a == b  # a hex sha256; other labels, another fingerprint
        (64, False)
    """
    sha = hashlib.sha256()
    for t in (data.x, data.y):
        t = t.detach().cpu().contiguous()
        sha.update(f"{t.dtype} {tuple(t.shape)};".encode())
        if t.numel():
            sha.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy of the dataset
    return sha.hexdigest()


def loader_seed(seed: int, epoch: int = 0) -> int:
    """The generator seed ``make_loader`` uses for ``(seed, epoch)``: ``seed * 1000 + epoch``."""
    return seed * 1000 + epoch


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    epoch: int = 0,
    drop_last: bool = False,
    sampler: Sampler | None = None,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose order is a function of ``(seed, epoch)`` only.

    The shuffling generator is seeded with ``seed * 1000 + epoch`` (see ``loader_seed``), so
    a trainer builds one loader per epoch (or rebuilds it on resume) and gets the very same
    order as an uninterrupted run, independent of the global RNG.

    Args:
        dataset: e.g. an ``IndexedTensorDataset``; batches are then ``(x, y, index)``.
        batch_size: examples per batch (>= 1).
        shuffle: shuffle with the seeded generator. Must be False when ``sampler`` is given.
        seed: base seed (int).
        epoch: epoch number mixed into the seed.
        drop_last: drop the last incomplete batch.
        sampler: e.g. a ``DistributedSampler`` (which has its own ``set_epoch``).
        num_workers: loader worker processes; each is seeded from the generator.
        pin_memory: pin batches for faster host-to-GPU copies.

    Example:
        >>> import torch
        >>> from opnorm.training.data import IndexedTensorDataset, make_loader
        >>> train_set = IndexedTensorDataset(torch.rand(10, 1, 8, 8), torch.arange(10) % 3)
        >>> loader = make_loader(train_set, 4, shuffle=True, seed=0, epoch=3)
        >>> [index.shape[0] for x, y, index in loader]  # every example once per epoch, with its index
        [4, 4, 2]
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for arg, value in (("seed", seed), ("epoch", epoch)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{arg} must be a non-negative int, got {value!r}")
    if sampler is not None and shuffle:
        raise ValueError("shuffle must be False when a sampler is given; the sampler decides the order")
    generator = torch.Generator().manual_seed(loader_seed(seed, epoch))
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=generator,
        worker_init_fn=_seed_worker if num_workers > 0 else None,
    )


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker from the loader's generator; numpy and random follow it.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def default_data_dirs(name: str) -> list[Path]:
    """Directories searched for ``name`` when no ``data_dir`` is given, in order."""
    key = canonical_dataset(name)
    dirs = []
    if os.environ.get("OPNORM_DATA"):
        dirs.append(Path(os.environ["OPNORM_DATA"]).expanduser() / key)
    if key == "fashion-mnist":
        dirs.append(Path(DEBIAN_FASHION_MNIST_DIR))
    dirs.append(Path("~/.cache/opnorm").expanduser() / key)
    return dirs


def canonical_dataset(name: str) -> str:
    """The one spelling of a dataset name: case-insensitive, ``_`` for ``-`` ("Fashion_MNIST" ->
    "fashion-mnist"); ValueError for unknown names. Every entry point goes through it."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, one of {', '.join(DATASETS)}; got {type(name).__name__}")
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def _download_root(key: str, data_dir: str | os.PathLike | None) -> Path:
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get("OPNORM_DATA"):
        return Path(os.environ["OPNORM_DATA"]).expanduser() / key
    return Path("~/.cache/opnorm").expanduser() / key


def _download(key: str, root: Path) -> None:
    """Fetch a dataset with torchvision into ``root`` (its own layout, which we also read)."""
    try:
        import torchvision.datasets as tvd  # type: ignore[import-not-found]
    except ImportError as err:
        raise DatasetNotFoundError(
            f"{key}: download=True needs torchvision, which is not installed. Install it "
            f"(pip install 'opnorm[vision]', torchvision matching your torch version) or place the files "
            f"yourself in {root} (or pass another directory with --data-dir / data_dir=)."
        ) from err
    cls = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}[key]
    root.mkdir(parents=True, exist_ok=True)
    # One call fetches both splits' raw files.
    getattr(tvd, cls)(str(root), train=True, download=True)


def _how_to_get(key: str) -> str:
    hints = []
    if key == "fashion-mnist":
        hints.append(f"`apt-get install dataset-fashion-mnist` (Debian; installs into {DEBIAN_FASHION_MNIST_DIR})")
    hints.append("`--download` / download=True with torchvision installed")
    if key == "cifar10":
        hints.append(
            "extract cifar-10-python.tar.gz so that data_batch_1..5 and test_batch lie in a "
            "directory and pass it with --data-dir / data_dir= (or put it in one of the directories above)"
        )
    else:
        hints.append(
            "put the four IDX files (optionally .gz) in a directory and pass it with "
            "--data-dir / data_dir= (or put them in one of the directories above)"
        )
    hints.append("set OPNORM_DATA=<root> to use <root>/" + key)
    return "Get the data with one of: " + "; ".join(hints) + "."


# --------------------------------------------------------------------------- digits


def _load_digits() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    try:  # scikit-learn: only the digits dataset needs it
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise ImportError(
            "the digits dataset needs scikit-learn, a dependency of opnorm: pip install 'scikit-learn>=1.0'"
        ) from None

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # pixel values are 0..16
    labels = digits.target.astype(np.int64)
    train_idx, test_idx = train_test_split(np.arange(len(labels)), test_size=360, stratify=labels, random_state=0)
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels)
    train_idx, test_idx = torch.from_numpy(train_idx), torch.from_numpy(test_idx)
    return (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])


# --------------------------------------------------------------------------- IDX (MNIST-style)


def _find_files(candidates: Sequence[Path], names: Sequence[str], gz_ok: bool) -> dict[str, Path] | None:
    """The first directory among candidates that holds every name (or name.gz)."""
    for d in candidates:
        found = {}
        for n in names:
            for suffix in ("", ".gz") if gz_ok else ("",):
                if (d / (n + suffix)).is_file():
                    found[n] = d / (n + suffix)
                    break
        if len(found) == len(names):
            return found
    return None


def _idx_candidates(key: str, data_dir: str | os.PathLike | None) -> list[Path]:
    roots = [Path(data_dir).expanduser()] if data_dir is not None else default_data_dirs(key)
    return [d for r in roots for d in (r, r / _TORCHVISION_RAW[key])]


def _not_found(key: str, candidates: Sequence[Path], names: Sequence[str], gz_ok: bool) -> DatasetNotFoundError:
    wanted = ", ".join(n + ("[.gz]" if gz_ok else "") for n in names)
    return DatasetNotFoundError(
        f"{key}: could not find {wanted} in any of: {', '.join(str(c) for c in candidates)}. {_how_to_get(key)}"
    )


def _load_idx_dataset(key: str, data_dir: str | os.PathLike | None, download: bool):
    names = list(IDX_FILES.values())
    candidates = _idx_candidates(key, data_dir)
    files = _find_files(candidates, names, gz_ok=True)
    if files is None and download:
        root = _download_root(key, data_dir)
        _download(key, root)
        candidates = [root, root / _TORCHVISION_RAW[key]]
        files = _find_files(candidates, names, gz_ok=True)
    if files is None:
        raise _not_found(key, candidates, names, gz_ok=True)
    train = _idx_pair(files[IDX_FILES["train_images"]], files[IDX_FILES["train_labels"]])
    test = _idx_pair(files[IDX_FILES["test_images"]], files[IDX_FILES["test_labels"]])
    return train, test


def _idx_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(f"{images_path}: expected uint8 images of shape (N, H, W), got {images.dtype} {images.shape}")
    if labels.ndim != 1:
        raise ValueError(f"{labels_path}: expected labels of shape (N,), got shape {labels.shape}")
    if len(labels) != len(images):
        raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    check_labels(labels, labels_path)
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _cifar_candidates(data_dir: str | os.PathLike | None) -> list[Path]:
    roots = [Path(data_dir).expanduser()] if data_dir is not None else default_data_dirs("cifar10")
    return [d for r in roots for d in (r, r / CIFAR_DIRNAME)]


def _load_cifar10(data_dir: str | os.PathLike | None, download: bool):
    names = list(CIFAR_TRAIN_BATCHES) + [CIFAR_TEST_BATCH]
    candidates = _cifar_candidates(data_dir)
    files = _find_files(candidates, names, gz_ok=False)
    if files is None and download:
        root = _download_root("cifar10", data_dir)
        _download("cifar10", root)
        candidates = [root, root / CIFAR_DIRNAME]
        files = _find_files(candidates, names, gz_ok=False)
    if files is None:
        raise _not_found("cifar10", candidates, names, gz_ok=False)

    def to_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels)

    parts = [load_cifar_batch(files[n]) for n in CIFAR_TRAIN_BATCHES]
    train = to_tensors(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = to_tensors(*load_cifar_batch(files[CIFAR_TEST_BATCH]))
    return train, test
