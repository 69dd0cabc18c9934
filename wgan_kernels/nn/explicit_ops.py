"""One object per explicit-path operation: its forward, input-gradient VJP, tangent and weight gradient.

Every step of the explicit input-gradient chain is described here once, by a small ``Op`` class,
and read by both consumers:

- the layer-by-layer chain (``InputGradModule.forward_with_input_grad`` in layers.py): ``forward``
  then ``vjp``, built from differentiable ops (a penalty on it can be differentiated twice);
- the one-node chain of piecewise-linear critics (``_PiecewiseLinearChain`` in _chain.py): it
  runs a program that is a tree of these objects (``SequentialOp`` / ``ResidualOp`` composites
  over leaf ops) through ``run``, ``walk_back`` and ``walk_forward``, keeping only its tape.

An op is built from a torch module (``from_module``; a wgan_kernels.nn block is one) and holds
references to its parameter tensors (``params``: shared, never copied). Every method takes the
parameter values to use as ``p`` (the layer-by-layer path passes ``op.params``; the one-node
chain passes the tensors it saved for its backward), so an op is a pure description::

    forward(p, x)                   -> (y, saved)   the forward, keeping what the backward needs
    vjp(p, saved, g, first_order)   -> grad_x       the input gradient (adjoint), g at the output
    tangent(p, saved, psi)          -> psi'         piecewise-linear ops: psi -> m * A(psi), the
                                                    linear map with masks frozen and no bias
    weight_grad(p, inp, grad_out)   -> dW           ops with parameters: the weight gradient of
                                                    <grad_out, A(inp)>, summed over samples
    chain_dim(dim, x)               -> int | None   the number of dims after the op on the
                                                    one-node path, None where it cannot take it

Flags: ``piecewise_linear`` (eligible for the one-node chain), ``has_params`` (``params`` is
``(weight, bias)``, the layer is affine: ``A(h) + b``), ``linear`` (linear in its input with no
parameters, e.g. reshapes and pooling: a bias before it reaches ``grad_x`` only through a later
activation). Setting ``torch_type`` registers the class in ``OPS`` (torch module type -> op
class), which ``from_torch`` and the block classes of layers.py read.

Adding an operation = one class here (plus its tests): ``forward``, ``vjp``, ``from_module`` and
``torch_type``; piecewise-linear ones add ``tangent`` and ``chain_dim`` to take the one-node path.

Imports run one way: this module imports ``torch`` and ``wgan_kernels.ops`` only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import activation as _act

_LOW_PRECISION = (torch.float16, torch.bfloat16)

OPS: dict[type, type[Op]] = {}  # torch module type -> the op class describing it


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 so an activation's derivative is rounded once, like torch's
    own kernels (which compute in float32 internally); other dtypes unchanged."""
    return t.float() if t.dtype in _LOW_PRECISION else t


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def check_matches_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(
            f"x ({x.dtype}, {x.device}) must have the dtype and device of the layer's weight "
            f"({weight.dtype}, {weight.device})"
        )


class Mask:
    """What a LeakyReLU/ReLU saves on the CUDA mask path: ``(x > 0)`` as a bool tensor."""

    __slots__ = ("mask",)

    def __init__(self, mask: torch.Tensor):
        self.mask = mask


class Op:
    """One explicit-path operation (see the module docstring for the contract)."""

    torch_type: type | None = None
    piecewise_linear = False
    has_params = False
    linear = False
    params: tuple = ()
    slot = -1  # its index in the one-node chain's tape (set by ``plan``)
    index = -1  # ops with parameters: their rank among them (the chain's parameter inputs)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("torch_type") is not None:
            OPS[cls.torch_type] = cls

    @classmethod
    def from_module(cls, m: nn.Module) -> Op:
        raise NotImplementedError

    @classmethod
    def unsupported(cls, m: nn.Module, path: str) -> str | None:
        """Why ``m`` has no explicit path (None: it has one)."""
        return None

    def forward(self, p, x):
        raise NotImplementedError

    def forward_fused(self, p, x):
        """The layer-by-layer path's forward: may use the Triton activation-mask kernels."""
        return self.forward(p, x)

    def vjp(self, p, saved, g, first_order=False):
        raise NotImplementedError

    def tangent(self, p, saved, psi):
        raise NotImplementedError(f"{type(self).__name__} is not piecewise-linear")

    def weight_grad(self, p, inp, grad_out):
        raise NotImplementedError(f"{type(self).__name__} has no parameters")

    def chain_dim(self, dim: int, x: torch.Tensor) -> int | None:
        return None

    # ---- the one-node chain's walks (composites override them; ``tape`` is _chain._Tape)

    def plan(self, planner, dim: int) -> int | None:
        """Takes a tape slot; returns the number of dims after the op, None when the one-node
        chain cannot run it."""
        if not self.piecewise_linear:
            return None
        dim = self.chain_dim(dim, planner.x)
        if dim is not None:
            self.slot = len(planner.ops)
            planner.ops.append(self)
        return dim

    def run(self, h, tape):
        """The forward, filling the tape."""
        y, tape.saved[self.slot] = self.forward(tape.params[self.slot], h)
        return y

    def walk_back(self, g, tape, at_affine):
        """The chain rule from the output to the input; ``at_affine(op, g)`` at every affine op's
        output."""
        if self.has_params:
            at_affine(self, g)
        return self.vjp(tape.params[self.slot], tape.saved[self.slot], g, True)

    def walk_forward(self, psi, tape, at_affine):
        """The penalty chain: ``psi`` through the masked linear maps (None stays None);
        ``at_affine(op, psi)`` at every affine op's input."""
        if self.has_params:
            at_affine(self, psi)
        return None if psi is None else self.tangent(tape.params[self.slot], tape.saved[self.slot], psi)

    def followed_by_act(self, after: bool, out: dict) -> bool:
        """Fills ``out[slot]`` for the affine ops: whether an activation comes after it on some
        path to the output. Returns whether one comes from the op's input on."""
        if self.has_params:
            out[self.slot] = after
            return after
        return after if self.linear else True

    def leaves(self):
        yield self


# ----------------------------------------------------------------------------------------------
# Affine ops: params = (weight, bias); bias may be None
# ----------------------------------------------------------------------------------------------


class LinearOp(Op):
    """y = x W^T + b; dx = dy W; tangent psi W^T; dW = dy^T x."""

    torch_type = nn.Linear
    piecewise_linear = has_params = True

    def __init__(self, weight, bias):
        self.params = (weight, bias)

    @classmethod
    def from_module(cls, m):
        return cls(m.weight, m.bias)

    def forward(self, p, x):
        return F.linear(x, p[0], p[1]), x

    def forward_fused(self, p, x):
        check_matches_weight(x, p[0])
        return self.forward(p, x)

    def vjp(self, p, saved, g, first_order=False):
        return g @ p[0]

    def tangent(self, p, saved, psi):
        return psi @ p[0].t()

    def weight_grad(self, p, inp, grad_out):
        return grad_out.t() @ inp

    def chain_dim(self, dim, x):
        w = self.params[0]
        return dim if dim == 2 and w.dtype == x.dtype and w.device == x.device else None


class Conv2dOp(Op):
    """``conv2d`` with zero padding; dx is the transposed convolution of dy with the same weight
    (``output_padding`` restores the input size the strided forward rounded away)."""

    torch_type = nn.Conv2d
    piecewise_linear = has_params = True

    def __init__(self, weight, bias, stride, padding, dilation, groups, supported=True):
        self.params = (weight, bias)
        self.stride, self.padding, self.dilation, self.groups = _pair(stride), _pair(padding), _pair(dilation), groups
        self.supported = supported

    @classmethod
    def from_module(cls, m):
        padding = m.padding
        if padding == "valid":
            padding = (0, 0)
        elif padding == "same":
            padding = tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size))
        return cls(m.weight, m.bias, m.stride, padding, m.dilation, m.groups, cls.unsupported(m, "") is None)

    @classmethod
    def unsupported(cls, m, path):
        if m.padding_mode != "zeros":
            return f"{path}: Conv2d with padding_mode={m.padding_mode!r} is not supported (only 'zeros')"
        if m.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(m.dilation, m.kernel_size)):
            return f"{path}: Conv2d with padding='same' and an even (dilated) kernel pads unevenly; not supported"
        return None

    def forward(self, p, x):
        return F.conv2d(x, p[0], p[1], self.stride, self.padding, self.dilation, self.groups), x

    def forward_fused(self, p, x):
        check_matches_weight(x, p[0])
        return self.forward(p, x)

    def _backward(self, grad_out, inp, weight, mask):
        return torch.ops.aten.convolution_backward(grad_out, inp, weight, None, self.stride, self.padding,
                                                   self.dilation, False, [0, 0], self.groups, mask)

    def vjp(self, p, saved, g, first_order=False):
        if first_order:  # aten's convolution backward: the one-node chain (no graph)
            return self._backward(g, saved, p[0], [True, False, False])[0]
        weight = p[0]  # a transposed convolution: differentiable twice
        output_padding = [
            size_in - ((size_out - 1) * s - 2 * pad + d * (k - 1) + 1)
            for size_in, size_out, s, pad, d, k in zip(saved.shape[-2:], g.shape[-2:], self.stride, self.padding,
                                                       self.dilation, weight.shape[-2:])
        ]
        return F.conv_transpose2d(g, weight, None, self.stride, self.padding, output_padding, self.groups,
                                  self.dilation)

    def tangent(self, p, saved, psi):
        return F.conv2d(psi, p[0], None, self.stride, self.padding, self.dilation, self.groups)

    def weight_grad(self, p, inp, grad_out):
        return self._backward(grad_out, inp, p[0], [False, True, False])[1]

    def chain_dim(self, dim, x):
        w = self.params[0]
        ok = dim == 4 and self.supported and w.dtype == x.dtype and w.device == x.device
        return dim if ok else None


# ----------------------------------------------------------------------------------------------
# Activations. Piecewise-linear ones save their output (the mask is read off its sign) or, on
# CUDA's layer-by-layer path, a 1-byte mask; smooth ones save x (or y) and multiply by the
# analytic derivative, itself differentiable so the penalty reaches earlier parameters.
# The forward never works in place (it must keep what it saves).
# ----------------------------------------------------------------------------------------------


class LeakyReLUOp(Op):
    """y = x if x > 0 else slope * x; dx = dy where x > 0, slope * dy elsewhere (for a slope >= 0
    read off y; the tangent is the same diagonal map)."""

    torch_type = nn.LeakyReLU

    def __init__(self, slope: float):
        self.slope = float(slope)
        self.piecewise_linear = self.slope >= 0  # y's sign is x's: the mask can be read off y

    @classmethod
    def from_module(cls, m):
        return cls(m.negative_slope)

    def forward(self, p, x):
        y = F.leaky_relu(x, self.slope) if self.slope else F.relu(x)
        return y, (y if self.slope >= 0 else x)

    def forward_fused(self, p, x):
        if _act.fused(x.device):  # CUDA: Triton kernels, a 1-byte mask saved instead of x
            y, mask = _act.leaky_relu_with_mask(x, self.slope, backend="triton")
            return y, Mask(mask)
        return self.forward(p, x)

    def vjp(self, p, saved, g, first_order=False):
        if isinstance(saved, Mask):
            return _act.masked_scale(g, saved.mask, self.slope, backend="triton")
        # aten's own backward kernels: one vectorised pass (torch.where with a bool mask is
        # several times slower on CPU), differentiable in g (their derivative is themselves)
        if self.slope == 0.0:
            return torch.ops.aten.threshold_backward(g, saved, 0)
        return torch.ops.aten.leaky_relu_backward(g, saved, self.slope, self.slope >= 0)

    tangent = vjp  # a diagonal map: its own adjoint (same arguments: p, saved, psi)

    def chain_dim(self, dim, x):
        return dim


class ReLUOp(LeakyReLUOp):
    """y = max(x, 0); dx = dy where x > 0, 0 elsewhere."""

    torch_type = nn.ReLU

    def __init__(self):
        super().__init__(0.0)

    @classmethod
    def from_module(cls, m):
        return cls()


class SoftplusOp(Op):
    """y = log(1 + exp(beta x)) / beta (x where beta x > threshold); dy/dx = sigmoid(beta x)
    (1 above the threshold)."""

    torch_type = nn.Softplus

    def __init__(self, beta, threshold):
        self.beta, self.threshold = beta, threshold

    @classmethod
    def from_module(cls, m):
        return cls(m.beta, m.threshold)

    def forward(self, p, x):
        return F.softplus(x, self.beta, self.threshold), x

    def vjp(self, p, x, g, first_order=False):
        bx, gu = self.beta * _upcast(x), _upcast(g)
        return torch.where(bx > self.threshold, gu, gu * torch.sigmoid(bx)).to(g.dtype)


class ELUOp(Op):
    """y = x if x > 0 else alpha (exp(x) - 1); dy/dx = 1 if x > 0 else alpha exp(x)."""

    torch_type = nn.ELU

    def __init__(self, alpha):
        self.alpha = alpha

    @classmethod
    def from_module(cls, m):
        return cls(m.alpha)

    def forward(self, p, x):
        return F.elu(x, self.alpha), x

    def vjp(self, p, x, g, first_order=False):
        xu, gu = _upcast(x), _upcast(g)
        # exp of min(x, 0): the unused branch of where must stay finite, or its zero gradient
        # times inf becomes NaN in the penalty's backward.
        return torch.where(xu > 0, gu, gu * self.alpha * torch.exp(xu.clamp(max=0))).to(g.dtype)


class SiLUOp(Op):
    """y = x sigmoid(x); dy/dx = s (1 + x (1 - s)) with s = sigmoid(x)."""

    torch_type = nn.SiLU

    @classmethod
    def from_module(cls, m):
        return cls()

    def forward(self, p, x):
        return F.silu(x), x

    def vjp(self, p, x, g, first_order=False):
        xu, gu = _upcast(x), _upcast(g)
        s = torch.sigmoid(xu)
        return (gu * s * (1 + xu * (1 - s))).to(g.dtype)


class TanhOp(Op):
    """y = tanh(x); dy/dx = 1 - y^2."""

    torch_type = nn.Tanh

    @classmethod
    def from_module(cls, m):
        return cls()

    def forward(self, p, x):
        y = torch.tanh(x)
        return y, y

    def vjp(self, p, y, g, first_order=False):
        yu, gu = _upcast(y), _upcast(g)
        return (gu * (1 - yu * yu)).to(g.dtype)


class GELUOp(Op):
    """y = x Phi(x) (``approximate='tanh'``: torch's tanh form); dx = dy * y'(x), by aten's own
    ``gelu_backward`` (differentiable again in both arguments, so the penalty's gradient reaches
    the earlier layers through x)."""

    torch_type = nn.GELU

    def __init__(self, approximate: str = "none"):
        self.approximate = approximate

    @classmethod
    def from_module(cls, m):
        return cls(m.approximate)

    def forward(self, p, x):
        return F.gelu(x, approximate=self.approximate), x

    def vjp(self, p, x, g, first_order=False):
        return torch.ops.aten.gelu_backward(g, x, approximate=self.approximate)


class HardtanhOp(Op):
    """y = clamp(x, min_val, max_val); dx = dy where min_val < x < max_val, 0 elsewhere (read off
    y by aten's ``hardtanh_backward``). Piecewise-linear: its tangent is the same diagonal map,
    so it takes the one-node chain too."""

    torch_type = nn.Hardtanh
    piecewise_linear = True

    def __init__(self, min_val: float = -1.0, max_val: float = 1.0):
        self.min_val, self.max_val = float(min_val), float(max_val)

    @classmethod
    def from_module(cls, m):
        return cls(m.min_val, m.max_val)

    def forward(self, p, x):
        y = F.hardtanh(x, self.min_val, self.max_val)
        return y, y

    def vjp(self, p, y, g, first_order=False):
        return torch.ops.aten.hardtanh_backward(g, y, self.min_val, self.max_val)

    tangent = vjp  # a diagonal map: its own adjoint (same arguments: p, saved, psi)

    def chain_dim(self, dim, x):
        return dim


# ----------------------------------------------------------------------------------------------
# Reshapes and pooling (linear maps without parameters: the input gradient is their adjoint,
# the tangent the map itself)
# ----------------------------------------------------------------------------------------------


class AvgPool2dOp(Op):
    """``avg_pool2d``; its adjoint is aten's ``avg_pool2d_backward``: a plain op (linear in dy,
    its own derivative defined, lowered by inductor), exact for every option (padding,
    ``ceil_mode``, ``count_include_pad``, ``divisor_override``). It needs only the input's shape:
    it gets a stand-in of that shape."""

    torch_type = nn.AvgPool2d
    piecewise_linear = linear = True

    def __init__(self, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        self.args = (_pair(kernel_size), _pair(kernel_size if stride is None else stride), _pair(padding),
                     ceil_mode, count_include_pad, divisor_override)

    @classmethod
    def from_module(cls, m):
        return cls(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)

    def forward(self, p, x):
        return F.avg_pool2d(x, *self.args), x.shape

    def vjp(self, p, shape, g, first_order=False):
        return torch.ops.aten.avg_pool2d_backward(g, g.new_empty((1,) * len(shape)).expand(shape), *self.args)

    def tangent(self, p, shape, psi):
        return F.avg_pool2d(psi, *self.args)

    def chain_dim(self, dim, x):
        return dim if dim == 4 else None


class FlattenOp(Op):
    """Reshape forward, reshape back."""

    torch_type = nn.Flatten
    piecewise_linear = linear = True

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        self.start_dim, self.end_dim = start_dim, end_dim

    @classmethod
    def from_module(cls, m):
        return cls(m.start_dim, m.end_dim)

    def forward(self, p, x):
        return x.flatten(self.start_dim, self.end_dim), x.shape

    def vjp(self, p, shape, g, first_order=False):
        return g.reshape(shape)

    def tangent(self, p, shape, psi):
        return psi.flatten(self.start_dim, self.end_dim)

    def chain_dim(self, dim, x):
        start, end = self.start_dim % dim, self.end_dim % dim
        if start == 0 or start > end:  # the batch dimension stays: the backward is per sample
            return None
        return dim - (end - start)


# ----------------------------------------------------------------------------------------------
# Composites: a chain of ops, and a sum of two branches
# ----------------------------------------------------------------------------------------------


class SequentialOp(Op):
    """Ops one after another: forward through all, the input gradients in reverse order."""

    def __init__(self, ops):
        self.ops = tuple(ops)

    def forward(self, p, x):
        saved = []
        for op in self.ops:
            x, s = op.forward(op.params, x)
            saved.append(s)
        return x, saved

    def vjp(self, p, saved, g, first_order=False):
        for op, s in zip(reversed(self.ops), reversed(saved)):
            g = op.vjp(op.params, s, g, first_order)
        return g

    def plan(self, planner, dim):
        for op in self.ops:
            dim = op.plan(planner, dim)
            if dim is None:
                return None
        return dim

    def run(self, h, tape):
        for op in self.ops:
            h = op.run(h, tape)
        return h

    def walk_back(self, g, tape, at_affine):
        for op in reversed(self.ops):
            g = op.walk_back(g, tape, at_affine)
        return g

    def walk_forward(self, psi, tape, at_affine):
        for op in self.ops:
            psi = op.walk_forward(psi, tape, at_affine)
        return psi

    def followed_by_act(self, after, out):
        for op in reversed(self.ops):
            after = op.followed_by_act(after, out)
        return after

    def leaves(self):
        for op in self.ops:
            yield from op.leaves()


def _add(x, y):
    return y if x is None else x if y is None else x + y


class ResidualOp(Op):
    """y = body(x) + shortcut(x) (identity when ``shortcut`` is None); every walk splits at it and
    sums the branches (the chain rule on a graph)."""

    def __init__(self, body: Op, shortcut: Op | None = None):
        self.body, self.shortcut = body, shortcut

    def _branches(self):
        return (self.body,) if self.shortcut is None else (self.body, self.shortcut)

    def forward(self, p, x):
        y, saved_body = self.body.forward(self.body.params, x)
        if self.shortcut is None:
            return y + x, (saved_body, None)
        s, saved_shortcut = self.shortcut.forward(self.shortcut.params, x)
        return y + s, (saved_body, saved_shortcut)

    def vjp(self, p, saved, g, first_order=False):
        grad_x = self.body.vjp(self.body.params, saved[0], g, first_order)
        if self.shortcut is None:
            return grad_x + g
        return grad_x + self.shortcut.vjp(self.shortcut.params, saved[1], g, first_order)

    def plan(self, planner, dim):
        body = self.body.plan(planner, dim)
        shortcut = dim if self.shortcut is None else self.shortcut.plan(planner, dim)
        return body if body is not None and body == shortcut else None

    def run(self, h, tape):
        return self.body.run(h, tape) + (h if self.shortcut is None else self.shortcut.run(h, tape))

    def walk_back(self, g, tape, at_affine):
        grad = self.body.walk_back(g, tape, at_affine)
        return grad + (g if self.shortcut is None else self.shortcut.walk_back(g, tape, at_affine))

    def walk_forward(self, psi, tape, at_affine):
        body = self.body.walk_forward(psi, tape, at_affine)
        return _add(body, psi if self.shortcut is None else self.shortcut.walk_forward(psi, tape, at_affine))

    def followed_by_act(self, after, out):
        body = self.body.followed_by_act(after, out)
        shortcut = after if self.shortcut is None else self.shortcut.followed_by_act(after, out)  # both fill out
        return body or shortcut

    def leaves(self):
        for branch in self._branches():
            yield from branch.leaves()
