"""opnorm: data-dependent (p, q) operator norms of input-output Jacobians,
l_p adversarial attacks and robust training for PyTorch."""

from opnorm.analysis import EquivalenceResult, activation_agreement, alignment, verify_equivalence
from opnorm.attacks import PGD, EvalPGD, pgd
from opnorm.evaluation import Evaluation, evaluate
from opnorm.fast_at import FreeATLoss, SingleStepATLoss

# the function is exported as jacobian_matrix: the name opnorm.jacobian is the subpackage
from opnorm.jacobian import eval_mode, jvp, linearize, vjp
from opnorm.jacobian import jacobian as jacobian_matrix
from opnorm.norms import (
    clip_box,
    conjugate,
    duality_map,
    lp_norm,
    norm_order,
    project_l1_ball,
    project_lp_ball,
    steepest_ascent,
)
from opnorm.power import OperatorNormResult, SpectrumResult, operator_norm, singular_values
from opnorm.regularizers import (
    AdversarialTrainingLoss,
    DirectionStore,
    ExactPenalty,
    FDPenalty,
    FisherKL,
    GlobalSpectralNormRegularizer,
    LogitNorm,
    OperatorNormRegularizer,
    PGASolver,
)
from opnorm.training.config import TrainConfig
from opnorm.training.data import IndexedTensorDataset
from opnorm.training.trainer import TrainResult, train

__version__ = "0.1.0"

__all__ = [
    "AdversarialTrainingLoss",
    "DirectionStore",
    "EquivalenceResult",
    "Evaluation",
    "ExactPenalty",
    "FDPenalty",
    "FisherKL",
    "FreeATLoss",
    "GlobalSpectralNormRegularizer",
    "IndexedTensorDataset",
    "LogitNorm",
    "OperatorNormRegularizer",
    "OperatorNormResult",
    "PGASolver",
    "PGD",
    "EvalPGD",
    "SingleStepATLoss",
    "SpectrumResult",
    "TrainConfig",
    "TrainResult",
    "activation_agreement",
    "alignment",
    "clip_box",
    "conjugate",
    "duality_map",
    "eval_mode",
    "evaluate",
    "jacobian_matrix",
    "jvp",
    "linearize",
    "lp_norm",
    "norm_order",
    "operator_norm",
    "pgd",
    "project_l1_ball",
    "project_lp_ball",
    "singular_values",
    "steepest_ascent",
    "train",
    "verify_equivalence",
    "vjp",
]
