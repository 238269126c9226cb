"""Per-example access to the input-output Jacobian J(x) of any classifier.

A model ``f: (B, *in) -> (B, d)`` has one Jacobian ``J(x_b)`` of shape ``(d, *in)`` per
example as long as it does not mix examples. BatchNorm in training mode does (its
statistics come from the batch), and dropout makes f random. **opnorm's documented choice:
every per-example quantity (Jacobians, operator norms, attacks) is evaluated with the
model in eval mode**; the mode of every submodule is restored afterwards, also on errors.
Wrappers such as ``DistributedDataParallel`` are unwrapped to their ``.module``.

All functions are batched over examples: one JVP or VJP call serves the whole batch,
because with a per-example model ``sum_b f(x_b)`` has gradient ``J(x_b)^T u_b`` in row b.

Two routes give J as a linear operator (:func:`linearize`): :class:`Linearization`
(autograd on a retained graph; any model) and :class:`PatternLinearization` (replays the
linear pieces of a ReLU / max-pool / BatchNorm ``nn.Sequential`` with the activation
pattern of x fixed; exact, several times cheaper; unrecognized modules inside it are
differentiated by autograd, and :func:`pattern_support` says which and why).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "eval_mode",
    "unwrap",
    "check_inputs",
    "check_label_range",
    "forward",
    "jvp",
    "vjp",
    "linearize",
    "jacobian",
    "jacobian_of",
    "PatternLinearization",
    "pattern_support",
]


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DataParallel / DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own flag on exit."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def check_inputs(model: nn.Module, x: torch.Tensor, name: str = "x") -> None:
    """Raise a clear error if x cannot be fed to model for per-example analysis."""
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"model must be a torch.nn.Module or a callable, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, ...), got {type(x).__name__}")
    if x.ndim < 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty batch of shape (B, ...) with B >= 1 and at least one dimension per "
                         f"example, got shape {tuple(x.shape)}" + (f"; for a single example use {name}[None]" if x.ndim == 1 else ""))
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}; convert with x.float()")
    if isinstance(model, nn.Module):
        param = next(iter(model.parameters()), None)
        if param is not None:
            if param.device != x.device:
                raise ValueError(
                    f"{name} is on device {x.device} but the model is on device {param.device}; move one of them, e.g. x.to({str(param.device)!r})"
                )
            if param.is_floating_point() and param.dtype != x.dtype:
                raise TypeError(
                    f"{name} has dtype {x.dtype} but the model's parameters have dtype {param.dtype}; "
                    f"use x.to({param.dtype}) or model.to({x.dtype})"
                )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values; clean the inputs before computing norms or attacks")


def check_label_range(y: torch.Tensor, num_logits: int, name: str = "y") -> None:
    """Raise a clear error unless every label indexes one of ``num_logits`` logits."""
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_logits):
        raise ValueError(f"{name} holds labels in [{int(y.min())}, {int(y.max())}] but the model has {num_logits} logits; "
                         f"labels must be in [0, {num_logits - 1}]")


def _check_output(out: torch.Tensor, batch: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"model must return a tensor of logits of shape (B, d), got {type(out).__name__}")
    if out.ndim != 2 or out.shape[0] != batch:
        raise ValueError(
            f"model output must be 2-D (B, d) with B = {batch} (one logit vector per example), got shape {tuple(out.shape)}"
        )
    return out


def forward(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """model(x) with the output shape checked to be (B, d)."""
    return _check_output(model(x), x.shape[0])


def vjp(model: Callable, x: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), J(x)^T u) for every example: u is (B, d), the result has x's shape."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        out = forward(model, xg)
        (g,) = torch.autograd.grad(out, xg, grad_outputs=u.to(out.dtype))
    return out.detach(), g


def jvp(model: Callable, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), J(x) v) for every example by forward-mode AD: v has x's shape, J v is (B, d)."""
    if v.shape != x.shape:
        raise ValueError(f"v must have the shape of x {tuple(x.shape)}, got {tuple(v.shape)}")
    out, tangent = torch.func.jvp(lambda inp: forward(model, inp), (x.detach(),), (v.detach().to(x.dtype),))
    return out.detach(), tangent.detach()


class Linearization:
    """J(x) as a linear operator at fixed x, built from one forward pass (autograd route).

    ``rmatvec(u) = J^T u`` reuses the retained graph (one backward each);
    ``matvec(v) = J v`` differentiates the VJP graph once more ("double-backward trick":
    ``J v = d/du <J^T u, v>``, built on the first call), so neither needs another
    forward pass. ``matmat`` / ``rmatmat`` take stacks (k, B, ...) in one vmapped call.
    """

    route = "autograd"

    def __init__(self, model: Callable, x: torch.Tensor):
        with torch.enable_grad():
            self.x = x.detach().requires_grad_(True)
            self.out = forward(model, self.x)
        self.logits = self.out.detach()
        self.fallbacks: list[str] = []
        self._jt_graph: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    @property
    def _jt(self) -> torch.Tensor:
        return self._double_backward()[1]

    @property
    def _u(self) -> torch.Tensor:
        return self._double_backward()[0]

    def _double_backward(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._jt_graph is None:
            with torch.enable_grad():
                u = torch.zeros_like(self.out, requires_grad=True)
                # J^T u as a differentiable function of u (linear in u)
                (jt,) = torch.autograd.grad(self.out, self.x, grad_outputs=u, create_graph=True)
            self._jt_graph = (u, jt)
        return self._jt_graph

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(self.out, self.x, grad_outputs=u.to(self.out.dtype), retain_graph=True)
        return g

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self._jt.grad_fn is None:  # the model is constant in x
            return torch.zeros_like(self.out)
        (jv,) = torch.autograd.grad(self._jt, self._u, grad_outputs=v.to(self.out.dtype), retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.out) if jv is None else jv.detach()

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """J^T u_i for a stack U (k, B, d) -> (k, B, *in): one vmapped backward."""
        return _batched_grad(self.out, self.x, U.to(self.out.dtype))

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """J v_i for a stack V (k, B, *in) -> (k, B, d)."""
        if self._jt.grad_fn is None:
            return torch.zeros(V.shape[0], *self.out.shape, dtype=self.out.dtype, device=self.out.device)
        return _batched_grad(self._jt, self._u, V.to(self.out.dtype)).detach()


def _batched_grad(out: torch.Tensor, inp: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """d<out, g_i>/d inp for every g_i in grads (k, *out.shape), keeping the graph."""
    zeros = torch.zeros(grads.shape[0], *inp.shape, dtype=grads.dtype, device=grads.device)
    if not out.requires_grad:  # out does not depend on inp
        return zeros
    try:
        (res,) = torch.autograd.grad(out, inp, grad_outputs=grads, is_grads_batched=True, retain_graph=True, allow_unused=True)
        return zeros if res is None else res
    except RuntimeError:  # an op without a batching rule: one backward per vector
        for i, g in enumerate(grads):
            (row,) = torch.autograd.grad(out, inp, grad_outputs=g, retain_graph=True, allow_unused=True)
            if row is not None:
                zeros[i] = row
        return zeros


# ----------------------------------------------------------------------------- pattern route
#
# A ReLU network is piecewise linear: with the activation pattern of x fixed (ReLU masks,
# max-pool argmax indices), J(x) is a product of known linear maps. Replaying them is exact
# and much cheaper than autograd: no graph, no double backward, and max-pool on a
# channels-last copy (the contiguous CPU max-pool kernel is several times slower).
# Every tensor below carries a leading "stack" dimension k: (k, B, *shape).


def _plain(m: nn.Module, cls: type) -> bool:
    """m is a cls whose forward is cls's own (a subclass overriding forward is unknown)."""
    return isinstance(m, cls) and type(m).forward is cls.forward


def _has_hooks(m: nn.Module) -> bool:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(len(getattr(m, n, None) or ()) for n in names)


def _global_hooks() -> bool:
    mod = torch.nn.modules.module
    names = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks", "_global_backward_pre_hooks")
    return any(len(getattr(mod, n, None) or ()) for n in names)


def _lead(t: torch.Tensor) -> torch.Tensor:
    """(k, B, *s) -> (k * B, *s) for ops that take one batch dimension."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


class _Step:
    """One module of the chain: ``forward`` records the pattern, then ``jvp`` / ``vjp``.

    ``jvp(t, owned)`` / ``vjp(g, owned)``: ``owned`` says the input is a temporary of the
    chain (not the caller's tensor), so the step may overwrite it. ``fresh``: the output
    is new memory (False for steps that may return a view of their input).
    """

    name: str
    fresh = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, rows: torch.Tensor) -> "_Step":
        """This step for the examples ``rows`` only (steps without per-example state are shared)."""
        return self

    def jvp(self, t: torch.Tensor, owned: bool) -> torch.Tensor:
        raise NotImplementedError

    def vjp(self, g: torch.Tensor, owned: bool) -> torch.Tensor:
        raise NotImplementedError


class _Linear(_Step):
    def __init__(self, m: nn.Linear, name: str):
        self.m, self.name = m, name

    def forward(self, h):
        self.w = self.m.weight.detach()
        return self.m(h)

    def jvp(self, t, owned):
        return F.linear(t, self.w)  # no bias: the tangent map is the linear part

    def vjp(self, g, owned):
        return g @ self.w


_CONV = {nn.Conv1d: (F.conv1d, F.conv_transpose1d), nn.Conv2d: (F.conv2d, F.conv_transpose2d)}


def _hwc(t: torch.Tensor) -> torch.Tensor:
    """(k, B, C, H, W) -> (k, B, H*W, C): a view when t is channels-last, else a copy."""
    k, b, c, h, w = t.shape
    return t.permute(0, 1, 3, 4, 2).reshape(k, b, h * w, c)


def _from_hwc(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(k, B, H*W, C) contiguous -> (k, B, C, H, W) with channels-last memory (a view)."""
    c, h, w = shape
    return t.view(t.shape[0], t.shape[1], h, w, c).permute(0, 1, 4, 2, 3)


def _is_cl(t: torch.Tensor) -> bool:
    return t.dim() == 5 and t.permute(0, 1, 3, 4, 2).is_contiguous()


class _Conv(_Step):
    """Conv1d / Conv2d. 2-D maps run channels-last, in the recording pass too (faster CPU
    kernels, no reorders; the values equal model(x)'s up to float rounding)."""

    def __init__(self, m: nn.Module, name: str):
        self.m, self.name = m, name
        self.conv, self.conv_t = next(fns for cls, fns in _CONV.items() if isinstance(m, cls))
        self.is_2d = self.conv is F.conv2d

    def forward(self, h):
        m = self.m
        self.w = m.weight.detach()
        if self.is_2d:  # channels-last: the same values up to float rounding, and faster on CPU
            h = h.to(memory_format=torch.channels_last)
        out = m(h)
        # the transposed convolution maps back onto exactly the input size
        k = self.w.shape[2:]
        self.in_size = tuple(h.shape[2:])
        self.output_padding = tuple(
            h.shape[2 + i] - ((out.shape[2 + i] - 1) * m.stride[i] - 2 * m.padding[i] + m.dilation[i] * (k[i] - 1) + 1)
            for i in range(len(k))
        )
        return out

    def _flat(self, t: torch.Tensor) -> torch.Tensor:
        t = _lead(t)
        return t.to(memory_format=torch.channels_last) if self.is_2d else t

    def jvp(self, t, owned):
        m = self.m
        out = self.conv(self._flat(t), self.w, None, m.stride, m.padding, m.dilation, m.groups)
        return out.view(t.shape[0], t.shape[1], *out.shape[1:])

    def vjp(self, g, owned):
        m = self.m
        flat = self._flat(g)
        if self.is_2d and m.groups == 1 and m.in_channels <= 2:
            # few input channels (a grayscale first layer): the transpose is one matmul plus
            # col2im (fold), several times faster than the general transposed-conv kernel on CPU
            n, c = flat.shape[:2]
            g3 = flat.permute(0, 2, 3, 1).reshape(n, -1, c).transpose(1, 2)  # (N, C, H*W), a view of channels-last memory
            cols = self.w.reshape(c, -1).T @ g3  # (N, C_in * kh * kw, H*W)
            res = F.fold(cols, self.in_size, self.w.shape[2:], m.dilation, m.padding, m.stride)
        else:
            res = self.conv_t(flat, self.w, None, m.stride, m.padding, self.output_padding, m.groups, m.dilation)
        return res.view(g.shape[0], g.shape[1], *res.shape[1:])


class _Mask(_Step):
    """Elementwise piecewise-linear activations: ReLU (slope 0 / 1) and LeakyReLU.

    A ReLU right before a max-pool is folded into the pool (``folded``): max-pooling commutes
    with the ReLU (``pool(relu(h)) = relu(pool(h))``, and both pick the same argmax wherever
    the pooled value is > 0), so the pool runs on h and applies the ReLU and its mask
    ``pooled > 0`` at the pooled size, four times fewer entries for a 2x2 pool.
    """

    folded = False

    def __init__(self, m: nn.Module, name: str):
        self.m, self.name = m, name
        self._mask_cl: Optional[torch.Tensor] = None

    def forward(self, h):
        self._mask_cl = None
        if isinstance(self.m, nn.LeakyReLU):
            # autograd's rule: slope 1 where the input is > 0, else negative_slope
            one = torch.ones((), dtype=h.dtype, device=h.device)
            self.mask = torch.where(h > 0, one, one * self.m.negative_slope)  # in h's dtype, not float32
            return self.m(h)
        if self.folded:
            return h  # the pool after it applies the ReLU to its (smaller) output
        out = self.m(h)
        self.mask = (out > 0).to(out.dtype)  # relu's backward passes the gradient where the output is > 0
        return out

    def select(self, rows):
        if self.folded:
            return self
        step = copy.copy(self)
        step.mask, step._mask_cl = self.mask[rows], None
        return step

    def jvp(self, t, owned):
        if self.folded:
            return t
        mask = self.mask
        if _is_cl(t):  # match the tangent's memory layout (converted once, on first use)
            if self._mask_cl is None:
                self._mask_cl = mask.contiguous(memory_format=torch.channels_last)
            mask = self._mask_cl
        return t.mul_(mask) if owned else t * mask

    vjp = jvp


class _MaxPool(_Step):
    """Max-pooling with x's argmax fixed: a gather forward, a scatter-add backward.

    2-D pools keep their tangents channels-last: gathers and scatters run along the
    spatial positions of (k, B, H*W, C) views.
    """

    def __init__(self, m: nn.Module, name: str):
        self.m, self.name = m, name
        self.pool = F.max_pool2d if isinstance(m, nn.MaxPool2d) else F.max_pool1d
        self.relu_mask: Optional[torch.Tensor] = None  # set when a ReLU before it is folded in

    def forward(self, h):
        m = self.m
        self.is_2d = h.dim() == 4
        # channels-last: the same values and argmax, and a much faster CPU kernel than contiguous
        src = h.to(memory_format=torch.channels_last) if self.is_2d else h
        out, idx = self.pool(src, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
        self.in_shape, self.out_shape = h.shape[1:], out.shape[1:]
        if self.relu_mask is not None:  # the folded ReLU (see _Mask)
            out = torch.relu(out)
            self.relu_mask = (out > 0).to(out.dtype)  # (B, C, ...) in the pool's layout, like the tangents
        if self.is_2d:
            self.idx = _hwc(idx.unsqueeze(0))  # (1, B, h*w, C): flat input positions per channel
        else:
            self.idx = idx.reshape(1, *idx.shape[:2], -1)  # (1, B, C, L_out)
        return out

    def select(self, rows):
        step = copy.copy(self)
        step.idx = self.idx[:, rows]
        if self.relu_mask is not None:
            step.relu_mask = self.relu_mask[rows]
        return step

    def jvp(self, t, owned):
        k = t.shape[0]
        idx = self.idx.expand(k, *self.idx.shape[1:])
        if self.is_2d:
            res = _from_hwc(_hwc(t).gather(2, idx), self.out_shape)
        else:
            res = t.reshape(k, *t.shape[1:3], -1).gather(3, idx).reshape(k, t.shape[1], *self.out_shape)
        return res if self.relu_mask is None else res.mul_(self.relu_mask)

    def vjp(self, g, owned):
        k, b = g.shape[:2]
        if self.relu_mask is not None:
            g = g.mul_(self.relu_mask) if owned else g * self.relu_mask
        idx = self.idx.expand(k, *self.idx.shape[1:])
        # scatter_add: overlapping windows may pick the same input twice
        if self.is_2d:
            c = self.in_shape[0]
            res = torch.zeros(k, b, self.in_shape[1:].numel(), c, dtype=g.dtype, device=g.device)
            return _from_hwc(res.scatter_add_(2, idx, _hwc(g)), self.in_shape)
        res = torch.zeros(k, b, self.in_shape[0], self.in_shape[1:].numel(), dtype=g.dtype, device=g.device)
        res.scatter_add_(3, idx, g.reshape(k, b, self.out_shape[0], -1))
        return res.reshape(k, b, *self.in_shape)


class _Scale(_Step):
    """Eval-mode BatchNorm: per-channel affine, its linear part is a per-channel scale."""

    def __init__(self, m: nn.Module, name: str):
        self.m, self.name = m, name

    def forward(self, h):
        m = self.m
        scale = torch.rsqrt(m.running_var.detach() + m.eps)
        if m.weight is not None:
            scale = scale * m.weight.detach()
        self.scale = scale.to(h.dtype).reshape(-1, *([1] * (h.dim() - 2)))  # (C, 1, ...) broadcasts over (k, B)
        return m(h)

    def jvp(self, t, owned):
        return t.mul_(self.scale) if owned else t * self.scale

    vjp = jvp


class _Reshape(_Step):
    """Flatten / Unflatten / Identity / eval-mode Dropout: a reshape (or nothing)."""

    fresh = False

    def __init__(self, m: nn.Module, name: str):
        self.m, self.name = m, name

    def forward(self, h):
        out = self.m(h)
        self.in_shape, self.out_shape = h.shape[1:], out.shape[1:]
        return out

    def jvp(self, t, owned):
        return t.reshape(*t.shape[:2], *self.out_shape)

    def vjp(self, g, owned):
        return g.reshape(*g.shape[:2], *self.in_shape)


class _Autograd(_Step):
    """Any other module: its own local Jacobian by autograd (exact, just not faster)."""

    fresh = False  # autograd may hand back its incoming gradient unchanged

    def __init__(self, m: nn.Module, name: str, reason: str):
        self.m, self.name, self.reason = m, name, reason

    def forward(self, h):
        with torch.enable_grad():
            self.hin = h.detach().requires_grad_(True)
            out = self.m(self.hin.clone())  # clone: an in-place first op must not touch the leaf
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"module {self.name!r} returned {type(out).__name__}; a chain of modules must pass tensors")
            self.out = out
            self.u = torch.zeros_like(out, requires_grad=True)
            jt = None
            if out.requires_grad:
                (jt,) = torch.autograd.grad(out, self.hin, grad_outputs=self.u, create_graph=True, allow_unused=True)
            self.jt = jt  # J^T u as a function of u: differentiating it in u gives J v
        return out.detach()

    def select(self, rows):
        step = _Autograd(self.m, self.name, self.reason)
        step.forward(self.hin.detach()[rows])  # a new local graph for those examples
        return step

    def jvp(self, t, owned):
        if self.jt is None or self.jt.grad_fn is None:
            return torch.zeros(t.shape[0], *self.out.shape, dtype=t.dtype, device=t.device)
        return _batched_grad(self.jt, self.u, t)

    def vjp(self, g, owned):
        return _batched_grad(self.out, self.hin, g)


_MASKS = (nn.ReLU, nn.LeakyReLU)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _recognize(m: nn.Module, name: str) -> Union[_Step, str]:
    """The fast step for m, or the reason why m needs local autograd."""
    if _has_hooks(m):
        return "has hooks (they could change its output or gradient)"
    if _plain(m, nn.Linear):
        return _Linear(m, name)
    if any(_plain(m, c) for c in _CONV):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return f"convolution with padding_mode={m.padding_mode!r}, padding={m.padding!r} (only numeric zero padding is replayed)"
        return _Conv(m, name)
    if any(_plain(m, c) for c in _MASKS):
        return _Mask(m, name)
    if any(_plain(m, c) for c in _POOLS):
        if m.return_indices:
            return "max-pool with return_indices=True returns a tuple"
        return _MaxPool(m, name)
    if any(_plain(m, c) for c in _NORMS):
        if m.training or m.running_var is None:
            return "BatchNorm that uses batch statistics (training mode or track_running_stats=False) mixes examples"
        return _Scale(m, name)
    if any(_plain(m, c) for c in _RESHAPES):
        return _Reshape(m, name)
    if any(_plain(m, c) for c in _DROPOUTS):
        if m.training:
            return "dropout in training mode is random"
        return _Reshape(m, name)
    if _plain(m, nn.Sequential):
        return "nested Sequential"  # expanded by the caller
    return f"{type(m).__name__} is not a recognized piecewise-linear module"


def pattern_support(model: nn.Module) -> tuple[bool, list[str]]:
    """Whether :class:`PatternLinearization` applies to model, and the modules it hands to autograd.

    Returns ``(applies, fallbacks)``: ``applies`` is True when the unwrapped model is a plain
    ``nn.Sequential`` (forward not overridden) and no global module hooks are set;
    ``fallbacks`` lists ``"name: reason"`` for every module differentiated by autograd
    (exact, but without the speed-up).

    Example:
        >>> pattern_support(nn.Sequential(nn.Linear(4, 3), nn.Tanh()))
        (True, ['1: Tanh is not a recognized piecewise-linear module'])
    """
    model = unwrap(model)
    if _global_hooks():
        return False, ["<global>: global module hooks are set"]
    if not _plain(model, nn.Sequential) or _has_hooks(model):
        return False, [f"<model>: {type(model).__name__} is not a plain nn.Sequential without hooks"]
    steps = _build_steps(model, "")
    return True, [f"{s.name}: {s.reason}" for s in steps if isinstance(s, _Autograd)]


def _build_steps(seq: nn.Sequential, prefix: str) -> list[_Step]:
    steps: list[_Step] = []
    for key, m in seq._modules.items():
        if m is None:
            continue
        name = f"{prefix}{key}"
        if _plain(m, nn.Sequential) and not _has_hooks(m):
            steps.extend(_build_steps(m, name + "."))
            continue
        step = _recognize(m, name)
        steps.append(step if isinstance(step, _Step) else _Autograd(m, name, step))
    return steps


def _fold(steps: list[_Step]) -> list[_Step]:
    """Fold each plain ReLU that feeds a max-pool into the pool (see :class:`_Mask`)."""
    for a, b in zip(steps, steps[1:]):
        if isinstance(a, _Mask) and _plain(a.m, nn.ReLU) and isinstance(b, _MaxPool):
            a.folded, a.fresh = True, False  # now the identity: its output is its input
            b.relu_mask = torch.empty(0)  # a placeholder: forward fills it in
    return steps


class PatternLinearization:
    """J(x) of a piecewise-linear ``nn.Sequential`` with the activation pattern of x fixed.

    One forward pass through the modules records what makes each one linear at x (ReLU
    masks, max-pool argmax indices, eval-BatchNorm scales); ``matvec`` then replays the
    linear parts forward (Linear / Conv without bias, mask multiplies, gathers) and
    ``rmatvec`` replays their transposes backward. Both are exact for ReLU / LeakyReLU /
    max-pool / eval-BatchNorm / Linear / Conv1d / Conv2d / Flatten / Dropout (eval) nets;
    any other module (e.g. a ``Normalize`` preprocessing layer, or a block with a custom
    forward) is differentiated by autograd on its own, so the result is always exact;
    ``fallbacks`` lists those modules and why. Use :func:`linearize` to get this class when
    it applies and :class:`Linearization` otherwise. Evaluate in eval mode
    (:func:`eval_mode`); BatchNorm in training mode falls back to autograd.

    Args:
        model: a plain ``nn.Sequential`` (nested Sequentials are expanded).
        x: (B, *in) inputs.

    Attributes:
        logits: f(x), (B, d). fallbacks: ``"name: reason"`` strings.

    Example:
        >>> lin = PatternLinearization(model.eval(), x)
        >>> lin.matvec(v).shape, lin.rmatvec(u).shape   # (B, d), x.shape
    """

    route = "pattern"

    def __init__(self, model: nn.Module, x: torch.Tensor):
        model = unwrap(model)
        if not _plain(model, nn.Sequential):
            raise TypeError(f"PatternLinearization needs a plain nn.Sequential, got {type(model).__name__}; use linearize()")
        self.steps = _fold(_build_steps(model, ""))
        self.fallbacks = [f"{s.name}: {s.reason}" for s in self.steps if isinstance(s, _Autograd)]
        self.x_shape = x.shape
        with torch.no_grad():
            h = x.detach()
            for step in self.steps:
                h = step.forward(h)
        self.logits = _check_output(h, x.shape[0])
        self.out = self.logits

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """J v_i for a stack V (k, B, *in) -> (k, B, d)."""
        t = V.to(self.logits.dtype)
        owned = t is not V  # a conversion is ours to overwrite; the caller's V is not
        with torch.no_grad():
            for step in self.steps:
                t = step.jvp(t, owned)
                owned = step.fresh or owned
        return t

    def rmatmat(self, U: torch.Tensor) -> torch.Tensor:
        """J^T u_i for a stack U (k, B, d) -> (k, B, *in)."""
        g = U.to(self.logits.dtype)
        owned = g is not U
        with torch.no_grad():
            for step in reversed(self.steps):
                g = step.vjp(g, owned)
                owned = step.fresh or owned
        return g.contiguous()  # inner steps may leave a channels-last layout

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """J v: (B, *in) -> (B, d)."""
        return self.matmat(v.unsqueeze(0))[0]

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """J^T u: (B, d) -> (B, *in)."""
        return self.rmatmat(u.unsqueeze(0))[0]

    def select(self, rows: torch.Tensor) -> "PatternLinearization":
        """The operator for the examples ``rows`` only (a 1-D index tensor), without a new forward
        pass: iterative methods shrink their batch as examples converge."""
        sub = copy.copy(self)
        sub.steps = [step.select(rows) for step in self.steps]
        sub.logits = sub.out = self.logits[rows]
        sub.x_shape = torch.Size((len(rows), *self.x_shape[1:]))
        return sub


LinearOperator = Union[Linearization, PatternLinearization]
ROUTES = ("auto", "pattern", "autograd")


def linearize(model: Callable, x: torch.Tensor, route: str = "auto") -> LinearOperator:
    """J(x) as a linear operator (``matvec`` = J v, ``rmatvec`` = J^T u, ``matmat`` /
    ``rmatmat`` for stacks (k, B, ...), ``logits`` = f(x)).

    Args:
        model: the model, already in the mode to analyse (see :func:`eval_mode`).
        x: (B, *in) inputs.
        route: "pattern" (:class:`PatternLinearization`: needs a plain ``nn.Sequential``),
            "autograd" (:class:`Linearization`: any model), or "auto": pattern whenever
            :func:`pattern_support` says it applies (it is exact either way; modules it
            does not recognize are differentiated by autograd), else autograd.

    Example:
        >>> with eval_mode(model):
        ...     lin = linearize(model, x)
        ...     jv = lin.matvec(torch.randn_like(x))   # (B, d)
    """
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    if route == "autograd" or not isinstance(model, nn.Module):
        return Linearization(model, x)
    applies, reasons = pattern_support(model)
    if route == "pattern" and not applies:
        raise ValueError(f"route='pattern' does not apply: {'; '.join(reasons)}; use route='auto' or 'autograd'")
    if applies:
        return PatternLinearization(unwrap(model), x)
    lin = Linearization(model, x)
    lin.fallbacks = reasons  # why the pattern route was not taken
    return lin


def jacobian(model: nn.Module, x: torch.Tensor, *, route: str = "auto", chunk: Optional[int] = None) -> torch.Tensor:
    """The exact per-example Jacobian, shape (B, d, *in), from d VJPs batched over the basis.

    The model is evaluated in eval mode (see the module docstring) and its mode restored.

    Args:
        model: f: (B, *in) -> (B, d). x: (B, *in).
        route: how the VJPs are computed, as in :func:`linearize`: "auto" (the pattern
            route for plain ``nn.Sequential`` models, else autograd), "pattern", "autograd".
        chunk: basis vectors per stacked VJP (default: all of them for autograd, one for the
            pattern route). Only memory and speed depend on it.

    Example:
        >>> J = jacobian(model, x)     # (B, d, *x.shape[1:])
    """
    check_inputs(model, x)
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
    net = unwrap(model)
    with eval_mode(net), torch.enable_grad():
        if route != "autograd" and (route == "pattern" or pattern_support(net)[0]):
            return jacobian_of(linearize(net, x, "pattern"), chunk=chunk)
        xg = x.detach().requires_grad_(True)
        out = forward(net, xg)
        rows = _batched_grad(out, xg, _basis(out))  # no double-backward graph needed here
    return rows.transpose(0, 1).contiguous()  # (B, d, *in)


def _basis(out: torch.Tensor) -> torch.Tensor:
    """(d, B, d) stack: entry i is e_i for every example."""
    B, d = out.shape
    return torch.eye(d, dtype=out.dtype, device=out.device).unsqueeze(1).expand(d, B, d)


def jacobian_of(lin: LinearOperator, chunk: Optional[int] = None) -> torch.Tensor:
    """The exact J (B, d, *in) of a linear operator from :func:`linearize`: rmatmat on the basis.

    Args:
        lin: a :class:`PatternLinearization` or :class:`Linearization`.
        chunk: basis vectors per rmatmat call (default: d for autograd, 1 for the pattern route).
    """
    basis = _basis(lin.logits)
    d = basis.shape[0]
    if chunk is None:
        chunk = _default_chunk(lin)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
    rows = torch.cat([lin.rmatmat(basis[i : i + chunk]) for i in range(0, d, chunk)])
    return rows.transpose(0, 1).contiguous()


def _default_chunk(lin: LinearOperator) -> int:
    # autograd: one vmapped backward for the whole basis; pattern: one vector at a time, as
    # stacking only grows the temporaries past the caches (measured by benchmarks/operator_norm.py)
    return lin.logits.shape[1] if isinstance(lin, Linearization) else 1
