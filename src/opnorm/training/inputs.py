"""What :func:`opnorm.train` trains: a registry model or your ``nn.Module``, on a named dataset
or on your ``Dataset``.

``model=`` takes a name of :data:`~opnorm.training.models.MODELS` or an ``nn.Module`` (trained in
place: the result's model is that object); ``data=`` takes a map-style ``torch`` Dataset whose
items are ``(x, y)`` or ``(x, y, index)`` (index = the item's position), and ``test_data=`` an
optional one for the per-epoch check (without it the check is skipped, with a warning). A
Dataset is read into memory once (:func:`as_indexed`) and indexed there, so every method,
the fast opnorm store included, gets ``(x, y, index)`` batches. Inputs ``x`` must lie in
``[0, 1]`` (the attacks and the regularizer keep ``x + delta`` in that box: normalize inside
the model), labels ``y`` are class numbers ``0..C-1``.

The run's ``config.json`` names them ``model: "custom:<class name>"`` and ``dataset:
"custom:<class name> sha256:<first 16 hex digits of data_fingerprint>"``; a resume must pass
a module of the same class and the same training data (:meth:`TrainInputs.check_resume`).
The CLI trains registry models on named datasets only.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.utils.data import TensorDataset
    >>> from opnorm.training.inputs import train_inputs
    >>> x, y = torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> inputs = train_inputs(net, TensorDataset(x, y), TensorDataset(x[:2], y[:2]))
    >>> inputs.settings()["model"]
    'custom:Sequential'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, IterableDataset, TensorDataset

from opnorm.training.config import TrainConfig, is_custom
from opnorm.training.data import (
    DatasetSplits,
    IndexedTensorDataset,
    channel_stats,
    data_fingerprint,
    load_dataset,
)
from opnorm.training.models import MODELS, build_model
from opnorm.training.paper_setup import input_normalization

__all__ = ["TrainInputs", "train_inputs", "as_indexed", "custom_model_name", "registry_model"]

_ITEM = "items (x, y) or (x, y, index), x a float tensor, y an int class label, index the item's position"


def registry_model(name: str, splits: DatasetSplits, *, input_range=None, width: int | None = None) -> nn.Module:
    """The registry's model ``name`` (:data:`~opnorm.training.models.MODELS`), randomly
    initialized for ``splits``: its input shape and classes, and the normalization its inputs
    get from the data's mean and std (``input_range``: e.g. [-1, 1], see
    :func:`~opnorm.training.paper_setup.input_normalization`). ``width``: the model's width
    option (None: its default)."""
    mean, std = input_normalization(input_range, splits.mean, splits.std)
    return build_model(
        name, input_shape=splits.input_shape, num_classes=splits.num_classes, mean=mean, std=std, width=width
    )


def custom_model_name(module: nn.Module) -> str:
    """The name a run records for a module passed as ``model=``: ``"custom:<class name>"``."""
    return f"custom:{type(module).__name__}"


@dataclass(frozen=True)
class TrainInputs:
    """The model and data of one training call (see the module docstring).

    Attributes:
        module: the module passed as ``model=``, or None (build ``cfg.model`` from the registry).
        model_name: a registry name passed as ``model=``, the module's ``custom:`` name, or None.
        train, test: the Datasets passed as ``data=`` / ``test_data=``, in memory; None:
            ``cfg.dataset`` is loaded (train None) or there is no per-epoch check (test None).
        data_name: ``data``'s ``custom:`` name, or None.
    """

    module: nn.Module | None = None
    model_name: str | None = None
    train: IndexedTensorDataset | None = None
    test: IndexedTensorDataset | None = None
    data_name: str | None = None

    def settings(self) -> dict[str, Any]:
        """The config fields these inputs set (``model``, ``dataset``)."""
        out: dict[str, Any] = {}
        if self.model_name is not None:
            out["model"] = self.model_name
        if self.data_name is not None:
            out["dataset"] = self.data_name
        return out

    def check(self, cfg: TrainConfig) -> None:
        """Refuse a config that names a ``custom:`` model or dataset without the object, or sets
        options that a module or a Dataset would silently ignore (one-line ValueError)."""
        if is_custom(cfg.model) and self.module is None:
            raise ValueError(
                f"model {cfg.model!r} was a module passed to opnorm.train(model=...): pass that module again "
                f"(the CLI builds registry models only: {', '.join(MODELS)})"
            )
        if is_custom(cfg.dataset) and self.train is None:
            raise ValueError(
                f"dataset {cfg.dataset!r} was a Dataset passed to opnorm.train(data=...): pass that data again "
                f"(the CLI trains on named datasets only)"
            )
        if self.module is not None:
            for name in ("width", "input_range"):
                if getattr(cfg, name) is not None:
                    raise ValueError(
                        f"{name} configures the registry models; with model=<your module> set it in your module"
                    )
        if self.train is not None:
            for name in ("data_dir", "download"):
                if getattr(cfg, name):
                    raise ValueError(f"{name} locates named datasets; with data=<your Dataset> leave it unset")

    def check_resume(self, saved: dict[str, Any], where: str) -> None:
        """Refuse a resume whose model class or training data differ from those of the run
        (``saved``: the checkpoint's config), in one line saying what to pass."""
        old, new = saved.get("model"), self.model_name
        if is_custom(old) and self.module is None:
            raise ValueError(
                f"cannot resume {where}: it trained a module passed as model= ({old}); pass a module of that "
                f"class again: opnorm.train(model=..., data=..., out=..., resume=True)"
            )
        if self.module is not None and new != old:
            raise ValueError(
                f"cannot resume {where} with model={new}: the run trained {old}; pass a module of the run's class, "
                f"or start a new run (another out)"
            )
        old_data = saved.get("dataset")
        if is_custom(old_data) and self.train is None:
            raise ValueError(
                f"cannot resume {where}: it trained on data passed as data= ({old_data}); pass that data again"
            )
        if self.train is not None and self.data_name != old_data:
            raise ValueError(
                f"cannot resume {where} with data={self.data_name}: the run trained on {old_data}; pass the run's "
                f"training data, or start a new run (another out)"
            )

    def splits(self, cfg: TrainConfig) -> DatasetSplits:
        """The train and test splits: the Datasets passed (limited by ``cfg.limit_train`` /
        ``limit_test``), or ``cfg.dataset`` loaded by name (``test`` None: no per-epoch check)."""
        if self.train is None:
            return load_dataset(
                cfg.dataset, cfg.data_dir, download=cfg.download, limit_train=cfg.limit_train, limit_test=cfg.limit_test
            )
        train, test = self.train, self.test
        if cfg.limit_train is not None:
            train = IndexedTensorDataset(train.x[: cfg.limit_train], train.y[: cfg.limit_train])
        if test is not None and cfg.limit_test is not None:
            test = IndexedTensorDataset(test.x[: cfg.limit_test], test.y[: cfg.limit_test])
        labels = train.y if test is None else torch.cat([train.y, test.y])
        mean, std = channel_stats(train.x)
        return DatasetSplits(
            name=cfg.dataset,
            train=train,
            test=test,
            num_classes=int(labels.max()) + 1,
            input_shape=tuple(int(s) for s in train.x.shape[1:]),  # type: ignore[arg-type]
            mean=mean,
            std=std,
        )

    def model(self, cfg: TrainConfig, splits: DatasetSplits) -> nn.Module:
        """The module passed, or the registry's ``cfg.model`` built for ``splits``."""
        if self.module is not None:
            return self.module
        if len(splits.input_shape) != 3 or splits.num_classes < 2:
            raise ValueError(
                f"the registry model {cfg.model!r} needs images (N, C, H, W) of at least 2 classes, got inputs "
                f"of shape (N, {', '.join(map(str, splits.input_shape))}) with {splits.num_classes} class(es); "
                f"pass your own module as model="
            )
        return registry_model(cfg.model, splits, input_range=cfg.input_range, width=cfg.width)


def train_inputs(model: Any = None, data: Any = None, test_data: Any = None) -> TrainInputs:
    """Check and resolve what ``opnorm.train`` got as ``model=``, ``data=`` and ``test_data=``.

    Args:
        model: None (the config's model), a registry name, or an ``nn.Module``.
        data: None (the config's named dataset) or a map-style Dataset (see :func:`as_indexed`).
        test_data: None or a Dataset like ``data`` for the per-epoch check; only with ``data``.

    Raises:
        TypeError / ValueError: anything else, in one line.

    Example::

        >>> train_inputs("cnn").settings()
        {'model': 'cnn'}
    """
    if model is not None and not isinstance(model, (str, nn.Module)):
        raise TypeError(
            f"model must be an nn.Module or a registry name ({', '.join(MODELS)}), got {type(model).__name__}"
        )
    if test_data is not None and data is None:
        raise ValueError("test_data= goes with data=: a named dataset brings its own test split")
    module = model if isinstance(model, nn.Module) else None
    model_name = custom_model_name(module) if module is not None else model
    if data is None:
        return TrainInputs(module=module, model_name=model_name)
    train = as_indexed(data, "data")
    test = as_indexed(test_data, "test_data") if test_data is not None else None
    if test is not None and test.x.shape[1:] != train.x.shape[1:]:
        raise ValueError(
            f"test_data's inputs have shape {tuple(test.x.shape[1:])} per example, data's {tuple(train.x.shape[1:])}"
        )
    name = f"custom:{type(data).__name__} sha256:{data_fingerprint(train)[:16]}"
    return TrainInputs(module=module, model_name=model_name, train=train, test=test, data_name=name)


def as_indexed(data: Any, what: str = "data") -> IndexedTensorDataset:
    """A map-style Dataset of ``(x, y)`` or ``(x, y, index)`` items, read into memory as an
    :class:`IndexedTensorDataset` (whose items carry their index).

    Args:
        data: e.g. a ``TensorDataset(x, y)``, an ``IndexedTensorDataset`` or any Dataset with
            ``__len__`` and ``__getitem__``; x float with values in [0, 1], y int labels >= 0.
        what: the argument's name, for messages.

    Raises:
        TypeError / ValueError: in one line naming ``what`` and the first item that is wrong
            (also: a Dataset whose item 0 differs between two reads, e.g. random transforms,
            which a copy in memory would freeze).

    Example::

        >>> as_indexed(TensorDataset(torch.rand(4, 1, 8, 8), torch.arange(4)))[2][2]
        2
    """
    if isinstance(data, IndexedTensorDataset):
        x, y = data.x, data.y
    elif isinstance(data, TensorDataset) and len(data.tensors) in (2, 3):
        x, y = data.tensors[0], data.tensors[1]
        if len(data.tensors) == 3 and not torch.equal(data.tensors[2].cpu(), torch.arange(len(data))):
            raise ValueError(f"{what}: the third tensor must be the index 0..N-1 of each item (or leave it out)")
    elif isinstance(data, IterableDataset) or not isinstance(data, Dataset) or not hasattr(data, "__len__"):
        raise TypeError(f"{what} must be a map-style torch Dataset (__len__, __getitem__) of {_ITEM}")
    else:
        x, y = _read(data, what)
    if len(x) == 0:
        raise ValueError(f"{what} is empty")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise TypeError(f"{what}: x must be float tensors, got {_describe(x)}; {what} must yield {_ITEM}")
    if not isinstance(y, torch.Tensor) or y.is_floating_point() or y.is_complex() or y.ndim != 1 or len(y) != len(x):
        raise TypeError(
            f"{what}: y must be one int class label per item, got {_describe(y)}; {what} must yield {_ITEM}"
        )
    lo, hi = float(x.min()), float(x.max())
    if not (0.0 <= lo and hi <= 1.0):  # also NaN
        raise ValueError(
            f"{what}: inputs lie in [{lo:g}, {hi:g}], not in [0, 1]; the attacks and the regularizer keep "
            f"x + delta in the box [0, 1]: scale the data to [0, 1] and normalize inside the model"
        )
    if int(y.min()) < 0:
        raise ValueError(f"{what}: labels must be class numbers 0..C-1, got {int(y.min())}")
    return IndexedTensorDataset(x.detach().cpu().contiguous(), y.detach().cpu().long().contiguous())


def _read(data: Dataset, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    first = data[0] if len(data) else None
    if first is not None:
        again = data[0]
        if not (_is_item(first) and _is_item(again)):
            raise TypeError(f"{what}[0] is {_describe(first)}; {what} must yield {_ITEM}")
        if not torch.equal(torch.as_tensor(first[0]), torch.as_tensor(again[0])):
            raise ValueError(
                f"{what}[0] gives a different x on each read (random transforms?); opnorm.train reads the data "
                f"into memory once: pass fixed data, and augment inside the model if wanted"
            )
    xs, ys = [], []
    for i in range(len(data)):
        item = data[i] if i else first
        if not _is_item(item):
            raise TypeError(f"{what}[{i}] is {_describe(item)}; {what} must yield {_ITEM}")
        if len(item) == 3 and int(item[2]) != i:
            raise ValueError(f"{what}[{i}] carries index {int(item[2])}; the index must be the item's position")
        xs.append(torch.as_tensor(item[0]))
        ys.append(torch.as_tensor(item[1]))
    try:
        return torch.stack(xs), torch.stack(ys)
    except RuntimeError as err:
        raise ValueError(f"{what}: the items' x or y differ in shape ({str(err).splitlines()[0]})") from None


def _is_item(item: Any) -> bool:
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        return False
    x, y = item[0], item[1]
    label = isinstance(y, int) or (isinstance(y, torch.Tensor) and y.ndim == 0 and not y.is_floating_point())
    index = len(item) == 2 or isinstance(item[2], int) or (isinstance(item[2], torch.Tensor) and item[2].ndim == 0)
    return isinstance(x, torch.Tensor) and not isinstance(y, bool) and label and index


def _describe(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {tuple(v.shape)}"
    if isinstance(v, (tuple, list)):
        return f"a {type(v).__name__} of {len(v)}: ({', '.join(_describe(e) for e in v[:4])})"
    return f"a {type(v).__name__}"
