"""Activation masks for the explicit input-gradient chain: (bias +) leaky ReLU saving a 1-byte mask.

On the explicit path (``wgan_kernels.nn``) a LeakyReLU/ReLU layer contributes twice to a critic
step: its forward ``y = act(z)`` and, in the input-gradient chain, ``dz = dy * act'(z)``. Both
backward passes of the step (the loss through ``y``, the penalty through ``dz``) then multiply by
the same ``act'(z)``, which only depends on ``mask = z > 0``. So two small ops cover it:

- ``leaky_relu_with_mask(z, negative_slope, bias=None) -> (y, mask)``: ``y = leaky_relu(z + b)``
  (``b`` broadcast along dim 1, the channel dim of (N, C, ...) and the feature dim of (B, F))
  and ``mask = (z + b) > 0`` as ``torch.bool``. The bias add is fused: a convolution run without
  its bias, then this, replaces conv + bias add + activation (three passes over the output) by
  conv + one pass. Differentiable in ``z`` and ``b``; the mask is not differentiable.
- ``masked_scale(g, mask, negative_slope) -> where(mask, g, negative_slope * g)``: the
  activation's vector-Jacobian product. Linear in ``g`` and self-adjoint, so its backward is the
  same kernel: derivatives of every order exist.

Saving the 1-byte mask instead of the 2-4 byte pre-activation lets autograd free ``z``.
The Triton kernels (CUDA; CPU tensors under ``TRITON_INTERPRET=1``) compute in float32 (float64
for float64) and round once, like torch's own kernels. On CPU the blocks keep aten's
``leaky_relu_backward`` on the saved input (already one vectorised pass), and under
``torch.compile`` the references run so inductor fuses them with their neighbours itself. The
references below are the test oracle.
"""

from __future__ import annotations

import torch

from .._backend import BACKENDS, compiling, resolve
from .._checks import FLOAT32_MAX, acc_dtype, check_float_dtype, finite_real
from .._triton import next_power_of_2, tl, triton

__all__ = ["leaky_relu_with_mask", "leaky_relu_with_mask_reference", "masked_scale", "masked_scale_reference"]

OP = "activation_mask"
_BLOCK = 1024


# ----------------------------------------------------------------------------- checks


def _check_float(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
    check_float_dtype(t, name)


def _check_slope(negative_slope) -> float:
    # |slope| within float32's range: torch's leaky_relu refuses a slope that overflows its float
    # conversion, and a float32/float16 kernel would turn it into inf (0 * inf = NaN where g = 0)
    return finite_real("negative_slope", negative_slope, max_abs=FLOAT32_MAX)


def _check_bias(x: torch.Tensor, bias) -> None:
    if bias is None:
        return
    _check_float("bias", bias)
    if x.dim() < 2:
        raise ValueError(f"bias: needs x of shape (N, C, ...) to broadcast along dim 1, got x of shape {tuple(x.shape)}")
    if bias.shape != (x.shape[1],):
        raise ValueError(f"bias: expected shape ({x.shape[1]},) (x's dim 1), got {tuple(bias.shape)}")
    if bias.dtype != x.dtype or bias.device != x.device:
        raise ValueError(f"bias: expected x's dtype and device ({x.dtype}, {x.device}), got ({bias.dtype}, {bias.device})")


def _check_backend_type(backend) -> None:
    if backend is not None and not isinstance(backend, str):  # (resolve compares names: an array would be ambiguous)
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _check_mask(g: torch.Tensor, mask) -> None:
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask: expected a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise ValueError(f"mask: expected a torch.bool tensor, got {mask.dtype}")
    if mask.shape != g.shape:
        raise ValueError(f"mask: expected the shape of g {tuple(g.shape)}, got {tuple(mask.shape)}")
    if mask.device != g.device:
        raise ValueError(f"mask: expected g's device {g.device}, got {mask.device}")


# ----------------------------------------------------------------------------- references


def _bias_view(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return bias.view((1, -1) + (1,) * (x.dim() - 2))


def leaky_relu_with_mask_reference(x, negative_slope: float = 0.01, bias=None):
    """Plain PyTorch: ``z = x + b`` (dim 1), ``(leaky_relu(z), z > 0)``."""
    z = x if bias is None else x + _bias_view(x, bias)
    return torch.nn.functional.leaky_relu(z, negative_slope), z > 0


def masked_scale_reference(g, mask, negative_slope: float):
    """Plain PyTorch: ``where(mask, g, negative_slope * g)``."""
    return torch.where(mask, g, g * negative_slope)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    # slope is annotated tl.float64 (a bare Python float would reach a compiled kernel as float32,
    # inexact for float64 input) and converted once to the compute type. Offsets are 32-bit unless
    # the tensor has 2^31 - BLOCK elements or more (INDEX64): 64-bit integer division costs tens of
    # instructions per element, and the flat bias path divides twice.

    @triton.jit
    def _leaky_relu_mask_kernel(x_ptr, b_ptr, y_ptr, mask_ptr, n, inner, channels, slope_arg: tl.float64,
                                HAS_BIAS: tl.constexpr, PLANES: tl.constexpr, INDEX64: tl.constexpr,
                                F64: tl.constexpr, BLOCK: tl.constexpr):
        # PLANES (with a bias, planes of `inner` values): a channel-aware grid, program (plane, block)
        # with plane = sample * channels + channel, so the bias is one scalar per program; otherwise
        # a flat grid over the n values, the channel (offs // inner) % channels per value.
        acc_t = tl.float64 if F64 else tl.float32
        slope = tl.full([], slope_arg, acc_t)
        if PLANES:
            plane = tl.program_id(0)
            within = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
            inside = within < inner
            if INDEX64:
                offs = plane.to(tl.int64) * inner + within
            else:
                offs = plane * inner + within
        else:
            if INDEX64:
                offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            else:
                offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            inside = offs < n
        x = tl.load(x_ptr + offs, mask=inside, other=0.0)
        z = x.to(acc_t)
        if HAS_BIAS:
            if PLANES:
                b = tl.load(b_ptr + plane % channels)
            else:
                b = tl.load(b_ptr + (offs // inner) % channels, mask=inside, other=0.0)
            z = (z + b.to(acc_t)).to(x.dtype).to(acc_t)
        positive = z > 0
        y = tl.where(positive, z, z * slope)
        tl.store(y_ptr + offs, y.to(x.dtype), mask=inside)
        tl.store(mask_ptr + offs, positive.to(tl.uint8), mask=inside)

    @triton.jit
    def _masked_scale_kernel(g_ptr, mask_ptr, out_ptr, n, slope_arg: tl.float64, INDEX64: tl.constexpr,
                             F64: tl.constexpr, BLOCK: tl.constexpr):
        acc_t = tl.float64 if F64 else tl.float32
        slope = tl.full([], slope_arg, acc_t)
        if INDEX64:
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        else:
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offs < n
        g = tl.load(g_ptr + offs, mask=inside, other=0.0).to(acc_t)
        m = tl.load(mask_ptr + offs, mask=inside, other=0)
        out = tl.where(m != 0, g, g * slope)
        tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=inside)


# The bias path takes the channel-aware grid for planes of at least this many values (below, a
# block would be mostly masked off); a plane's block is then the plane's size up to _BLOCK.
_PLANE_MIN = 256


def _index64(n: int) -> bool:
    return n + _BLOCK > 2**31 - 1


def _triton_leaky_relu_mask(x, bias, slope):
    x = x.contiguous()
    y = torch.empty_like(x)
    mask = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    n = x.numel()
    inner = 1 if x.dim() < 3 else x[0, 0].numel()
    channels = x.shape[1] if x.dim() >= 2 else 1
    b = bias.contiguous() if bias is not None else x  # unused pointer when there is no bias
    planes = bias is not None and inner >= _PLANE_MIN and triton.cdiv(inner, _BLOCK) <= 65535  # (grid dim 1 limit)
    block = min(_BLOCK, next_power_of_2(inner)) if planes else _BLOCK
    grid = (n // inner, triton.cdiv(inner, block)) if planes else (triton.cdiv(n, block),)
    _leaky_relu_mask_kernel[grid](x, b, y, mask, n, inner, channels, slope, HAS_BIAS=bias is not None, PLANES=planes,
                                  INDEX64=_index64(n), F64=x.dtype == torch.float64, BLOCK=block)
    return y, mask.view(torch.bool)


def _triton_masked_scale(g, mask, slope):
    g = g.contiguous()
    out = torch.empty_like(g)
    n = g.numel()
    _masked_scale_kernel[(triton.cdiv(n, _BLOCK),)](g, mask.contiguous().view(torch.uint8), out, n, slope,
                                                     INDEX64=_index64(n), F64=g.dtype == torch.float64, BLOCK=_BLOCK)
    return out


# ----------------------------------------------------------------------------- autograd


class _MaskedScale(torch.autograd.Function):
    """``where(mask, g, slope g)``; linear and self-adjoint, so the backward is itself."""

    @staticmethod
    def forward(ctx, g, mask, slope):
        ctx.save_for_backward(mask)
        ctx.slope = slope
        return _triton_masked_scale(g, mask, slope)

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        return _MaskedScale.apply(grad_out, mask, ctx.slope), None, None


class _LeakyReLUWithMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, slope):
        y, mask = _triton_leaky_relu_mask(x, bias, slope)
        ctx.save_for_backward(mask)
        ctx.slope = slope
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mask)
        return y, mask

    @staticmethod
    def backward(ctx, grad_y, _grad_mask):
        (mask,) = ctx.saved_tensors
        grad_x = _MaskedScale.apply(grad_y, mask, ctx.slope)
        grad_b = None
        if ctx.has_bias and ctx.needs_input_grad[1]:
            dims = [0] + list(range(2, grad_x.dim()))
            acc = acc_dtype(grad_x.dtype)
            grad_b = grad_x.sum(dims, dtype=acc).to(grad_x.dtype)
        return grad_x, grad_b, None


# ----------------------------------------------------------------------------- public


def leaky_relu_with_mask(x, negative_slope: float = 0.01, bias=None, *, backend: str | None = None):
    """``(leaky_relu(x + bias, negative_slope), (x + bias) > 0)``: ``bias`` (optional, shape (C,))
    broadcast along dim 1 of ``x`` (N, C, ...), the mask a ``torch.bool`` tensor of ``x``'s shape.
    ReLU is ``negative_slope=0``. Differentiable w.r.t. ``x`` and ``bias``.

    ``backend``: ``"auto"``, ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"reference"``.
    """
    _check_float("x", x)
    slope = _check_slope(negative_slope)
    _check_bias(x, bias)
    if x.numel() == 0:
        raise ValueError(f"x: expected a non-empty tensor, got shape {tuple(x.shape)}")
    _check_backend_type(backend)
    if compiling() or resolve(OP, x.device, backend) == "reference":
        return leaky_relu_with_mask_reference(x, slope, bias)
    return _LeakyReLUWithMask.apply(x, bias, slope)


def masked_scale(g, mask, negative_slope: float, *, backend: str | None = None):
    """``where(mask, g, negative_slope * g)``: the vector-Jacobian product of a leaky ReLU whose
    ``mask`` came from ``leaky_relu_with_mask``. Differentiable (to every order) w.r.t. ``g``.

    ``backend``: ``"auto"``, ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"reference"``.
    """
    _check_float("g", g)
    _check_mask(g, mask)
    slope = _check_slope(negative_slope)
    _check_backend_type(backend)
    if compiling() or resolve(OP, g.device, backend) == "reference":
        return masked_scale_reference(g, mask, slope)
    return _MaskedScale.apply(g, mask, slope)
