"""Argument checks shared by the op families: each raises ValueError naming the argument."""

from __future__ import annotations

import math
import numbers

import torch

from ._backend import BACKENDS, PREFERENCES, compiling


# The floating dtypes every kernel takes, and the accumulation rule they share.
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_float_dtype(t: torch.Tensor, name: str) -> None:
    """``t`` is of a kernel dtype (``FLOAT_DTYPES``)."""
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating-point tensor (float32, float64, float16, bfloat16), got {t.dtype}")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """What reductions accumulate in: float64 for float64 input, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def positive_int(name: str, value) -> int:
    """``value``: an int >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    return value


def finite_number(name: str, value, *, low: float | None = None, low_inclusive: bool = True) -> float:
    """``value`` as a float: a finite real number (not a bool), ``>= low`` (``> low`` when not
    ``low_inclusive``) when ``low`` is given."""
    try:  # an int too large for a float (10**400) is not a finite float either
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    except OverflowError:
        ok = False
    if ok and low is not None:
        ok = value >= low if low_inclusive else value > low
    if not ok:
        bound = "" if low is None else f" {'>=' if low_inclusive else '>'} {low}"
        raise ValueError(f"{name}: expected a finite number{bound}, got {value!r}")
    return float(value)


def as_list(items, name: str) -> list:
    """A tensor as a one-item list, any other iterable as a list (items not checked)."""
    if isinstance(items, torch.Tensor):
        return [items]
    try:
        return list(items)
    except TypeError:
        raise ValueError(f"{name}: expected a tensor or an iterable of tensors, got {type(items).__name__}") from None


def check_tensors(items: list, name: str) -> None:
    for i, t in enumerate(items):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")


def tensor_list(items, name: str) -> list[torch.Tensor]:
    """``as_list`` then ``check_tensors``."""
    items = as_list(items, name)
    check_tensors(items, name)
    return items


# The largest finite float32: hyper-parameters that the float32 kernels (and torch's float32
# arithmetic) use must not round to inf there.
FLOAT32_MAX = torch.finfo(torch.float32).max


def finite_real(name: str, value, *, low: float | None = None, low_inclusive: bool = True,
                max_abs: float | None = None) -> float:
    """``value`` as a float: a finite real number, Python's or numpy's (``numbers.Real``; not a
    bool, not a tensor), ``>= low`` (``> low`` when not ``low_inclusive``) when ``low`` is given,
    and ``|value| <= max_abs`` when ``max_abs`` is given."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok:
        try:  # an int too large for a float (10**400) is not a finite float either
            value_f = float(value)
        except OverflowError:
            ok = False
        else:
            ok = math.isfinite(value_f)
    if ok and low is not None:
        ok = value_f >= low if low_inclusive else value_f > low
    if ok and max_abs is not None:
        ok = abs(value_f) <= max_abs
    if not ok:
        bounds = []
        if low is not None:
            bounds.append(f"{'>=' if low_inclusive else '>'} {low}")
        if max_abs is not None:
            bounds.append(f"of magnitude <= {max_abs}")
        bound = (" " + " and ".join(bounds)) if bounds else ""
        raise ValueError(f"{name}: expected a finite real number{bound}, got {value!r}")
    return value_f


# ----------------------------------------------------------------------------- in-place ops
# The messages below are also written, word for word, by the extension's checks
# (csrc/bindings/common.h), so an op refuses an argument with the same words whichever backend runs it.

INFERENCE_TENSOR = ("an inference tensor (created under torch.inference_mode()) cannot be updated in place outside "
                    "inference mode; clone it first, or call this under torch.inference_mode()")
SELF_OVERLAPPING = ("its elements share memory (an expanded view?) and it is updated in place; pass a tensor that "
                    "owns its elements (e.g. .clone())")


def check_backend(op: str, backend) -> None:
    """``backend=`` of ``op`` checked at the front door (an optimizer's construction, an op given
    nothing to do): a known name that ``op`` implements on some device. Whether it can run on the
    tensors' device is decided when it runs (``wgan_kernels._backend.resolve``)."""

    if backend is None:
        return
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    implemented = {name for per_device in PREFERENCES[op].values() for name in per_device} | {"auto", "reference"}
    if backend not in implemented:
        raise ValueError(f"backend: {op} has no {backend!r} implementation (it has "
                         f"{tuple(name for name in BACKENDS if name in implemented)})")


def check_not_inference(t: torch.Tensor, name: str) -> None:
    """Refuses an inference tensor about to be written in place outside inference mode (torch
    itself refuses that; a kernel writing through a pointer would not). Skipped while compiling:
    Dynamo cannot trace ``is_inference`` (a graph break), and traced tensors are not inference tensors."""
    if not compiling() and t.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name}: {INFERENCE_TENSOR}")


def has_internal_overlap(t: torch.Tensor) -> bool:
    """True when two elements of ``t`` are one memory location for sure (a stride 0 over a dim of
    more than one element: an expanded view), the case torch refuses for in-place writes (as
    ``at::has_internal_overlap``: a tensor without elements has none)."""
    if t.is_contiguous():  # (the common case, decided in C++)
        return False
    return any(st == 0 and n > 1 for st, n in zip(t.stride(), t.shape)) and t.numel() > 0


def byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last + 1)`` byte addresses that ``t``'s elements may occupy (from its data
    pointer, sizes and strides); empty when ``t`` has no elements."""
    start = t.data_ptr()
    if t.is_contiguous():
        return start, start + t.nbytes
    if t.numel() == 0:
        return start, start
    span = 1 + sum((n - 1) * st for n, st in zip(t.shape, t.stride()) if st > 0)
    return start, start + span * t.element_size()


def overlapping_pair(tensors: list[torch.Tensor], read_only: int = 0) -> tuple[int, int] | None:
    """Indices ``(i, j)``, ``i < j``, of two tensors whose memory may overlap where at least one of
    them is written, or None. The first ``read_only`` tensors are only read (they may overlap
    each other); the others are written. Conservative: byte ranges that intersect count as
    overlapping (two interleaved strided views of one buffer do), while disjoint views of one
    buffer (``buf[0:2]``, ``buf[2:4]``) do not. A sweep over the ranges sorted by start,
    O(n log n). Host and device memory (and several GPUs) share one 64-bit virtual address space
    (CUDA's unified addressing), so addresses compare whatever the device; tensors without memory
    (no elements, meta) are skipped. It runs on every call of the ops that use it: three cheap
    calls for a contiguous tensor, names built by the caller only for an error."""
    ranges = []
    for k, t in enumerate(tensors):
        start = t.data_ptr()
        end = start + t.nbytes if t.is_contiguous() else byte_range(t)[1]
        if end > start and start:
            ranges.append((start, end, k))
    if len(ranges) < 2:
        return None
    ranges.sort()
    any_end = written_end = any_k = written_k = -1
    for start, end, k in ranges:
        written = k >= read_only
        other = any_k if written and start < any_end else written_k if start < written_end else -1
        if other >= 0:
            return (other, k) if other < k else (k, other)
        if end > any_end:
            any_end, any_k = end, k
        if written and end > written_end:
            written_end, written_k = end, k
    return None
