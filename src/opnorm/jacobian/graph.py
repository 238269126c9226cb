"""The pattern route for networks that are not chains: residual blocks and other graphs
of modules joined by additions, traced with ``torch.fx``.

Each module node is replayed by its pattern step (see :mod:`opnorm.jacobian.steps`);
``a + b`` of two tensors is linear (tangents add; a gradient goes to both inputs);
``relu`` and ``flatten`` calls are a mask and a reshape. A model with any other function
call, with hooks, or that ``torch.fx`` cannot trace is not covered (the autograd routes
take it).
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from opnorm.jacobian.core import check_autograd, check_output
from opnorm.jacobian.steps import (
    AutogradStep,
    MaskStep,
    ReshapeStep,
    Step,
    global_hooks,
    has_hooks,
    is_plain,
    recognize,
)

_ADDS = (operator.add, operator.iadd, torch.add)
_RELUS = (F.relu, torch.relu)


class _View(ReshapeStep):
    """``torch.flatten(h, start)`` / ``h.flatten(start)``: a reshape."""

    def __init__(self, start: int, name: str):
        super().__init__(lambda h: torch.flatten(h, start), name)


class _Tracer(fx.Tracer):
    """Containers (modules with children and their own forward) are traced through; every
    other module is one node."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return next(m.children(), None) is None


def _node_step(node: fx.Node, modules: dict[str, nn.Module]) -> Step | str | None:
    """The step of a call node; "add" for a sum; a reason string when not covered."""
    if node.op == "call_module":
        if len(node.args) != 1 or not isinstance(node.args[0], fx.Node) or node.kwargs:
            return f"{node.format_node()} takes more than one tensor"
        m = modules[node.target]
        if is_plain(m, nn.Sequential) and len(m) == 0:  # an empty shortcut: the identity
            return ReshapeStep(nn.Identity(), node.target)
        step = recognize(m, node.target)
        return step if isinstance(step, Step) else AutogradStep(m, node.target, step)
    args = [a for a in node.args if isinstance(a, fx.Node)]
    if node.op == "call_function" and node.target in _ADDS and len(args) == 2 == len(node.args) and not node.kwargs:
        return "add"
    if node.op == "call_function" and node.target in _RELUS and len(args) == 1:
        return MaskStep(nn.ReLU(), node.name)
    flat = (node.op == "call_function" and node.target is torch.flatten) or (
        node.op == "call_method" and node.target == "flatten"
    )
    if flat and len(args) == 1 and len(node.args) <= 2 and not node.kwargs:
        start = node.args[1] if len(node.args) == 2 else 0
        if isinstance(start, int) and start >= 1:
            return _View(start, node.name)
    return f"{node.format_node()} is not a module, a sum, relu or flatten"


def graph_support(model: nn.Module) -> tuple[fx.GraphModule | None, list[str]]:
    """(traced graph, reasons): the graph when :class:`GraphLinearization` covers model, else
    None and why not; with a graph, the reasons list the nodes left to local autograd."""
    if global_hooks():
        return None, ["<global>: global module hooks are set"]
    hooked = [name or "<model>" for name, m in model.named_modules() if has_hooks(m)]
    if hooked:
        return None, [f"{hooked[0]}: has hooks (they could change its output or gradient)"]
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:  # data-dependent control flow and the like: not traceable
        return None, [f"<model>: torch.fx cannot trace it ({type(e).__name__}: {str(e).splitlines()[0][:120]})"]
    modules = dict(gm.named_modules())
    reasons = []
    for node in gm.graph.nodes:
        if node.op in ("call_module", "call_function", "call_method", "get_attr"):
            step = _node_step(node, modules) if node.op != "get_attr" else f"{node.format_node()} reads an attribute"
            if isinstance(step, str) and step != "add":
                return None, [f"<model>: {step}"]
            if isinstance(step, AutogradStep):
                reasons.append(f"{step.name}: {step.reason}")
    if sum(n.op == "placeholder" for n in gm.graph.nodes) != 1:
        return None, ["<model>: the forward must take exactly one input"]
    return gm, reasons


class GraphLinearization:
    """J(x) of a piecewise-linear network made of modules joined by sums (ResNet / WRN
    blocks: the skip connection adds two linear maps of the same pattern), with the
    activation pattern of x fixed. Like :class:`~opnorm.jacobian.PatternLinearization`
    for graphs: exact, no autograd graph, no double backward.

    Args:
        model: a module :func:`graph_support` covers (eval mode, see :func:`eval_mode`).
        x: (B, *in) inputs.

    Attributes:
        logits: f(x), (B, d). fallbacks: ``"name: reason"`` for nodes left to local autograd.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from opnorm.jacobian import GraphLinearization
        >>> class Residual(nn.Module):  # a skip connection: modules joined by a sum
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.relu, self.b, self.head = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3)
        ...     def forward(self, x):
        ...         return self.head(x + self.b(self.relu(self.a(x))))
        >>> x = torch.rand(4, 8)
        >>> lin = GraphLinearization(Residual().eval(), x)
        >>> lin.matvec(torch.randn(4, 8)).shape, lin.rmatvec(torch.randn(4, 3)).shape  # (B, d), x.shape
        (torch.Size([4, 3]), torch.Size([4, 8]))
    """

    route = "pattern"

    def __init__(self, model: nn.Module, x: torch.Tensor):
        check_autograd(model)  # nodes the replay does not know are differentiated by autograd
        gm, reasons = graph_support(model)
        if gm is None:
            raise TypeError(f"GraphLinearization does not cover this model: {reasons[0]}; use linearize()")
        self.fallbacks = reasons
        modules = dict(gm.named_modules())
        self.nodes: list[tuple[str, Step | str, list[str]]] = []  # (name, step or "add", input names)
        env: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for node in gm.graph.nodes:
                inputs = [a.name for a in node.args if isinstance(a, fx.Node)]
                if node.op == "placeholder":
                    env[node.name] = x.detach()
                    self.input = node.name
                elif node.op == "output":
                    if not isinstance(node.args[0], fx.Node):  # a tuple or dict of outputs
                        check_output(node.args[0], x.shape[0])
                    self.output = inputs[0]
                else:
                    step = _node_step(node, modules)
                    env[node.name] = env[inputs[0]] + env[inputs[1]] if step == "add" else step.forward(env[inputs[0]])
                    self.nodes.append((node.name, step, inputs))
        self.x_shape = x.shape
        self.logits = self.out = check_output(env[self.output], x.shape[0])

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """J v_i for a stack V (k, B, *in) -> (k, B, d)."""
        env = {self.input: V.to(self.logits.dtype)}
        with torch.no_grad():
            for name, step, inputs in self.nodes:
                env[name] = env[inputs[0]] + env[inputs[1]] if step == "add" else step.jvp(env[inputs[0]], False)
        return env[self.output]

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """J^T u_i for a stack U (k, B, d) -> (k, B, *in)."""
        grads = {self.output: U.to(self.logits.dtype)}

        def give(name: str, g: torch.Tensor) -> None:
            grads[name] = grads[name] + g if name in grads else g  # out of place: g may be shared

        with torch.no_grad():
            for name, step, inputs in reversed(self.nodes):
                g = grads.pop(name, None)
                if g is None:  # the output does not depend on this node
                    continue
                if step == "add":
                    give(inputs[0], g)
                    give(inputs[1], g)
                else:
                    give(inputs[0], step.vjp(g, False))
        g = grads.get(self.input)
        if g is None:
            return torch.zeros(U.shape[0], *self.x_shape, dtype=self.logits.dtype, device=self.logits.device)
        return g.contiguous()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """J v: (B, *in) -> (B, d)."""
        return self.matmat(v.unsqueeze(0))[0]

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """J^T u: (B, d) -> (B, *in)."""
        return self.rmatmat(u.unsqueeze(0))[0]

    def select(self, rows: torch.Tensor) -> GraphLinearization:
        """The operator for the examples ``rows`` only, without a new forward pass."""
        sub = copy.copy(self)
        sub.nodes = [(n, s if s == "add" else s.select(rows), i) for n, s, i in self.nodes]
        sub.logits = sub.out = self.logits[rows]
        sub.x_shape = torch.Size((len(rows), *self.x_shape[1:]))
        return sub
