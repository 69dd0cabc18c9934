"""Weight clipping (original WGAN): ``clip_`` and the fused ``ClippedRMSprop`` optimizer.

Kernels: ``csrc/cpu/multi_tensor.cpp`` (OpenMP) and ``csrc/cuda/multi_tensor.cu``, reached
through ``wgan_kernels._C``; one launch per (device, dtype) group of tensors (on CUDA, per 96
tensors). References: ``clip_reference_`` and ``rmsprop_clip_reference_`` below, the loops
users write by hand; they are the fallback and the test oracle.

In-place semantics are those of an optimizer step: the values change outside autograd and the
version counters are bumped, so a graph that saved the old values fails loudly at backward.
Tensors that are part of a graph (non-leaf and requiring grad) are refused.
"""

from __future__ import annotations

import math

import torch

from .._backend import extension, resolve
from .._checks import as_list, check_tensors, finite_number

__all__ = ["clip_", "clip_reference_", "ClippedRMSprop", "rmsprop_clip_reference_"]

_KERNEL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _check_clip_value(clip_value, *, allow_none: bool = False) -> float | None:
    if clip_value is None and allow_none:
        return None
    return finite_number("clip_value", clip_value, low=0, low_inclusive=False)


def _check_writable(tensors: list[torch.Tensor], name: str) -> None:
    """The checks the extension does in C++, for the reference path (same messages)."""
    for i, t in enumerate(tensors):
        if t.dtype not in _KERNEL_DTYPES:
            raise ValueError(f"{name}[{i}]: expected a floating-point tensor (float32, float64, float16, "
                             f"bfloat16), got {t.dtype}")
        if t.requires_grad and not t.is_leaf:
            raise ValueError(f"{name}[{i}]: an in-place update of a non-leaf tensor that requires grad would "
                             "corrupt its graph; pass leaf tensors (parameters) or detach first")


def _check_like(tensors: list[torch.Tensor], params: list[torch.Tensor], name: str) -> None:
    for i, (t, p) in enumerate(zip(tensors, params)):
        if t.dtype != p.dtype or t.device != p.device or t.shape != p.shape:
            raise ValueError(f"{name}[{i}]: expected dtype {p.dtype}, device {p.device} and shape {tuple(p.shape)} "
                             f"like params[{i}], got {t.dtype}, {t.device}, {tuple(t.shape)}")


def _needs_reference(tensors: list[torch.Tensor]) -> bool:
    # The extension may lack its CUDA half (built with WGAN_KERNELS_SKIP_CUDA=1).
    ext = extension()
    return ext is not None and not ext.has_cuda and any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors)


# ----------------------------------------------------------------------------- clip_


def clip_reference_(params, clip_value: float = 0.01) -> None:
    """Plain-PyTorch weight clipping: ``p.clamp_(-c, c)`` for each tensor, under ``no_grad``."""
    with torch.no_grad():
        for p in params:
            p.clamp_(-clip_value, clip_value)


def clip_(params, clip_value: float = 0.01, *, backend: str | None = None) -> None:
    """Clamp every tensor of ``params`` to ``[-clip_value, clip_value]`` in place.

    ``params``: a tensor or an iterable of tensors / Parameters, of any shapes, floating dtypes
    and devices, contiguous or not. One kernel launch per (device, dtype) group.
    ``backend``: ``"auto"`` (default), ``"cpp"`` or ``"reference"``; see ``wgan_kernels._backend``.
    Not differentiable (a parameter update, like an optimizer step).
    """
    # The common call (a float, a list of parameters) takes about 2 us of Python before the
    # kernel: no copy of a list, the device type without building a torch.device when on CPU.
    c = clip_value if type(clip_value) is float and 0 < clip_value < math.inf else _check_clip_value(clip_value)
    tensors = params if type(params) is list else as_list(params, "params")
    if not tensors:
        return
    first = tensors[0]
    device = ("cpu" if first.is_cpu else first.device) if isinstance(first, torch.Tensor) else "cpu"
    if resolve("clip_", device, backend) == "cpp" and not _needs_reference(tensors):
        extension().clip_(tensors, c)  # checks items, dtypes and graphs in C++, same messages
        return
    check_tensors(tensors, "params")
    _check_writable(tensors, "params")
    clip_reference_(tensors, c)


# ----------------------------------------------------------------------------- RMSprop + clip


def rmsprop_clip_reference_(params, grads, square_avgs, steps, *, lr: float, alpha: float, eps: float,
                            weight_decay: float, clip_value: float | None) -> None:
    """``torch.optim.RMSprop`` (single-tensor path, no momentum, not centered) then a clamp."""
    with torch.no_grad():
        for p, g, s, step in zip(params, grads, square_avgs, steps):
            step += 1
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            s.mul_(alpha).addcmul_(g, g, value=1 - alpha)
            p.addcdiv_(g, s.sqrt().add_(eps), value=-lr)
            if clip_value is not None:
                p.clamp_(-clip_value, clip_value)


class ClippedRMSprop(torch.optim.Optimizer):
    """RMSprop whose ``step()`` also clamps every parameter to ``[-clip_value, clip_value]``,
    in one fused pass over parameters, gradients and state (the original WGAN's critic optimizer).

    The same numbers as ``torch.optim.RMSprop(params, lr, alpha, eps, weight_decay)`` followed by
    ``p.clamp_(-clip_value, clip_value)``; the same state (``step``, ``square_avg``), so state
    dicts load both ways (a torch state dict with momentum or ``centered=True`` is refused).
    ``clip_value=None`` gives plain fused RMSprop. Parameters without a gradient are skipped.
    ``backend``: ``"auto"`` (default), ``"cpp"`` or ``"reference"``.
    """

    def __init__(self, params, lr: float = 5e-5, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, clip_value: float | None = 0.01, *, backend: str | None = None):
        defaults = dict(
            lr=finite_number("lr", lr, low=0.0),
            alpha=finite_number("alpha", alpha, low=0.0),
            eps=finite_number("eps", eps, low=0.0),
            weight_decay=finite_number("weight_decay", weight_decay, low=0.0),
            clip_value=_check_clip_value(clip_value, allow_none=True),
        )
        if defaults["alpha"] > 1:
            raise ValueError(f"alpha: expected a number in [0, 1], got {alpha!r}")
        self.backend = backend
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            # A torch.optim.RMSprop state dict has no clip_value; it has momentum and centered.
            group.setdefault("clip_value", self.defaults["clip_value"])
            if group.get("momentum", 0) != 0 or group.get("centered", False):
                raise ValueError("state_dict: ClippedRMSprop has no momentum and is not centered; got "
                                 f"momentum={group.get('momentum')}, centered={group.get('centered')}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, square_avgs, steps = [], [], [], []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError("params: ClippedRMSprop does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["square_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(g)
                square_avgs.append(state["square_avg"])
                steps.append(state["step"])
            if not params:
                continue
            hyper = dict(lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                         weight_decay=group["weight_decay"], clip_value=group["clip_value"])
            if resolve("rmsprop_clip_", params[0].device, self.backend) == "cpp" and not _needs_reference(params):
                extension().rmsprop_clip_(params, grads, square_avgs, steps, **hyper)
            else:
                _check_writable(params, "params")
                _check_like(square_avgs, params, "square_avgs")
                rmsprop_clip_reference_(params, grads, square_avgs, steps, **hyper)
        return loss
