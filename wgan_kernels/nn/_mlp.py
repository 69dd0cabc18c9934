"""One autograd node for a whole piecewise-linear MLP on the explicit path.

A ``Sequential`` of ``Linear, act, Linear, act, ..., Linear`` with ``act`` a ``LeakyReLU`` (slope
>= 0) or ``ReLU``, on a 2-D input, gets ``(out, grad_x)`` from ``_PiecewiseLinearMLP``: the same
GEMMs as the layer-by-layer chain, but one autograd node instead of about 25 (one per op, each with
its saved tensors and engine bookkeeping), which on CPU is most of what a small critic's step costs
beyond its GEMMs.

Notation, layers l = 1..L: ``z_l = h_{l-1} W_l^T + b_l``, ``h_l = act(z_l)``, ``h_0 = x``,
``out = z_L``; the activation's derivative ``m_l = act'(z_l)`` is 1 where ``z_l > 0`` and the slope
elsewhere, so it is read off ``h_l`` (same sign as ``z_l`` for a slope >= 0).

Forward (the input gradient of ``out.sum()``)::

    dh_{L-1} = 1 W_L  (the column sums of W_L, broadcast)     dz_l = dh_l * m_l     dh_{l-1} = dz_l W_l
    grad_x = dh_0

Backward, given ``a = dLoss/dout`` and ``c = dLoss/dgrad_x``. The masks are piecewise constant, so
``grad_x`` depends on the parameters through the ``W_l`` of the chain above only (a.e.), and two
independent chains give every gradient::

    loss chain   e_L = a,  e_{l-1} = (e_l W_l) * m_{l-1}         dW_l += e_l^T h_{l-1},  db_l = sum e_l
    penalty      psi_0 = c,  psi_l = (psi_{l-1} W_l^T) * m_l     dW_l += dz_l^T psi_{l-1}  (l < L)
                                                                 dW_L += 1^T psi_{L-1}
    dx = e_1 W_1  (grad_x contributes nothing to dx: its derivative in x is 0 a.e.)

The backward is first-order only (``once_differentiable``): the explicit path exists so that a
penalty step needs no double backward. Which critics take this node, and when, is decided by
``plan`` (``Sequential.forward_with_input_grad`` asks it); the layer-by-layer chain is the
reference it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .._backend import requested_backend


def _act_backward(g: torch.Tensor, h: torch.Tensor, slope: float) -> torch.Tensor:
    """``g * act'(z)`` read off ``h = act(z)``: aten's own one-pass kernels."""
    if slope == 0.0:
        return torch.ops.aten.threshold_backward(g, h, 0)
    return torch.ops.aten.leaky_relu_backward(g, h, slope, True)


def _linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


class _PiecewiseLinearMLP(torch.autograd.Function):
    """``(out, grad_x)`` of a Linear/(Leaky)ReLU MLP; inputs ``(slopes, x, W_1, b_1, ..., W_L, b_L)``
    (a ``b`` may be None)."""

    @staticmethod
    def forward(ctx, slopes, x, *params):
        weights, biases = params[0::2], params[1::2]
        n = len(weights)
        hs = [x]
        for l in range(n - 1):
            z = _linear(hs[-1], weights[l], biases[l])
            hs.append(F.leaky_relu(z, slopes[l]) if slopes[l] else F.relu(z))
        out = _linear(hs[-1], weights[-1], biases[-1])
        dh = weights[-1].sum(0).expand(x.shape[0], -1)
        dzs = [None] * (n - 1)
        for l in range(n - 2, -1, -1):
            dzs[l] = _act_backward(dh, hs[l + 1], slopes[l])
            dh = dzs[l] @ weights[l]
        ctx.slopes = slopes
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(*hs, *dzs, *weights)
        ctx.set_materialize_grads(False)  # an unused output costs no GEMMs in the backward
        return out, dh

    @staticmethod
    @once_differentiable
    def backward(ctx, a, c):
        slopes, n = ctx.slopes, len(ctx.has_bias)
        saved = ctx.saved_tensors
        hs, dzs, weights = saved[:n], saved[n:2 * n - 1], saved[2 * n - 1:]
        d_weights: list[torch.Tensor | None] = [None] * n
        d_biases: list[torch.Tensor | None] = [None] * n
        if c is not None:  # the penalty's chain
            psi = c
            for l in range(n - 1):
                d_weights[l] = dzs[l].t() @ psi
                psi = _act_backward(psi @ weights[l].t(), hs[l + 1], slopes[l])
            d_weights[-1] = psi.sum(0, keepdim=True).expand(weights[-1].shape[0], -1).contiguous()
        d_x = None
        if a is not None:  # the loss's chain
            e = a
            for l in range(n - 1, -1, -1):
                d_weights[l] = e.t() @ hs[l] if d_weights[l] is None else torch.addmm(d_weights[l], e.t(), hs[l])
                if ctx.has_bias[l]:
                    d_biases[l] = e.sum(0)
                if l > 0:
                    e = _act_backward(e @ weights[l], hs[l], slopes[l - 1])
                elif ctx.needs_input_grad[1]:
                    d_x = e @ weights[0]
        grads: list[torch.Tensor | None] = [None, d_x]
        for l, (dw, db) in enumerate(zip(d_weights, d_biases)):
            if db is None and ctx.has_bias[l] and c is not None and l < n - 1:
                # grad_x alone: zeros for the hidden biases (through the masks), as autograd gives,
                # so an optimizer steps on them alike; grad_x does not depend on the last bias (None)
                db = weights[l].new_zeros(weights[l].shape[0])
            grads += [dw, db]
        return tuple(grads)


def plan(seq, x: torch.Tensor):
    """``(slopes, params)`` when ``seq`` (a ``wgan_kernels.nn.Sequential``) can take the one-node
    path on ``x``, else None: layers exactly ``Linear, (LeakyReLU | ReLU), ..., Linear`` (no
    subclasses such as ``SNLinear``), slopes >= 0, a 2-D input of the weights' dtype and device, no
    autocast, not inside ``torch.compile`` (inductor fuses the layer-by-layer chain itself), and
    ``WGAN_KERNELS_BACKEND`` neither ``reference`` (the layer-by-layer chain of aten ops) nor
    ``triton`` (the layer-by-layer chain with the Triton activation-mask kernels)."""
    from .layers import LeakyReLU, Linear, ReLU  # noqa: PLC0415 - layers imports this module

    layers = list(seq._modules.values())
    if len(layers) < 3 or len(layers) % 2 == 0 or x.dim() != 2:
        return None
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return None
    if requested_backend(None) in ("reference", "triton"):
        return None
    slopes, params = [], []
    for i, layer in enumerate(layers):
        if i % 2 == 0:
            if type(layer) is not Linear:
                return None
            w = layer.weight
            if w.dtype != x.dtype or w.device != x.device:
                return None  # the layer-by-layer path raises its clear error
            params += [w, layer.bias]
        else:
            kind = type(layer)
            if kind is ReLU:
                slopes.append(0.0)
            elif kind is LeakyReLU and layer.negative_slope >= 0:
                slopes.append(float(layer.negative_slope))
            else:
                return None
    return tuple(slopes), params


def forward_with_input_grad(slopes, params, x):
    return _PiecewiseLinearMLP.apply(slopes, x, *params)
