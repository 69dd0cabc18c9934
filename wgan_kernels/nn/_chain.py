"""One autograd node for a whole piecewise-linear critic on the explicit path.

A ``Sequential`` of ``Linear``, ``Conv2d``, ``LeakyReLU`` (slope >= 0), ``ReLU`` and ``Flatten``
blocks gets ``(out, grad_x)`` from ``_PiecewiseLinearChain``: one autograd node instead of one per
op (about 25 for a 4-layer MLP, each with its saved tensors and engine bookkeeping), and a
hand-written backward that needs fewer matrix products than autograd's.

Notation, affine layers j = 1..n (a Linear, or a Conv2d): ``z_j = A_j(h_{j-1}) + b_j`` with ``A_j``
linear (``h W^T``, or the convolution), ``J_j^T`` its adjoint (``g W``, or the transposed
convolution); between them the activations ``h = act(z)``, whose derivative ``m = act'(z)`` is 1
where ``z > 0`` and the slope elsewhere, so it is read off ``h`` (same sign as ``z`` for a slope
>= 0), and the reshapes of ``Flatten``.

Forward: ``out``, then the input gradient of ``out.sum()`` by the chain rule,
``g = ones``; per affine layer from the last, ``dz_j = g`` (the gradient at its output, masks
applied) and ``g = A_j^T(dz_j)``; ``grad_x`` is the last ``g``.

Backward, given ``a = dLoss/dout`` and ``c = dLoss/dgrad_x``. The masks are piecewise constant, so
``grad_x`` depends on the parameters through the ``A_j`` of the chain above only (a.e.), and its
gradient follows the penalty chain, forward through the layers::

    psi_0 = c;   dW_j += weight_grad(input=psi_{j-1}, grad_out=dz_j);   psi_j = m * A_j(psi_{j-1})

A critic has one output per sample. Then the loss chain needs no products of its own: the
gradient of ``sum_i a_i out_i`` at ``z_j`` is ``a_i dz_j`` (``dz_j`` is the gradient of ``out_i``
there), and a weight gradient is bilinear in (input, grad_out) and sums over samples, so both
chains' weight gradients are one product per layer::

    dW_j = weight_grad(input = a * h_{j-1} + psi_{j-1}, grad_out = dz_j)
    db_j = sum over samples (and positions) of a * dz_j,    dx = a * grad_x

Per layer that is 2 products in the backward (``A_j psi`` and one weight gradient) where
autograd's double backward takes 4 (the loss chain's ``A_j^T e`` and weight gradient, the penalty
chain's two): the whole step is 4 products per layer instead of 6, the "floor" (2x a plain
forward + backward) included. With several outputs per sample the loss chain is walked on its
own (``e_n = a``, ``dW_j += weight_grad(h_{j-1}, e_j)``, ``e = m * A_j^T e``).

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

# Layer descriptors (static, hashable): ("linear",), ("conv", stride, padding, dilation, groups),
# ("act", slope), ("flatten", start_dim, end_dim). Affine ones take (weight, bias) from params.
_AFFINE = ("linear", "conv")


def _act_backward(g: torch.Tensor, h: torch.Tensor, slope: float) -> torch.Tensor:
    """``g * act'(z)`` read off ``h = act(z)``: aten's own one-pass kernels."""
    if slope == 0.0:
        return torch.ops.aten.threshold_backward(g, h, 0)
    return torch.ops.aten.leaky_relu_backward(g, h, slope, True)


def _forward(op, h, weight, bias):
    """``A(h) + b``."""
    if op[0] == "linear":
        return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()
    return F.conv2d(h, weight, bias, *op[1:])


def _apply(op, h, weight):
    """``A(h)``, no bias: the penalty chain's step."""
    if op[0] == "linear":
        return h @ weight.t()
    return F.conv2d(h, weight, None, *op[1:])


def _conv_backward(op, grad_out, inp, weight, mask):
    stride, padding, dilation, groups = op[1:]
    return torch.ops.aten.convolution_backward(grad_out, inp, weight, None, stride, padding, dilation, False,
                                               [0, 0], groups, mask)


def _adjoint(op, g, inp, weight):
    """``A^T(g)``, shaped like the layer's input ``inp``."""
    if op[0] == "linear":
        return g @ weight
    return _conv_backward(op, g, inp, weight, [True, False, False])[0]


def _weight_grad(op, inp, grad_out, weight):
    """The weight gradient of ``<grad_out, A(inp)>``: sums over samples (and positions)."""
    if op[0] == "linear":
        return grad_out.t() @ inp
    return _conv_backward(op, grad_out, inp, weight, [False, True, False])[1]


def _bias_grad(grad_out, a=None):
    """``sum_i a_i grad_out_i`` over samples and positions (``a`` None: all ones), as a product
    then a sum, the order autograd's loss chain takes: where the two sides of a WGAN loss cancel
    exactly (a bias whose unit has as many open masks on real as on fake samples), both give 0,
    not rounding noise that Adam would turn into a full step."""
    dims = (0,) + tuple(range(2, grad_out.dim()))
    return (grad_out if a is None else grad_out * _per_sample(a, grad_out)).sum(dims)


def _per_sample(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``a`` (one value per sample) shaped to broadcast against ``like``."""
    return a.reshape((like.shape[0],) + (1,) * (like.dim() - 1))


def _walk_back(ops, g, inputs, acts, shapes, weights, at_affine, to_input=True):
    """The chain rule from the output to the input: ``g`` through every op's adjoint, and
    ``at_affine(j, g)`` with the gradient at affine layer j's output. Returns the gradient at the
    input, or None without the first layer's adjoint when ``to_input`` is False."""
    j, k, s = len(weights), len(acts), len(shapes)
    for op in reversed(ops):
        if op[0] in _AFFINE:
            j -= 1
            at_affine(j, g)
            if j == 0 and not to_input:
                return None
            g = _adjoint(op, g, inputs[j], weights[j])
        elif op[0] == "act":
            k -= 1
            g = _act_backward(g, acts[k], op[1])
        else:
            s -= 1
            g = g.reshape(shapes[s])
    return g


class _PiecewiseLinearChain(torch.autograd.Function):
    """``(out, grad_x)`` of a chain of affine layers, (leaky) ReLUs and reshapes; inputs
    ``(ops, x, W_1, b_1, ..., W_n, b_n)`` (a ``b`` may be None), ``ops`` from ``plan``."""

    @staticmethod
    def forward(ctx, ops, x, *params):
        weights, biases = params[0::2], params[1::2]
        h, j = x, 0
        inputs, acts, shapes = [], [], []
        for op in ops:
            if op[0] in _AFFINE:
                inputs.append(h)
                h = _forward(op, h, weights[j], biases[j])
                j += 1
            elif op[0] == "act":
                h = F.leaky_relu(h, op[1]) if op[1] else F.relu(h)
                acts.append(h)
            else:
                shapes.append(h.shape)
                h = h.flatten(op[1], op[2])
        out = h
        dzs = [None] * len(weights)
        g = _walk_back(ops, torch.ones_like(out), inputs, acts, shapes, weights, dzs.__setitem__)
        ctx.ops, ctx.shapes = ops, shapes
        ctx.counts = (len(weights), len(acts))
        ctx.has_bias = [b is not None for b in biases]
        # b_j reaches grad_x (through a mask) iff an activation follows layer j somewhere
        ctx.bias_in_grad_x = [any(later[0] == "act" for later in ops[i + 1:]) for i, op in enumerate(ops)
                              if op[0] in _AFFINE]
        ctx.per_sample = out.numel() == out.shape[0]
        ctx.save_for_backward(*inputs, *acts, *dzs, *weights, g)
        ctx.set_materialize_grads(False)  # an unused output costs no products in the backward
        return out, g

    @staticmethod
    @once_differentiable
    def backward(ctx, a, c):
        ops, shapes, (n, n_acts) = ctx.ops, ctx.shapes, ctx.counts
        saved = ctx.saved_tensors
        inputs, acts = saved[:n], saved[n:n + n_acts]
        dzs, weights, grad_x = saved[n + n_acts:2 * n + n_acts], saved[2 * n + n_acts:3 * n + n_acts], saved[-1]
        fused = a is not None and ctx.per_sample  # the loss chain folded into the penalty's
        d_w: list[torch.Tensor | None] = [None] * n
        d_b: list[torch.Tensor | None] = [None] * n
        d_x = None
        if c is not None or fused:  # forward through the layers: the penalty chain psi
            psi, j, k = c, 0, 0
            for op in ops:
                if op[0] in _AFFINE:
                    u = psi
                    if fused:
                        a_h = _per_sample(a, inputs[j])
                        u = inputs[j] * a_h if psi is None else torch.addcmul(psi, inputs[j], a_h)
                        if ctx.has_bias[j]:
                            d_b[j] = _bias_grad(dzs[j], a)
                    d_w[j] = _weight_grad(op, u, dzs[j], weights[j])
                    if psi is not None and j < n - 1:
                        psi = _apply(op, psi, weights[j])
                    j += 1
                elif psi is not None and op[0] == "act":
                    psi = _act_backward(psi, acts[k], op[1])
                elif psi is not None:
                    psi = psi.flatten(op[1], op[2])
                k += op[0] == "act"
                if j == n:
                    break
            if fused and ctx.needs_input_grad[1]:
                d_x = grad_x * _per_sample(a, grad_x)
        if a is not None and not fused:  # several outputs per sample: the loss chain on its own
            affine = [op for op in ops if op[0] in _AFFINE]

            def loss_grads(j, e):
                dw = _weight_grad(affine[j], inputs[j], e, weights[j])
                d_w[j] = dw if d_w[j] is None else d_w[j] + dw
                if ctx.has_bias[j]:
                    d_b[j] = _bias_grad(e)

            d_x = _walk_back(ops, a, inputs, acts, shapes, weights, loss_grads, to_input=ctx.needs_input_grad[1])
        grads: list[torch.Tensor | None] = [None, d_x]
        for j, (dw, db) in enumerate(zip(d_w, d_b)):
            if db is None and ctx.has_bias[j] and c is not None and ctx.bias_in_grad_x[j]:
                # grad_x alone: zeros for a bias that reaches it through a mask (derivative 0 a.e.),
                # as autograd gives, so an optimizer steps on it alike; None for the others
                db = weights[j].new_zeros(weights[j].shape[0])
            grads += [dw, db]
        return tuple(grads)


def plan(seq, x: torch.Tensor):
    """``(ops, params)`` when ``seq`` (a ``wgan_kernels.nn.Sequential``) can take the one-node
    path on ``x``, else None: layers ``Linear`` (on 2-D input), ``Conv2d`` (on 4-D input, zero
    padding), ``LeakyReLU`` with a slope >= 0, ``ReLU`` and ``Flatten``, exactly those classes (no
    subclasses such as ``SNLinear``), at least one affine layer, weights of the input's dtype and
    device; no autocast, not inside ``torch.compile`` (inductor fuses the layer-by-layer chain
    itself), and ``WGAN_KERNELS_BACKEND`` neither ``reference`` (the layer-by-layer chain of aten
    ops) nor ``triton`` (the layer-by-layer chain with the Triton activation-mask kernels)."""
    from .layers import Conv2d, Flatten, LeakyReLU, Linear, ReLU  # noqa: PLC0415 - layers imports this module

    if requested_backend(None) in ("reference", "triton") or x.dim() < 2:
        return None
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return None
    ops, params, dim = [], [], x.dim()
    for layer in seq._modules.values():
        kind = type(layer)
        if kind is Linear or kind is Conv2d:
            if dim != (2 if kind is Linear else 4) or (kind is Conv2d and layer._unsupported("") is not None):
                return None
            w = layer.weight
            if w.dtype != x.dtype or w.device != x.device:
                return None  # the layer-by-layer path raises its clear error
            if kind is Linear:
                ops.append(("linear",))
            else:
                ops.append(("conv", tuple(layer.stride), tuple(layer._numeric_padding()), tuple(layer.dilation),
                            layer.groups))
            params += [w, layer.bias]
        elif kind is ReLU or (kind is LeakyReLU and layer.negative_slope >= 0):
            ops.append(("act", 0.0 if kind is ReLU else float(layer.negative_slope)))
        elif kind is Flatten:
            start, end = layer.start_dim % dim, layer.end_dim % dim
            if start == 0 or start > end:  # the batch dimension stays: the backward is per sample
                return None
            ops.append(("flatten", start, end))
            dim -= end - start
        else:
            return None
    if not params:
        return None
    return tuple(ops), params


def forward_with_input_grad(ops, params, x):
    return _PiecewiseLinearChain.apply(ops, x, *params)
