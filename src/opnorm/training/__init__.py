"""Training layer: datasets, model registry, checkpoints (and the trainer built on them).

Example (loading digits imports scikit-learn, a few seconds)::

    from opnorm.training import build_model, load_dataset

    splits = load_dataset("digits")
    model = build_model(
        "cnn", input_shape=splits.input_shape, num_classes=splits.num_classes, mean=splits.mean, std=splits.std
    )
    model(splits.test.x[:5]).shape  # torch.Size([5, 10])
"""

from opnorm.training.checkpoint import (
    CheckpointError,
    export_weights,
    load_checkpoint,
    load_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_digest,
)
from opnorm.training.data import (
    DATASETS,
    DatasetNotFoundError,
    DatasetSplits,
    IndexedTensorDataset,
    load_dataset,
    make_loader,
)
from opnorm.training.files import RunLock, RunLockedError
from opnorm.training.models import MODELS, Normalize, build_model

__all__ = [
    "DATASETS",
    "DatasetNotFoundError",
    "DatasetSplits",
    "IndexedTensorDataset",
    "load_dataset",
    "make_loader",
    "MODELS",
    "Normalize",
    "build_model",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "export_weights",
    "load_weights",
    "rng_state",
    "set_rng_state",
    "write_digest",
    "RunLock",
    "RunLockedError",
]
