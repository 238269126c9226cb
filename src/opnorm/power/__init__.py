"""(p, q) operator norms of per-example Jacobians: the power method, exact forms, spectra.

``||J||_{p->q} = max_{||v||_p <= 1} ||J v||_q``. The (p, q) power method (Boyd 1974)
iterates ``u_k = psi_q(J v_{k-1})``, ``v_k = psi_{p*}(J^T u_k)``; each iterate is a
lower bound attained by ``v_k``, exact at convergence for p = q = 2.

Exact routes form J with d VJPs (d = number of logits) and use:
  * (2, 2): the top singular value (SVD);
  * (1, q): the largest column q-norm;  (p, inf): the largest row p*-norm;
  * (inf, q) with n <= ``max_enumerate``: all 2^(n-1) sign vectors (the maximum of a
    convex function over the cube sits at a vertex);
  * (p, 1) with d <= ``max_enumerate``: ``||J||_{p->1} = max_{s in {+-1}^d} ||J^T s||_{p*}``;
  * any other pair (NP-hard in general): the best of many power-method restarts on the
    formed J, a documented lower bound (``result.exact`` is False).
"""


from opnorm.power.exact import DEFAULT_RESTARTS, operator_norm_of_matrix
from opnorm.power.iteration import lanczos_iteration, power_iteration, random_unit
from opnorm.power.norm import DEFAULT_ITERS, DEFAULT_TOL, ITERATION_COST, METHODS, OperatorNormResult, operator_norm
from opnorm.power.spectra import SpectrumResult, singular_values

__all__ = [
    "OperatorNormResult",
    "SpectrumResult",
    "power_iteration",
    "lanczos_iteration",
    "operator_norm",
    "operator_norm_of_matrix",
    "singular_values",
    "random_unit",
    "METHODS",
    "DEFAULT_ITERS",
    "DEFAULT_TOL",
    "DEFAULT_RESTARTS",
    "ITERATION_COST",
]
