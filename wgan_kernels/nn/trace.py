"""The explicit path for any torch critic module, built from its ``torch.fx`` graph.

``TracedCritic(module)`` traces ``module.forward`` once (``torch.fx``, symbolic) and, for each
new input signature (per-sample shape, dtype, device, and the train/eval mode of every
submodule), turns the graph into a ``graph.GraphOp`` of explicit_ops.py ops:

1. **probe**: the module's own forward runs once on the input, under ``no_grad``, with the random
   state forked and every buffer restored after it (dropout, batch-norm statistics, spectral
   norm's u and v are left as they were); it records each value's shape;
2. **build**: the nodes whose values depend on the input become ops (modules through
   ``explicit_ops.OPS``; functions and tensor methods through the tables below); the nodes that
   do not (parameters read by functional layers, class embeddings, shapes) stay fx nodes,
   evaluated before each forward (``bind``); what cannot be expressed raises ``Unsupported``
   with the reason, naming the node;
3. **run**: ``bind`` evaluates the constants and each op's parameters (a spectral-norm layer's
   normalised weight, advancing its power iteration as its forward would), then the one-node
   chain (nn/_chain.py) when the whole graph is piecewise-linear, else the layer-by-layer chain.

What stays per sample is checked: a value whose first dimension is not the batch, a reduction
or concatenation over dim 0, or a batch norm using the batch's statistics couple the samples
of a minibatch, and the per-sample input gradient a penalty needs is then not what a chain of
per-sample maps computes: refused, with that reason.
"""

from __future__ import annotations

import copy
import math
import operator
import weakref

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.nn.utils import parametrize

from . import _chain
from . import explicit_ops as _ops
from .graph import Add, Apply, Cat, Const, GraphOp, Prod
from .layers import LAYOUT_MODULES, InputGradModule, check_input
from .spectral import SN_BLOCKS


class Unsupported(ValueError):
    """The critic (or this node of it) has no explicit input-gradient path; the message says why."""


MINIBATCH = "mixes the samples of a minibatch"


# ----------------------------------------------------------------------------------------------
# tracing
# ----------------------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    """Leaves: every module an op class describes (exactly its torch type, or parametrized on
    top of it), the SN blocks, and what torch.fx keeps as leaves by default (torch.nn modules);
    user modules and containers are traced through."""

    def is_leaf_module(self, m, qualname):
        if type(m) in _ops.OPS or parametrize.is_parametrized(m) or isinstance(m, SN_BLOCKS):
            return True
        if isinstance(m, InputGradModule) and type(m).__dict__.get("op_type") is not None:
            return True
        return super().is_leaf_module(m, qualname)


def trace_graph(module: nn.Module) -> fx.Graph:
    """``module``'s fx graph; ``Unsupported`` when torch.fx cannot trace it (data-dependent
    control flow, iteration over a tensor, ...), with fx's own message, and when its forward
    assigns a module attribute (``self.calls += 1``, ``self.features = h``): a Python side effect
    runs once while tracing, never in the graph, so the explicit path would silently skip it."""
    ours = {id(m) for m in module.modules()}
    assigned: list[str] = []
    setattr_ = nn.Module.__setattr__

    def spy(self, name, value):
        if id(self) in ours:
            assigned.append(f"{type(self).__name__}.{name}")
        setattr_(self, name, value)

    state = [(m, dict(m.__dict__)) for m in module.modules()]  # tracing runs forward's Python once
    nn.Module.__setattr__ = spy
    try:
        graph = _Tracer().trace(module)
    except Exception as e:  # TraceError, or any error the forward raises on proxies
        raise Unsupported(f"{type(module).__name__}.forward cannot be traced by torch.fx ({type(e).__name__}: "
                          f"{e}); data-dependent control flow, a loop over a tensor or a call fx cannot see "
                          "through") from None
    finally:
        nn.Module.__setattr__ = setattr_
        for m, attrs in state:  # as it was: the trace's own assignments (self.calls += 1) undone
            m.__dict__.clear()
            m.__dict__.update(attrs)
    if assigned:
        raise Unsupported(f"{type(module).__name__}.forward assigns {', '.join(sorted(set(assigned)))}: a Python side "
                          "effect, which the traced graph (and so the explicit path) would skip")
    return graph


# ----------------------------------------------------------------------------------------------
# the module a leaf call runs, and the parameters its op reads at each forward
# ----------------------------------------------------------------------------------------------


def _old_style_sn_hooks(m: nn.Module):
    from torch.nn.utils.spectral_norm import SpectralNorm as _TorchSN  # noqa: PLC0415

    return [h for h in m._forward_pre_hooks.values() if isinstance(h, _TorchSN)]


def _module_op(m: nn.Module, path: str):
    """``(op, fetch)``: the op for leaf module ``m`` and ``fetch()`` -> its parameters for this
    forward. Raises ``Unsupported``."""
    base = type(m)
    if parametrize.is_parametrized(m):
        base = base.__mro__[1]  # the class parametrize subclassed
        extra = set(m.parametrizations.keys()) - {"weight"}
        if extra:
            raise Unsupported(f"{path}: {base.__name__} has parametrized {sorted(extra)} (only the weight may be)")
    sn_blocks = SN_BLOCKS
    if isinstance(m, sn_blocks):
        op_type = _ops.LinearOp if isinstance(m, nn.Linear) else _ops.Conv2dOp
    else:
        op_type = _ops.OPS.get(base)
        if op_type is None and isinstance(m, InputGradModule):
            op_type = type(m).__dict__.get("op_type")
    if op_type is None:
        raise Unsupported(f"{path}: {type(m).__name__} is not supported on the explicit path (supported modules: "
                          f"{', '.join(sorted(t.__name__ for t in _ops.OPS))})")
    sn_hooks = _old_style_sn_hooks(m)
    if len(m._forward_pre_hooks) != len(sn_hooks) or m._forward_hooks:
        raise Unsupported(f"{path}: {type(m).__name__} has forward hooks, which the explicit path would skip")
    reason = op_type.unsupported(m, path)
    if reason is not None:
        raise Unsupported(reason)
    # (a parametrized weight is computed on each read, advancing spectral norm's iteration: the
    # op is made from the original; fetch() reads the real one once per forward)
    op = op_type.from_module(_Unparametrized(m) if parametrize.is_parametrized(m) else m)
    if isinstance(m, sn_blocks):
        def fetch():
            return (m.normalized_weight(), m.bias)
    elif op.has_params or op.params:
        def fetch():
            for hook in sn_hooks:  # torch.nn.utils.spectral_norm: sets m.weight (iterating in training mode)
                hook(m, None)
            return (m.weight, m.bias)
    else:
        fetch = None
    return op, fetch


class _Unparametrized:
    """A parametrized module's attributes, its ``weight`` the stored original."""

    def __init__(self, m):
        self.__dict__["_m"] = m

    def __getattr__(self, name):
        if name == "weight":
            return self._m.parametrizations.weight.original
        return getattr(self._m, name)


# ----------------------------------------------------------------------------------------------
# functions and tensor methods on input-dependent values
# ----------------------------------------------------------------------------------------------


def _arg(node: fx.Node, pos: int, name: str, default=None):
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(name, default)


def _static(value, node: fx.Node, name: str):
    """A hyper-parameter must be a literal (not computed at run time)."""
    if isinstance(value, fx.Node):
        raise Unsupported(f"{node.name}: argument {name!r} of {_describe(node)} is computed at run time; the "
                          "explicit path needs it fixed")
    return value


def _act(op_type, *params):
    def make(node):
        values = [_static(_arg(node, pos, name, default), node, name) for pos, name, default in params]
        return op_type(*values)
    return make


_ACTIVATIONS = {
    F.relu: _act(_ops.ReLUOp), torch.relu: _act(_ops.ReLUOp), torch.relu_: _act(_ops.ReLUOp),
    F.relu_: _act(_ops.ReLUOp), "relu": _act(_ops.ReLUOp), "relu_": _act(_ops.ReLUOp),
    F.leaky_relu: _act(_ops.LeakyReLUOp, (1, "negative_slope", 0.01)),
    F.leaky_relu_: _act(_ops.LeakyReLUOp, (1, "negative_slope", 0.01)),
    torch.tanh: _act(_ops.TanhOp), F.tanh: _act(_ops.TanhOp), "tanh": _act(_ops.TanhOp),
    "tanh_": _act(_ops.TanhOp),
    torch.sigmoid: _act(_ops.SigmoidOp), F.sigmoid: _act(_ops.SigmoidOp), "sigmoid": _act(_ops.SigmoidOp),
    "sigmoid_": _act(_ops.SigmoidOp),
    F.gelu: _act(_ops.GELUOp, (1, "approximate", "none")),
    F.silu: _act(_ops.SiLUOp),
    F.elu: _act(_ops.ELUOp, (1, "alpha", 1.0)),
    F.softplus: _act(_ops.SoftplusOp, (1, "beta", 1.0), (2, "threshold", 20.0)),
    F.hardtanh: _act(_ops.HardtanhOp, (1, "min_val", -1.0), (2, "max_val", 1.0)),
    F.avg_pool2d: _act(_ops.AvgPool2dOp, (1, "kernel_size", None), (2, "stride", None), (3, "padding", 0),
                       (4, "ceil_mode", False), (5, "count_include_pad", True), (6, "divisor_override", None)),
}

_DROPOUT = {F.dropout: _ops.DropoutOp, F.dropout1d: _ops.Dropout1dOp, F.dropout2d: _ops.Dropout2dOp,
            F.dropout3d: _ops.Dropout3dOp}
_ADAPTIVE = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3}
_CONV_FN = {F.conv1d: _ops.Conv1dOp, F.conv2d: _ops.Conv2dOp, F.conv3d: _ops.Conv3dOp}
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as",
             torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.unflatten}
_IDENTITIES = {"contiguous", "clone", torch.clone}
_CASTS = {"float", "double", "half", "bfloat16", "to", "type_as"}
_SUMS = {"sum": 1.0, torch.sum: 1.0, "mean": None, torch.mean: None}
_REDUCTIONS = {"std", "var", "max", "min", "amax", "amin", "prod", "norm", "logsumexp", "median", torch.std,
               torch.var, torch.max, torch.min, torch.amax, torch.amin, torch.prod, torch.norm, torch.logsumexp,
               torch.median, torch.std_mean, torch.var_mean}
_ADD = {operator.add: 1, torch.add: 1, "add": 1, "add_": 1, operator.sub: -1, torch.sub: -1, "sub": -1,
        "sub_": -1, operator.iadd: 1, operator.isub: -1}
_MUL = {operator.mul: False, torch.mul: False, "mul": False, "mul_": False, operator.imul: False,
        operator.truediv: True, torch.div: True, "div": True, "div_": True, operator.itruediv: True}
_SHAPE_QUERIES = {"size", "dim", "numel", "ndimension"}
_INPLACE_FUNCS = {torch.relu_, F.relu_, F.leaky_relu_, operator.iadd, operator.isub, operator.imul,
                  operator.itruediv}


def _describe(node: fx.Node) -> str:
    t = node.target
    if node.op == "call_method":
        return f"Tensor.{t}"
    if node.op == "call_module":
        return f"module {t}"
    return getattr(t, "__module__", "") + "." + getattr(t, "__name__", str(t)) if callable(t) else str(t)


def _is_shape_query(node: fx.Node) -> bool:
    if node.op == "call_method" and node.target in _SHAPE_QUERIES:
        return True
    return node.op == "call_function" and node.target is getattr and node.args[1] in ("shape", "ndim", "dtype",
                                                                                         "device")


_LIKE = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like}
_NEW = {"new_zeros", "new_ones", "new_full", "new_empty", "new_tensor"}


def _value_inputs(node: fx.Node):
    """The nodes whose values (not only shape, dtype and device) ``node`` reads."""
    if node.op == "call_method" and node.target in _NEW:
        skip = {0}
    elif node.op == "call_method" and node.target in ("type_as", "to", "expand_as", "view_as", "reshape_as"):
        skip = set(range(1, len(node.args)))
    elif node.op == "call_function" and node.target in _LIKE:
        skip = {0}
    else:
        return node.all_input_nodes
    kept = [a for i, a in enumerate(node.args) if i not in skip]
    found: list[fx.Node] = []
    fx.node.map_arg((kept, node.kwargs), lambda a: found.append(a))
    return found


def _inplace(node: fx.Node, module=None) -> bool:
    if module is not None:
        return bool(getattr(module, "inplace", False))
    if node.op == "call_method":
        return node.target.endswith("_") and not node.target.endswith("__")
    return node.target in _INPLACE_FUNCS or node.kwargs.get("inplace", False) is True


# ----------------------------------------------------------------------------------------------
# the program of one input signature
# ----------------------------------------------------------------------------------------------


class _Program:
    """The ops of one input signature: the ``GraphOp``, the fx nodes to evaluate before each
    forward (``consts``), and for each op with parameters its binder."""

    def __init__(self, graph_op, placeholders, consts, binders, holders, dep, shapes, dtypes, layout_free=False):
        self.graph_op, self.placeholders, self.consts = graph_op, placeholders, consts
        self.binders, self.holders = binders, holders
        self.dep, self.shapes, self.dtypes = dep, shapes, dtypes
        self.layout_free = layout_free  # the module's forward reads no strides of its activations
        self.chain_nhwc = False  # its last explicit forward ran the one-node chain in channels_last


# what gives other results on a channels_last value than on a contiguous one with the same values:
# tensor methods reading the layout, and random draws per element (they fill in memory order: the
# same seed gives other dropout masks; per-channel draws such as Dropout2d's do not)
_LAYOUT_METHODS = frozenset({"stride", "is_contiguous", "data_ptr", "as_strided", "storage", "untyped_storage",
                             "bernoulli", "bernoulli_", "uniform_", "normal_", "random_", "exponential_",
                             "geometric_", "cauchy_", "log_normal_"})
_LAYOUT_FUNCTIONS = frozenset({F.dropout, F.alpha_dropout, torch.dropout, torch.alpha_dropout, torch.rand_like,
                               torch.randn_like, torch.randint_like, torch.bernoulli, torch.normal, F.rrelu})


def _layout_free(graph: fx.Graph, dep, seen, modules) -> bool:
    """Whether the forward gives the same values, and runs, on a channels_last input: nothing of
    ``_LAYOUT_METHODS`` / ``_LAYOUT_FUNCTIONS`` / ``LAYOUT_MODULES`` (in training mode) on the
    input's path, and no ``view`` of a value with more than one non-unit dimension after the
    batch's (a view needs strides its flattening can follow: of a channels_last
    ``(N, C, H, W)`` activation, only when ``C`` or ``H W`` is 1)."""
    for node in graph.nodes:
        if node not in dep:
            continue
        if node.op == "call_module":
            m = modules.get(node.target)
            if isinstance(m, LAYOUT_MODULES) and m.training:
                return False
            continue
        if node.op not in ("call_method", "call_function"):
            continue
        if node.op == "call_function" and node.target in _LAYOUT_FUNCTIONS:
            return False
        if node.op == "call_method" and node.target in _LAYOUT_METHODS:
            return False
        if (node.op == "call_method" and node.target in ("view", "view_as")) or node.target is torch.Tensor.view:
            value = seen.get(node.args[0]) if node.args else None
            if not (isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], tuple)):
                return False
            if sum(d != 1 for d in value[0][1:]) > 1:
                return False
    return True


def _probe(critic: nn.Module, graph: fx.Graph, inputs: dict):
    """Runs the module's graph on real inputs (no grad, random state forked, buffers restored):
    each node's value (tensors as ``(shape, dtype)``)."""
    gm = fx.GraphModule(critic, graph)
    seen: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            value = super().run_node(n)
            seen[n] = (tuple(value.shape), value.dtype) if isinstance(value, torch.Tensor) else value
            return value

    buffers = [(b, b.detach().clone()) for b in critic.buffers()]
    devices = sorted({b.device.index for b, _ in buffers if b.is_cuda} |
                     {t.device.index for t in inputs.values() if isinstance(t, torch.Tensor) and t.is_cuda})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            Recorder(gm).run(*inputs.values())
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                # through .data: the restore is no change to autograd (a loss forward that ran just
                # before, e.g. an eval-mode batch norm's, saved these buffers for its backward)
                if not torch.equal(b, saved):
                    b.data.copy_(saved)
    return seen


def _build(critic: nn.Module, graph: fx.Graph, inputs: dict, output) -> _Program:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    x_node = placeholders[0]
    n = inputs[x_node.target].shape[0]
    modules = dict(critic.named_modules())

    # which values depend on x (shape queries do not propagate: they are evaluated per forward)
    dep: set[fx.Node] = {x_node}
    for node in graph.nodes:
        if node is x_node or _is_shape_query(node):
            continue
        if any(a in dep for a in _value_inputs(node)):
            dep.add(node)

    # static checks of the modules on the input's path, before running anything
    leaves = {node.target for node in graph.nodes if node.op == "call_module"}
    for path, m in critic.named_modules():
        if path == "" and around_hooks(m) is not None:
            continue  # (spectral_norm_all's batching: run around the explicit path)
        if path not in leaves and (m._forward_hooks or m._forward_pre_hooks):
            raise Unsupported(f"{path or 'the critic'}: {type(m).__name__} has forward hooks, which the explicit path "
                              "would not run (it does not call the module)")
    for node in graph.nodes:
        if node in dep and node.op == "call_module":
            _module_op(modules[node.target], node.target)

    seen = _probe(critic, graph, inputs)
    out_node = next(n_ for n_ in graph.nodes if n_.op == "output")
    result = out_node.args[0]
    if isinstance(result, dict):
        if output is None or output not in result:
            raise Unsupported(f"the critic returns a dict (keys {sorted(result)}): pass output=<key> to say which "
                              "entry is the score")
        result = result[output]
    elif isinstance(result, (tuple, list)):
        if not isinstance(output, int) or not -len(result) <= output < len(result):
            raise Unsupported(f"the critic returns a {type(result).__name__} of {len(result)}: pass output=<index> "
                              "to say which is the score")
        result = result[output]
    elif output is not None:
        raise Unsupported(f"output={output!r}: the critic returns a single tensor")
    if not isinstance(result, fx.Node) or result not in dep:
        raise Unsupported("the critic's output does not depend on its input")

    # keep the input-dependent nodes that reach the output
    live: set[fx.Node] = set()
    stack = [result]
    while stack:
        node = stack.pop()
        if node in live or node not in dep:
            continue
        live.add(node)
        stack.extend(_value_inputs(node))

    shapes, dtypes = {}, {}
    for node in (m_ for m_ in graph.nodes if m_ in dep):
        value = seen.get(node)
        is_tensor = isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], torch.dtype)
        if node in live and not is_tensor:
            raise Unsupported(f"{node.name}: {_describe(node)} gives a {type(value).__name__} from the input, not a "
                              "tensor")
        if not is_tensor:
            continue
        shape = value[0]
        if node in live and (len(shape) == 0 or shape[0] != n):
            raise Unsupported(f"{node.name}: {_describe(node)} gives shape {shape} from a batch of {n}: it {MINIBATCH} "
                              "(the first dimension must stay the batch)")
        shapes[node], dtypes[node] = shape[1:], value[1]

    index: dict[fx.Node, int] = {x_node: 0}
    nodes, binders, holders = [], [], []

    def ref(a):
        return index[a]

    def const(a):
        c = Const()
        holders.append((c, a))
        return c

    def add_node(gnode):
        nodes.append(gnode)
        return len(nodes)

    for node in graph.nodes:
        if node not in live or node is x_node:
            continue
        if node.op == "placeholder":
            raise Unsupported(f"{node.name}: only the first argument may be the sample")
        module = modules.get(node.target) if node.op == "call_module" else None
        first = node.args[0] if node.args else None
        rank = len(shapes[first]) + 1 if isinstance(first, fx.Node) and first in live else None
        made = _convert(node, module, live, shapes, dtypes, rank, ref, const)
        if isinstance(made, int):  # an alias: the same value
            index[node] = made
        else:
            if isinstance(made, tuple):  # (op, fetch or None, arg)
                op, fetch, arg = made
                if fetch is not None:
                    binders.append((op, fetch))
                made = Apply(op, index[arg])
            index[node] = add_node(made)
        if _inplace(node, module) and isinstance(first, fx.Node) and first in index:
            index[first] = index[node]  # later uses of the input see the updated tensor, as in eager

    # the input-independent nodes the kept ones read (directly or through other constants)
    needed: set[fx.Node] = set()
    stack = [a for node in live for a in node.all_input_nodes if a not in dep]
    while stack:
        node = stack.pop()
        if node not in needed:
            needed.add(node)
            stack.extend(a for a in node.all_input_nodes if a not in dep)
    consts = [node for node in graph.nodes if node in needed and node.op not in ("placeholder", "output")]
    return _Program(GraphOp(nodes, index[result]), placeholders, consts, binders, holders, dep, shapes, dtypes,
                    _layout_free(graph, dep, seen, modules))


def _dims(dim, rank):
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    return tuple(d % rank for d in dims)


def _convert(node, module, live, shapes, dtypes, rank, ref, const):
    """One input-dependent node as ``(op, fetch, arg)``, an ``Add`` / ``Cat``, or an int (the
    value index it aliases). Raises ``Unsupported``."""
    target, args = node.target, node.args
    first = args[0] if args else None
    where = f"{node.name} ({_describe(node)})"
    if node.op == "call_module":
        op, fetch = _module_op(module, node.target)
        if len(args) != 1 or node.kwargs:
            raise Unsupported(f"{where}: a module called with more than its input")
        return op, fetch, first
    if node.op not in ("call_function", "call_method"):
        raise Unsupported(f"{where}: unsupported node kind {node.op}")
    if first not in live and target not in _ADD and target not in _MUL and target not in (torch.cat, torch.concat):
        raise Unsupported(f"{where}: the input-dependent value is not its first argument")
    out_shape = shapes[node]

    if target in _ACTIVATIONS:
        return _ACTIVATIONS[target](node), None, first
    if target in _DROPOUT:
        p = _static(_arg(node, 1, "p", 0.5), node, "p")
        training = _static(_arg(node, 2, "training", True), node, "training")
        return _DROPOUT[target](p, training), None, first
    if target in _ADAPTIVE:
        size = _static(_arg(node, 1, "output_size"), node, "output_size")
        nd = _ADAPTIVE[target]
        if any(s != 1 for s in ((size,) * nd if isinstance(size, int) else size)):
            raise Unsupported(f"{where}: output_size={size!r} is not supported (only 1: a global average pool)")
        return _ops.ReduceOp(tuple(range(2, 2 + nd)), True, 1.0 / math.prod(shapes[first][1:])), None, first
    if target is F.linear or target in _CONV_FN:
        w, b = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        if w in live or b in live:
            raise Unsupported(f"{where}: a weight that depends on the input")
        wc, bc = const(w), (const(b) if b is not None else None)
        if target is F.linear:
            op = _ops.LinearOp(None, None)
        else:
            stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
            dilation, groups = _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)
            for name, v in (("stride", stride), ("padding", padding), ("dilation", dilation), ("groups", groups)):
                _static(v, node, name)
            if isinstance(padding, str):
                raise Unsupported(f"{where}: padding={padding!r} (a string) is not supported in functional form")
            op = _CONV_FN[target](None, None, stride, padding, dilation, groups)

        def fetch():
            return (wc.value, None if bc is None else bc.value)
        return op, fetch, first
    if target in _IDENTITIES:
        return ref(first)
    if target in _CASTS:
        if dtypes[node] != dtypes[first] or out_shape != shapes[first]:
            raise Unsupported(f"{where}: a dtype change inside the critic is not supported")
        return ref(first)
    if target in _RESHAPES:
        if out_shape == shapes[first]:
            return ref(first)
        return _ops.ReshapeOp(out_shape), None, first
    if target in ("transpose", "permute", torch.transpose, torch.permute, "swapaxes", "swapdims"):
        if target in ("permute", torch.permute):
            dims = args[1:] if target == "permute" and not isinstance(_arg(node, 1, "dims"), (tuple, list)) \
                else _arg(node, 1, "dims")
            perm = tuple(d % rank for d in _static(tuple(dims), node, "dims"))
        else:
            d0 = _static(_arg(node, 1, "dim0"), node, "dim0") % rank
            d1 = _static(_arg(node, 2, "dim1"), node, "dim1") % rank
            perm = list(range(rank))
            perm[d0], perm[d1] = d1, d0
            perm = tuple(perm)
        if perm[0] != 0:
            raise Unsupported(f"{where}: moves dim 0, the batch: it {MINIBATCH}")
        return _ops.PermuteOp(perm), None, first
    if target in _SUMS:
        dim = _arg(node, 1, "dim", None)
        dim = _static(dim, node, "dim")
        keepdim = _static(_arg(node, 2, "keepdim", False), node, "keepdim")
        if dim is None or 0 in _dims(dim, rank):
            raise Unsupported(f"{where}: reduces over dim 0, the batch: it {MINIBATCH}")
        dims = _dims(dim, rank)
        scale = _SUMS[target]
        if scale is None:
            scale = 1.0 / math.prod(shapes[first][d - 1] for d in dims)
        return _ops.ReduceOp(dims, keepdim, scale), None, first
    if target in _REDUCTIONS:
        dim = _arg(node, 1, "dim", None)
        if dim is None or (not isinstance(dim, fx.Node) and 0 in _dims(dim, rank)):
            raise Unsupported(f"{where}: reduces over dim 0, the batch: it {MINIBATCH}")
        raise Unsupported(f"{where}: not supported on the explicit path")
    if target in _ADD:
        sign = _ADD[target]
        a, b = args[0], args[1] if len(args) > 1 else node.kwargs.get("other")
        alpha = _static(node.kwargs.get("alpha", 1), node, "alpha")
        coef_b = sign * alpha
        refs, coefs, c = [], [], None
        for operand, coef in ((a, 1), (b, coef_b)):
            if isinstance(operand, fx.Node) and operand in live:
                refs.append(ref(operand))
                coefs.append(coef)
            elif coef == 1:
                c = const(operand)
            else:  # c - x or x - c: the constant term with its sign
                if coef != -1:
                    raise Unsupported(f"{where}: alpha on a constant")
                holder = const(operand)
                c = _Negated(holder)
        broadcast = any(shapes[o] != out_shape for o in (a, b) if isinstance(o, fx.Node) and o in live)
        return Add(refs, coefs, c, broadcast)
    if target in _MUL:
        divide = _MUL[target]
        a, b = args[0], args[1] if len(args) > 1 else node.kwargs.get("other")
        a_live, b_live = isinstance(a, fx.Node) and a in live, isinstance(b, fx.Node) and b in live
        if a_live and b_live and not divide:
            return Prod(ref(a), ref(b), any(shapes[o] != out_shape for o in (a, b)))
        if divide and b_live:
            raise Unsupported(f"{where}: division by an input-dependent value is not supported")
        x_arg, factor = (a, b) if a_live else (b, a)
        if not isinstance(factor, fx.Node):
            if isinstance(factor, torch.Tensor):
                raise Unsupported(f"{where}: a tensor literal factor is not supported")
            return _ops.ScaleOp(1.0 / factor if divide else factor), None, x_arg
        holder = const(factor)
        op = _ops.MulOp()

        def fetch():
            v = holder.value
            return (1.0 / v if divide else v,)
        return op, fetch, x_arg
    if target is operator.neg or target == "neg":
        return _ops.ScaleOp(-1.0), None, first
    if target in (torch.cat, torch.concat):
        parts = args[0]
        dim = _static(_arg(node, 1, "dim", 0), node, "dim")
        dim = dim % (len(out_shape) + 1)
        if dim == 0:
            raise Unsupported(f"{where}: concatenates along dim 0, the batch: it {MINIBATCH}")
        gparts, part_shapes = [], []
        for q in parts:
            if isinstance(q, fx.Node) and q in live:
                gparts.append(ref(q))
                part_shapes.append(shapes[q])
            else:
                gparts.append(const(q))
                part_shapes.append(None)
        # constant parts' per-sample shape: the rest of the output along dim
        known = sum(s[dim - 1] for s in part_shapes if s is not None)
        missing = [i for i, s in enumerate(part_shapes) if s is None]
        for i in missing:
            s = list(out_shape)
            s[dim - 1] = (out_shape[dim - 1] - known) if len(missing) == 1 else None
            part_shapes[i] = tuple(s)
        if any(None in s for s in part_shapes):
            raise Unsupported(f"{where}: more than one input-independent part in a concatenation")
        return Cat(gparts, dim, part_shapes)
    if target is operator.getitem:
        raise Unsupported(f"{where}: indexing an input-dependent tensor is not supported")
    raise Unsupported(f"{where}: not supported on the explicit path")


class _Negated:
    """The constant term ``-c`` of ``c - x`` (an ``Add``'s const)."""

    __slots__ = ("holder",)

    def __init__(self, holder):
        self.holder = holder

    @property
    def value(self):
        return -self.holder.value


def around_hooks(module: nn.Module):
    """The objects of ``module``'s forward hooks when every one is a method of an object that
    declares ``runs_around_input_grad`` (``spectral_norm_all``'s batched iteration): the explicit
    path runs their ``before`` / ``after`` around itself. None when any other hook is there."""
    hooks = list(module._forward_pre_hooks.values()) + list(module._forward_hooks.values())
    owners = []
    for h in hooks:
        owner = getattr(h, "__self__", None)
        if not getattr(owner, "runs_around_input_grad", False):
            return None
        if owner not in owners:
            owners.append(owner)
    return owners


# ----------------------------------------------------------------------------------------------
# the module
# ----------------------------------------------------------------------------------------------


class TracedCritic(InputGradModule):
    """A torch critic module on the explicit path, through its fx graph (see the module
    docstring). Shares the module's parameters, buffers and submodules (same objects, same
    ``state_dict`` keys); ``forward`` is the module's own (its output selected by ``output``,
    a dict key or tuple index, when given); ``forward_with_input_grad(x, *args, **kwargs)``
    returns ``(out, grad_x)`` with ``grad_x = d out.sum() / dx``, extra arguments (class labels)
    passed to the critic unchanged."""

    def __init__(self, module: nn.Module, output=None, *, _weak: bool = False):
        nn.Module.__init__(self)
        # (the cache of traced_critic holds the module weakly: it is the key; a copy.deepcopy of a
        # from_torch result copies the strongly held module along with the dicts it shares)
        self.__dict__["_critic"] = weakref.ref(module) if _weak else None
        self.__dict__["_strong"] = None if _weak else module
        self._parameters, self._buffers, self._modules = module._parameters, module._buffers, module._modules
        self._non_persistent_buffers_set = module._non_persistent_buffers_set
        self.training = module.training
        # (set through __dict__: the shared _modules must not see these names)
        self.__dict__["output"] = output
        self.__dict__["_graph"] = None
        self.__dict__["_trace_error"] = None
        try:
            self.__dict__["_graph"] = trace_graph(module)
        except Unsupported as e:
            self.__dict__["_trace_error"] = str(e)
        self.__dict__["_programs"] = {}

    def __deepcopy__(self, memo):
        """A copy over a copy of the module (the shared dicts copied once, through ``memo``); the
        programs, whose parameter binders point at the original's layers, are rebuilt on use."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_programs":
                new.__dict__[key] = {}
            else:
                new.__dict__[key] = copy.deepcopy(value, memo)
        return new

    @property
    def critic(self) -> nn.Module:
        """The traced module."""
        return self._strong if self._strong is not None else self._critic()

    def train(self, mode: bool = True):
        super().train(mode)
        self.critic.training = mode
        return self

    def forward(self, *args, **kwargs):
        out = self.critic(*args, **kwargs)
        return out if self.output is None else out[self.output]

    def _unsupported(self, path):
        return None if self._trace_error is None else f"{path}: {self._trace_error}"

    def _modes(self):
        """What the program depends on besides the input: which submodules there are (a replaced
        layer gets a new program: the binders hold the layers), each one's mode and whether it
        has forward hooks (which the explicit path would not run)."""
        return tuple((id(m), m.training, bool(m._forward_hooks or m._forward_pre_hooks))
                     for m in self.critic.modules())

    def _key(self, x, args, kwargs):
        return (self._modes(), x.shape[1:], x.dtype, x.device, len(args), tuple(sorted(kwargs)),
                tuple((a.shape[1:], a.dtype) if isinstance(a, torch.Tensor) else type(a) for a in args))

    def channels_last_for(self, x: torch.Tensor) -> bool:
        """``InputGradModule.channels_last_for``: known from this signature's last explicit
        forward (its program is never built here: the first call answers False)."""
        if self._trace_error is not None or not _chain.nhwc_input(x):
            return False
        program = self._programs.get(self._key(x, (), {}))
        return isinstance(program, _Program) and program.layout_free and program.chain_nhwc

    def program(self, x, args, kwargs) -> _Program:
        """The program for this input signature (built on first use; ``Unsupported`` if none)."""
        if self._trace_error is not None:
            raise Unsupported(self._trace_error)
        key = self._key(x, args, kwargs)
        program = self._programs.get(key)
        if program is None:
            placeholders = [p for p in self._graph.nodes if p.op == "placeholder"]
            inputs = _bind_inputs(placeholders, (x,) + tuple(args), kwargs)
            try:
                program = _build(self.critic, self._graph, inputs, self.output)
            except Unsupported as e:
                program = e
            self._programs[key] = program
        if isinstance(program, Unsupported):
            raise program
        return program

    def forward_with_input_grad(self, x, *args, **kwargs):
        check_input(x)
        program = self.program(x, args, kwargs)
        critic = self.critic
        hooks = list(self._input_grad_hooks) + (around_hooks(critic) or [])
        for hook in hooks:
            hook.before(critic, (x,))
        try:
            _bind(critic, program, x, args, kwargs)
            root = program.graph_op
            chain = _chain.plan_root(root, x)
            program.chain_nhwc = chain is not None and _chain.runs_nhwc(chain[0], x)
            if chain is not None:
                return _chain.forward_with_input_grad(*chain, x)
            out, saved = root.forward((), x)
            return out, root.vjp((), saved, torch.ones_like(out))
        finally:
            for hook in hooks:
                hook.after(critic, (x,), None)


def _bind_inputs(placeholders, args, kwargs) -> dict:
    inputs = {}
    for i, p in enumerate(placeholders):
        if i < len(args):
            inputs[p.target] = args[i]
        elif p.target in kwargs:
            inputs[p.target] = kwargs[p.target]
        elif p.args:
            inputs[p.target] = p.args[0]  # the default
        else:
            raise Unsupported(f"missing argument {p.target!r} of the critic's forward")
    return inputs


def _fetch_attr(module, target: str):
    for name in target.split("."):
        module = getattr(module, name)
    return module


def _bind(critic, program: _Program, x, args, kwargs) -> None:
    """Evaluates the input-independent nodes (and shape queries, from the input's shape) and
    gives every op its parameters for this forward."""
    env: dict[fx.Node, object] = {}
    placeholders = program.placeholders
    inputs = _bind_inputs(placeholders, (x,) + tuple(args), kwargs)
    for p in placeholders:
        env[p] = inputs[p.target]
    n = x.shape[0]
    stand_ins = {}

    def value(a):
        if a in program.dep:  # read for its shape, dtype or device only: a stand-in without storage
            s = stand_ins.get(a)
            if s is None:
                shape = (n,) + tuple(program.shapes.get(a, x.shape[1:]))
                s = x.new_empty(1, dtype=program.dtypes.get(a, x.dtype)).expand(shape)
                stand_ins[a] = s
            return s
        return env[a]

    for node in program.consts:
        node_args = fx.node.map_arg(node.args, value)
        node_kwargs = fx.node.map_arg(node.kwargs, value)
        if node.op == "get_attr":
            env[node] = _fetch_attr(critic, node.target)
        elif node.op == "call_module":
            env[node] = critic.get_submodule(node.target)(*node_args, **node_kwargs)
        elif node.op == "call_function":
            env[node] = node.target(*node_args, **node_kwargs)
        else:
            env[node] = getattr(node_args[0], node.target)(*node_args[1:], **node_kwargs)
    for holder, a in program.holders:
        holder.value = value(a) if isinstance(a, fx.Node) else a
    for op, fetch in program.binders:
        op.params = fetch()


_TRACED: weakref.WeakKeyDictionary[nn.Module, TracedCritic] = weakref.WeakKeyDictionary()


def loss_channels_last(critic, x: torch.Tensor) -> bool:
    """Whether ``critic_loss`` runs its loss forward ``critic(x)`` on ``x`` in channels_last: the
    critic's explicit path runs its convolutions in that layout (``channels_last_for``), a
    wgan_kernels.nn critic or a torch module already traced (a wrapper, DDP or a compiled module
    is left as it is)."""
    if isinstance(critic, InputGradModule):
        return critic.channels_last_for(x)
    traced = _TRACED.get(critic) if isinstance(critic, nn.Module) else None
    return traced is not None and traced.channels_last_for(x)


def in_loss_layout(critic, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the critic's plain forwards around its penalty take it (``critic_loss``'s loss
    forward, the fused trainer's generator step): in channels_last where ``loss_channels_last``
    (oneDNN's CPU convolutions are faster in it; DCGAN-64 WGAN-GP critic step, 2 CPU threads:
    756 -> 685 ms, interleaved), else as it is."""
    return _chain.to_nhwc(x) if _chain.nhwc_input(x) and loss_channels_last(critic, x) else x


def traced_critic(module: nn.Module) -> TracedCritic:
    """The ``TracedCritic`` of ``module`` (made on first use and kept while the module lives):
    what ``critic_loss`` / ``gradient_penalty`` use for a torch critic module."""
    traced = _TRACED.get(module)
    if traced is None:
        traced = _TRACED[module] = TracedCritic(module, _weak=True)
    return traced
