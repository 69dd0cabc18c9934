"""One autograd node for a whole piecewise-linear critic on the explicit path.

A ``Sequential`` of ``Linear``, ``Conv2d``, ``LeakyReLU`` (slope >= 0), ``ReLU``, ``AvgPool2d`` and
``Flatten`` blocks, and of ``Sequential`` and ``Residual`` blocks made of those (MLP, DCGAN and
ResNet critics), gets ``(out, grad_x)`` from ``_PiecewiseLinearChain``: one autograd node instead
of one per op (about 25 for a 4-layer MLP, each with its saved tensors and engine bookkeeping),
and a hand-written backward that needs fewer matrix products than autograd's.

Notation, affine layers j = 1..n (a Linear, or a Conv2d): ``z_j = A_j(h_{j-1}) + b_j`` with ``A_j``
linear (``h W^T``, or the convolution), ``J_j^T`` its adjoint (``g W``, or the transposed
convolution); between them the activations ``h = act(z)``, whose derivative ``m = act'(z)`` is 1
where ``z > 0`` and the slope elsewhere, so it is read off ``h`` (same sign as ``z`` for a slope
>= 0), and the linear maps without parameters (``Flatten``'s reshape, ``AvgPool2d``). A
``Residual`` adds its branches: forward ``body(h) + shortcut(h)``, and every walk below splits at
it and sums the branches (the chain rule on a graph).

Forward: ``out``, then the input gradient of ``out.sum()`` by the chain rule,
``g = ones``; per affine layer from the last, ``dz_j = g`` (the gradient at its output, masks
applied) and ``g = A_j^T(dz_j)``; ``grad_x`` is the last ``g``.

Backward, given ``a = dLoss/dout`` and ``c = dLoss/dgrad_x``. The masks are piecewise constant, so
``grad_x`` depends on the parameters through the ``A_j`` of the chain above only (a.e.), and its
gradient follows the penalty chain, forward through the layers::

    psi_0 = c;   dW_j += weight_grad(input=psi_{j-1}, grad_out=dz_j);   psi_j = m * A_j(psi_{j-1})

(the network's masked linear map applied to ``c``: a forward pass with the masks frozen).

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

Gradient order: one. The backward is first-order only (like ``once_differentiable``): the explicit
path exists so that a penalty step needs no double backward. Its intermediate values are computed
without a graph, so a second derivative through it cannot be right; asking for one raises
``SECOND_ORDER_ERROR`` instead of returning None or zeros (see ``_FirstOrderOnly``). Which critics
take this node, and when, is decided by ``plan`` (``Sequential.forward_with_input_grad`` asks it);
the layer-by-layer chain is the reference it is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .._backend import requested_backend

# The program ``plan`` builds: nested, hashable op tuples, each with its slot in the saved lists.
#   ("linear", j)   ("conv", j, stride, padding, dilation, groups)   weight, bias = params[2j:2j+2]
#   ("act", i, slope)   ("flatten", i, start, end)   ("pool", i, kernel, stride, padding, ceil_mode,
#   count_include_pad, divisor_override)   ("seq", ops)   ("res", body, shortcut or None)
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
    return F.conv2d(h, weight, bias, *op[2:])


def _apply(op, h, weight):
    """``A(h)``, no bias: the penalty chain's step."""
    if op[0] == "linear":
        return h @ weight.t()
    return F.conv2d(h, weight, None, *op[2:])


def _conv_backward(op, grad_out, inp, weight, mask):
    stride, padding, dilation, groups = op[2:]
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


def _add(x, y):
    return y if x is None else x if y is None else x + y


class _Tape:
    """What the forward keeps, by slot: the input of each affine layer, the output of each
    activation, the input shape of each reshape or pooling; and the weights."""

    def __init__(self, inputs, dzs, acts, shapes, weights):
        self.inputs, self.dzs, self.acts, self.shapes, self.weights = inputs, dzs, acts, shapes, weights

    @classmethod
    def empty(cls, n_affine, n_act, n_shape, weights):
        return cls([None] * n_affine, [None] * n_affine, [None] * n_act, [None] * n_shape, weights)


def _run(op, h, tape, biases):
    """The forward, filling ``tape``."""
    kind = op[0]
    if kind in _AFFINE:
        tape.inputs[op[1]] = h
        return _forward(op, h, tape.weights[op[1]], biases[op[1]])
    if kind == "act":
        h = F.leaky_relu(h, op[2]) if op[2] else F.relu(h)
        tape.acts[op[1]] = h
        return h
    if kind == "flatten":
        tape.shapes[op[1]] = h.shape
        return h.flatten(op[2], op[3])
    if kind == "pool":
        tape.shapes[op[1]] = h.shape
        return F.avg_pool2d(h, *op[2:])
    if kind == "seq":
        for sub in op[1]:
            h = _run(sub, h, tape, biases)
        return h
    body, shortcut = op[1:]
    return _run(body, h, tape, biases) + (h if shortcut is None else _run(shortcut, h, tape, biases))


def _walk_back(op, g, tape, at_affine):
    """The chain rule from an op's output to its input: ``g`` through every adjoint, and
    ``at_affine(j, g)`` with the gradient at affine layer j's output."""
    kind = op[0]
    if kind in _AFFINE:
        at_affine(op[1], g)
        return _adjoint(op, g, tape.inputs[op[1]], tape.weights[op[1]])
    if kind == "act":
        return _act_backward(g, tape.acts[op[1]], op[2])
    if kind == "flatten":
        return g.reshape(tape.shapes[op[1]])
    if kind == "pool":  # the adjoint needs the input's shape only: a stand-in of that shape
        shape = tape.shapes[op[1]]
        return torch.ops.aten.avg_pool2d_backward(g, g.new_empty((1,) * len(shape)).expand(shape), *op[2:])
    if kind == "seq":
        for sub in reversed(op[1]):
            g = _walk_back(sub, g, tape, at_affine)
        return g
    body, shortcut = op[1:]
    return _walk_back(body, g, tape, at_affine) + (g if shortcut is None else _walk_back(shortcut, g, tape, at_affine))


def _walk_forward(op, psi, tape, at_affine):
    """The masked linear map from an op's input to its output (the penalty chain): ``psi``
    through every op with the masks frozen and no biases (None stays None: no penalty), and
    ``at_affine(j, psi)`` with the value at affine layer j's input."""
    kind = op[0]
    if kind in _AFFINE:
        at_affine(op[1], psi)
        return None if psi is None else _apply(op, psi, tape.weights[op[1]])
    if kind == "seq":
        for sub in op[1]:
            psi = _walk_forward(sub, psi, tape, at_affine)
        return psi
    if kind == "res":
        body, shortcut = op[1:]
        return _add(_walk_forward(body, psi, tape, at_affine),
                    psi if shortcut is None else _walk_forward(shortcut, psi, tape, at_affine))
    if psi is None:
        return None
    if kind == "act":
        return _act_backward(psi, tape.acts[op[1]], op[2])
    if kind == "flatten":
        return psi.flatten(op[2], op[3])
    return F.avg_pool2d(psi, *op[2:])


def _affine_ops(op):
    """The affine ops by slot."""
    if op[0] in _AFFINE:
        return [op]
    if op[0] == "seq":
        return [a for sub in op[1] for a in _affine_ops(sub)]
    if op[0] == "res":
        return _affine_ops(op[1]) + ([] if op[2] is None else _affine_ops(op[2]))
    return []


def _followed_by_act(op, after: bool, out: list) -> bool:
    """Fills ``out[j]``: whether an activation comes after affine layer j on some path to the
    output (then its bias reaches grad_x, through a mask). Returns whether one comes from the
    op's input on."""
    kind = op[0]
    if kind in _AFFINE:
        out[op[1]] = after
        return after
    if kind == "act":
        return True
    if kind == "seq":
        for sub in reversed(op[1]):
            after = _followed_by_act(sub, after, out)
        return after
    if kind == "res":
        body = _followed_by_act(op[1], after, out)
        shortcut = after if op[2] is None else _followed_by_act(op[2], after, out)  # both walked: they fill out
        return body or shortcut
    return after


SECOND_ORDER_ERROR = (
    "wgan_kernels.nn: the explicit input-gradient path is first-order (once_differentiable): the "
    "(out, grad_x) of forward_with_input_grad, and losses built on it such as critic_loss, can be "
    "differentiated once (loss.backward(), torch.autograd.grad without create_graph), not twice. "
    "For a second derivative (a Hessian-vector product, a penalty on the parameter gradients, "
    "gradgradcheck) use the plain torch critic with autograd's double backward "
    "(torch.autograd.grad(critic(x).sum(), x, create_graph=True)), or set "
    "WGAN_KERNELS_BACKEND=reference for the layer-by-layer chain, which is differentiable twice."
)


class _FirstOrderOnly(torch.autograd.Function):
    """The chain's first-order gradients, as they are, on a node whose backward raises
    ``SECOND_ORDER_ERROR``: what ``_PiecewiseLinearChain.backward`` returns when it runs with
    ``create_graph=True``. Inputs ``(n, g_1, ..., g_n, *anchors)``, outputs ``g_1, ..., g_n``.

    torch's ``once_differentiable`` is not enough here: its error node hangs off fresh detached
    leaves, so ``torch.autograd.grad(..., inputs)`` prunes it and returns None, and when the
    incoming gradients do not require grad it returns constants. The anchors tie this node to
    everything the true second derivative depends on: ``grad_x`` (saved output of the chain, so
    its grad_fn is the chain's node, whose edges are x and the parameters) and the incoming
    gradients that require grad. Any differentiation that reaches x, the parameters or anything
    upstream of them then runs this backward and raises."""

    @staticmethod
    def forward(ctx, n, *tensors):
        # detached aliases, not the inputs: an input returned as is comes back as a view, which
        # in-place ops (clip_grad_norm_ on .grad) refuse; the values are not copied
        return tuple(t.detach() for t in tensors[:n])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(SECOND_ORDER_ERROR)


def _refuse_second_order(grads, anchors):
    """``grads`` (tensors or None) passed through ``_FirstOrderOnly``."""
    slots = [i for i, g in enumerate(grads) if g is not None]
    if not slots:
        return grads
    through = _FirstOrderOnly.apply(len(slots), *(grads[i] for i in slots), *anchors)
    out = list(grads)
    for i, g in zip(slots, through):
        out[i] = g
    return tuple(out)


class _PiecewiseLinearChain(torch.autograd.Function):
    """``(out, grad_x)`` of a program from ``plan``; inputs ``(program, x, W_1, b_1, ..., W_n,
    b_n)`` (a ``b`` may be None)."""

    @staticmethod
    def forward(ctx, program, x, *params):
        root, n_affine, n_act, n_shape = program
        weights, biases = params[0::2], params[1::2]
        tape = _Tape.empty(n_affine, n_act, n_shape, weights)
        out = _run(root, x, tape, biases)
        grad_x = _walk_back(root, torch.ones_like(out), tape, tape.dzs.__setitem__)
        ctx.program, ctx.shapes = program, tape.shapes
        ctx.has_bias = [b is not None for b in biases]
        ctx.bias_in_grad_x = [False] * n_affine
        _followed_by_act(root, False, ctx.bias_in_grad_x)
        ctx.per_sample = out.numel() == out.shape[0]
        ctx.save_for_backward(*tape.inputs, *tape.dzs, *tape.acts, *weights, grad_x)
        ctx.set_materialize_grads(False)  # an unused output costs no products in the backward
        return out, grad_x

    @staticmethod
    def backward(ctx, a, c):
        with torch.no_grad():
            grads = _PiecewiseLinearChain._first_order(ctx, a, c)
        if torch.is_grad_enabled():  # create_graph=True: a second-order graph is asked for; refuse it
            saved_grad_x = ctx.saved_tensors[-1]
            anchors = [saved_grad_x] + [t for t in (a, c) if t is not None and t.requires_grad]
            grads = _refuse_second_order(grads, anchors)
        return grads

    @staticmethod
    def _first_order(ctx, a, c):
        root, n, n_act, _ = ctx.program
        saved = ctx.saved_tensors
        tape = _Tape(saved[:n], saved[n:2 * n], saved[2 * n:2 * n + n_act], ctx.shapes,
                     saved[2 * n + n_act:3 * n + n_act])
        affine = _affine_ops(root)
        fused = a is not None and ctx.per_sample  # the loss chain folded into the penalty's
        d_w: list[torch.Tensor | None] = [None] * n
        d_b: list[torch.Tensor | None] = [None] * n

        def weight_grads(j, psi):  # at affine j's input: the penalty chain's value psi
            inp, dz = tape.inputs[j], tape.dzs[j]
            u = psi
            if fused:
                a_h = _per_sample(a, inp)
                u = inp * a_h if psi is None else torch.addcmul(psi, inp, a_h)
                if ctx.has_bias[j]:
                    d_b[j] = _bias_grad(dz, a)
            if u is not None:
                d_w[j] = _weight_grad(affine[j], u, dz, tape.weights[j])

        def loss_grads(j, e):  # several outputs per sample: the loss chain's gradient e
            dw = _weight_grad(affine[j], tape.inputs[j], e, tape.weights[j])
            d_w[j] = dw if d_w[j] is None else d_w[j] + dw
            if ctx.has_bias[j]:
                d_b[j] = _bias_grad(e)

        d_x = None
        if c is not None or fused:
            _walk_forward(root, c, tape, weight_grads)
            if fused and ctx.needs_input_grad[1]:
                grad_x = saved[-1]
                d_x = grad_x * _per_sample(a, grad_x)
        if a is not None and not fused:
            d_x = _walk_back(root, a, tape, loss_grads)
            d_x = d_x if ctx.needs_input_grad[1] else None
        grads: list[torch.Tensor | None] = [None, d_x]
        for j, (dw, db) in enumerate(zip(d_w, d_b)):
            if db is None and ctx.has_bias[j] and c is not None and ctx.bias_in_grad_x[j]:
                # grad_x alone: zeros for a bias that reaches it through a mask (derivative 0 a.e.),
                # as autograd gives, so an optimizer steps on it alike; None for the others
                db = tape.weights[j].new_zeros(tape.weights[j].shape[0])
            grads += [dw, db]
        return tuple(grads)


class _Planner:
    """Builds the program of ``plan``: op tuples with their slots, the parameters in slot order,
    and the number of dimensions along the way (None: not this node)."""

    def __init__(self, x):
        from .layers import AvgPool2d, Conv2d, Flatten, LeakyReLU, Linear, ReLU, Residual, Sequential  # noqa: PLC0415

        self.kinds = dict(AvgPool2d=AvgPool2d, Conv2d=Conv2d, Flatten=Flatten, LeakyReLU=LeakyReLU, Linear=Linear,
                          ReLU=ReLU, Residual=Residual, Sequential=Sequential)
        self.x, self.params, self.n_act, self.n_shape = x, [], 0, 0

    def op(self, layer, dim):
        """``(op, dim after)`` or None."""
        k, kind = self.kinds, type(layer)
        if kind is k["Linear"] or kind is k["Conv2d"]:
            if dim != (2 if kind is k["Linear"] else 4) or (kind is k["Conv2d"] and layer._unsupported("") is not None):
                return None
            w = layer.weight
            if w.dtype != self.x.dtype or w.device != self.x.device:
                return None  # the layer-by-layer path raises its clear error
            j = len(self.params) // 2
            self.params += [w, layer.bias]
            if kind is k["Linear"]:
                return ("linear", j), dim
            return ("conv", j, tuple(layer.stride), tuple(layer._numeric_padding()), tuple(layer.dilation),
                    layer.groups), dim
        if kind is k["ReLU"] or (kind is k["LeakyReLU"] and layer.negative_slope >= 0):
            self.n_act += 1
            return ("act", self.n_act - 1, 0.0 if kind is k["ReLU"] else float(layer.negative_slope)), dim
        if kind is k["Flatten"]:
            start, end = layer.start_dim % dim, layer.end_dim % dim
            if start == 0 or start > end:  # the batch dimension stays: the backward is per sample
                return None
            self.n_shape += 1
            return ("flatten", self.n_shape - 1, start, end), dim - (end - start)
        if kind is k["AvgPool2d"]:
            if dim != 4:
                return None
            self.n_shape += 1
            kernel, stride = layer.kernel_size, layer.stride if layer.stride is not None else layer.kernel_size
            return ("pool", self.n_shape - 1, _pair(kernel), _pair(stride), _pair(layer.padding), layer.ceil_mode,
                    layer.count_include_pad, layer.divisor_override), dim
        if kind is k["Sequential"]:
            ops = []
            for sub in layer._modules.values():
                got = self.op(sub, dim)
                if got is None:
                    return None
                ops.append(got[0])
                dim = got[1]
            return ("seq", tuple(ops)), dim
        if kind is k["Residual"]:
            body = self.op(layer.body, dim)
            shortcut = None if layer.shortcut is None else self.op(layer.shortcut, dim)
            if body is None or (layer.shortcut is not None and shortcut is None):
                return None
            if body[1] != (dim if shortcut is None else shortcut[1]):
                return None
            return ("res", body[0], None if shortcut is None else shortcut[0]), body[1]
        return None


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def plan(seq, x: torch.Tensor):
    """``(program, params)`` when ``seq`` (a ``wgan_kernels.nn.Sequential``) can take the one-node
    path on ``x``, else None: blocks ``Linear`` (on 2-D input), ``Conv2d`` (on 4-D input, zero
    padding), ``LeakyReLU`` with a slope >= 0, ``ReLU``, ``AvgPool2d`` (4-D), ``Flatten`` (not of
    the batch dimension), and ``Sequential`` / ``Residual`` of those, exactly those classes (no
    subclasses such as ``SNLinear``), at least one affine layer, weights of the input's dtype and
    device; no autocast, not inside ``torch.compile`` (inductor fuses the layer-by-layer chain
    itself), and ``WGAN_KERNELS_BACKEND`` neither ``reference`` (the layer-by-layer chain of aten
    ops) nor ``triton`` (the layer-by-layer chain with the Triton activation-mask kernels)."""
    if requested_backend(None) in ("reference", "triton") or x.dim() < 2:
        return None
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type):
        return None
    planner = _Planner(x)
    got = planner.op(seq, x.dim())
    if got is None or not planner.params:
        return None
    return (got[0], len(planner.params) // 2, planner.n_act, planner.n_shape), planner.params


def forward_with_input_grad(program, params, x):
    return _PiecewiseLinearChain.apply(program, x, *params)
