"""One autograd node for a whole piecewise-linear critic on the explicit path.

A program of piecewise-linear ops (explicit_ops.py: ``Linear``, ``Conv2d``, ``LeakyReLU`` with a
slope >= 0, ``ReLU``, ``AvgPool2d``, ``Flatten`` and any other op flagged ``piecewise_linear``,
in ``SequentialOp`` / ``ResidualOp`` composites: MLP, DCGAN and ResNet critics) gets
``(out, grad_x)`` from ``_PiecewiseLinearChain``: one autograd node instead of one per op (about
25 for a 4-layer MLP, each with its saved tensors and engine bookkeeping), and a hand-written
backward that needs fewer matrix products than autograd's. This module keeps only the tape and
the node; what each op computes (forward, adjoint, tangent, weight gradient) is its op class's.

Notation, affine layers j = 1..n (a Linear, or a Conv2d): ``z_j = A_j(h_{j-1}) + b_j`` with ``A_j``
linear (``h W^T``, or the convolution), ``J_j^T`` its adjoint (``g W``, or the transposed
convolution); between them the activations ``h = act(z)``, whose derivative ``m = act'(z)`` is a
piecewise-constant diagonal read off ``h`` (for a LeakyReLU: 1 where ``z > 0`` and the slope
elsewhere, ``h`` having ``z``'s sign for a slope >= 0), and the linear maps without parameters
(``Flatten``'s reshape, ``AvgPool2d``). A ``Residual`` adds its branches: forward
``body(h) + shortcut(h)``, and every walk below splits at it and sums the branches (the chain
rule on a graph).

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

from .._backend import chain_path

# The program ``plan`` builds is a tree of explicit_ops.Op objects (``SequentialOp`` /
# ``ResidualOp`` over leaf ops), each leaf with its slot in the tape; the chain below only walks
# it (``run``, ``walk_back``, ``walk_forward``, ``followed_by_act``) and never looks inside an op.


def _bias_grad(grad_out, a=None):
    """``sum_i a_i grad_out_i`` over samples and positions (``a`` None: all ones).

    Without positions (a Linear's): the product, then the sum, as autograd's loss chain computes
    it, bit for bit (where the two sides of a WGAN loss nearly cancel, other rounding is noise
    that Adam turns into a full step, and the backends' trajectories part). With positions (a
    convolution's, whose bias gradient autograd sums in its own kernel): each sample's sum over
    its positions, then the ``a``-weighted sum over samples, so that no product the size of
    ``grad_out`` is written (on CPU a conv1-sized one, 33.5 MB for DCGAN-64 at batch 128, is fresh
    pages at every step: 13.5 ms against 0.8 ms, as accurate)."""
    dims = tuple(range(2, grad_out.dim()))
    if a is None:
        return grad_out.sum((0,) + dims)
    if not dims:
        return (grad_out * _per_sample(a, grad_out)).sum(0)
    per_sample = grad_out.sum(dims)  # (samples, channels)
    return a.reshape(1, -1).to(per_sample.dtype).mm(per_sample).reshape(-1)


def _per_sample(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``a`` (one value per sample) shaped to broadcast against ``like``."""
    return a.reshape((like.shape[0],) + (1,) * (like.dim() - 1))


class _Tape:
    """What the forward keeps, by slot: each op's saved value (an affine op's input, an
    activation's output, a reshape's or pooling's input shape), the gradient at each affine op's
    output (``dz``), the parameter values each op reads (``params``) and what each op may
    overwrite (``owned``: see ``explicit_ops.hand_over``)."""

    __slots__ = ("saved", "dz", "params", "own")

    def __init__(self, n_slots: int, own=None):
        self.saved = [None] * n_slots
        self.dz = [None] * n_slots
        self.params = [()] * n_slots
        self.own = own or {}

    def owned(self, slot: int):
        return self.own.get(slot, ())


class _Program:
    """The op tree of ``plan``, its number of tape slots, the slots of its affine ops (in the
    order of the node's parameter inputs), the constants the other ops were bound to for
    this forward (``(slot, params)``: a ``MulOp``'s factor; tensors that need no gradient),
    the affine ops whose products run in channels_last on CPU (2-D convolutions) and what each
    op may overwrite (slot -> kinds, ``explicit_ops.hand_over``)."""

    __slots__ = ("root", "n_slots", "param_slots", "consts", "channels_last", "own")

    def __init__(self, root, n_slots, param_slots, consts=(), channels_last=(), own=None):
        self.root, self.n_slots, self.param_slots, self.consts = root, n_slots, param_slots, consts
        self.channels_last = channels_last  # indices (in param_slots) of the ops that run NHWC on CPU
        self.own = {slot: frozenset(kinds) for slot, kinds in (own or {}).items()}

    def tape(self, params=None) -> _Tape:
        tape = _Tape(self.n_slots, self.own)
        if params is not None:
            for i, slot in enumerate(self.param_slots):
                tape.params[slot] = (params[2 * i], params[2 * i + 1])
        for slot, values in self.consts:
            tape.params[slot] = values
        return tape


SECOND_ORDER_ERROR = (
    "wgan_kernels.nn: the explicit input-gradient path is first-order (once_differentiable): the "
    "(out, grad_x) of forward_with_input_grad, and losses built on it such as critic_loss, can be "
    "differentiated once (loss.backward(), torch.autograd.grad without create_graph), not twice. "
    "For a second derivative (a Hessian-vector product, a penalty on the parameter gradients, "
    "gradgradcheck) use autograd's double backward on the plain torch critic "
    "(torch.autograd.grad(critic(x).sum(), x, create_graph=True); critic_loss takes it for a "
    "critic passed as a function, e.g. lambda x: critic(x)), or set "
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
        root, slots = program.root, program.param_slots
        nchw = runs_nhwc(program, x)
        if nchw:  # oneDNN's convolutions are faster in NHWC: the whole chain runs in it (the
            # weights' gradients come back NHWC; autograd stores them in the parameters' layout)
            x = x.contiguous(memory_format=torch.channels_last)
            params = list(params)
            for k in program.channels_last:
                params[2 * k] = params[2 * k].contiguous(memory_format=torch.channels_last)
        tape = program.tape(params)
        out = root.run(x, tape)
        dz = tape.dz

        def at_affine(op, g):
            dz[op.slot] = g

        grad_x = root.walk_back(torch.ones_like(out), tape, at_affine)
        if nchw:
            grad_x = grad_x.contiguous()  # in the input's layout (user code views it)
        tensors, tensor_slots, others = [], [], []
        for i, s in enumerate(tape.saved):
            if isinstance(s, torch.Tensor):
                tensors.append(s)
                tensor_slots.append(i)
            else:
                others.append((i, s))
        ctx.program, ctx.tensor_slots, ctx.others = program, tensor_slots, others
        ctx.has_bias = [b is not None for b in params[1::2]]
        ctx.per_sample = out.numel() == out.shape[0]
        ctx.save_for_backward(*tensors, *(dz[i] for i in slots), *params[0::2], grad_x)
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
        program = ctx.program
        root, slots = program.root, program.param_slots
        saved = ctx.saved_tensors
        n_t, n = len(ctx.tensor_slots), len(slots)
        tape = program.tape()
        for i, t in zip(ctx.tensor_slots, saved[:n_t]):
            tape.saved[i] = t
        for i, s in ctx.others:
            tape.saved[i] = s
        for k, slot in enumerate(slots):
            tape.dz[slot] = saved[n_t + k]
            tape.params[slot] = (saved[n_t + n + k], None)  # the bias is not read
        fused = a is not None and ctx.per_sample  # the loss chain folded into the penalty's
        d_w: list[torch.Tensor | None] = [None] * n
        d_b: list[torch.Tensor | None] = [None] * n

        def weight_grads(op, psi, owned):  # at affine op's input: the penalty chain's value psi
            k = op.index
            inp, dz = tape.saved[op.slot], tape.dz[op.slot]
            if not fused:
                if psi is not None:
                    d_w[k] = op.weight_grad(tape.params[op.slot], psi, dz)
                return
            a_h = _per_sample(a, inp)
            u = inp * a_h if psi is None else psi.addcmul_(inp, a_h) if owned else torch.addcmul(psi, inp, a_h)
            d_w[k] = op.weight_grad(tape.params[op.slot], u, dz)
            if ctx.has_bias[k]:
                d_b[k] = _bias_grad(dz, a)

        def loss_grads(op, e):  # several outputs per sample: the loss chain's gradient e
            k = op.index
            dw = op.weight_grad(tape.params[op.slot], tape.saved[op.slot], e)
            d_w[k] = dw if d_w[k] is None else d_w[k] + dw
            if ctx.has_bias[k]:
                d_b[k] = _bias_grad(e)

        d_x = None
        if c is not None or fused:
            root.walk_forward(c, tape, weight_grads)
            if fused and ctx.needs_input_grad[1]:
                grad_x = saved[-1]
                d_x = grad_x * _per_sample(a, grad_x)
        if a is not None and not fused:
            d_x = root.walk_back(a, tape, loss_grads)
            d_x = d_x if ctx.needs_input_grad[1] else None
        grads: list[torch.Tensor | None] = [None, d_x]
        bias_in_grad_x = {}  # by affine slot: whether an activation follows it on some path
        if c is not None:
            root.followed_by_act(False, bias_in_grad_x)
        for k, (dw, db) in enumerate(zip(d_w, d_b)):
            if db is None and ctx.has_bias[k] and c is not None and bias_in_grad_x[slots[k]]:
                # grad_x alone: zeros for a bias that reaches it through a mask (derivative 0 a.e.),
                # as autograd gives, so an optimizer steps on it alike; None for the others
                weight = tape.params[slots[k]][0]
                db = weight.new_zeros(weight.shape[0])
            grads += [dw, db]
        return tuple(grads)


class _Planner:
    """What ``Op.plan`` reads and fills: the input, the leaf ops by tape slot (walk order) and
    what each may overwrite (``explicit_ops.hand_over``)."""

    __slots__ = ("x", "ops", "own")

    def __init__(self, x):
        self.x, self.ops, self.own = x, [], {}


def plan(seq, x: torch.Tensor):
    """``(program, params)`` when ``seq`` (a ``wgan_kernels.nn.Sequential``, or any block whose
    ``_op()`` gives an op tree) can take the one-node path on ``x``, else None: every op
    piecewise-linear with ``chain_dim`` accepting it (blocks ``Linear`` on 2-D input, ``Conv2d``
    on 4-D input with zero padding, ``LeakyReLU`` with a slope >= 0, ``ReLU``, ``AvgPool2d`` (4-D),
    ``Flatten`` (not of the batch dimension), and ``Sequential`` / ``Residual`` of those, exactly
    those classes: no subclasses such as ``SNLinear``), at least one affine op, weights of the
    input's dtype and device; and ``_backend.chain_path(x)`` is ``"one-node"`` (not inside
    torch.compile or autocast, the backend not forced to ``reference`` or ``triton``)."""
    if x.dim() < 2 or chain_path(x) != "one-node":
        return None
    return plan_root(seq._op(), x)


def plan_root(root, x: torch.Tensor):
    """``plan`` for an op tree ``root`` (None: no program)."""
    if root is None or x.dim() < 2 or chain_path(x) != "one-node":
        return None
    planner = _Planner(x)
    if root.plan(planner, x.dim()) is None:
        return None
    slots = [i for i, op in enumerate(planner.ops) if op.has_params]
    if not slots:
        return None
    for k, i in enumerate(slots):
        planner.ops[i].index = k
    params = [p for i in slots for p in planner.ops[i].params]
    consts = tuple((i, op.params) for i, op in enumerate(planner.ops) if not op.has_params and op.params)
    channels_last = tuple(k for k, i in enumerate(slots) if planner.ops[i].channels_last)
    return _Program(root, len(planner.ops), slots, consts, channels_last, planner.own), params


def nhwc_input(x: torch.Tensor) -> bool:
    """Whether ``x`` is what the chain converts to channels_last: a contiguous 4-D CPU tensor."""
    return x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous()


def runs_nhwc(program, x: torch.Tensor) -> bool:
    """Whether the chain runs ``program`` on ``x`` in channels_last: ``nhwc_input(x)`` and 2-D
    convolutions among its ops (it converts the input and those weights)."""
    return bool(program.channels_last) and nhwc_input(x)


def to_nhwc(x: torch.Tensor) -> torch.Tensor:
    """``x`` (4-D) with channels_last strides, also with one channel, where
    ``contiguous(memory_format=channels_last)`` returns the NCHW tensor as it is (contiguous in
    both layouts) and a convolution with NCHW weights then runs in NCHW."""
    if x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    return torch.empty_like(x, memory_format=torch.channels_last).copy_(x)


def forward_with_input_grad(program, params, x):
    return _PiecewiseLinearChain.apply(program, x, *params)
