"""Per-example access to the input-output Jacobian J(x) of any classifier.

A model ``f: (B, *in) -> (B, d)`` has one Jacobian ``J(x_b)`` of shape ``(d, *in)`` per
example as long as it does not mix examples. BatchNorm in training mode does (its
statistics come from the batch), and dropout / stochastic depth make f random. **opnorm's
documented choice: every per-example quantity (Jacobians, operator norms, attacks) is
evaluated with the model in eval mode**; the mode of every submodule is restored
afterwards, also on errors. Wrappers such as ``DistributedDataParallel`` are unwrapped to
their ``.module``.

All functions are batched over examples: one JVP or VJP call serves the whole batch,
because with a per-example model ``sum_b f(x_b)`` has gradient ``J(x_b)^T u_b`` in row b.

Routes to J as a linear operator (:func:`linearize`; ``lin.route`` names the one used):

* ``"pattern"`` (:class:`PatternLinearization`, :class:`GraphLinearization`): replays the
  linear pieces of a ReLU / max-pool / BatchNorm network (an ``nn.Sequential``, or modules
  joined by sums such as ResNet / WRN blocks) with the activation pattern of x fixed; exact
  and several times cheaper; unrecognized modules inside it are differentiated by autograd
  (:func:`pattern_support` says which and why).
* ``"forward"`` (:class:`Linearization`): J^T u by a backward on one retained graph, J v by
  forward-mode AD (dual tensors, ``torch.autograd.forward_ad``).
* ``"autograd"`` (:class:`Linearization`): J v by differentiating the backward graph
  (double backward).

Every route runs the model under :func:`linearizable` (twice-differentiable hardsigmoid /
hardswish, the math attention kernel), so models such as MobileNetV3 and vision
transformers work by either autograd route. ``"auto"`` takes the pattern route where it
applies, else double backward with forward mode as the fallback; when an op supports
neither, :class:`UnsupportedModelError` names the module and op.
:func:`differentiable_jvp` gives J v differentiable w.r.t. the weights, for penalties.

Example:
    >>> import torch
    >>> from torch import nn
    >>> _ = torch.manual_seed(0)
    >>> model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    >>> x, v, u = torch.rand(4, 8), torch.randn(4, 8), torch.randn(4, 3)
    >>> from opnorm.jacobian import eval_mode, linearize
    >>> with eval_mode(model):
    ...     lin = linearize(model, x)
    ...     jv, jtu = lin.matvec(v), lin.rmatvec(u)
    >>> jv.shape, jtu.shape  # (B, d), x.shape
    (torch.Size([4, 3]), torch.Size([4, 8]))
    >>> lin.route  # "pattern", "forward" or "autograd"
    'pattern'
"""

from opnorm.jacobian.autograd import JV_ROUTES, Linearization, differentiable_jvp, jvp, vjp
from opnorm.jacobian.core import (
    Logits,
    check_autograd,
    check_inputs,
    check_label_range,
    check_output,
    eval_mode,
    forward,
    linearizable,
    unbatched,
    unwrap,
    usable,
)
from opnorm.jacobian.graph import GraphLinearization, graph_support
from opnorm.jacobian.pattern import PatternLinearization, pattern_support
from opnorm.jacobian.routes import ROUTES, LinearOperator, jacobian, jacobian_of, linearize
from opnorm.jacobian.support import UnsupportedModelError

__all__ = [
    "eval_mode",
    "unwrap",
    "Logits",
    "check_autograd",
    "check_inputs",
    "check_label_range",
    "check_output",
    "unbatched",
    "usable",
    "forward",
    "jvp",
    "vjp",
    "differentiable_jvp",
    "linearize",
    "linearizable",
    "jacobian",
    "jacobian_of",
    "Linearization",
    "PatternLinearization",
    "GraphLinearization",
    "graph_support",
    "pattern_support",
    "LinearOperator",
    "ROUTES",
    "JV_ROUTES",
    "UnsupportedModelError",
]
