"""Readers of the files datasets ship in: IDX (MNIST, Fashion-MNIST; gzipped or not) and
CIFAR-10's python pickle batches, read with a restricted unpickler (no code runs on load).

Example (the dataset files must be on disk)::

    images = read_idx("train-images-idx3-ubyte.gz")  # (N, 28, 28) uint8
    x, y = load_cifar_batch("cifar-10-batches-py/data_batch_1")
"""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["read_idx", "RestrictedUnpickler", "load_cifar_batch", "check_labels"]

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    """File contents, gunzipped when the file starts with the gzip magic."""
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise ValueError(f"{path}: corrupt or truncated gzip file ({err}); delete it and get it again") from err
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a numpy array of its stored shape.

    The header is two zero bytes, a type code (0x08 = uint8, ...), the number of
    dimensions, then one big-endian uint32 per dimension; the data follow, big-endian.

    Raises:
        ValueError: bad magic number, truncated data or trailing bytes; the file is named.

    Example (the file must be on disk)::

        read_idx("t10k-labels-idx1-ubyte.gz").shape  # (10000,)
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file ({len(raw)} bytes, not even a header)")
    zero1, zero2, code, ndim = raw[:4]
    if zero1 != 0 or zero2 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(
            f"{path}: not an IDX file (magic number 0x{raw[:4].hex()}; expected 0x000008NN, "
            f"e.g. 0x00000803 for images, 0x00000801 for labels)"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_DTYPES[code])
    count = int(np.prod(dims, dtype=np.int64))
    expected = count * dtype.itemsize
    found = len(raw) - header
    if found < expected:
        raise ValueError(
            f"{path}: truncated IDX file: header says shape {tuple(dims)} ({expected} data bytes), "
            f"found {found}; delete it and get it again"
        )
    if found > expected:
        raise ValueError(f"{path}: malformed IDX file: {found - expected} bytes after the data of shape {tuple(dims)}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=header).reshape(dims)


def check_labels(labels: np.ndarray, source: Any, num_classes: int = 10) -> None:
    """Raise a one-line ValueError naming ``source`` unless every label lies in 0..num_classes - 1."""
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{source}: labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")


# --------------------------------------------------------------------------- CIFAR-10


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a CIFAR batch pickle needs: numpy array and dtype reconstruction."""
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        # py3 protocol 2 pickles spell bytes as _codecs.encode(str, "latin1").
        ("_codecs", "encode"): codecs.encode,
    }
    for mod in ("numpy.core", "numpy._core"):  # written by numpy 1.x / 2.x
        allowed[(f"{mod}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{mod}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{mod}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only numpy array / dtype reconstruction globals.

    Any other global (``os.system``, ``builtins.eval``, ...) raises ``pickle.UnpicklingError``
    before it can be called, so a malicious file cannot run code.

    Example:
        >>> import io, pickle
        >>> import numpy as np
        >>> from opnorm.training.formats import RestrictedUnpickler
        >>> data = pickle.dumps({"labels": [3, 8], "data": np.zeros((2, 3), dtype=np.uint8)})
        >>> RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()["data"].shape
        (2, 3)
        >>> RestrictedUnpickler(io.BytesIO(pickle.dumps(print))).load()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        _pickle.UnpicklingError: ...
    """

    _allowed: dict[tuple[str, str], Any] | None = None

    def find_class(self, module: str, name: str) -> Any:
        if RestrictedUnpickler._allowed is None:
            RestrictedUnpickler._allowed = _numpy_globals()
        try:
            return RestrictedUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: only numpy array reconstruction is allowed in a CIFAR batch"
            ) from None


def load_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch safely.

    Returns:
        images uint8 of shape (N, 3, 32, 32) (rows of 3072 are channel-major: R, G, B planes),
        labels int64 of shape (N,).

    Raises:
        ValueError: the file is not a CIFAR batch, is truncated, or references a disallowed
            global; the message names the file.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            # latin1 turns python-2 str (the real files) into str that numpy reads as bytes.
            batch = RestrictedUnpickler(f, encoding="latin1").load()
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
        struct.error,
    ) as err:
        raise ValueError(f"{path}: not a valid CIFAR-10 batch ({type(err).__name__}: {err})") from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: not a CIFAR-10 batch (a pickled {type(batch).__name__}, expected a dict)")
    # Keys are bytes or str depending on who wrote the file.
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: not a CIFAR-10 batch (keys {sorted(map(str, batch))}, need 'data' and 'labels')")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    if labels.ndim != 1 or len(labels) != len(data) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: 'labels' must be {len(data)} integers, got {labels.dtype} {labels.shape}")
    check_labels(labels, path)
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)
