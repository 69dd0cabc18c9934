"""Spectral normalisation, the op: batched power iteration (``power_iteration_``).

Math (as ``torch.nn.utils.parametrizations.spectral_norm``): for a 2-D weight W (m x n) with
vectors u (m) and v (n), repeat n_power_iterations times { u = normalize(W v); v = normalize(W^T u) }
with ``normalize(x) = x / max(||x||, eps)``, then ``sigma = u . (W v)`` and the layer uses W / sigma.
sigma is differentiable w.r.t. W only (u and v are constants: d sigma / dW = u v^T).

Layers (one file):
  - kernels: Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``) reading pointer / shape /
    stride tables: ONE launch per (device, dtype) group of small weights (one program per weight),
    or, when a weight is large, 2 launches per iteration with several programs per weight; the
    extension's CPU kernel (``csrc/cpu/spectral_norm.cpp``, ``wgan_kernels._C.power_iteration_``).
    Both accumulate in float32 (float64 for float64 weights) and return sigma.
  - ``_Sigmas``: the autograd Function that attaches a kernel's sigmas to their W (gradient
    ``g * u v^T``, written with torch ops so it is itself differentiable, e.g. under a double
    backward), one node per (device, dtype) group.
  - ``power_iteration_reference_``: plain PyTorch, the same ops as torch's parametrization; the
    oracle and the fallback.
  - ``power_iteration_``: the public op (checks, dispatch through ``wgan_kernels._backend``).
  - ``initial_vectors``: the u, v of a new layer (torch's random draws and warm-up iterations).

The modules on top (``SpectralNorm``, ``spectral_norm``, the SN blocks, ``spectral_norm_all``)
live in ``wgan_kernels/nn/spectral.py``; this module imports nothing from ``wgan_kernels.nn``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import compiling, extension, resolve
from .._checks import (SELF_OVERLAPPING, acc_dtype, check_backend, check_float_dtype, check_not_inference, finite_number,
                       has_internal_overlap, overlapping_pair, positive_int, tensor_list)
from .._triton import tl, triton

__all__ = [
    "initial_vectors",
    "power_iteration_",
    "power_iteration_reference_",
]



# ----------------------------------------------------------------------------- checks


def check_iterations(n_power_iterations) -> int:
    return positive_int("n_power_iterations", n_power_iterations)


def check_eps(eps) -> float:
    return finite_number("eps", eps, low=0, low_inclusive=False)


def check_eps_fits(eps: float, dtype: torch.dtype, weight: str) -> None:
    """The reference (torch's ``F.normalize``) clamps norms to eps in the weight's dtype and
    refuses an eps beyond that dtype's range (1e5 for float16); so do the kernels."""
    if eps > 65504.0 and dtype.is_floating_point and eps > torch.finfo(dtype).max:
        raise ValueError(f"eps: expected a number <= {torch.finfo(dtype).max} (the largest {dtype} value, the dtype "
                         f"of {weight}), got {eps!r}")


def _check_inputs(weights, us, vs, n_power_iterations, eps):
    n = check_iterations(n_power_iterations)
    eps = check_eps(eps)
    weights, us, vs = tensor_list(weights, "weights"), tensor_list(us, "us"), tensor_list(vs, "vs")
    if not (len(us) == len(weights) == len(vs)):
        raise ValueError(f"us, vs: expected one u and one v per weight, got {len(weights)} weights, {len(us)} us, "
                         f"{len(vs)} vs")
    for i, (w, u, v) in enumerate(zip(weights, us, vs)):
        if w.dim() != 2:
            raise ValueError(f"weights[{i}]: expected a 2-D matrix, got shape {tuple(w.shape)} (flatten conv weights "
                             "first; 1-D weights are not supported)")
        check_float_dtype(w, f"weights[{i}]")
        check_eps_fits(eps, w.dtype, f"weights[{i}]")
        for name, t, length in (("us", u, w.shape[0]), ("vs", v, w.shape[1])):
            if t.shape != (length,) or t.dtype != w.dtype or t.device != w.device:
                raise ValueError(f"{name}[{i}]: expected a 1-D tensor of {length} values, dtype {w.dtype}, device "
                                 f"{w.device} to match weights[{i}] {tuple(w.shape)}, got {tuple(t.shape)}, "
                                 f"{t.dtype}, {t.device}")
            if t.requires_grad:
                raise ValueError(f"{name}[{i}]: updated in place, so it must not require grad (u and v are buffers, "
                                 "constants for autograd)")
            check_not_inference(t, f"{name}[{i}]")
            if has_internal_overlap(t):
                raise ValueError(f"{name}[{i}]: {SELF_OVERLAPPING}")
    if not compiling():  # addresses of traced tensors mean nothing
        _check_no_aliasing(weights, us, vs)
    return weights, us, vs, n, eps


def _check_no_aliasing(weights, us, vs) -> None:
    """u and v are written while every W is read (by all backends, in different orders): no u or v
    may share memory with another u or v or with any weight, across all entries. Decided from
    byte ranges (``overlapping_pair``), the same way for every backend."""
    pair = overlapping_pair(weights + us + vs, read_only=len(weights))
    if pair is None:
        return
    n = len(weights)
    first, second = (("weights", "us", "vs")[k // n] + f"[{k % n}]" for k in pair)
    if first.startswith("weights"):
        raise ValueError(f"{second}: overlaps {first} (they share memory); u and v are updated in place and must not "
                         "alias a weight")
    raise ValueError(f"us, vs: {first} and {second} share memory; each u and v is updated in place and must be its "
                     "own tensor")


# ----------------------------------------------------------------------------- reference


def sigma_at(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``u . (W v)`` for the current u, v (the sigma of a frozen / eval-mode spectral norm, and
    of the reference), differentiable w.r.t. W only (u, v cloned as torch does, so later in-place
    updates of the buffers do not disturb this graph)."""
    u = u.clone(memory_format=torch.contiguous_format)
    v = v.clone(memory_format=torch.contiguous_format)
    return torch.vdot(u, torch.mv(w, v))


def power_iteration_reference_(weights, us, vs, n_power_iterations: int = 1, eps: float = 1e-12) -> list[torch.Tensor]:
    """Plain PyTorch, the same ops in the same order as torch's ``_SpectralNorm``: updates each u, v
    in place (in the weight's dtype) and returns ``[u_i . (W_i v_i)]``, differentiable w.r.t. W_i.
    No argument checks: ``power_iteration_`` does them."""
    with torch.no_grad():
        for w, u, v in zip(weights, us, vs):
            for _ in range(n_power_iterations):
                u.copy_(F.normalize(torch.mv(w, v), dim=0, eps=eps))
                v.copy_(F.normalize(torch.mv(w.mT, u), dim=0, eps=eps))
    return [sigma_at(w, u, v) for w, u, v in zip(weights, us, vs)]


# ----------------------------------------------------------------------------- Triton kernels

# One row of int64 per weight in the launch table (see _triton_power_iteration):
#   W address, u address, v address, rows, cols, W stride 0, W stride 1, u stride, v stride,
#   offsets of this weight's t (rows values) and s (cols values) in the float32 (float64) workspace.
# Addresses (not a concatenated copy) let one launch cover weights of any shapes and strides.
#
# Two ways through a launch group (``_SPLIT_NUMEL`` picks):
#   - fused (small weights): ONE launch, one program per weight running every iteration;
#   - split (a weight of more than _SPLIT_NUMEL values): per iteration one launch for t = W v and
#     one for s = W^T u, each with several programs per large weight (a work list of (weight, first,
#     last) row or column ranges of about _PROGRAM_NUMEL values of W each), then one launch that
#     writes u, v and sigma. A program recomputes the norm it needs from the workspace (rows or
#     cols values, against its own range x cols or rows values of W).
# Constexprs: ROW_CONTIG when every W has unit column stride (the address then needs no stride
# multiply), and ALIGN (elements, a power of two up to 16 bytes) dividing every W's address, row
# stride and column count, so that rows are read ALIGN values (up to 16 bytes) at a time.

if triton is not None:

    @triton.jit
    def _weight_entry(table_ptr, k, ELEM: tl.constexpr, ALIGN: tl.constexpr, INDEX64: tl.constexpr):
        # weight k's row of the table; sizes, strides and offsets as int32 unless INDEX64
        entry = table_ptr + k * 11
        # (the hint goes on the pointer: int_to_ptr does not carry an integer's divisibility)
        w_ptr = tl.multiple_of(tl.load(entry + 0).to(tl.pointer_type(ELEM)), ALIGN * ELEM.primitive_bitwidth // 8)
        u_ptr = tl.load(entry + 1).to(tl.pointer_type(ELEM))
        v_ptr = tl.load(entry + 2).to(tl.pointer_type(ELEM))
        index_t = tl.int64 if INDEX64 else tl.int32
        rows = tl.load(entry + 3).to(index_t)
        cols = tl.multiple_of(tl.load(entry + 4).to(index_t), ALIGN)
        w_stride0 = tl.multiple_of(tl.load(entry + 5).to(index_t), ALIGN)
        w_stride1 = tl.load(entry + 6).to(index_t)
        u_stride = tl.load(entry + 7).to(index_t)
        v_stride = tl.load(entry + 8).to(index_t)
        t_offset = tl.load(entry + 9).to(index_t)
        s_offset = tl.load(entry + 10).to(index_t)
        return w_ptr, u_ptr, v_ptr, rows, cols, w_stride0, w_stride1, u_stride, v_stride, t_offset, s_offset

    @triton.jit
    def _w_tile(w_ptr, om, on, rows, cols, w_stride0, w_stride1, ROW_CONTIG: tl.constexpr):
        # W[om, on] (0 outside), in W's dtype
        mask = (om[:, None] < rows) & (on[None, :] < cols)
        if ROW_CONTIG:
            ptrs = w_ptr + om[:, None] * w_stride0 + on[None, :]
        else:
            ptrs = w_ptr + om[:, None] * w_stride0 + on[None, :] * w_stride1
        return tl.load(ptrs, mask=mask, other=0.0)

    @triton.jit
    def _inverse_norm(x_ptr, n, eps, ACC: tl.constexpr, BLOCK: tl.constexpr):
        # (1 / max(||x||, eps), ||x||^2) of n workspace values
        sq = tl.zeros((BLOCK,), ACC)
        for i0 in range(0, n, BLOCK):
            offs = i0 + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
            sq += x * x
        total = tl.sum(sq, axis=0)
        return 1.0 / tl.maximum(tl.sqrt(total), eps), total

    @triton.jit
    def _power_iteration_kernel(table_ptr, ws_ptr, sigma_ptr, n_iterations, eps_arg: tl.float64,
                                ELEM: tl.constexpr, ACC: tl.constexpr, ROW_CONTIG: tl.constexpr, ALIGN: tl.constexpr,
                                INDEX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Fused: one program per weight, every iteration. The workspace holds t = W v (rows values)
        # and s = W^T u (cols values) in the accumulation dtype; the current u is t / c, v is s / d.
        w_ptr, u_ptr, v_ptr, rows, cols, w_stride0, w_stride1, u_stride, v_stride, t_offset, s_offset = \
            _weight_entry(table_ptr, tl.program_id(0), ELEM, ALIGN, INDEX64)
        eps = tl.full((), eps_arg, ACC)
        t_ptr = ws_ptr + t_offset
        s_ptr = ws_ptr + s_offset
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)

        for n0 in range(0, cols, BLOCK_N):  # s = v
            on = n0 + offs_n
            tl.store(s_ptr + on, tl.load(v_ptr + on * v_stride, mask=on < cols, other=0.0).to(ACC), mask=on < cols)
        tl.debug_barrier()
        inv_c = tl.full((), 1.0, ACC)
        inv_d = tl.full((), 1.0, ACC)
        s_sq = tl.zeros((), ACC)
        for _ in range(n_iterations):
            # t = W v, with v = s / d
            t_sq = tl.zeros((), ACC)
            for m0 in range(0, rows, BLOCK_M):
                om = m0 + offs_m
                acc = tl.zeros((BLOCK_M,), ACC)
                for n0 in range(0, cols, BLOCK_N):
                    on = n0 + offs_n
                    w = _w_tile(w_ptr, om, on, rows, cols, w_stride0, w_stride1, ROW_CONTIG)
                    v = tl.load(s_ptr + on, mask=on < cols, other=0.0) * inv_d
                    acc += tl.sum(w.to(ACC) * v[None, :], axis=1)
                tl.store(t_ptr + om, acc, mask=om < rows)
                t_sq += tl.sum(acc * acc, axis=0)
            inv_c = 1.0 / tl.maximum(tl.sqrt(t_sq), eps)
            tl.debug_barrier()
            # s = W^T u, with u = t / c
            s_sq = tl.zeros((), ACC)
            for n0 in range(0, cols, BLOCK_N):
                on = n0 + offs_n
                acc = tl.zeros((BLOCK_N,), ACC)
                for m0 in range(0, rows, BLOCK_M):
                    om = m0 + offs_m
                    w = _w_tile(w_ptr, om, on, rows, cols, w_stride0, w_stride1, ROW_CONTIG)
                    u = tl.load(t_ptr + om, mask=om < rows, other=0.0) * inv_c
                    acc += tl.sum(w.to(ACC) * u[:, None], axis=0)
                tl.store(s_ptr + on, acc, mask=on < cols)
                s_sq += tl.sum(acc * acc, axis=0)
            inv_d = 1.0 / tl.maximum(tl.sqrt(s_sq), eps)
            tl.debug_barrier()

        for m0 in range(0, rows, BLOCK_M):  # u = t / c
            om = m0 + offs_m
            u = tl.load(t_ptr + om, mask=om < rows, other=0.0) * inv_c
            tl.store(u_ptr + om * u_stride, u.to(ELEM), mask=om < rows)
        for n0 in range(0, cols, BLOCK_N):  # v = s / d
            on = n0 + offs_n
            v = tl.load(s_ptr + on, mask=on < cols, other=0.0) * inv_d
            tl.store(v_ptr + on * v_stride, v.to(ELEM), mask=on < cols)
        # sigma = u . W v_new = (W^T u) . v_new = ||s||^2 / max(||s||, eps): no extra pass over W
        tl.store(sigma_ptr + tl.program_id(0), s_sq * inv_d)

    @triton.jit
    def _power_iteration_rows_kernel(table_ptr, work_ptr, ws_ptr, eps_arg: tl.float64, FIRST: tl.constexpr,
                                     ELEM: tl.constexpr, ACC: tl.constexpr, ROW_CONTIG: tl.constexpr,
                                     ALIGN: tl.constexpr, INDEX64: tl.constexpr, BLOCK_M: tl.constexpr,
                                     BLOCK_N: tl.constexpr):
        # Split, t = W v for rows [r0, r1) of weight k: v = s / max(||s||, eps), or the stored v in
        # the first iteration (FIRST), as the fused kernel starts from s = v, d = 1.
        job = work_ptr + tl.program_id(0) * 3
        k = tl.load(job)
        index_t = tl.int64 if INDEX64 else tl.int32
        r0 = tl.load(job + 1).to(index_t)
        r1 = tl.load(job + 2).to(index_t)
        w_ptr, u_ptr, v_ptr, rows, cols, w_stride0, w_stride1, u_stride, v_stride, t_offset, s_offset = \
            _weight_entry(table_ptr, k, ELEM, ALIGN, INDEX64)
        t_ptr = ws_ptr + t_offset
        s_ptr = ws_ptr + s_offset
        inv_d = tl.full((), 1.0, ACC)
        if not FIRST:
            inv_d, _ = _inverse_norm(s_ptr, cols, tl.full((), eps_arg, ACC), ACC, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        for m0 in range(r0, r1, BLOCK_M):
            om = m0 + offs_m
            acc = tl.zeros((BLOCK_M,), ACC)
            for n0 in range(0, cols, BLOCK_N):
                on = n0 + offs_n
                w = _w_tile(w_ptr, om, on, r1, cols, w_stride0, w_stride1, ROW_CONTIG)
                if FIRST:
                    v = tl.load(v_ptr + on * v_stride, mask=on < cols, other=0.0).to(ACC)
                else:
                    v = tl.load(s_ptr + on, mask=on < cols, other=0.0) * inv_d
                acc += tl.sum(w.to(ACC) * v[None, :], axis=1)
            tl.store(t_ptr + om, acc, mask=om < r1)

    @triton.jit
    def _power_iteration_cols_kernel(table_ptr, work_ptr, ws_ptr, eps_arg: tl.float64, ELEM: tl.constexpr,
                                     ACC: tl.constexpr, ROW_CONTIG: tl.constexpr, ALIGN: tl.constexpr,
                                     INDEX64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        # Split, s = W^T u for columns [c0, c1) of weight k, with u = t / max(||t||, eps).
        job = work_ptr + tl.program_id(0) * 3
        k = tl.load(job)
        index_t = tl.int64 if INDEX64 else tl.int32
        c0 = tl.multiple_of(tl.load(job + 1).to(index_t), BLOCK_N)  # ranges start at multiples of BLOCK_N
        c1 = tl.multiple_of(tl.load(job + 2).to(index_t), ALIGN)  # a multiple of BLOCK_N, or cols
        w_ptr, u_ptr, v_ptr, rows, cols, w_stride0, w_stride1, u_stride, v_stride, t_offset, s_offset = \
            _weight_entry(table_ptr, k, ELEM, ALIGN, INDEX64)
        t_ptr = ws_ptr + t_offset
        s_ptr = ws_ptr + s_offset
        inv_c, _ = _inverse_norm(t_ptr, rows, tl.full((), eps_arg, ACC), ACC, BLOCK_M)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        for n0 in range(c0, c1, BLOCK_N):
            on = n0 + offs_n
            acc = tl.zeros((BLOCK_N,), ACC)
            for m0 in range(0, rows, BLOCK_M):
                om = m0 + offs_m
                w = _w_tile(w_ptr, om, on, rows, c1, w_stride0, w_stride1, ROW_CONTIG)
                u = tl.load(t_ptr + om, mask=om < rows, other=0.0) * inv_c
                acc += tl.sum(w.to(ACC) * u[:, None], axis=0)
            tl.store(s_ptr + on, acc, mask=on < c1)

    @triton.jit
    def _power_iteration_finish_kernel(table_ptr, ws_ptr, sigma_ptr, eps_arg: tl.float64, ELEM: tl.constexpr,
                                       ACC: tl.constexpr, INDEX64: tl.constexpr, BLOCK: tl.constexpr):
        # Split, last: u = t / c, v = s / d and sigma = ||s||^2 / d for weight k (one program each).
        k = tl.program_id(0)
        w_ptr, u_ptr, v_ptr, rows, cols, w_stride0, w_stride1, u_stride, v_stride, t_offset, s_offset = \
            _weight_entry(table_ptr, k, ELEM, 1, INDEX64)
        eps = tl.full((), eps_arg, ACC)
        t_ptr = ws_ptr + t_offset
        s_ptr = ws_ptr + s_offset
        inv_c, _ = _inverse_norm(t_ptr, rows, eps, ACC, BLOCK)
        inv_d, s_sq = _inverse_norm(s_ptr, cols, eps, ACC, BLOCK)
        offs = tl.arange(0, BLOCK)
        for i0 in range(0, rows, BLOCK):
            o = i0 + offs
            u = tl.load(t_ptr + o, mask=o < rows, other=0.0) * inv_c
            tl.store(u_ptr + o * u_stride, u.to(ELEM), mask=o < rows)
        for i0 in range(0, cols, BLOCK):
            o = i0 + offs
            v = tl.load(s_ptr + o, mask=o < cols, other=0.0) * inv_d
            tl.store(v_ptr + o * v_stride, v.to(ELEM), mask=o < cols)
        tl.store(sigma_ptr + k, s_sq * inv_d)

    _TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.float16: tl.float16,
                  torch.bfloat16: tl.bfloat16}

# A group takes the split path when one of its weights has more values than this (one program per
# weight then leaves most of a GPU idle); each split program covers about _PROGRAM_NUMEL values of W.
_SPLIT_NUMEL = 1 << 17
_PROGRAM_NUMEL = 1 << 15
# Tiles (rows x cols of W per step) and warps: a few fixed ones (every variant compiled and checked
# for spills by tests/test_triton_compile.py), not one per power of two. The fused kernel's by
# (max rows <= 8, max cols <= 32) of the group; a split program's range is a multiple of its
# tile, so the split tiles are narrow along the split dim (more programs per weight).
_FUSED_TILES = {(True, True): (8, 32, 1), (True, False): (8, 128, 1), (False, True): (32, 32, 2),
                (False, False): (32, 128, 8)}
_ROWS_TILE = (8, 128, 4)  # 8 warps for float64: at 4, one float64 variant spills on sm_80
_COLS_TILE = (16, 64, 4)
_FINISH_BLOCK = 1024


def _row_layout(weights) -> tuple[bool, int]:
    """(ROW_CONTIG, ALIGN) of a launch group: whether every W has unit column stride (a size-1
    dim's stride does not matter), and the largest power of two (up to 16 bytes) of elements that
    divides every W's address, row stride and column count (1 when not ROW_CONTIG)."""
    if not all(w.shape[1] == 1 or w.stride(1) == 1 for w in weights):
        return False, 1
    size = weights[0].element_size()
    align = 16 // size
    for w in weights:
        rows, cols = w.shape
        while align > 1 and (w.data_ptr() % (align * size) or cols % align or (rows > 1 and w.stride(0) % align)):
            align //= 2
    return True, align


def _needs_index64(weights, us, vs, workspace_size: int) -> bool:
    """Whether an element offset of a weight (or u, v, the workspace) can reach 2^31 - 1, the
    int32 limit, counting a block of padding past the end."""
    limit = 2**31 - 1 - 1024
    spans = [workspace_size]
    for w, u, v in zip(weights, us, vs):
        spans.append(sum((n - 1) * abs(st) for n, st in zip(w.shape, w.stride())) + w.shape[1])
        spans += [(u.shape[0] - 1) * abs(u.stride(0)) + 1, (v.shape[0] - 1) * abs(v.stride(0)) + 1]
    return max(spans) >= limit


def _ranges(length: int, other: int, block: int) -> list[tuple[int, int]]:
    """[first, last) ranges of ``length`` rows (or cols), multiples of ``block`` long, each covering
    about _PROGRAM_NUMEL values of W with ``other`` values per row (col)."""
    step = max(block, triton.cdiv(triton.cdiv(_PROGRAM_NUMEL, max(other, 1)), block) * block)
    return [(first, min(first + step, length)) for first in range(0, length, step)]


def _tile(block_m: int, block_n: int, warps: int) -> dict:
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps)


def _triton_power_iteration(weights, us, vs, n_iterations: int, eps: float) -> torch.Tensor:
    """The power iteration for a list of weights of one device and dtype (one launch, or 2n + 1
    launches on the split path); returns the sigmas (float32, or float64 for float64 weights)."""
    device, dtype = weights[0].device, weights[0].dtype
    acc = acc_dtype(dtype)
    row_contig, align = _row_layout(weights)
    split = max(w.numel() for w in weights) > _SPLIT_NUMEL
    table, offset = [], 0
    for w, u, v in zip(weights, us, vs):
        rows, cols = w.shape
        table.append([w.data_ptr(), u.data_ptr(), v.data_ptr(), rows, cols, w.stride(0), w.stride(1), u.stride(0),
                      v.stride(0), offset, offset + rows])
        offset += rows + cols
    flat = [x for row in table for x in row]
    if split:  # the work lists: (weight, first, last) row ranges, then column ranges
        row_jobs = [(k, a, b) for k, w in enumerate(weights) for a, b in _ranges(w.shape[0], w.shape[1], _ROWS_TILE[0])]
        col_jobs = [(k, a, b) for k, w in enumerate(weights) for a, b in _ranges(w.shape[1], w.shape[0], _COLS_TILE[1])]
        flat += [x for job in row_jobs + col_jobs for x in job]
    packed = torch.tensor(flat, dtype=torch.int64).to(device, non_blocking=True)
    table_t = packed[:len(table) * 11]
    workspace = torch.empty(offset, dtype=acc, device=device)
    sigmas = torch.empty(len(weights), dtype=acc, device=device)
    types = dict(ELEM=_TL_DTYPES[dtype], ACC=_TL_DTYPES[acc])
    layout = dict(**types, ROW_CONTIG=row_contig, ALIGN=align, INDEX64=_needs_index64(weights, us, vs, offset))
    if not split:
        small = (max(w.shape[0] for w in weights) <= 8, max(w.shape[1] for w in weights) <= 32)
        _power_iteration_kernel[(len(weights),)](table_t, workspace, sigmas, n_iterations, eps, **layout,
                                                 **_tile(*_FUSED_TILES[small]))
        return sigmas
    rows_tile = _tile(*_ROWS_TILE[:2], 8 if dtype == torch.float64 else _ROWS_TILE[2])
    row_work = packed[len(table) * 11:len(table) * 11 + 3 * len(row_jobs)]
    col_work = packed[len(table) * 11 + 3 * len(row_jobs):]
    for i in range(n_iterations):
        _power_iteration_rows_kernel[(len(row_jobs),)](table_t, row_work, workspace, eps, FIRST=i == 0, **layout,
                                                       **rows_tile)
        _power_iteration_cols_kernel[(len(col_jobs),)](table_t, col_work, workspace, eps, **layout,
                                                       **_tile(*_COLS_TILE))
    _power_iteration_finish_kernel[(len(weights),)](table_t, workspace, sigmas, eps, **types,
                                                    INDEX64=layout["INDEX64"], BLOCK=_FINISH_BLOCK, num_warps=4)
    return sigmas


def _kernel_power_iteration(weights, us, vs, n_iterations: int, eps: float, backend: str) -> torch.Tensor:
    """The kernel of ``backend`` ("triton" or "cpp") on one (device, dtype) group; u, v updated in
    place; returns the sigmas (float32 / float64)."""
    if backend == "triton":
        return _triton_power_iteration(weights, us, vs, n_iterations, eps)
    dense = [t.contiguous() for t in us + vs]  # the extension wants contiguous u, v (it copes with W)
    raw = extension().power_iteration_(weights, dense[:len(weights)], dense[len(weights):], n_iterations, eps)
    for t, d in zip(us + vs, dense):
        if d is not t:
            t.copy_(d)
    return raw


# Under torch.compile the kernels are this custom op, so a compiled critic keeps one graph through
# the power iteration; in eager mode they are called directly (the custom op's dispatch costs more
# than the kernel on small layers). The op is functional: it returns [sigmas, *new us, *new vs] and
# the caller copies them into the buffers. (Declaring u, v mutated instead let the compiled backward
# read u, v as they were after the LAST iteration of the step: wrong sigma gradients.)
@torch.library.custom_op("wgan_kernels::power_iteration", mutates_args=())
def _power_iteration_op(weights: list[torch.Tensor], us: list[torch.Tensor], vs: list[torch.Tensor],
                        n_iterations: int, eps: float, backend: str) -> list[torch.Tensor]:
    us, vs = [u.clone() for u in us], [v.clone() for v in vs]
    sigmas = _kernel_power_iteration(weights, us, vs, n_iterations, eps, backend)
    return [sigmas, *us, *vs]


@_power_iteration_op.register_fake
def _(weights, us, vs, n_iterations, eps, backend):
    # the extension returns float64 sigmas; the Triton kernel its accumulation dtype
    acc = torch.float64 if backend == "cpp" or weights[0].dtype == torch.float64 else torch.float32
    return [weights[0].new_empty((len(weights),), dtype=acc), *(torch.empty_like(t) for t in us + vs)]


# ----------------------------------------------------------------------------- autograd


class _Sigmas(torch.autograd.Function):
    """Attaches the kernel's sigmas of a group of weights to those weights, one node for the
    group: inputs ``(raw sigmas, cat(us + vs) snapshot, *weights)``, outputs one 0-d sigma per
    weight (its dtype); ``dW_k = g_k * outer(u_k, v_k)`` (torch ops, so differentiable again;
    the second derivative of sigma w.r.t. W is 0)."""

    @staticmethod
    def forward(ctx, raw, snapshot, *weights):
        ctx.save_for_backward(snapshot)
        ctx.shapes = [w.shape for w in weights]
        values = raw.detach().to(dtype=weights[0].dtype, copy=True)
        return tuple(values[k].clone() for k in range(len(weights)))

    @staticmethod
    def backward(ctx, *grads):
        (snapshot,) = ctx.saved_tensors
        rows = [shape[0] for shape in ctx.shapes]
        cols = [shape[1] for shape in ctx.shapes]
        parts = snapshot.split(rows + cols)
        us, vs = parts[: len(rows)], parts[len(rows):]
        d_weights = [
            None if g is None or not ctx.needs_input_grad[2 + k] else g * torch.outer(us[k], vs[k])
            for k, g in enumerate(grads)
        ]
        return (None, None, *d_weights)


# ----------------------------------------------------------------------------- public op


def power_iteration_(weights, us, vs, n_power_iterations: int = 1, eps: float = 1e-12, *,
                     backend: str | None = None) -> list[torch.Tensor]:
    """Spectral-norm power iteration over a list of 2-D weights of any shapes, in place.

    For each W_i (m_i x n_i) with u_i (m_i) and v_i (n_i) of W_i's dtype and device: repeat
    ``n_power_iterations`` times { u = normalize(W v); v = normalize(W^T u) }, with
    ``normalize(x) = x / max(||x||, eps)`` — exactly ``torch.nn.utils.parametrizations.spectral_norm``.
    Returns ``[sigma_i = u_i . (W_i v_i)]`` (0-d tensors of W_i's dtype), differentiable w.r.t.
    W_i with u_i, v_i held constant (gradient ``u_i v_i^T``).

    ``backend``: ``"auto"`` (default), ``"triton"`` (CUDA; CPU under ``TRITON_INTERPRET=1``; one
    launch per (device, dtype) group), ``"cpp"`` (CPU) or ``"reference"``. Kernels accumulate in
    float32 (float64 for float64); the reference computes in the weights' dtype, as torch does.
    u and v are written in place outside autograd (version counters bumped); they must not
    require grad, be inference tensors outside ``torch.inference_mode()``, be expanded, or share
    memory with each other or with any weight (ValueError naming them, on every backend).
    """
    check_backend("power_iteration_", backend)
    weights, us, vs, n, eps = _check_inputs(weights, us, vs, n_power_iterations, eps)
    sigmas: list[torch.Tensor | None] = [None] * len(weights)
    for idx, name in _groups(weights, backend):
        ws, u_list, v_list = [weights[i] for i in idx], [us[i] for i in idx], [vs[i] for i in idx]
        if name == "reference":
            values = power_iteration_reference_(ws, u_list, v_list, n, eps)
        else:
            raw, updated = _group_sigmas(ws, u_list, v_list, n, eps, name)
            if compiling() or (torch.is_grad_enabled() and any(w.requires_grad for w in ws)
                                                 and not torch.is_inference_mode_enabled()):
                # one node for the group; u, v snapshotted in one copy (later in-place updates of
                # the buffers must not disturb this graph). Under inference mode autograd records
                # nothing, even with grad mode turned back on (the reference's ops do not either).
                values = list(_Sigmas.apply(raw, torch.cat(updated), *ws))
            else:  # no graph wanted: just the values
                values = list(raw.to(ws[0].dtype).unbind())
        for i, s in zip(idx, values):
            sigmas[i] = s
    return sigmas


def _groups(weights, backend) -> list[tuple[list[int], str]]:
    """The weights' (device, dtype) groups, in order of first appearance: (indices, backend name)."""
    groups: dict[tuple, list[int]] = {}
    for i, w in enumerate(weights):
        groups.setdefault((w.device, w.dtype), []).append(i)
    return [(idx, resolve("power_iteration_", device, backend)) for (device, _), idx in groups.items()]


def _group_sigmas(ws, u_list, v_list, n: int, eps: float, name: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The kernel of ``name`` on one (device, dtype) group: u, v updated in place (versions
    bumped); returns the sigmas (1-D, float32 / float64, no graph) and the tensors now holding
    u then v (the buffers, or under torch.compile the custom op's fresh copies)."""
    detached = [w.detach() for w in ws]
    with torch.no_grad():
        if compiling():
            outs = _power_iteration_op(detached, u_list, v_list, n, eps, name)
            raw, new = outs[0], outs[1:]
            for t, fresh in zip(u_list + v_list, new):
                t.copy_(fresh)
            return raw, list(new)
        raw = _kernel_power_iteration(detached, u_list, v_list, n, eps, name)
        updated = u_list + v_list
        torch.autograd.graph.increment_version(updated)
    return raw, updated


def attach_sigmas(raw: torch.Tensor, snapshot: torch.Tensor, weights: list[torch.Tensor]) -> list[torch.Tensor]:
    """The sigmas ``raw`` (1-D, one per weight, no graph) as 0-d tensors of the weights' dtype,
    differentiable w.r.t. the 2-D ``weights`` through ``u v^T`` (``snapshot``: the us then the vs,
    concatenated, as they were when ``raw`` was computed): one autograd node."""
    return list(_Sigmas.apply(raw, snapshot, *weights))


def power_iteration_values_(weights, us, vs, n_power_iterations: int = 1, eps: float = 1e-12, *,
                            checked: bool = False) -> list[torch.Tensor]:
    """``power_iteration_`` without autograd, for callers that attach sigma to W themselves
    (``spectral_norm_all``'s hook): u, v updated in place as there; returns one 1-D tensor
    holding sigma_i (float32 / float64 from a kernel, W_i's dtype from the reference), without
    graph, per weight. ``checked=True``: the caller has run these arguments (the same tensors,
    shapes and memory) through ``power_iteration_``'s checks before, and they are skipped."""
    n = n_power_iterations
    if not checked:
        weights, us, vs, n, eps = _check_inputs(weights, us, vs, n_power_iterations, eps)
    values: list[torch.Tensor | None] = [None] * len(weights)
    for idx, name in _groups(weights, None):
        ws, u_list, v_list = [weights[i] for i in idx], [us[i] for i in idx], [vs[i] for i in idx]
        if name == "reference":
            with torch.no_grad():
                raw = torch.stack(power_iteration_reference_(ws, u_list, v_list, n, eps))
        else:
            raw, _ = _group_sigmas(ws, u_list, v_list, n, eps, name)
        for i, s in zip(idx, raw.split(1)):
            values[i] = s
    return values


# ----------------------------------------------------------------------------- initial u, v


def initial_vectors(mat: torch.Tensor, eps: float, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """u, v for a new spectral-norm layer with the 2-D weight ``mat``: the same random draws in the
    same order as torch's parametrization (so a seeded init gives torch's u, v), normalised, then
    15 warm-up iterations with the reference (the same numbers as torch), plus ``extra``: the
    iterations of the check forward that ``register_parametrization`` runs (``n_power_iterations``
    when the layer is in training mode), for layers that are not registered as parametrizations.
    An eps beyond the weight dtype's range is refused (ValueError naming ``eps``)."""
    check_eps_fits(eps, mat.dtype, "the weight")
    mat = mat.detach()
    u = F.normalize(mat.new_empty(mat.shape[0]).normal_(0, 1), dim=0, eps=eps)
    v = F.normalize(mat.new_empty(mat.shape[1]).normal_(0, 1), dim=0, eps=eps)
    with torch.no_grad():
        power_iteration_reference_([mat], [u], [v], 15, eps)
        if extra:
            power_iteration_reference_([mat], [u], [v], extra, eps)
    return u, v
