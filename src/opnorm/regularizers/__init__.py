"""Training objectives: data-dependent operator norm regularization (composed from a metric,
a direction solver, a store and a penalty), global spectral norm regularization, and
adversarial training (PGD-AT, l_q-logit AT, TRADES). Every term is an ``nn.Module`` added to
the task loss; see docs/theory.md for the math.

Example:
    >>> import torch
    >>> import torch.nn.functional as F
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x, y = torch.rand(4, 8), torch.tensor([0, 1, 2, 0])
    >>> from opnorm.regularizers import OperatorNormRegularizer
    >>> reg = OperatorNormRegularizer.paper(2, 2, eps=0.1, lam=0.02)
    >>> logits, pen = reg.joint(model, x)
    >>> logits.shape, pen.shape
    (torch.Size([4, 3]), torch.Size([]))
    >>> (F.cross_entropy(logits, y) + pen).backward()
"""

from opnorm.regularizers.adversarial import AT_KINDS, AdversarialTrainingLoss
from opnorm.regularizers.batchnorm import clean_statistics, frozen_statistics
from opnorm.regularizers.metrics import FisherKL, LogitNorm, OutputMetric
from opnorm.regularizers.operator_norm import (
    BATCHNORM_WARMUP,
    GROWTH_WARNING,
    OperatorNormRegularizer,
    mixes_examples,
)
from opnorm.regularizers.penalty import ExactPenalty, FDPenalty, Penalty, paired_noise
from opnorm.regularizers.solver import PGASolver
from opnorm.regularizers.spectral import GlobalSpectralNormRegularizer
from opnorm.regularizers.store import DirectionStore

__all__ = [
    "OperatorNormRegularizer",
    "LogitNorm",
    "FisherKL",
    "OutputMetric",
    "PGASolver",
    "DirectionStore",
    "FDPenalty",
    "ExactPenalty",
    "Penalty",
    "paired_noise",
    "clean_statistics",
    "frozen_statistics",
    "mixes_examples",
    "BATCHNORM_WARMUP",
    "GROWTH_WARNING",
    "GlobalSpectralNormRegularizer",
    "AdversarialTrainingLoss",
    "AT_KINDS",
]
