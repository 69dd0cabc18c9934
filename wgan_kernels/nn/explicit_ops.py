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

Imports run one way: this module imports ``torch``, ``wgan_kernels.ops`` and ``wgan_kernels._backend`` only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._backend import layer_activation
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
    channels_last = False  # the one-node chain on CPU runs this op's products in channels_last
    linear = False
    # What the one-node chain may overwrite instead of allocating (``hand_over``): whether the
    # op's forward output (``fresh_out``), its input gradient and tangent (``fresh_grads``) are
    # new tensors that only the next op reads; whether the op can work in place on an input it
    # is handed (``in_place``: the piecewise-linear activations)
    fresh_out = fresh_grads = in_place = False
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
        ``at_affine(op, psi, owned)`` at every affine op's input, ``owned`` when ``psi`` is the
        op's alone (its tangent is taken first: ``at_affine`` may then overwrite it)."""
        if self.has_params:
            if psi is not None and "psi" in tape.owned(self.slot):
                out = self.tangent(tape.params[self.slot], tape.saved[self.slot], psi)
                at_affine(self, psi, True)
                return out
            at_affine(self, psi, False)
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


def hand_over(planner, producer: Op, consumer: Op) -> None:
    """Records, for the one-node chain, what may be overwritten on the edge ``producer ->
    consumer`` of two leaf ops where the producer's output is read by the consumer alone: the
    consumer's forward input and tangent (``"fwd"``) when the producer makes them new (an affine
    op), the consumer's tangent input at an affine op (``"psi"``, overwritten by the loss chain's
    ``a * h + psi`` once the tangent is taken) and the producer's input gradient (``"grad"``)
    when the consumer's is new. Fewer fresh buffers: on CPU, buffers of 32 MB and more are fresh
    pages from the kernel at every allocation (8192 page faults each). Composites (no slot of
    their own) are skipped: what their ends read or make is their children's business."""
    if producer.slot < 0 or consumer.slot < 0:
        return
    own = planner.own
    if consumer.in_place and producer.fresh_out and producer.fresh_grads:
        own.setdefault(consumer.slot, set()).add("fwd")
    if consumer.has_params and consumer.fresh_grads and producer.fresh_grads:
        own.setdefault(consumer.slot, set()).add("psi")
    if producer.in_place and consumer.fresh_grads:
        own.setdefault(producer.slot, set()).add("grad")


# ----------------------------------------------------------------------------------------------
# Affine ops: params = (weight, bias); bias may be None
# ----------------------------------------------------------------------------------------------


class LinearOp(Op):
    """y = x W^T + b; dx = dy W; tangent psi W^T; dW = dy^T x."""

    torch_type = nn.Linear
    piecewise_linear = has_params = True
    fresh_out = fresh_grads = True

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


def _ntuple(v, n: int) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _per_dims(base: type, torch_types: tuple, first_nd: int = 1) -> tuple:
    """The op classes of a family of torch modules that differ only in their number of spatial
    dims (``Conv1d`` / ``Conv2d`` / ``Conv3d``, ...): subclasses of ``base`` with ``torch_type``
    and ``nd`` set (registered in ``OPS`` by ``Op.__init_subclass__``)."""
    return tuple(type(f"{t.__name__}Op", (base,), {"torch_type": t, "nd": first_nd + i, "__module__": __name__,
                                                   "__doc__": f"``nn.{t.__name__}``: {base.__doc__}"})
                 for i, t in enumerate(torch_types))


class _ConvOp(Op):
    """``conv{1,2,3}d`` with zero padding (any stride, dilation, groups); dx is the transposed
    convolution of dy with the same weight (``output_padding`` restores the input size the
    strided forward rounded away). ``nd``: the number of spatial dims."""

    nd = 2
    piecewise_linear = has_params = True
    fresh_out = fresh_grads = True

    @property
    def channels_last(self) -> bool:
        # oneDNN's CPU convolutions are faster on NHWC activations and weights: measured on the
        # DCGAN-64 critic's layers at batch 128 (2 threads), forward 157 -> 127 ms, input
        # gradients 210 -> 158, weight gradients 163 -> 136
        return self.nd == 2

    def __init__(self, weight, bias, stride, padding, dilation, groups, supported=True):
        n = self.nd
        self.params = (weight, bias)
        self.stride, self.padding, self.dilation = _ntuple(stride, n), _ntuple(padding, n), _ntuple(dilation, n)
        self.groups, self.supported = groups, supported

    @classmethod
    def from_module(cls, m):
        padding = m.padding
        if padding == "valid":
            padding = (0,) * cls.nd
        elif padding == "same":
            padding = tuple(d * (k - 1) // 2 for d, k in zip(m.dilation, m.kernel_size))
        return cls(m.weight, m.bias, m.stride, padding, m.dilation, m.groups, cls.unsupported(m, "") is None)

    @classmethod
    def unsupported(cls, m, path):
        name = type(m).__name__
        if m.padding_mode != "zeros":
            return f"{path}: {name} with padding_mode={m.padding_mode!r} is not supported (only 'zeros')"
        if m.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(m.dilation, m.kernel_size)):
            return f"{path}: {name} with padding='same' and an even (dilated) kernel pads unevenly; not supported"
        return None

    def forward(self, p, x):
        return _CONV[self.nd](x, p[0], p[1], self.stride, self.padding, self.dilation, self.groups), x

    def forward_fused(self, p, x):
        check_matches_weight(x, p[0])
        return self.forward(p, x)

    def _backward(self, grad_out, inp, weight, mask):
        return torch.ops.aten.convolution_backward(grad_out, inp, weight, None, self.stride, self.padding,
                                                   self.dilation, False, [0] * self.nd, self.groups, mask)

    def vjp(self, p, saved, g, first_order=False):
        if first_order:  # aten's convolution backward: the one-node chain (no graph)
            return self._backward(g, saved, p[0], [True, False, False])[0]
        weight = p[0]  # a transposed convolution: differentiable twice
        n = self.nd
        output_padding = [
            size_in - ((size_out - 1) * s - 2 * pad + d * (k - 1) + 1)
            for size_in, size_out, s, pad, d, k in zip(saved.shape[-n:], g.shape[-n:], self.stride, self.padding,
                                                       self.dilation, weight.shape[-n:])
        ]
        return _CONV_T[n](g, weight, None, self.stride, self.padding, output_padding, self.groups, self.dilation)

    def tangent(self, p, saved, psi):
        return _CONV[self.nd](psi, p[0], None, self.stride, self.padding, self.dilation, self.groups)

    def weight_grad(self, p, inp, grad_out):
        return self._backward(grad_out, inp, p[0], [False, True, False])[1]

    def chain_dim(self, dim, x):
        w = self.params[0]
        ok = dim == self.nd + 2 and self.supported and w.dtype == x.dtype and w.device == x.device
        return dim if ok else None


Conv1dOp, Conv2dOp, Conv3dOp = _per_dims(_ConvOp, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


# ----------------------------------------------------------------------------------------------
# Activations. Piecewise-linear ones save their output (the mask is read off its sign) or, on
# CUDA's layer-by-layer path, a 1-byte mask; smooth ones save x (or y) and multiply by the
# analytic derivative, itself differentiable so the penalty reaches earlier parameters.
# The layer-by-layer forward never works in place; the one-node chain does where the input is
# the op's alone (``hand_over``): an activation saves its output, not its input.
# ----------------------------------------------------------------------------------------------


class _DiagonalOp(Op):
    """A piecewise-linear activation whose derivative is a diagonal read off its output: on an
    input it is handed (``explicit_ops.hand_over``) the one-node chain runs it in place, and its
    vjp (= its tangent) into the gradient it is handed; the same aten kernels, the same values."""

    fresh_grads = in_place = True  # (its vjp writes a new tensor, or one it owns)

    def _forward_into(self, h):
        raise NotImplementedError

    def _vjp_into(self, g, saved):
        raise NotImplementedError

    def run(self, h, tape):
        if "fwd" not in tape.owned(self.slot):
            return super().run(h, tape)
        y = tape.saved[self.slot] = self._forward_into(h)
        return y

    def walk_back(self, g, tape, at_affine):
        if "grad" not in tape.owned(self.slot):
            return super().walk_back(g, tape, at_affine)
        return self._vjp_into(g, tape.saved[self.slot])

    def walk_forward(self, psi, tape, at_affine):
        if psi is None or "fwd" not in tape.owned(self.slot):
            return super().walk_forward(psi, tape, at_affine)
        return self._vjp_into(psi, tape.saved[self.slot])


class LeakyReLUOp(_DiagonalOp):
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
        if layer_activation(x.device) == "triton":  # CUDA: Triton kernels, a 1-byte mask saved instead of x
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

    def _forward_into(self, h):  # (a slope >= 0 on the chain: y is what it saves)
        return F.leaky_relu_(h, self.slope) if self.slope else F.relu_(h)

    def _vjp_into(self, g, saved):
        if self.slope == 0.0:
            return torch.ops.aten.threshold_backward.grad_input(g, saved, 0, grad_input=g)
        return torch.ops.aten.leaky_relu_backward.grad_input(g, saved, self.slope, True, grad_input=g)

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


class _SavesOutputOp(Op):
    """A smooth activation whose derivative is a function of its output: it saves y and
    multiplies g by ``slope(y)`` (in float32 for 16-bit values)."""

    @classmethod
    def from_module(cls, m):
        return cls()

    def forward(self, p, x):
        y = self.fn(x)
        return y, y

    def vjp(self, p, y, g, first_order=False):
        return (_upcast(g) * self.slope(_upcast(y))).to(g.dtype)


class TanhOp(_SavesOutputOp):
    """y = tanh(x); dy/dx = 1 - y^2."""

    torch_type = nn.Tanh
    fn = staticmethod(torch.tanh)

    @staticmethod
    def slope(y):
        return 1 - y * y


class SigmoidOp(_SavesOutputOp):
    """y = sigmoid(x); dy/dx = y (1 - y)."""

    torch_type = nn.Sigmoid
    fn = staticmethod(torch.sigmoid)

    @staticmethod
    def slope(y):
        return y * (1 - y)


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


class HardtanhOp(_DiagonalOp):
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

    def _forward_into(self, h):
        return F.hardtanh_(h, self.min_val, self.max_val)

    def _vjp_into(self, g, saved):
        return torch.ops.aten.hardtanh_backward.grad_input(g, saved, self.min_val, self.max_val, grad_input=g)

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
    it gets a stand-in of that shape, uninitialised and laid out as ``g`` (aten makes an
    expanded one contiguous: a copy of the input's size; an empty one it reads nothing of)."""

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
        nhwc = g.dim() == 4 and not g.is_contiguous() and g.is_contiguous(memory_format=torch.channels_last)
        stand_in = torch.empty(shape, dtype=g.dtype, device=g.device,
                               memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        return torch.ops.aten.avg_pool2d_backward(g, stand_in, *self.args)

    def tangent(self, p, shape, psi):
        return F.avg_pool2d(psi, *self.args)

    def chain_dim(self, dim, x):
        return dim if dim == 4 else None


class _ReshapeOp(Op):
    """A reshape of each sample: ``forward`` saves the input's shape, the adjoint reshapes back,
    the tangent is the forward itself."""

    piecewise_linear = linear = True

    def vjp(self, p, shape, g, first_order=False):
        return g.reshape(shape)

    def tangent(self, p, shape, psi):
        return self.forward(p, psi)[0]


class FlattenOp(_ReshapeOp):
    """Reshape forward, reshape back."""

    torch_type = nn.Flatten

    def __init__(self, start_dim: int = 1, end_dim: int = -1):
        self.start_dim, self.end_dim = start_dim, end_dim

    @classmethod
    def from_module(cls, m):
        return cls(m.start_dim, m.end_dim)

    def forward(self, p, x):
        return x.flatten(self.start_dim, self.end_dim), x.shape

    def chain_dim(self, dim, x):
        start, end = self.start_dim % dim, self.end_dim % dim
        if start == 0 or start > end:  # the batch dimension stays: the backward is per sample
            return None
        return dim - (end - start)


class IdentityOp(Op):
    """y = x (``nn.Identity``, and a dropout in eval mode)."""

    torch_type = nn.Identity
    piecewise_linear = linear = True

    @classmethod
    def from_module(cls, m):
        return cls()

    def forward(self, p, x):
        return x, None

    def vjp(self, p, saved, g, first_order=False):
        return g

    tangent = vjp

    def chain_dim(self, dim, x):
        return dim


class ReduceOp(Op):
    """``x.sum(dims)`` / ``x.mean(dims)`` (``scale`` 1 / the count) over non-batch dims, and
    ``AdaptiveAvgPool{1,2,3}d`` to size 1 (a mean keeping the dims). Its adjoint broadcasts g back."""

    piecewise_linear = linear = True

    def __init__(self, dims, keepdim: bool, scale: float = 1.0):
        self.dims, self.keepdim, self.scale = tuple(sorted(dims)), keepdim, scale

    def forward(self, p, x):
        y = x.sum(self.dims, keepdim=self.keepdim)
        return (y if self.scale == 1.0 else y * self.scale), x.shape

    def vjp(self, p, shape, g, first_order=False):
        if not self.keepdim:
            for d in self.dims:
                g = g.unsqueeze(d)
        g = g.expand(shape)
        return g if self.scale == 1.0 else g * self.scale

    def tangent(self, p, shape, psi):
        return self.forward(p, psi)[0]

    def chain_dim(self, dim, x):
        return dim - (0 if self.keepdim else len(self.dims))


class _AdaptiveAvgPoolOp(ReduceOp):
    """``AdaptiveAvgPool{n}d`` with output size 1: the mean over the spatial dims, kept."""

    nd = 2

    @classmethod
    def from_module(cls, m):
        dims = tuple(range(2, 2 + cls.nd))
        return cls(dims, True, 1.0)  # the scale is set from the input's shape in forward

    @classmethod
    def unsupported(cls, m, path):
        size = _ntuple(m.output_size, cls.nd)
        if any(s != 1 for s in size):
            return (f"{path}: {type(m).__name__} with output_size={m.output_size!r} is not supported "
                    "(only 1: a global average pool)")
        return None

    def forward(self, p, x):
        self.scale = 1.0 / math.prod(x.shape[2:]) if x.dim() == self.nd + 2 else 1.0
        return super().forward(p, x)


AdaptiveAvgPool1dOp, AdaptiveAvgPool2dOp, AdaptiveAvgPool3dOp = _per_dims(
    _AdaptiveAvgPoolOp, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d))


class ScaleOp(Op):
    """y = c x for a number c (``h * 0.5``, ``h / 2``, ``-h``)."""

    piecewise_linear = linear = True

    def __init__(self, c: float):
        self.c = c

    def forward(self, p, x):
        return x * self.c, None

    def vjp(self, p, saved, g, first_order=False):
        return g * self.c

    tangent = vjp

    def chain_dim(self, dim, x):
        return dim


class MulOp(Op):
    """y = x * t for a tensor t that does not depend on x (broadcast; per sample, or shared):
    an embedding in a projection critic, a fixed scale. ``params`` is ``(t,)``, bound for each
    forward. A linear map of x; on the one-node chain only when t needs no gradient."""

    piecewise_linear = linear = True

    def __init__(self, t=None):
        self.params = (t,)

    def forward(self, p, x):
        return x * p[0], x.shape

    def vjp(self, p, shape, g, first_order=False):
        return (g * p[0]).sum_to_size(shape)

    def tangent(self, p, shape, psi):
        return psi * p[0]

    def chain_dim(self, dim, x):
        t = self.params[0]
        if t.requires_grad or t.dim() > dim or (t.dim() == dim and t.shape[0] not in (1, x.shape[0])):
            return None
        return dim


class ReshapeOp(_ReshapeOp):
    """A reshape of each sample (``view``, ``reshape``, ``flatten``, ``unflatten``, ``squeeze``,
    ``unsqueeze`` that keep the batch dimension first): ``(N, *shape)``; back to the input's shape."""

    def __init__(self, shape):
        self.shape = tuple(shape)

    def forward(self, p, x):
        return x.reshape((x.shape[0],) + self.shape), x.shape

    def chain_dim(self, dim, x):
        return 1 + len(self.shape)


class UnflattenOp(_ReshapeOp):
    """``nn.Unflatten`` of a non-batch dim; back by a reshape."""

    torch_type = nn.Unflatten

    def __init__(self, dim: int, sizes):
        self.dim, self.sizes = dim, tuple(sizes)

    @classmethod
    def from_module(cls, m):
        return cls(m.dim, m.unflattened_size)

    @classmethod
    def unsupported(cls, m, path):
        if m.dim == 0 or isinstance(m.unflattened_size[0], tuple):
            return f"{path}: Unflatten of dim 0 (the batch) or with named sizes is not supported"
        return None

    def forward(self, p, x):
        if self.dim % x.dim() == 0:
            raise ValueError(f"Unflatten: dim {self.dim} is the batch dimension of a {x.dim()}-D input")
        return x.unflatten(self.dim, self.sizes), x.shape

    def chain_dim(self, dim, x):
        return dim + len(self.sizes) - 1 if self.dim % dim != 0 else None


class PermuteOp(Op):
    """A permutation of the non-batch dims (``transpose``, ``permute``, ``.mT`` of each sample);
    back by the inverse permutation."""

    piecewise_linear = linear = True

    def __init__(self, perm):
        self.perm = tuple(perm)
        self.inverse = tuple(sorted(range(len(perm)), key=lambda i: perm[i]))

    def forward(self, p, x):
        return x.permute(self.perm), None

    def vjp(self, p, saved, g, first_order=False):
        return g.permute(self.inverse)

    def tangent(self, p, saved, psi):
        return psi.permute(self.perm)

    def chain_dim(self, dim, x):
        return dim


class _DropoutOp(Op):
    """A training-mode dropout: y = x * m, the mask m (0 or 1 / (1 - p), one value per element,
    or per channel for the Dropout{1,2,3}d) drawn by torch's own dropout of ones, so it takes the
    same random numbers as ``module(x)`` would; for that forward it is a fixed linear map, whose
    adjoint and tangent multiply by m. In eval mode (or p = 0) an identity."""

    piecewise_linear = linear = True
    nd = 0  # Dropout: per element; Dropout{n}d: per channel of an (N, C, *n dims) input
    _FN = {0: F.dropout, 1: F.dropout1d, 2: F.dropout2d, 3: F.dropout3d}

    def __init__(self, p: float, training: bool):
        self.p, self.training = p, training

    @classmethod
    def from_module(cls, m):
        return cls(m.p, m.training)

    def forward(self, p, x):
        if not self.training or self.p == 0:
            return x, None
        shape = x.shape if self.nd == 0 else x.shape[:2] + (1,) * self.nd
        mask = self._FN[self.nd](x.new_ones(shape), self.p, True)
        return x * mask, mask

    def vjp(self, p, mask, g, first_order=False):
        return g if mask is None else g * mask

    tangent = vjp

    def chain_dim(self, dim, x):
        return dim if self.nd == 0 or dim == self.nd + 2 else None


class DropoutOp(_DropoutOp):
    """``nn.Dropout`` (see ``_DropoutOp``)."""

    torch_type = nn.Dropout


Dropout1dOp, Dropout2dOp, Dropout3dOp = _per_dims(_DropoutOp, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d))


# ----------------------------------------------------------------------------------------------
# Normalisations. Eval-mode BatchNorm is a per-channel affine map of its running statistics
# (piecewise-linear: it takes the one-node chain). The per-sample norms (LayerNorm, GroupNorm,
# InstanceNorm) are smooth: their adjoint is written out with differentiable ops. A norm that
# uses the batch's statistics couples the samples, so the per-sample gradient a penalty needs is
# not what the explicit path computes: refused with that reason.
# ----------------------------------------------------------------------------------------------

BATCH_STATISTICS = ("{path}: {name} in training mode (or without running statistics) normalises with the "
                    "batch's statistics, which couples the samples of a minibatch: a per-sample gradient penalty "
                    "is not defined on it; put it in eval mode or use a per-sample norm (LayerNorm, GroupNorm, "
                    "InstanceNorm)")


class _BatchNormOp(Op):
    """Eval-mode ``BatchNorm{1,2,3}d``: y = (x - mean) s + b with s = w / sqrt(var + eps) per
    channel (dim 1), from the running statistics. Affine (``has_params``: (weight, bias)) when
    the module is: the tangent is psi s, the weight gradient sum(grad_out (x - mean)) / sqrt(var +
    eps); it saves the centred input. Without affine parameters a linear map plus a constant."""

    piecewise_linear = True

    def __init__(self, m):
        self.module = m
        self.has_params = m.affine
        self.linear = not m.affine
        self.params = (m.weight, m.bias) if m.affine else ()

    @classmethod
    def from_module(cls, m):
        return cls(m)

    @classmethod
    def unsupported(cls, m, path):
        if m.training or not m.track_running_stats or m.running_mean is None:
            return BATCH_STATISTICS.format(path=path, name=type(m).__name__)
        return None

    def _shape(self, x):
        return (1, -1) + (1,) * (x.dim() - 2)

    def _inv_std(self, x):
        m = self.module
        return torch.rsqrt(m.running_var.to(_upcast(x).dtype) + m.eps).view(self._shape(x))

    def forward(self, p, x):
        m = self.module
        w, b = (p[0], p[1]) if self.has_params else (None, None)
        y = F.batch_norm(x, m.running_mean, m.running_var, w, b, False, 0.0, m.eps)
        saved = (x - m.running_mean.to(x.dtype).view(self._shape(x))) if self.has_params else x.shape
        return y, saved

    def _scale(self, p, x):
        s = self._inv_std(x)
        return s * p[0].view(self._shape(x)) if self.has_params else s

    def vjp(self, p, saved, g, first_order=False):
        return (_upcast(g) * self._scale(p, g)).to(g.dtype)

    tangent = vjp

    def weight_grad(self, p, inp, grad_out):
        dims = (0,) + tuple(range(2, inp.dim()))
        return ((_upcast(grad_out) * _upcast(inp)) * self._inv_std(inp)).sum(dims).to(p[0].dtype)

    def chain_dim(self, dim, x):
        if not self.has_params:
            return dim if dim >= 2 else None
        w = self.params[0]
        return dim if dim >= 2 and w.dtype == x.dtype and w.device == x.device else None


BatchNorm1dOp, BatchNorm2dOp, BatchNorm3dOp = _per_dims(_BatchNormOp, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))


def _norm_vjp(x, g, groups_shape, affine_view, weight, eps):
    """The adjoint of y = xhat w + b with xhat = (x - mean) / sqrt(var + eps) over the last dim
    of ``x.reshape(groups_shape)``: dx = rstd (gw - mean(gw) - xhat mean(gw xhat)), gw = g w;
    plain differentiable ops (in float32 for 16-bit inputs)."""
    xu, gu = _upcast(x), _upcast(g)
    if weight is not None:
        gu = gu * weight.to(gu.dtype).view(affine_view)
    xr, gr = xu.reshape(groups_shape), gu.reshape(groups_shape)
    mean = xr.mean(-1, keepdim=True)
    centred = xr - mean
    rstd = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    xhat = centred * rstd
    dx = rstd * (gr - gr.mean(-1, keepdim=True) - xhat * (gr * xhat).mean(-1, keepdim=True))
    return dx.reshape(x.shape).to(g.dtype)


class _NormOp(Op):
    """A per-sample norm module (its statistics and ``eps`` read from ``module``); ``params`` is
    its ``(weight, bias)`` (None without affine parameters)."""

    def __init__(self, m):
        self.module = m
        self.params = (m.weight, m.bias)

    @classmethod
    def from_module(cls, m):
        return cls(m)


class LayerNormOp(_NormOp):
    """``nn.LayerNorm`` over the trailing ``normalized_shape`` dims (per sample): adjoint by
    ``_norm_vjp``, differentiable again (its gradient reaches the layers before it)."""

    torch_type = nn.LayerNorm

    def forward(self, p, x):
        m = self.module
        return F.layer_norm(x, m.normalized_shape, p[0], p[1], m.eps), x

    def vjp(self, p, x, g, first_order=False):
        k = len(self.module.normalized_shape)
        lead = x.shape[:-k]
        view = (1,) * len(lead) + tuple(self.module.normalized_shape)
        return _norm_vjp(x, g, lead + (-1,), view, p[0], self.module.eps)


class GroupNormOp(_NormOp):
    """``nn.GroupNorm``: statistics per (sample, group) over its channels and positions."""

    torch_type = nn.GroupNorm

    def forward(self, p, x):
        m = self.module
        return F.group_norm(x, m.num_groups, p[0], p[1], m.eps), x

    def vjp(self, p, x, g, first_order=False):
        m = self.module
        view = (1, -1) + (1,) * (x.dim() - 2)
        return _norm_vjp(x, g, (x.shape[0], m.num_groups, -1), view, p[0], m.eps)


class _InstanceNormOp(_NormOp):
    """``InstanceNorm{1,2,3}d``: statistics per (sample, channel) over positions (running
    statistics, when tracked, are updated in training mode as the module does; in eval mode
    with tracked statistics it is refused)."""

    @classmethod
    def unsupported(cls, m, path):
        if not m.training and m.track_running_stats:
            return (f"{path}: {type(m).__name__} in eval mode with track_running_stats=True (a per-channel affine "
                    "map of the running statistics) is not supported")
        return None

    def forward(self, p, x):
        m = self.module
        y = F.instance_norm(x, m.running_mean, m.running_var, p[0], p[1], m.training or not m.track_running_stats,
                            m.momentum if m.momentum is not None else 0.0, m.eps)
        return y, x

    def vjp(self, p, x, g, first_order=False):
        view = (1, -1) + (1,) * (x.dim() - 2)
        return _norm_vjp(x, g, (x.shape[0], x.shape[1], -1), view, p[0], self.module.eps)


InstanceNorm1dOp, InstanceNorm2dOp, InstanceNorm3dOp = _per_dims(
    _InstanceNormOp, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d))


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
        for producer, consumer in zip(self.ops, self.ops[1:]):
            hand_over(planner, producer, consumer)
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
