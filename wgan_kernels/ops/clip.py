"""Weight clipping (original WGAN): ``clip_`` and the fused ``ClippedRMSprop`` optimizer.

Kernels: ``csrc/cpu/multi_tensor.cpp`` (OpenMP) and ``csrc/cuda/multi_tensor.cu``, reached
through ``wgan_kernels._C``; one launch per (device, dtype) group of tensors (on CUDA, per 96
tensors). References: ``clip_reference_`` and ``rmsprop_clip_reference_`` below, the loops
users write by hand; they are the fallback and the test oracle.

In-place semantics are those of an optimizer step: the values change outside autograd and the
version counters are bumped, so a graph that saved the old values fails loudly at backward.
Refused, with the same ValueError on every backend (the extension checks in C++, the reference
path here, word for word): tensors that are part of a graph (non-leaf and requiring grad),
inference tensors outside inference mode (inside it torch allows their in-place update, and so do
these ops), sparse tensors, non-floating dtypes, and views whose elements share memory (expanded).
"""

from __future__ import annotations

import math

import torch

from .._backend import extension, resolve_tensors
from .._checks import (SELF_OVERLAPPING, as_list, check_backend, check_float_dtype, check_not_inference,
                       check_tensors, finite_number, has_internal_overlap, overlapping_pair)

__all__ = ["clip_", "clip_reference_", "ClippedRMSprop", "rmsprop_clip_reference_"]

# RMSprop's hyper-parameters enter float32 arithmetic for every dtype but float64 (torch's and the
# kernels'): beyond this a float32 step overflows in the kernels and is refused by torch.
_FLOAT32_MAX = torch.finfo(torch.float32).max


def _check_clip_value(clip_value, *, allow_none: bool = False) -> float | None:
    if clip_value is None and allow_none:
        return None
    return finite_number("clip_value", clip_value, low=0, low_inclusive=False)


def _clip_bound(clip_value: float, dtype: torch.dtype) -> float:
    """``clip_value`` as the kernels use it for ``dtype``: rounded to ``dtype`` as torch converts
    a scalar (through float32 for the 16-bit types), ``inf`` when it overflows ``dtype`` (no
    clipping: e.g. 1e5 for float16). torch's ``clamp_`` refuses a scalar beyond the dtype's range;
    one it can represent gives the same numbers as the rounded bound."""
    if dtype == torch.float64 or not dtype.is_floating_point or clip_value <= torch.finfo(dtype).max:
        return clip_value
    return float(torch.tensor(clip_value, dtype=torch.float64).to(dtype))


# The checks the extension does in C++ (csrc/bindings/: check_writable, kernel_dtype, ...), in the
# same order and words, for the paths that do not go through it.


def _check_writable(t: torch.Tensor, name: str) -> None:
    if t.requires_grad and not t.is_leaf:
        raise ValueError(f"{name}: an in-place update of a non-leaf tensor that requires grad would corrupt its "
                         "graph; pass leaf tensors (parameters) or detach first")
    check_not_inference(t, name)
    if t.layout != torch.strided:
        raise ValueError(f"{name}: expected a dense (strided) tensor, got {t.layout}")


def _check_dtype(t: torch.Tensor, name: str) -> None:
    check_float_dtype(t, name)


def _check_own_elements(t: torch.Tensor, name: str) -> None:
    if has_internal_overlap(t):
        raise ValueError(f"{name}: {SELF_OVERLAPPING}")


def _check_params(tensors: list[torch.Tensor], name: str = "params") -> None:
    """clip_'s checks of each tensor (the C++ ones of clip_)."""
    for i, t in enumerate(tensors):
        _check_writable(t, f"{name}[{i}]")
        _check_dtype(t, f"{name}[{i}]")
        _check_own_elements(t, f"{name}[{i}]")


def _check_like(t: torch.Tensor, p: torch.Tensor, name: str, i: int) -> None:
    if t.dtype != p.dtype or t.device != p.device or t.shape != p.shape:
        raise ValueError(f"{name}[{i}]: expected dtype {p.dtype}, device {p.device} and shape {tuple(p.shape)} "
                         f"like params[{i}], got {t.dtype}, {t.device}, {tuple(t.shape)}")


def _check_rmsprop_items(params, grads, square_avgs, steps) -> None:
    """rmsprop_clip_'s checks of each (param, grad, square_avg, step), the C++ ones in their order."""
    for i, (p, g, s, step) in enumerate(zip(params, grads, square_avgs, steps)):
        _check_writable(p, f"params[{i}]")
        _check_dtype(p, f"params[{i}]")
        if g.layout != torch.strided:
            raise ValueError(f"grads[{i}]: expected a dense gradient")
        _check_like(g, p, "grads", i)
        _check_like(s, p, "square_avgs", i)
        _check_writable(s, f"square_avgs[{i}]")
        check_not_inference(step, f"steps[{i}]")
        _check_own_elements(p, f"params[{i}]")
        _check_own_elements(s, f"square_avgs[{i}]")


# ----------------------------------------------------------------------------- clip_


def clip_reference_(params, clip_value: float = 0.01) -> None:
    """Plain-PyTorch weight clipping: ``p.clamp_(-c, c)`` for each tensor, under ``no_grad``
    (``c`` rounded to each tensor's dtype; beyond its range, no clipping)."""
    with torch.no_grad():
        for p in params:
            c = _clip_bound(clip_value, p.dtype)
            p.clamp_(-c, c)


def clip_(params, clip_value: float = 0.01, *, backend: str | None = None) -> None:
    """Clamp every tensor of ``params`` to ``[-clip_value, clip_value]`` in place.

    ``params``: a tensor or an iterable of tensors / Parameters, of any shapes, floating dtypes
    and devices, contiguous or not. One kernel launch per (device, dtype) group.
    ``clip_value``: a finite number > 0, rounded to each tensor's dtype; above the dtype's range
    (e.g. 1e5 for float16) the tensor is left as it is.
    ``backend``: ``"auto"`` (default), ``"cpp"`` or ``"reference"``; see ``wgan_kernels._backend``.
    Not differentiable (a parameter update, like an optimizer step). Refused (ValueError naming
    the tensor): non-floating or sparse tensors, non-leaf tensors that require grad, inference
    tensors outside ``torch.inference_mode()``, expanded views.
    """
    # The common call (a float, a list of parameters) takes about 2 us of Python before the
    # kernel: no copy of a list, the device type without building a torch.device when on CPU.
    c = clip_value if type(clip_value) is float and 0 < clip_value < math.inf else _check_clip_value(clip_value)
    tensors = params if type(params) is list else as_list(params, "params")
    if not tensors:
        check_backend("clip_", backend)
        return
    if resolve_tensors("clip_", tensors, backend) == "cpp":
        extension().clip_(tensors, c)  # checks items, dtypes and graphs in C++, same messages
        return
    check_tensors(tensors, "params")
    _check_params(tensors)
    clip_reference_(tensors, c)


# ----------------------------------------------------------------------------- RMSprop + clip


def _check_group(group: dict) -> None:
    """A param group's hyper-parameters, at construction and at every step (a scheduler or a user
    may have edited them): ValueError naming the one that is wrong. The usual floats cost no call;
    others are stored back as floats."""
    for name in ("lr", "alpha", "eps", "weight_decay"):
        value = group[name]
        if type(value) is float and 0.0 <= value <= _FLOAT32_MAX:
            continue
        value = finite_number(name, value, low=0.0)
        if value > _FLOAT32_MAX:
            raise ValueError(f"{name}: expected a finite number <= {_FLOAT32_MAX} (steps compute in float32 for "
                             f"every dtype but float64), got {group[name]!r}")
        group[name] = value
    if group["alpha"] > 1:
        raise ValueError(f"alpha: expected a number in [0, 1], got {group['alpha']!r}")
    momentum = group.get("momentum", 0.0)
    if not (type(momentum) is float and 0.0 <= momentum < math.inf):
        group["momentum"] = finite_number("momentum", momentum, low=0.0)
    if not isinstance(group.get("centered", False), bool):
        raise ValueError(f"centered: expected a bool, got {group['centered']!r}")
    clip_value = group["clip_value"]
    if clip_value is not None and not (type(clip_value) is float and 0.0 < clip_value < math.inf):
        group["clip_value"] = _check_clip_value(clip_value)


def rmsprop_clip_reference_(params, grads, square_avgs, steps, *, lr: float, alpha: float, eps: float,
                            weight_decay: float, clip_value: float | None, momentum: float = 0.0,
                            momentum_buffers=None, grad_avgs=None) -> None:
    """``torch.optim.RMSprop`` (its single-tensor path) then a clamp. ``momentum > 0`` updates
    ``momentum_buffers``; ``grad_avgs`` given: centered (torch's ``centered=True``)."""
    with torch.no_grad():
        for i, (p, g, s, step) in enumerate(zip(params, grads, square_avgs, steps)):
            step += 1
            if weight_decay != 0:
                g = g.add(p, alpha=weight_decay)
            s.mul_(alpha).addcmul_(g, g, value=1 - alpha)
            if grad_avgs is not None:
                grad_avg = grad_avgs[i]
                grad_avg.lerp_(g, 1 - alpha)
                avg = s.addcmul(grad_avg, grad_avg, value=-1).sqrt_().add_(eps)
            else:
                avg = s.sqrt().add_(eps)
            if momentum > 0:
                buf = momentum_buffers[i]
                buf.mul_(momentum).addcdiv_(g, avg)
                p.add_(buf, alpha=-lr)
            else:
                p.addcdiv_(g, avg, value=-lr)
            if clip_value is not None:
                c = _clip_bound(clip_value, p.dtype)
                p.clamp_(-c, c)


def _op_of(group: dict) -> str:
    """The dispatch op of a parameter group: the fused RMSprop + clamp, or its momentum /
    centered form (reference only)."""
    return "rmsprop_clip_momentum_" if group.get("momentum", 0.0) > 0 or group.get("centered") else "rmsprop_clip_"


class ClippedRMSprop(torch.optim.Optimizer):
    """RMSprop whose ``step()`` also clamps every parameter to ``[-clip_value, clip_value]``,
    in one fused pass over parameters, gradients and state (the original WGAN's critic optimizer).

    The same numbers as ``torch.optim.RMSprop(params, lr, alpha, eps, weight_decay, momentum,
    centered)`` followed by ``p.clamp_(-clip_value, clip_value)``; the same state (``step``,
    ``square_avg``, ``momentum_buffer``, ``grad_avg``), so state dicts load both ways.
    ``clip_value=None`` gives plain RMSprop. Parameters without a gradient are skipped.
    ``backend``: ``"auto"`` (default), ``"cpp"`` or ``"reference"``. The fused kernels cover the
    original WGAN's optimizer (no momentum, not centered); a group with ``momentum > 0`` or
    ``centered=True`` runs torch's own RMSprop update and then the clamp (the op
    ``rmsprop_clip_momentum_`` of ``wgan_kernels._backend``, reference only).
    Checked when the optimizer is built (ValueError naming the argument): the hyper-parameters
    (``lr``, ``eps``, ``weight_decay`` >= 0 and within float32's range, ``alpha`` in [0, 1],
    ``clip_value`` > 0 or None; again at each step, as schedulers edit them), ``backend``, and the
    parameters (floating, dense, leaves, not inference tensors, no two sharing memory).
    """

    def __init__(self, params, lr: float = 5e-5, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, clip_value: float | None = 0.01, momentum: float = 0.0,
                 centered: bool = False, *, backend: str | None = None):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, clip_value=clip_value,
                        momentum=momentum, centered=centered)
        _check_group(defaults)
        check_backend(_op_of(defaults), backend)
        self.backend = backend
        # torch.optim.Optimizer raises TypeError, or a ValueError that does not name the argument
        if isinstance(params, torch.Tensor):
            raise ValueError("params: expected an iterable of tensors (or of param-group dicts), got a tensor; "
                             "pass [tensor]")
        params = as_list(params, "params")
        if not params:
            raise ValueError("params: got an empty list of parameters")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        """``torch.optim.Optimizer.add_param_group`` after this optimizer's checks: the group's
        hyper-parameters and tensors, and no parameter sharing memory with another (a step would
        update that memory twice, in an order that depends on the backend and the threads)."""
        if not isinstance(param_group, dict):
            raise ValueError(f"param_group: expected a dict, got {type(param_group).__name__}")
        where = "params" if not self.param_groups else f"param_groups[{len(self.param_groups)}]['params']"
        tensors = param_group.get("params")
        if isinstance(tensors, (set, frozenset)):
            raise ValueError(f"{where}: expected an ordered iterable of tensors, got a set")
        tensors = as_list(tensors, where)
        check_tensors(tensors, where)
        for i, t in enumerate(tensors):
            _check_writable(t, f"{where}[{i}]")
            _check_dtype(t, f"{where}[{i}]")
            _check_own_elements(t, f"{where}[{i}]")
        _check_group({name: param_group.get(name, default) for name, default in self.defaults.items()})
        names = [f"param_groups[{k}]['params'][{i}]" for k, group in enumerate(self.param_groups)
                 for i in range(len(group["params"]))] + [f"{where}[{i}]" for i in range(len(tensors))]
        pair = overlapping_pair([t for group in self.param_groups for t in group["params"]] + tensors)
        if pair is not None:
            raise ValueError(f"{names[pair[0]]}, {names[pair[1]]}: two parameters share memory (the same tensor "
                             "twice, or overlapping views); a step would update that memory twice")
        param_group["params"] = tensors  # torch stores the list in the caller's dict too
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            # A torch.optim.RMSprop state dict has no clip_value; an older ClippedRMSprop one no momentum.
            group.setdefault("clip_value", self.defaults["clip_value"])
            group.setdefault("momentum", 0.0)
            group.setdefault("centered", False)

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
                if group["momentum"] > 0 and "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["centered"] and "grad_avg" not in state:
                    state["grad_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(g)
                square_avgs.append(state["square_avg"])
                steps.append(state["step"])
            if not params:
                continue
            _check_group(group)
            hyper = dict(lr=group["lr"], alpha=group["alpha"], eps=group["eps"],
                         weight_decay=group["weight_decay"], clip_value=group["clip_value"])
            if _op_of(group) == "rmsprop_clip_momentum_":
                resolve_tensors("rmsprop_clip_momentum_", params, self.backend)  # (the reference: checks the name)
                _check_rmsprop_items(params, grads, square_avgs, steps)
                rmsprop_clip_reference_(
                    params, grads, square_avgs, steps, **hyper, momentum=group["momentum"],
                    momentum_buffers=[self.state[p]["momentum_buffer"] for p in params] if group["momentum"] > 0
                    else None,
                    grad_avgs=[self.state[p]["grad_avg"] for p in params] if group["centered"] else None)
            elif resolve_tensors("rmsprop_clip_", params, self.backend) == "cpp":
                extension().rmsprop_clip_(params, grads, square_avgs, steps, **hyper)
            else:
                _check_rmsprop_items(params, grads, square_avgs, steps)
                rmsprop_clip_reference_(params, grads, square_avgs, steps, **hyper)
        return loss
