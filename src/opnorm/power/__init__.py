"""(p, q) operator norms of per-example Jacobians: the (p, q) power method and Lanczos
(:mod:`~opnorm.power.iteration`), exact forms of a formed J (:mod:`~opnorm.power.exact`),
top-k spectra (:mod:`~opnorm.power.spectra`) and the entry point
:func:`~opnorm.power.norm.operator_norm`, whose docstring lists which pairs are exact."""

from opnorm.power.exact import DEFAULT_RESTARTS, operator_norm_of_matrix
from opnorm.power.iteration import LanczosRun, PowerRun, lanczos_iteration, power_iteration, random_unit
from opnorm.power.norm import DEFAULT_ITERS, DEFAULT_RTOL_CHANGE, METHODS, OperatorNormResult, operator_norm
from opnorm.power.spectra import SpectrumResult, singular_values

__all__ = [
    "OperatorNormResult",
    "SpectrumResult",
    "power_iteration",
    "lanczos_iteration",
    "PowerRun",
    "LanczosRun",
    "operator_norm",
    "operator_norm_of_matrix",
    "singular_values",
    "random_unit",
    "METHODS",
    "DEFAULT_ITERS",
    "DEFAULT_RTOL_CHANGE",
    "DEFAULT_RESTARTS",
]
