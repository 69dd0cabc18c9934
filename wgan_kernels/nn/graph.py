"""``GraphOp``: the composite op of a traced critic, a graph of explicit-path ops.

``SequentialOp`` and ``ResidualOp`` (explicit_ops.py) cover chains and two-branch sums; a critic
written as a module (trace.py turns its ``torch.fx`` graph into one of these) may use a value
several times, add or concatenate branches anywhere and mix in tensors that do not depend on the
input (class embeddings). A ``GraphOp`` holds its nodes in topological order; value 0 is the
input and node ``i`` writes value ``i + 1``. Node kinds:

- ``Apply(op, arg)``: a leaf op of explicit_ops.py on one value;
- ``Add(args, coefs, const)``: ``sum_k coefs[k] * value[args[k]] (+ const)``, broadcasting;
- ``Cat(parts, dim)``: ``torch.cat`` of values (ints) and input-independent tensors (``Const``);
- ``Prod(a, b)``: ``value[a] * value[b]`` (a gate): not piecewise-linear, so the layer-by-layer
  chain only.

Every walk of the op protocol is the chain rule on the graph: forward in node order; backward
in reverse order, summing the gradients of a value over its uses. Only nodes that reach the
output are kept (trace.py prunes), so every node gets a gradient.
"""

from __future__ import annotations

import torch

from .explicit_ops import Op, hand_over


class Const:
    """A tensor (or number) that does not depend on the input, bound before each forward."""

    __slots__ = ("value",)

    def __init__(self, value=None):
        self.value = value


class Apply:
    __slots__ = ("op", "arg")

    def __init__(self, op: Op, arg: int):
        self.op, self.arg = op, arg


class Add:
    """``broadcast``: whether an argument's shape differs from the result's (then the one-node
    chain, whose walks do not reduce broadcast gradients, is not taken)."""

    __slots__ = ("args", "coefs", "const", "broadcast")

    def __init__(self, args, coefs, const: Const | None = None, broadcast: bool = False):
        self.args, self.coefs, self.const, self.broadcast = tuple(args), tuple(coefs), const, broadcast


class Cat:
    """``shapes``: each part's per-sample shape (known from the trace)."""

    __slots__ = ("parts", "dim", "shapes")

    def __init__(self, parts, dim: int, shapes):
        self.parts, self.dim, self.shapes = tuple(parts), dim, [tuple(s) for s in shapes]


class Prod:
    __slots__ = ("a", "b", "broadcast")

    def __init__(self, a: int, b: int, broadcast: bool = False):
        self.a, self.b, self.broadcast = a, b, broadcast


def _batched(t, n: int):
    """An input-independent part of a concatenation, shared by the samples (first dim 1) or
    one per sample: as ``n`` rows."""
    return t.expand((n,) + t.shape[1:]) if t.shape[0] == 1 and n != 1 else t


def _acc(grads, i, g):
    grads[i] = g if grads[i] is None else grads[i] + g


def _scaled(v, c):
    return v if c == 1 else -v if c == -1 else v * c


def _needs_grad(c) -> bool:
    return isinstance(c, torch.Tensor) and c.requires_grad


class GraphOp(Op):
    """A graph of ops (see the module docstring); ``output`` is the value index of the result."""

    def __init__(self, nodes, output: int):
        self.nodes, self.output = list(nodes), output
        self._edges = self._single_use_edges()  # (the nodes never change: found once, not per plan)

    def _single_use_edges(self) -> list[tuple[Op, Op]]:
        """``(producer, consumer)`` ops of the ``Apply`` nodes whose value only the consumer reads
        (what ``hand_over`` may let the chain overwrite)."""
        uses = [0] * (len(self.nodes) + 1)
        uses[self.output] += 1
        for node in self.nodes:
            args = (node.arg,) if isinstance(node, Apply) else (node.a, node.b) if isinstance(node, Prod) \
                else node.args if isinstance(node, Add) else node.parts
            for q in args:
                if isinstance(q, int):
                    uses[q] += 1
        return [(self.nodes[node.arg - 1].op, node.op) for node in self.nodes
                if isinstance(node, Apply) and node.arg > 0 and uses[node.arg] == 1
                and isinstance(self.nodes[node.arg - 1], Apply)]

    # ---- layer by layer (forward + vjp), differentiable twice

    def _add(self, node, values):
        y = None
        for a, c in zip(node.args, node.coefs):
            t = _scaled(values[a], c)
            y = t if y is None else y + t
        return y if node.const is None else y + node.const.value

    def _cat(self, node, values, n):
        return torch.cat([values[q] if isinstance(q, int) else _batched(q.value, n) for q in node.parts], node.dim)

    def forward(self, p, x):
        # forward_fused may take the Triton activation kernels; under autocast the plain forward
        # (the layers' dtype checks would refuse autocast's mixed dtypes)
        autocast = torch.is_autocast_enabled(x.device.type)

        def forward(op):
            return op.forward if autocast else op.forward_fused

        values, saved = [x], []
        for node in self.nodes:
            if isinstance(node, Apply):
                y, s = forward(node.op)(node.op.params, values[node.arg])
            elif isinstance(node, Add):
                y, s = self._add(node, values), [values[a].shape for a in node.args]
            elif isinstance(node, Prod):
                s = (values[node.a], values[node.b])
                y = s[0] * s[1]
            else:
                y = self._cat(node, values, x.shape[0])
                s = [(values[q] if isinstance(q, int) else q.value).shape[node.dim] for q in node.parts]
            values.append(y)
            saved.append(s)
        return values[self.output], saved

    def _back(self, g, n_values, step):
        grads = [None] * n_values
        grads[self.output] = g
        for i in range(len(self.nodes) - 1, -1, -1):
            gi = grads[i + 1]
            if gi is not None:
                step(i, self.nodes[i], gi, grads)
        return grads[0]

    def vjp(self, p, saved, g, first_order=False):
        def step(i, node, gi, grads):
            if isinstance(node, Apply):
                _acc(grads, node.arg, node.op.vjp(node.op.params, saved[i], gi, first_order))
            elif isinstance(node, Add):
                for a, c, shape in zip(node.args, node.coefs, saved[i]):
                    _acc(grads, a, _scaled(gi, c).sum_to_size(shape))
            elif isinstance(node, Prod):
                va, vb = saved[i]
                _acc(grads, node.a, (gi * vb).sum_to_size(va.shape))
                _acc(grads, node.b, (gi * va).sum_to_size(vb.shape))
            else:
                for q, piece in zip(node.parts, gi.split(saved[i], node.dim)):
                    if isinstance(q, int):
                        _acc(grads, q, piece)

        return self._back(g, len(self.nodes) + 1, step)

    # ---- the one-node chain's walks (nn/_chain.py)

    def plan(self, planner, dim):
        dims = [dim]
        for node in self.nodes:
            if isinstance(node, Prod):
                return None
            if isinstance(node, Apply):
                d = node.op.plan(planner, dims[node.arg])
            elif isinstance(node, Add):  # same shapes only: the walks below do not broadcast
                d = dims[node.args[0]]
                if node.broadcast or (node.const is not None and _needs_grad(node.const.value)):
                    return None
            else:
                ds = {dims[q] for q in node.parts if isinstance(q, int)}
                d = ds.pop() if len(ds) == 1 else None
                if any(not isinstance(q, int) and (_needs_grad(q.value) or q.value.dim() != d) for q in node.parts):
                    return None
            if d is None:
                return None
            dims.append(d)
        for producer, consumer in self._edges:
            hand_over(planner, producer, consumer)
        return dims[self.output]

    def run(self, h, tape):
        values = [h]
        for node in self.nodes:
            if isinstance(node, Apply):
                y = node.op.run(values[node.arg], tape)
            elif isinstance(node, Add):
                y = self._add(node, values)
            else:
                y = self._cat(node, values, h.shape[0])
            values.append(y)
        return values[self.output]

    def walk_back(self, g, tape, at_affine):
        def step(i, node, gi, grads):
            if isinstance(node, Apply):
                _acc(grads, node.arg, node.op.walk_back(gi, tape, at_affine))
            elif isinstance(node, Add):
                for a, c in zip(node.args, node.coefs):
                    _acc(grads, a, _scaled(gi, c))
            else:
                split = [s[node.dim - 1] for s in node.shapes]
                for q, piece in zip(node.parts, gi.split(split, node.dim)):
                    if isinstance(q, int):
                        _acc(grads, q, piece)

        return self._back(g, len(self.nodes) + 1, step)

    def walk_forward(self, psi, tape, at_affine):
        psis = [psi]
        for node in self.nodes:
            if isinstance(node, Apply):
                y = node.op.walk_forward(psis[node.arg], tape, at_affine)
            elif isinstance(node, Add):  # the constant term has no tangent
                y = None
                for a, c in zip(node.args, node.coefs):
                    if psis[a] is not None:
                        t = _scaled(psis[a], c)
                        y = t if y is None else y + t
            else:
                known = [psis[q] for q in node.parts if isinstance(q, int) and psis[q] is not None]
                if not known:
                    y = None
                else:
                    like = known[0]
                    y = torch.cat([psis[q] if isinstance(q, int) and psis[q] is not None
                                   else like.new_zeros((like.shape[0],) + tuple(shape))
                                   for q, shape in zip(node.parts, node.shapes)], node.dim)
            psis.append(y)
        return psis[self.output]

    def followed_by_act(self, after, out):
        afters = [False] * (len(self.nodes) + 1)
        afters[self.output] = after
        for i in range(len(self.nodes) - 1, -1, -1):
            node, a_out = self.nodes[i], afters[i + 1]
            if isinstance(node, Apply):
                afters[node.arg] |= node.op.followed_by_act(a_out, out)
            else:  # (a Prod never reaches the one-node chain)
                for q in (node.args if isinstance(node, Add) else node.parts):
                    if isinstance(q, int):
                        afters[q] |= a_out
        return afters[0]

    def leaves(self):
        for node in self.nodes:
            if isinstance(node, Apply):
                yield from node.op.leaves()
