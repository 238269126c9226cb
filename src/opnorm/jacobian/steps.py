"""The pattern route's steps: one per module of a chain, each recording at x what makes
its module linear there and replaying that linear map (``jvp``) or its transpose (``vjp``).

A ReLU network is piecewise linear: with the activation pattern of x fixed (ReLU masks,
max-pool argmax indices), J(x) is a product of known linear maps. Replaying them is exact
and much cheaper than autograd: no graph, no double backward, and max-pool on a
channels-last copy (the contiguous CPU max-pool kernel is several times slower).
Every tensor below carries a leading "stack" dimension k: (k, B, *shape).
:func:`recognize` picks the step of a module, or says why autograd must differentiate it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import forward_ad as fwAD

from opnorm.jacobian.core import batched_grad, linearizable
from opnorm.jacobian.support import unsupported


def is_plain(m: nn.Module, cls: type) -> bool:
    """m is a cls whose forward is cls's own (a subclass overriding forward is unknown)."""
    return isinstance(m, cls) and type(m).forward is cls.forward


def has_hooks(m: nn.Module) -> bool:
    names = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return any(len(getattr(m, n, None) or ()) for n in names)


def global_hooks() -> bool:
    mod = torch.nn.modules.module
    names = (
        "_global_forward_hooks",
        "_global_forward_pre_hooks",
        "_global_backward_hooks",
        "_global_backward_pre_hooks",
    )
    return any(len(getattr(mod, n, None) or ()) for n in names)


def _lead(t: torch.Tensor) -> torch.Tensor:
    """(k, B, *s) -> (k * B, *s) for ops that take one batch dimension."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


class Step:
    """One module of the chain: ``forward`` records the pattern, then ``jvp`` / ``vjp``.

    ``jvp(t, owned)`` / ``vjp(g, owned)``: ``owned`` says the input is a temporary of the
    chain (not the caller's tensor), so the step may overwrite it. ``fresh``: the output
    is new memory (False for steps that may return a view of their input).
    """

    name: str
    fresh = True

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, rows: torch.Tensor) -> Step:
        """This step for the examples ``rows`` only (steps without per-example state are shared)."""
        return self

    def jvp(self, t: torch.Tensor, owned: bool) -> torch.Tensor:
        raise NotImplementedError

    def vjp(self, g: torch.Tensor, owned: bool) -> torch.Tensor:
        raise NotImplementedError


class LinearStep(Step):
    def __init__(self, m: nn.Linear, name: str):
        self.m, self.name = m, name

    def forward(self, h):
        self.w = self.m.weight.detach()
        return self.m(h)

    def jvp(self, t, owned):
        return F.linear(t, self.w)  # no bias: the tangent map is the linear part

    def vjp(self, g, owned):
        return g @ self.w


CONVOLUTIONS = {nn.Conv1d: (F.conv1d, F.conv_transpose1d), nn.Conv2d: (F.conv2d, F.conv_transpose2d)}


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


class ConvStep(Step):
    """Conv1d / Conv2d. 2-D maps run channels-last, in the recording pass too (faster CPU
    kernels, no reorders; the values equal model(x)'s up to float rounding)."""

    def __init__(self, m: nn.Module, name: str):
        self.m, self.name = m, name
        self.conv, self.conv_t = next(fns for cls, fns in CONVOLUTIONS.items() if isinstance(m, cls))
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
            g3 = (
                flat.permute(0, 2, 3, 1).reshape(n, -1, c).transpose(1, 2)
            )  # (N, C, H*W), a view of channels-last memory
            cols = self.w.reshape(c, -1).T @ g3  # (N, C_in * kh * kw, H*W)
            res = F.fold(cols, self.in_size, self.w.shape[2:], m.dilation, m.padding, m.stride)
        else:
            res = self.conv_t(flat, self.w, None, m.stride, m.padding, self.output_padding, m.groups, m.dilation)
        return res.view(g.shape[0], g.shape[1], *res.shape[1:])


class MaskStep(Step):
    """Elementwise piecewise-linear activations: ReLU (slope 0 / 1) and LeakyReLU.

    A ReLU right before a max-pool is folded into the pool (``folded``): max-pooling commutes
    with the ReLU (``pool(relu(h)) = relu(pool(h))``, and both pick the same argmax wherever
    the pooled value is > 0), so the pool runs on h and applies the ReLU and its mask
    ``pooled > 0`` at the pooled size, four times fewer entries for a 2x2 pool.
    """

    folded = False

    def __init__(self, m: nn.Module, name: str):
        self.m, self.name = m, name
        self._mask_cl: torch.Tensor | None = None

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


class MaxPoolStep(Step):
    """Max-pooling with x's argmax fixed: a gather forward, a scatter-add backward.

    2-D pools keep their tangents channels-last: gathers and scatters run along the
    spatial positions of (k, B, H*W, C) views.
    """

    def __init__(self, m: nn.Module, name: str):
        self.m, self.name = m, name
        self.pool = F.max_pool2d if isinstance(m, nn.MaxPool2d) else F.max_pool1d
        self.relu_mask: torch.Tensor | None = None  # set when a ReLU before it is folded in

    def forward(self, h):
        m = self.m
        self.is_2d = h.dim() == 4
        # channels-last: the same values and argmax, and a much faster CPU kernel than contiguous
        src = h.to(memory_format=torch.channels_last) if self.is_2d else h
        out, idx = self.pool(src, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, return_indices=True)
        self.in_shape, self.out_shape = h.shape[1:], out.shape[1:]
        if self.relu_mask is not None:  # the folded ReLU (see MaskStep)
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


class ScaleStep(Step):
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


class ReshapeStep(Step):
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


class AutogradStep(Step):
    """Any other module: its own local Jacobian by autograd (exact, just not faster)."""

    fresh = False  # autograd may hand back its incoming gradient unchanged

    def __init__(self, m: nn.Module, name: str, reason: str):
        self.m, self.name, self.reason = m, name, reason

    def forward(self, h):
        with torch.enable_grad(), linearizable():
            self.hin = h.detach().requires_grad_(True)
            out = self.m(self.hin.clone())  # clone: an in-place first op must not touch the leaf
            if not isinstance(out, torch.Tensor):
                raise TypeError(
                    f"module {self.name!r} returned {type(out).__name__}; a chain of modules must pass tensors"
                )
            self.out = out
            self.u = torch.zeros_like(out, requires_grad=True)
            jt = None
            if out.requires_grad:
                (jt,) = torch.autograd.grad(out, self.hin, grad_outputs=self.u, create_graph=True, allow_unused=True)
            self.jt = jt  # J^T u as a function of u: differentiating it in u gives J v
        return out.detach()

    def select(self, rows):
        step = AutogradStep(self.m, self.name, self.reason)
        step.forward(self.hin.detach()[rows])  # a new local graph for those examples
        return step

    def jvp(self, t, owned):
        if self.jt is None or not self.jt.requires_grad:  # J^T u constant in u: J = 0
            return torch.zeros(t.shape[0], *self.out.shape, dtype=t.dtype, device=t.device)
        try:
            return batched_grad(self.jt, self.u, t, strict=True)
        except (RuntimeError, NotImplementedError) as e:  # no double backward: forward mode
            errors: dict[str, BaseException] = {"autograd": e}
        try:
            with linearizable():
                return torch.stack([self._forward_mode(ti) for ti in t])
        except (RuntimeError, NotImplementedError) as e:
            errors["forward"] = e
        raise unsupported(self.m, self.hin.detach(), errors, self.name) from errors["forward"]

    def _forward_mode(self, t: torch.Tensor) -> torch.Tensor:
        with fwAD.dual_level():
            tangent = fwAD.unpack_dual(self.m(fwAD.make_dual(self.hin.detach(), t))).tangent
        return torch.zeros_like(self.out) if tangent is None else tangent

    def vjp(self, g, owned):
        return batched_grad(self.out, self.hin, g)


_MASKS = (nn.ReLU, nn.LeakyReLU)
_POOLS = (nn.MaxPool1d, nn.MaxPool2d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RESHAPES = (nn.Flatten, nn.Unflatten, nn.Identity)
# modules that draw noise in training mode and are the identity in eval mode
DROPOUTS: tuple[type, ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def recognize(m: nn.Module, name: str) -> Step | str:
    """The fast step for m, or the reason why m needs local autograd."""
    if has_hooks(m):
        return "has hooks (they could change its output or gradient)"
    if is_plain(m, nn.Linear):
        return LinearStep(m, name)
    if any(is_plain(m, c) for c in CONVOLUTIONS):
        if m.padding_mode != "zeros" or isinstance(m.padding, str):
            return (
                f"convolution with padding_mode={m.padding_mode!r}, padding={m.padding!r} "
                "(only numeric zero padding is replayed)"
            )
        return ConvStep(m, name)
    if any(is_plain(m, c) for c in _MASKS):
        return MaskStep(m, name)
    if any(is_plain(m, c) for c in _POOLS):
        if m.return_indices:
            return "max-pool with return_indices=True returns a tuple"
        return MaxPoolStep(m, name)
    if any(is_plain(m, c) for c in _NORMS):
        if m.training or m.running_var is None:
            return "BatchNorm that uses batch statistics (training mode or track_running_stats=False) mixes examples"
        return ScaleStep(m, name)
    if any(is_plain(m, c) for c in _RESHAPES):
        return ReshapeStep(m, name)
    if any(is_plain(m, c) for c in DROPOUTS):
        if m.training:
            return "dropout in training mode is random"
        return ReshapeStep(m, name)
    if is_plain(m, nn.Sequential):
        return "nested Sequential"  # expanded by the caller
    return f"{type(m).__name__} is not a recognized piecewise-linear module"
