"""The gradient-norm penalty reduction: ``weight * mean_i phi(||grads_i||_2)``.

``phi(n) = |n - center|^p``, or ``max(0, n - center)^p`` when ``one_sided``; ``n_i`` is the L2
norm of sample i's gradient over all non-batch dims. This one formula is WGAN-GP (center 1, p 2),
WGAN-div (center 0, p 6), R1/R2 (center 0, p 2), DRAGAN and 0-GP; see ``wgan_kernels.losses``
for the presets.

Layers (one file): Triton kernels (CUDA) / the extension's CPU kernel (``csrc/cpu/penalty.cpp``)
do the forward (norms + penalty) and the backward (a per-row scale times the row) in one pass
over the gradients each (the Triton forward splits long rows across programs, then finishes the
norms in one small launch), accumulating in float32 (float64 for float64 input); ``_GradNormPenalty`` is the autograd
Function, whose backward is itself a Function (``_GradNormPenaltyGrad``) with an analytic,
differentiable backward, so the op is twice (and more) differentiable; ``grad_norm_penalty_reference``
is the plain-PyTorch oracle.

Gradient order: first derivative by the fused kernels; second and higher by plain torch ops.
At ``n_i = 0`` the gradient is defined: ``d phi / d grads_i = phi'(n_i) / n_i * grads_i`` with
``phi'(n)/n`` taken as ``p * n^(p-2)`` when center is 0 and p >= 2 (exact, 0 or 2 at n = 0), and as
``phi'(n) / max(n, EPS)`` otherwise (``EPS = 1e-12``); since ``grads_i = 0`` there, the gradient is 0.
"""

from __future__ import annotations


import torch

from .._backend import BACKENDS, compiling, extension, resolve
from .._checks import FLOAT32_MAX, acc_dtype, check_float_dtype, finite_real
from .._triton import next_power_of_2, tl, triton

__all__ = ["grad_norm_penalty", "grad_norm_penalty_reference", "EPS"]

EPS = 1e-12


# ----------------------------------------------------------------------------- checks


def _check_grads(grads) -> None:
    if not isinstance(grads, torch.Tensor):
        raise ValueError(f"grads: expected a tensor, got {type(grads).__name__}")
    check_float_dtype(grads, "grads")
    if grads.dim() < 1 or grads.shape[0] == 0:
        raise ValueError(f"grads: expected shape (B, ...) with B >= 1, got {tuple(grads.shape)} (empty batch)")


def check_parameters(weight, center, p, one_sided) -> tuple[float, float, float, bool]:
    """The penalty's hyper-parameters as ``(weight, center, p, one_sided)`` floats and a bool,
    or a ValueError naming the first bad one: finite real numbers (numpy scalars too, no bools)
    within float32's range (the float32 kernels and the reference convert them to float32: a
    weight of 1e39 would be inf there, and inf * 0 = NaN where the penalty is 0), ``weight >= 0``,
    ``p > 1``, ``one_sided`` a bool. ``wgan_kernels.losses`` checks its presets' overrides with
    the same rules."""
    weight = finite_real("weight", weight, low=0.0, max_abs=FLOAT32_MAX)
    center = finite_real("center", center, max_abs=FLOAT32_MAX)
    p = finite_real("p", p, low=1.0, low_inclusive=False, max_abs=FLOAT32_MAX)
    if not isinstance(one_sided, bool):
        raise ValueError(f"one_sided: expected a bool, got {one_sided!r}")
    return weight, center, p, one_sided


def _check_args(grads, weight, center, p, one_sided) -> tuple[float, float, float, bool]:
    _check_grads(grads)
    return check_parameters(weight, center, p, one_sided)




# ----------------------------------------------------------------------------- reference


def _phi(n, center, p, one_sided):
    d = n - center
    return (d.clamp_min(0) if one_sided else d.abs()).pow(p)


def _rows(grads: torch.Tensor) -> torch.Tensor:
    """``grads`` as (B, numel / B): one row per sample, also for 1-D grads (B,) (``flatten(1)``
    refuses those)."""
    return grads.reshape(grads.shape[0], -1)


def grad_norm_penalty_reference(grads, *, weight: float, center: float, p: float, one_sided: bool = False):
    """Plain PyTorch: ``weight * mean_i phi(||grads_i||)`` in float32 (float64 for float64 input),
    the norm over all non-batch dims of ``grads`` (B, ...); for 1-D grads (B,) each sample's
    gradient is a scalar and its norm ``|grads_i|``. Differentiable by autograd (its gradient is
    NaN at n_i = 0)."""
    g = _rows(grads).to(acc_dtype(grads.dtype))
    return weight * _phi(g.pow(2).sum(1).sqrt(), center, p, one_sided).mean()


def _scale(n, center, p, one_sided):
    """a(n) = phi'(n) / n in its safe form (see the module docstring); differentiable in n."""
    if center == 0 and p >= 2:
        return torch.full_like(n, 2.0) if p == 2 else p * n.pow(p - 2)
    d = n - center
    dphi = p * (d.clamp_min(0).pow(p - 1) if one_sided else d.abs().pow(p - 1) * d.sign())
    return dphi / n.clamp_min(EPS)


def _scale_derivative_over_n(n, center, p, one_sided):
    """a'(n) / n, the extra term of the second derivative."""
    if center == 0 and p >= 2:
        return torch.zeros_like(n) if p == 2 else p * (p - 2) * n.clamp_min(EPS).pow(p - 4)
    d = n - center
    if one_sided:  # 0 where the penalty is inactive (0 ** 0 would give 1 at p = 2)
        d2phi = torch.where(d > 0, p * (p - 1) * d.clamp_min(0).pow(p - 2), torch.zeros_like(d))
    else:
        d2phi = p * (p - 1) * d.abs().pow(p - 2)
    nc = n.clamp_min(EPS)
    return (d2phi - _scale(n, center, p, one_sided)) / (nc * nc)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    # Float arguments are annotated tl.float64: left bare, a compiled kernel takes a Python float as
    # float32, which rounds center = 0.4 (say) before a float64 input's norms are compared with it.
    # Each kernel converts them once to its accumulation type (tl.full keeps float64 exact under the
    # interpreter too, where tl.cast of a Python float goes through float32).
    # NaN propagates as in the reference: `where(x > 0, ..., 0)` and tl.maximum (fmax on a GPU)
    # would each turn a NaN norm into a penalty of 0.

    @triton.jit
    def _pow_pos(x, e):
        # x ** e for x >= 0, e > 0: 0 at x = 0, NaN for NaN
        return tl.where(x > 0, tl.exp2(e * tl.log2(tl.maximum(x, 1e-30))), x * 0.0)

    @triton.jit
    def _phi_device(n, center_arg, p_arg, ONE_SIDED: tl.constexpr):
        # |n - center|^p, or max(0, n - center)^p, in n's dtype
        d = n - tl.full([], center_arg, n.dtype)
        d = tl.maximum(d, 0.0, propagate_nan=tl.PropagateNan.ALL) if ONE_SIDED else tl.abs(d)
        return _pow_pos(d, tl.full([], p_arg, n.dtype))

    @triton.jit
    def _penalty_fwd_kernel(g_ptr, norms_ptr, phi_ptr, cols, center_arg: tl.float64, p_arg: tl.float64,
                            ONE_SIDED: tl.constexpr, ACC_F64: tl.constexpr, BLOCK: tl.constexpr):
        # one program per row (rows of up to _SPLIT_COLS values)
        row = tl.program_id(0).to(tl.int64)
        base = g_ptr + row * cols
        acc_t = tl.float64 if ACC_F64 else tl.float32
        acc = tl.zeros([BLOCK], dtype=acc_t)
        for start in range(0, cols, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < cols, other=0.0).to(acc_t)
            acc += x * x
        n = tl.sqrt(tl.sum(acc, axis=0))
        tl.store(norms_ptr + row, n)
        tl.store(phi_ptr + row, _phi_device(n, center_arg, p_arg, ONE_SIDED))

    @triton.jit
    def _penalty_partial_kernel(g_ptr, partial_ptr, cols, chunk, ACC_F64: tl.constexpr, BLOCK: tl.constexpr):
        # long rows: program (row, j) sums the squares of values [j * chunk, (j + 1) * chunk) of the
        # row into partial[row, j] (chunk is a multiple of BLOCK)
        row = tl.program_id(0).to(tl.int64)
        j = tl.program_id(1)
        base = g_ptr + row * cols + j.to(tl.int64) * chunk
        left = cols - j.to(tl.int64) * chunk
        acc_t = tl.float64 if ACC_F64 else tl.float32
        acc = tl.zeros([BLOCK], dtype=acc_t)
        for start in range(0, chunk, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(base + offs, mask=offs < left, other=0.0).to(acc_t)
            acc += x * x
        tl.store(partial_ptr + row * tl.num_programs(1) + j, tl.sum(acc, axis=0))

    @triton.jit
    def _penalty_finish_kernel(partial_ptr, norms_ptr, phi_ptr, rows, splits, center_arg: tl.float64,
                               p_arg: tl.float64, ONE_SIDED: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                               BLOCK_SPLITS: tl.constexpr):
        # long rows: norm and phi of BLOCK_ROWS rows from their partial sums (in the partials' dtype)
        r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        sq = tl.zeros([BLOCK_ROWS], dtype=partial_ptr.dtype.element_ty)
        for j0 in range(0, splits, BLOCK_SPLITS):
            j = j0 + tl.arange(0, BLOCK_SPLITS)
            mask = (r[:, None] < rows) & (j[None, :] < splits)
            sq += tl.sum(tl.load(partial_ptr + r[:, None] * splits + j[None, :], mask=mask, other=0.0), axis=1)
        n = tl.sqrt(sq)
        tl.store(norms_ptr + r, n, mask=r < rows)
        tl.store(phi_ptr + r, _phi_device(n, center_arg, p_arg, ONE_SIDED), mask=r < rows)

    @triton.jit
    def _penalty_bwd_kernel(g_ptr, out_ptr, norms_ptr, grad_out_ptr, cols, weight_over_rows_arg: tl.float64,
                            center_arg: tl.float64, p_arg: tl.float64, eps_arg: tl.float64,
                            ONE_SIDED: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
        # MODE 0: center 0 and p == 2 (a = 2); 1: center 0 and p > 2 (a = p n^(p-2)); 2: general.
        row = tl.program_id(0).to(tl.int64)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        n = tl.load(norms_ptr + row)
        acc_t = n.dtype
        p = tl.full([], p_arg, acc_t)
        if MODE == 0:
            a = n * 0.0 + 2.0
        elif MODE == 1:
            a = p * _pow_pos(n, p - 2.0)
        else:
            d = n - tl.full([], center_arg, acc_t)
            if ONE_SIDED:
                dphi = p * _pow_pos(tl.maximum(d, 0.0, propagate_nan=tl.PropagateNan.ALL), p - 1.0)
            else:
                sign = (d > 0).to(acc_t) - (d < 0).to(acc_t)  # in acc_t: no float32 value in a float64 kernel
                dphi = sign * p * _pow_pos(tl.abs(d), p - 1.0)
            a = dphi / tl.maximum(n, tl.full([], eps_arg, acc_t))
        c = tl.load(grad_out_ptr).to(acc_t) * tl.full([], weight_over_rows_arg, acc_t) * a
        mask = offs < cols
        x = tl.load(g_ptr + row * cols + offs, mask=mask, other=0.0)
        tl.store(out_ptr + row * cols + offs, (c * x.to(acc_t)).to(x.dtype), mask=mask)


# Rows longer than this are split across programs (a partial sum each, then one small launch for
# the norms and phi): one program per row would leave most of a GPU idle at batch 64.
_SPLIT_COLS = 8192
# Block sizes: a few fixed ones (each variant compiled and checked for spills by
# tests/test_triton_compile.py), not one per power of two.
_SPLIT_BLOCK = 4096
_FINISH_TILE = (64, 16)  # rows x partial sums per step of the finishing launch


def _block(cols: int, largest: int) -> int:
    """128, 1024 or ``largest`` values per step: the smallest that covers ``cols``, else ``largest``."""
    return next((b for b in (128, 1024) if cols <= b < largest), largest)


def _triton_forward(g2, center, p, one_sided):
    rows, cols = g2.shape
    acc = acc_dtype(g2.dtype)
    norms = torch.empty(rows, device=g2.device, dtype=acc)
    phi = torch.empty(rows, device=g2.device, dtype=acc)
    if cols <= _SPLIT_COLS:
        _penalty_fwd_kernel[(rows,)](g2, norms, phi, cols, center, p, ONE_SIDED=one_sided,
                                     ACC_F64=acc == torch.float64, BLOCK=_block(cols, 4096))
        return phi, norms
    block = min(_SPLIT_BLOCK, next_power_of_2(_SPLIT_COLS))
    chunk = triton.cdiv(max(_SPLIT_COLS, triton.cdiv(cols, 65535)), block) * block  # grid dim 1 <= 65535
    splits = triton.cdiv(cols, chunk)
    partial = torch.empty(rows, splits, device=g2.device, dtype=acc)
    _penalty_partial_kernel[(rows, splits)](g2, partial, cols, chunk, ACC_F64=acc == torch.float64, BLOCK=block)
    block_rows, block_splits = _FINISH_TILE
    _penalty_finish_kernel[(triton.cdiv(rows, block_rows),)](partial, norms, phi, rows, splits, center, p,
                                                             ONE_SIDED=one_sided, BLOCK_ROWS=block_rows,
                                                             BLOCK_SPLITS=block_splits)
    return phi, norms


def _triton_backward(g2, norms, grad_out, weight, center, p, one_sided):
    rows, cols = g2.shape
    out = torch.empty_like(g2)
    block = _block(cols, 1024)
    mode = 0 if (center == 0 and p == 2) else (1 if (center == 0 and p > 2) else 2)
    grid = (rows, triton.cdiv(cols, block))
    # one_sided only matters in MODE 2 (at center 0 both forms are n^p): one variant fewer to compile
    _penalty_bwd_kernel[grid](g2, out, norms, grad_out.reshape(1).to(norms.dtype), cols, weight / rows, center, p, EPS,
                              ONE_SIDED=one_sided and mode == 2, MODE=mode, BLOCK=block)
    return out


# ----------------------------------------------------------------------------- extension ops
# The CPU kernels registered as torch.library custom ops (with fake kernels), so torch.compile
# traces through them without a graph break.


@torch.library.custom_op("wgan_kernels::penalty_forward_cpu", mutates_args=())
def _penalty_forward_cpu(g2: torch.Tensor, weight: float, center: float, p: float, one_sided: bool,
                         eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    penalty, norms = extension().penalty_forward(g2, weight, center, p, one_sided, eps)
    return penalty, norms


@_penalty_forward_cpu.register_fake
def _(g2, weight, center, p, one_sided, eps):
    acc = acc_dtype(g2.dtype)
    return g2.new_empty((), dtype=acc), g2.new_empty((g2.shape[0],), dtype=acc)


@torch.library.custom_op("wgan_kernels::penalty_backward_cpu", mutates_args=())
def _penalty_backward_cpu(g2: torch.Tensor, norms: torch.Tensor, grad_penalty: torch.Tensor, weight: float,
                          center: float, p: float, one_sided: bool, eps: float) -> torch.Tensor:
    return extension().penalty_backward(g2, norms, float(grad_penalty), weight, center, p, one_sided, eps)


@_penalty_backward_cpu.register_fake
def _(g2, norms, grad_penalty, weight, center, p, one_sided, eps):
    return torch.empty_like(g2)


# ----------------------------------------------------------------------------- autograd


def _penalty_grad_kernel(grads, norms, grad_penalty, spec):
    """``grad_penalty * weight / B * a(n_i) * grads_i`` by the fused kernel of ``spec``'s backend."""
    weight, center, p, one_sided, backend = spec
    rows = grads.shape[0]
    g2 = grads.reshape(rows, -1).contiguous()
    if backend == "cpp":
        if compiling():
            out = _penalty_backward_cpu(g2, norms, grad_penalty.detach(), weight, center, p, one_sided, EPS)
        else:
            out = extension().penalty_backward(g2, norms, float(grad_penalty), weight, center, p, one_sided, EPS)
    else:
        out = _triton_backward(g2, norms, grad_penalty, weight, center, p, one_sided)
    return out.view(grads.shape)


class _GradNormPenalty(torch.autograd.Function):
    """(penalty, norms) from grads; backward by the fused kernel of the same backend."""

    @staticmethod
    def forward(ctx, grads, weight, center, p, one_sided, backend):
        rows = grads.shape[0]
        g2 = grads.reshape(rows, -1).contiguous()
        if backend == "cpp":
            # the custom op when compiling (traceable); the extension directly in eager mode
            # (the custom op's Python dispatch costs ~0.1 ms a call, more than the kernel on small inputs)
            forward = _penalty_forward_cpu if compiling() else extension().penalty_forward
            penalty, norms = forward(g2, weight, center, p, one_sided, EPS)
        else:  # triton
            phi, norms = _triton_forward(g2, center, p, one_sided)
            penalty = phi.sum() * (weight / rows)
        ctx.save_for_backward(grads, norms)
        ctx.spec = (weight, center, p, one_sided, backend)
        ctx.mark_non_differentiable(norms)
        return penalty, norms

    @staticmethod
    def backward(ctx, grad_penalty, _grad_norms):
        grads, norms = ctx.saved_tensors
        if torch.is_grad_enabled() or compiling():  # create_graph: a differentiable node
            d_grads = _GradNormPenaltyGrad.apply(grads, norms, grad_penalty, ctx.spec)
        else:  # a first-order backward (the explicit path): the kernel alone, no node to build
            d_grads = _penalty_grad_kernel(grads, norms, grad_penalty, ctx.spec)
        return d_grads, None, None, None, None, None


class _GradNormPenaltyGrad(torch.autograd.Function):
    """grad_in = grad_penalty * weight / B * a(n_i) * grads_i, by the fused kernel; its own
    backward is analytic (plain torch ops), so higher derivatives exist."""

    @staticmethod
    def forward(ctx, grads, norms, grad_penalty, spec):
        ctx.save_for_backward(grads, grad_penalty)
        ctx.spec = spec
        return _penalty_grad_kernel(grads, norms, grad_penalty, spec)

    @staticmethod
    def backward(ctx, grad_out):
        grads, grad_penalty = ctx.saved_tensors
        weight, center, p, one_sided, _ = ctx.spec
        rows = grads.shape[0]
        acc = acc_dtype(grads.dtype)
        g = grads.reshape(rows, -1).to(acc)
        gg = grad_out.reshape(rows, -1).to(acc)
        n = g.pow(2).sum(1).sqrt()
        a = _scale(n, center, p, one_sided)
        inner = (gg * g).sum(1)  # <G_i, g_i>
        d_grad_penalty = (weight / rows) * (a * inner).sum()
        s = grad_penalty.to(acc) * (weight / rows)
        d_grads = s * (a[:, None] * gg + (_scale_derivative_over_n(n, center, p, one_sided) * inner)[:, None] * g)
        return d_grads.to(grads.dtype).view(grads.shape), None, d_grad_penalty.to(grad_penalty.dtype), None


# ----------------------------------------------------------------------------- public


def grad_norm_penalty_and_norms(grads, *, weight: float, center: float, p: float, one_sided: bool = False,
                                backend: str | None = None):
    """``(penalty, norms)``: the penalty of ``grad_norm_penalty`` and the per-sample norms
    (float32/float64, not differentiable) it computed on the way, for logging."""
    weight, center, p, one_sided = _check_args(grads, weight, center, p, one_sided)
    if backend is not None and not isinstance(backend, str):  # (resolve compares names: an array would be ambiguous)
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    chosen = resolve("grad_norm_penalty", grads.device, backend)
    if chosen == "reference":
        with torch.no_grad():
            norms = _rows(grads.detach()).to(acc_dtype(grads.dtype)).norm(dim=1)
        return grad_norm_penalty_reference(grads, weight=weight, center=center, p=p, one_sided=one_sided), norms
    return _GradNormPenalty.apply(grads, weight, center, p, one_sided, chosen)


def grad_norm_penalty(grads, *, weight: float, center: float, p: float, one_sided: bool = False,
                      backend: str | None = None):
    """``weight * mean_i phi(||grads_i||_2)`` with ``phi(n) = |n - center|^p`` (or
    ``max(0, n - center)^p`` if ``one_sided``), the norm over all non-batch dims of ``grads``
    (shape (B, ...); for 1-D grads (B,) each sample's gradient is a scalar, its norm
    ``|grads_i|``), accumulated in float32 whatever the input dtype; returns a 0-d float32
    tensor (float64 for float64 input). Differentiable (twice and more) w.r.t. ``grads``.

    ``weight`` (>= 0), ``center``, ``p`` (> 1): finite real numbers (numpy scalars too) within
    float32's range; ``one_sided``: a bool. Anything else is a ValueError naming the argument,
    the same on every backend.

    ``backend``: ``"auto"``, ``"triton"`` (CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"cpp"``
    (CPU), ``"reference"``.
    """
    return grad_norm_penalty_and_norms(grads, weight=weight, center=center, p=p, one_sided=one_sided,
                                       backend=backend)[0]
