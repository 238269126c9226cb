"""Checkpoints that are written atomically and loaded safely, weights export, RNG state.

* ``save_checkpoint`` writes to a temporary file in the target directory, fsyncs it and
  renames it over the target, so ``path`` always holds either the previous checkpoint or
  the complete new one, never a half-written file. Files get the mode a plain ``open``
  would give them (the user's umask).
* Integrity: every file saved here gets a sidecar ``<file>.sha256`` in ``sha256sum`` format
  (``sha256sum -c checkpoint.pt.sha256`` checks it by hand). ``load_checkpoint`` refuses a
  file whose bytes do not match it (``torch.load`` itself ignores damage inside the archive)
  or that has none; ``write_digest`` vouches for a file obtained elsewhere.
* ``load_checkpoint`` uses ``torch.load(weights_only=True)``: a checkpoint is data
  (tensors, numbers, strings, containers), never code. Every failure is a one-line
  ``CheckpointError``.
* ``export_weights`` / ``load_weights`` share a model's ``state_dict`` as safetensors; the
  bytes depend only on the tensors and the metadata (sorted header, no timestamps), so
  equal weights give equal files and equal hashes.
* ``rng_state`` / ``set_rng_state`` capture every RNG a training run draws from, as
  tensors and ints, for bit-identical resume.

Example:
    >>> import os, tempfile
    >>> from torch import nn
    >>> from opnorm.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
    >>> model = nn.Linear(4, 2)
    >>> with tempfile.TemporaryDirectory() as run:
    ...     save_checkpoint(os.path.join(run, "last.pt"), {"model": model.state_dict(), "epoch": 3, "rng": rng_state()})
    ...     state = load_checkpoint(os.path.join(run, "last.pt"))
    >>> model.load_state_dict(state["model"])
    <All keys matched successfully>
    >>> set_rng_state(state["rng"])
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import random
import re
import struct
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from opnorm.jacobian import unwrap
from opnorm.training.files import (
    DIGEST_SUFFIX,
    CheckpointError,
    atomic_write,
    one_line,
    save_with_digest,
    sidecar,
    verify_digest,
    write_digest,
    write_text_atomic,
)

__all__ = [
    "CheckpointError",
    "DIGEST_SUFFIX",
    "atomic_write",
    "write_text_atomic",
    "write_digest",
    "verify_digest",
    "save_checkpoint",
    "load_checkpoint",
    "export_weights",
    "load_weights",
    "rng_state",
    "set_rng_state",
]


# Exact types: subclasses such as numpy.float64 (a float) pickle as globals weights_only refuses.
_PLAIN = (bool, int, float, complex, str, bytes, type(None), torch.Size)


def _check_state(obj: Any, where: str) -> None:
    """Refuse, before writing, anything that ``torch.load(weights_only=True)`` would refuse."""
    if type(obj) in _PLAIN or isinstance(obj, (torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(obj, (dict, collections.OrderedDict)):
        for k, v in obj.items():
            if not isinstance(k, (str, int, bool, float, type(None))):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            _check_state(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple)) and type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_state(v, f"{where}[{i}]")
        return
    hint = ""
    if isinstance(obj, (np.ndarray, np.generic)):
        hint = " (convert numpy values with torch.as_tensor(...) or .item())"
    raise TypeError(
        f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint may hold only tensors, "
        f"numbers, strings, bools, None and lists/tuples/dicts of those{hint}"
    )


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Save ``state`` with ``torch.save``, atomically.

    Args:
        path: target file; its directory is created if needed.
        state: dict of tensors, ints, floats, strings, bools, None and (nested)
            lists/tuples/dicts of those, e.g. model / optimizer / scheduler state_dicts,
            epoch, ``rng_state()``, config dict, metrics.

    Raises:
        TypeError: state holds something else (named by its key path), checked before writing.

    Example:
        >>> import os, tempfile
        >>> from torch import nn
        >>> from opnorm.training.checkpoint import save_checkpoint
        >>> with tempfile.TemporaryDirectory() as run:
        ...     save_checkpoint(os.path.join(run, "last.pt"), {"model": nn.Linear(4, 2).state_dict(), "epoch": 1})
        ...     sorted(os.listdir(run))  # the checkpoint and its sha256 sidecar
        ['last.pt', 'last.pt.sha256']
    """
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    _check_state(state, "state")
    save_with_digest(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict:
    """Load a checkpoint written by ``save_checkpoint``, safely (``weights_only=True``).

    Args:
        path: the checkpoint file (its ``<path>.sha256`` sidecar must match it).
        map_location: where tensors go, as in ``torch.load`` (default "cpu").

    Returns:
        the saved dict.

    Raises:
        CheckpointError: no file at path; no or a damaged sidecar; bytes that do not match the
            sidecar; truncated / corrupt / not a checkpoint; or the file holds objects other
            than tensors and plain data (refused, nothing is executed).

    Example:
        >>> import os, tempfile
        >>> from opnorm.training.checkpoint import load_checkpoint, save_checkpoint
        >>> with tempfile.TemporaryDirectory() as run:
        ...     save_checkpoint(os.path.join(run, "last.pt"), {"epoch": 1})
        ...     state = load_checkpoint(os.path.join(run, "last.pt"))
        >>> state["epoch"]
        1
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    verify_digest(path, "checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # The weights-only unpickler names the global it refused; anything else is damage.
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found:
            raise CheckpointError(
                f"refused to load {path}: it references {found.group(1)}, which is neither a tensor nor "
                f"plain data (not a checkpoint of this library, or unsafe); nothing was executed"
            ) from None
        raise CheckpointError(_corrupt_message(path, err)) from None
    except Exception as err:  # zip, pickle, EOF and storage errors all mean the same here
        raise CheckpointError(_corrupt_message(path, err)) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a checkpoint: it holds a {type(state).__name__}, not a dict")
    return state


def _corrupt_message(path: Path, err: BaseException) -> str:
    return f"checkpoint {path} is corrupt or truncated ({one_line(err)}); delete it or resume from another checkpoint"


# --------------------------------------------------------------------------- safetensors weights


def export_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write ``model.state_dict()`` (parameters and buffers) to a safetensors file, atomically.

    Args:
        model: the model (DDP / compiled wrappers are unwrapped, so keys have no "module." prefix).
        path: target file, conventionally ``*.safetensors``.
        metadata: optional str -> str pairs stored in the header (e.g. model name, dataset).

    Example:
        >>> import os, tempfile
        >>> from torch import nn
        >>> from opnorm.training.checkpoint import export_weights
        >>> with tempfile.TemporaryDirectory() as out:
        ...     export_weights(nn.Linear(4, 2), os.path.join(out, "linear.safetensors"), {"model": "linear"})
        ...     sorted(os.listdir(out))
        ['linear.safetensors', 'linear.safetensors.sha256']
    """
    # Clone so that tied / shared tensors become separate entries safetensors accepts.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in unwrap(model).state_dict().items()}
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("metadata must map str to str")
    data = _sorted_header(save(tensors, metadata=metadata))
    save_with_digest(path, lambda f: f.write(data))


def _sorted_header(data: bytes) -> bytes:
    """safetensors bytes with the JSON header's keys sorted (the library emits the metadata in
    hash order, which differs between processes), padded to 8 bytes as the format asks."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data[8 + n :]


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a safetensors file written by ``export_weights`` into ``model`` (in place).

    Keys and shapes must match exactly; values are cast to the model's dtypes and devices.
    When the file has a ``<path>.sha256`` sidecar (``export_weights`` writes one) its bytes
    must match it; files from elsewhere have none and are read as they are.

    Returns:
        the model.

    Raises:
        CheckpointError: missing or corrupt file, or missing / unexpected keys or shape
            mismatches (listed in the message).

    Example:
        >>> import os, tempfile, torch
        >>> from torch import nn
        >>> from opnorm.training.checkpoint import export_weights, load_weights
        >>> trained, fresh = nn.Linear(4, 2), nn.Linear(4, 2)
        >>> with tempfile.TemporaryDirectory() as out:
        ...     export_weights(trained, os.path.join(out, "linear.safetensors"))
        ...     model = load_weights(fresh, os.path.join(out, "linear.safetensors"))
        >>> torch.equal(model.weight, trained.weight)
        True
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no weights file at {path}")
    if sidecar(path).exists():
        verify_digest(path, "weights file")
    try:
        tensors = load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own error types for bad headers
        raise CheckpointError(
            f"weights file {path} is corrupt or not a safetensors file ({one_line(err)}); export it again"
        ) from None
    target = unwrap(model)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    mismatched = [
        f"{k}: file {tuple(tensors[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in tensors and tensors[k].shape != expected[k].shape
    ]
    if missing or unexpected or mismatched:
        parts = []
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        ):
            if items:
                shown = ", ".join(items[:5]) + (f", ... ({len(items)} in all)" if len(items) > 5 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"weights in {path} do not fit this model ({type(target).__name__}): " + "; ".join(parts))
    target.load_state_dict(tensors, strict=True)
    return model


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict:
    """Every global RNG state a run draws from, as tensors / ints / floats (weights_only-safe).

    Returns:
        ``{"torch": ByteTensor, "cuda": [ByteTensor per device] (empty without CUDA),
        "python": {"version", "state" (int64 tensor), "gauss"}, "numpy": {"keys" (int64 tensor),
        "pos", "has_gauss", "cached_gaussian"}}``.

    Example:
        >>> import torch
        >>> from opnorm.training.checkpoint import rng_state, set_rng_state
        >>> s = rng_state()
        >>> a = torch.rand(3)
        >>> set_rng_state(s)
        >>> torch.equal(a, torch.rand(3))
        True
    """
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    if kind != "MT19937":  # pragma: no cover - numpy's legacy global RNG is always MT19937
        raise RuntimeError(f"unsupported numpy global RNG {kind}")
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def set_rng_state(state: dict) -> None:
    """Restore the RNG states captured by ``rng_state`` (e.g. from a loaded checkpoint).

    CUDA states are restored when CUDA is available with the same number of devices;
    otherwise they are skipped with a warning (CPU results stay reproducible).

    Raises:
        CheckpointError: the dict is not an ``rng_state()`` result.
    """
    try:
        torch_state = state["torch"]
        py, npy = state["python"], state["numpy"]
        py_state = (int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"])
        np_state = (
            "MT19937",
            np.asarray(npy["keys"].cpu().numpy(), dtype=np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
        cuda = list(state.get("cuda", []))
    except (KeyError, TypeError, AttributeError, ValueError) as err:
        raise CheckpointError(f"not an RNG state saved by rng_state() ({one_line(err)})") from None
    torch.set_rng_state(torch_state.cpu())
    random.setstate(py_state)
    np.random.set_state(np_state)
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            warnings.warn(
                f"checkpoint has CUDA RNG states for {len(cuda)} device(s) but this run has "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}; CUDA RNG not restored",
                stacklevel=2,
            )
