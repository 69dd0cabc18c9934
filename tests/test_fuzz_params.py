"""Property-based fuzzing of the parameter ops' public API: clip_, ClippedRMSprop, power_iteration_,
and the spectral_norm / spectral_norm_all module wrappers.

Random shapes (0-size dims, 1 element, odd sizes), layouts (transposed, sliced with a step, at a
storage offset, expanded), dtypes (the four kernel dtypes and bad ones), hyper-parameters (0,
negative, nan, inf, huge, bools, strings, None), argument forms (tensor, list, tuple, generator,
empty, junk items), aliasing arguments, inference tensors (and calls under inference mode),
tensors that require grad (leaves and views of leaves).

The property, for every backend that runs the op on CPU (cpp, reference, and triton under
TRITON_INTERPRET=1 for power_iteration_, without bfloat16, which the interpreter lacks): each
either gives the reference's numbers (per-dtype tolerances; float16/bfloat16 power iteration
within 2x the reference's own error against float64, as tests/test_spectral_norm.py checks), or
raises ValueError whose message starts with the argument's name; and all backends make the same
decision with the same message. Any other exception fails the test with its traceback.

Bounded and deterministic (derandomize=True, no example database): about 17 s on 2 CPU cores.
`pytest --hypothesis-show-statistics` shows how often each argument was refused.
"""

import copy
import math
import os
import re
import warnings

import torch
import torch.nn.functional as F
from conftest import TOLERANCES
from torch import nn
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import wgan_kernels as wk
from wgan_kernels._backend import BACKEND_ENV, available, extension
from wgan_kernels.nn.spectral import spectral_norm, spectral_norm_all
from wgan_kernels.ops.spectral_norm import power_iteration_, power_iteration_reference_

HAS_CPP = extension() is not None
PARAM_BACKENDS = ["reference"] + (["cpp"] if HAS_CPP else [])
HAS_TRITON = available("triton", "cpu")

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
BAD_DTYPES = [torch.int64, torch.int32, torch.bool, torch.complex64, torch.uint8]
LAYOUTS = ["contiguous", "contiguous", "transposed", "step", "offset", "expanded"]

# A refusal names its argument first: "params[2]: ...", "us, vs: ...", "clip_value: ...".
ARGUMENT = re.compile(r"^(params|grads|square_avgs|steps|param_groups\[\d+\]\['params'\]|param_group|clip_value|lr|"
                      r"alpha|eps|weight_decay|backend|weights|us|vs|n_power_iterations|dim|name|module|critic)"
                      r"(\[\d+\])?[:,]")

# Deterministic (derandomize, no example database written into the tree); the sizes of the
# examples are bounded by the strategies below, their number here.
SUPPRESS = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]


# ----------------------------------------------------------------------------- building inputs


def _is_rare(x: int, one_in: int) -> bool:
    # x from integers(0, 1000): hypothesis favours the ends of a range, which stay "usual" here
    return 300 <= x < 300 + 1000 // one_in


def rare(draw, one_in: int) -> bool:
    """True about one time in ``one_in`` (False is the simple case hypothesis shrinks towards)."""
    return _is_rare(draw(st.integers(0, 1000)), one_in)


def mostly(usual: list, unusual: list, one_in: int = 4):
    """Values from ``usual``, and about one time in ``one_in`` from ``unusual`` (edge and bad
    values; shrinking goes towards ``usual``)."""
    return st.integers(0, 1000).flatmap(lambda x: st.sampled_from(unusual if _is_rare(x, one_in) else usual))


def pick(values: list):
    """One of ``values``, about evenly (``sampled_from`` favours some positions)."""
    return st.integers(0, 999).map(lambda x: values[x % len(values)])


@st.composite
def tensor_specs(draw, shape=None, dtype=None, bad_dtypes=True, layouts=LAYOUTS, one_in=12):
    """A recipe for one tensor (built again, identically, for each backend); about one in
    ``one_in`` is an inference tensor, one in ``one_in`` a bad dtype."""
    if shape is None:
        shape = tuple(draw(st.lists(st.sampled_from([0, 1, 2, 3, 5, 7]), max_size=3)))
    if dtype is None:
        dtype = draw(st.sampled_from(FLOATS + BAD_DTYPES) if bad_dtypes and rare(draw, one_in)
                     else st.sampled_from(FLOATS))
    return {
        "shape": tuple(shape),
        "dtype": dtype,
        "layout": draw(st.sampled_from(layouts)),
        "scale": draw(st.sampled_from([1e-3, 0.05, 1.0, 1.0, 30.0])),
        "special": draw(mostly([None], [math.nan, math.inf, -math.inf], 6)),
        "inference": rare(draw, one_in),
        "grad": draw(mostly(["none"], ["leaf", "view_of_leaf"], one_in // 2)),
    }


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_complex:
        return torch.complex(x, -x).to(dtype)
    if dtype == torch.bool:
        return x > 0
    if not dtype.is_floating_point:
        return x.nan_to_num(0.0, 100.0, -100.0).clamp(-100, 100).round().to(dtype)
    return x.to(dtype)


def build(spec, gen: torch.Generator) -> torch.Tensor:
    shape, layout = spec["shape"], spec["layout"]

    def values(*size):
        x = torch.randn(size, generator=gen, dtype=torch.float64) * spec["scale"]
        if spec["special"] is not None and x.numel():
            x.view(-1)[0] = spec["special"]
        return _cast(x, spec["dtype"])

    def make():
        numel = math.prod(shape)
        if layout == "transposed" and len(shape) >= 2:
            return values(*reversed(shape)).permute(*reversed(range(len(shape))))
        if layout == "step" and shape:
            return values(shape[0] * 2, *shape[1:])[::2]
        if layout == "offset":
            return values(numel + 5)[3:3 + numel].view(shape)
        if layout == "expanded" and shape:
            return values(1, *shape[1:]).expand(shape)
        return values(*shape)

    if spec["inference"]:
        with torch.inference_mode():
            return make()
    t = make()
    if spec["grad"] != "none" and (t.dtype.is_floating_point or t.dtype.is_complex):
        leaf = t.detach().requires_grad_()
        t = leaf if spec["grad"] == "leaf" else leaf[...]  # a view of a leaf: a non-leaf with t's layout
    return t


def as_form(items: list, form: str):
    """The list of arguments in the form the caller passes it."""
    if form == "tuple":
        return tuple(items)
    if form == "generator":
        return (t for t in items)
    if form == "single" and items:
        return items[0]
    return items


def snapshot(ts):
    return [t.detach().clone() for t in ts]


def run(fn):
    """("ok", result) or ("ValueError", message); any other exception propagates (a failure)."""
    try:
        return "ok", fn()
    except ValueError as e:
        return "ValueError", str(e)


def check_decisions(outcomes: dict, what: str):
    """Every backend accepted, or every backend refused with one message naming the argument."""
    kinds = {b: kind for b, (kind, _) in outcomes.items()}
    assert len(set(kinds.values())) == 1, f"{what}: backends disagree on accepting: " + repr(
        {b: (kind, value if kind != "ok" else "accepted") for b, (kind, value) in outcomes.items()})
    kind = next(iter(kinds.values()))
    # tallied by `pytest --hypothesis-show-statistics`: how often each argument is refused
    event(f"{kind}: {next(iter(outcomes.values()))[1].split(':')[0] if kind != 'ok' else 'accepted'}")
    if kind == "ValueError":
        messages = {b: msg for b, (_, msg) in outcomes.items()}
        assert len(set(messages.values())) == 1, f"{what}: backends refuse with different messages: {messages}"
        message = next(iter(messages.values()))
        assert ARGUMENT.match(message), f"{what}: the error does not start with the argument's name: {message!r}"
    return kind


def assert_close(actual, expected, dtype, what, exact=False):
    rtol, atol = (0.0, 0.0) if exact else TOLERANCES.get(dtype, (0.0, 0.0))
    if actual.dtype.is_floating_point or actual.dtype.is_complex:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, check_stride=False,
                                   msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(actual, expected), what


HYPER_JUNK = [math.nan, math.inf, -math.inf, True, "0.1", None, 10 ** 400]


# ----------------------------------------------------------------------------- clip_


@st.composite
def clip_cases(draw):
    n = draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(FLOATS))
    specs = [draw(tensor_specs(dtype=None if rare(draw, 5) else dtype)) for _ in range(n)]
    return {
        "specs": specs,
        "alias": draw(mostly(["none"], ["duplicate", "overlap", "disjoint"], 4)),
        "form": draw(mostly(["list", "tuple", "generator", "single"], ["junk_item", "not_iterable"], 6)),
        "clip_value": draw(mostly([0.01, 0.5, 1.0, 3, 1e-300, 65510.0, 1e5, 3.39e38, 1e39, 1e300],
                                  [0, -0.1] + HYPER_JUNK, 3)),
        "inside_inference_mode": rare(draw, 8),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def build_clip_args(case):
    gen = torch.Generator().manual_seed(case["seed"])
    tensors = [build(s, gen) for s in case["specs"]]
    buf = torch.randn(12, generator=gen)
    if case["alias"] == "duplicate" and tensors:
        tensors.append(tensors[0])
    elif case["alias"] == "overlap":
        tensors += [buf[0:7], buf[4:12]]
    elif case["alias"] == "disjoint":
        tensors += [buf[0:5], buf[5:12]]
    if case["form"] == "junk_item":
        return tensors, tensors[:1] + ["x"] + tensors[1:]
    if case["form"] == "not_iterable":
        return tensors, 5
    return tensors, as_form(tensors, case["form"])


@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=SUPPRESS)
@given(case=clip_cases())
def test_fuzz_clip(case):
    outcomes = {}
    for backend in PARAM_BACKENDS:
        tensors, arg = build_clip_args(case)

        def call(arg=arg, tensors=tensors, backend=backend):
            if case["inside_inference_mode"]:
                with torch.inference_mode():
                    wk.clip_(arg, case["clip_value"], backend=backend)
            else:
                wk.clip_(arg, case["clip_value"], backend=backend)
            return snapshot(tensors)

        outcomes[backend] = run(call)
    if check_decisions(outcomes, f"clip_ {case}") == "ok":
        expected = outcomes["reference"][1]
        for backend, (_, got) in outcomes.items():
            for i, (a, e) in enumerate(zip(got, expected)):
                assert_close(a, e, e.dtype, f"clip_ {backend} tensor {i}", exact=True)


# ----------------------------------------------------------------------------- ClippedRMSprop


@st.composite
def rmsprop_cases(draw):
    n = draw(st.integers(0, 4))
    dtype = draw(st.sampled_from(FLOATS))
    specs = [draw(tensor_specs(dtype=None if rare(draw, 6) else dtype)) for _ in range(n)]
    for s in specs:  # optimizers take leaves; views of leaves are fuzzed with a few
        if s["grad"] == "view_of_leaf" and draw(st.booleans()):
            s["grad"] = "leaf"
    return {
        "specs": specs,
        "grads": [draw(st.sampled_from(["contiguous", "like", "transposed", "none"])) for _ in specs],
        "alias": draw(mostly(["none"], ["duplicate", "overlap", "disjoint"], 5)),
        "form": draw(mostly(["list", "tuple", "generator", "groups"], ["single", "junk_item"], 6)),
        "hyper": {
            "lr": draw(mostly([1e-3, 1e-3, 0.1, 0, 1, 3e38], [1e39, -1e-3] + HYPER_JUNK, 8)),
            "alpha": draw(mostly([0.99, 0.99, 0, 1, 0.5], [1.5, -0.1, math.nan, "0.9"], 8)),
            "eps": draw(mostly([1e-8, 1e-8, 0, 1e-3, 1e5], [1e39, -1.0, math.inf, None], 8)),
            "weight_decay": draw(mostly([0, 0, 0.1, 1e3], [-1, math.nan, "0"], 8)),
            "clip_value": draw(mostly([0.01, 0.01, None, 1, 1e5, 1e300], [0, -1, math.inf, True], 8)),
        },
        "steps": draw(st.integers(1, 3)),
        "inside_inference_mode": rare(draw, 10),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def grad_like(p, mode, gen):
    g = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 3).to(p.dtype) if p.is_floating_point() else None
    if g is None or mode == "contiguous":
        return g
    if mode == "like":
        return torch.empty_like(p.detach()).copy_(g)
    if mode == "transposed" and p.dim() >= 2:
        return g.mT.contiguous().mT
    return g


def run_rmsprop(case, backend):
    gen = torch.Generator().manual_seed(case["seed"])
    params = [build(s, gen) for s in case["specs"]]
    buf = torch.randn(12, generator=gen, dtype=params[0].dtype if params and params[0].is_floating_point()
                      else torch.float32)
    if case["alias"] == "duplicate" and params:
        params.append(params[0])
    elif case["alias"] in ("overlap", "disjoint") and buf.is_floating_point():
        a, b = (buf[0:7], buf[4:12]) if case["alias"] == "overlap" else (buf[0:5], buf[5:12])
        params += [a.requires_grad_(), b.requires_grad_()]
    modes = case["grads"] + ["contiguous"] * (len(params) - len(case["grads"]))
    grads = [[grad_like(p, m, gen) if m != "none" else None for p, m in zip(params, modes)]
             for _ in range(case["steps"])]
    form = case["form"]
    if form == "groups" and len(params) >= 2:
        arg = [{"params": params[:1], "lr": 0.05}, {"params": params[1:]}]
    elif form == "junk_item":
        arg = params[:1] + [3.0] + params[1:]
    else:
        arg = as_form(params, form)

    def go():
        opt = wk.ClippedRMSprop(arg, backend=backend, **case["hyper"])
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                if p.is_leaf and not p.is_inference():
                    p.grad = None if g is None else g.clone()
            opt.step()
        states = [opt.state.get(p, {}) for p in params]
        return (snapshot(params), [snapshot([s["square_avg"]])[0] if s else None for s in states],
                [float(s["step"]) if s else None for s in states])

    if case["inside_inference_mode"]:
        with torch.inference_mode():
            return go()
    return go()


@settings(max_examples=400, deadline=None, derandomize=True, database=None, suppress_health_check=SUPPRESS)
@given(case=rmsprop_cases())
def test_fuzz_clipped_rmsprop(case):
    outcomes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's note on .grad of a non-leaf
        for backend in PARAM_BACKENDS:
            outcomes[backend] = run(lambda backend=backend: run_rmsprop(case, backend))
    if check_decisions(outcomes, f"ClippedRMSprop {case}") == "ok":
        params, avgs, steps = outcomes["reference"][1]
        for backend, (_, (got_params, got_avgs, got_steps)) in outcomes.items():
            for i, (a, e) in enumerate(zip(got_params, params)):
                assert_close(a, e, e.dtype, f"ClippedRMSprop {backend} params[{i}] {case}")
            for i, (a, e) in enumerate(zip(got_avgs, avgs)):
                if e is not None:
                    assert_close(a, e, e.dtype, f"ClippedRMSprop {backend} square_avg[{i}] {case}")
            assert got_steps == steps, (backend, got_steps, steps)


# ----------------------------------------------------------------------------- power_iteration_


# How u, v and the weights may share memory (entries 0 and 1): "none", or one u/v a view of
# another u/v or of a weight (refused), disjoint views of one buffer or a weight read twice (fine).
ALIASING = ["u_v_overlap", "u_v_disjoint", "u_is_w_column", "v_is_w_row", "u1_is_w0_column", "v1_is_u0", "u_twice",
            "w_twice"]
SAME_SHAPE = {"u_twice": (0, 0), "v1_is_u0": (0, 1), "u1_is_w0_column": (0, 0), "w_twice": None}


@st.composite
def power_iteration_cases(draw):
    alias = draw(mostly(["none"], ALIASING, 3))
    n = draw(st.integers(2 if alias in SAME_SHAPE else 1 if alias != "none" else 0, 3))
    dtype = draw(st.sampled_from(FLOATS))
    shapes = []
    for k in range(n):
        rank = 2 if k == 0 and alias != "none" else draw(mostly([2], [1, 3], 12))
        shapes.append(tuple(draw(st.sampled_from([1, 2, 3, 5, 9, 0])) for _ in range(rank)))
    if alias in SAME_SHAPE:  # entry 1 sized so that the aliasing is well-formed
        if SAME_SHAPE[alias] is None:
            shapes[1] = shapes[0]
        else:
            dim0, dim1 = SAME_SHAPE[alias]
            other = list((shapes[1] + (1, 1))[:2])
            other[dim1] = shapes[0][dim0]
            shapes[1] = tuple(other)
    entries = []
    for shape in shapes:
        w_dtype = draw(st.sampled_from(FLOATS + BAD_DTYPES)) if rare(draw, 12) else dtype
        w = draw(tensor_specs(shape=shape, dtype=w_dtype, one_in=24))
        rows, cols = (shape + (1, 1))[:2]
        vec = dict(dtype=draw(st.sampled_from(FLOATS)) if rare(draw, 20) else w_dtype, bad_dtypes=False,
                   layouts=["contiguous", "contiguous", "step", "offset", "expanded"], one_in=40)
        u = draw(tensor_specs(shape=(rows + (1 if rare(draw, 20) else 0),), **vec))
        v = draw(tensor_specs(shape=(cols,), **vec))
        for spec in (u, v):  # u, v as real code has them (unit, no grad), with a few exceptions
            spec["normalize"] = not rare(draw, 5)
            spec["grad"] = "leaf" if rare(draw, 30) else "none"
        entries.append((w, u, v))
    return {
        "entries": entries,
        "alias": alias,
        "form": draw(st.sampled_from(["list", "tuple", "generator", "single"])),
        "n_power_iterations": draw(mostly([1, 1, 2, 3], [0, -1, True, 1.5, "2"], 12)),
        "eps": draw(mostly([1e-12, 1e-12, 1e-3, 1.0, 1e300], [0.0, -1.0, math.nan, math.inf, "x", True], 12)),
        "grad_enabled": draw(st.booleans()),
        "inside_inference_mode": rare(draw, 10),
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def build_power_iteration_args(case):
    gen = torch.Generator().manual_seed(case["seed"])
    weights, us, vs = [], [], []
    for w_spec, u_spec, v_spec in case["entries"]:
        weights.append(build(w_spec, gen))
        for spec, out in ((u_spec, us), (v_spec, vs)):
            t = build(spec, gen)
            if spec["normalize"] and t.is_floating_point() and t.numel() and not t.is_inference() \
                    and not has_zero_stride(t):
                with torch.no_grad():
                    t.copy_(F.normalize(t.detach().double(), dim=0).to(t.dtype))
            out.append(t)
    alias = case["alias"]
    if alias in ("u_v_overlap", "u_v_disjoint"):  # one buffer: [u][v] apart, or sharing one value
        rows, cols = us[0].shape[0], vs[0].shape[0]
        buf = F.normalize(torch.randn(rows + cols + 1, generator=gen, dtype=torch.float64), dim=0).to(us[0].dtype)
        start = max(rows - 1, 0) if alias == "u_v_overlap" else rows
        us[0], vs[0] = buf[0:rows], buf[start:start + cols]
    elif alias == "u_is_w_column" and weights[0].shape[1]:
        us[0] = weights[0].detach()[:, 0]
    elif alias == "v_is_w_row" and weights[0].shape[0]:
        vs[0] = weights[0].detach()[0]
    elif alias == "u1_is_w0_column" and weights[0].shape[1]:
        us[1] = weights[0].detach()[:, -1]
    elif alias == "v1_is_u0":
        vs[1] = us[0]
    elif alias == "u_twice":
        us[1] = us[0]
    elif alias == "w_twice":
        weights[1] = weights[0]  # read twice: allowed
    form = case["form"]
    return weights, us, vs, as_form(weights, form), as_form(us, form), as_form(vs, form)


def has_zero_stride(t):
    return any(s == 0 for s in t.stride())


def sn_backends(case):
    dtypes = {t["dtype"] for entry in case["entries"] for t in entry}
    out = ["reference"] + (["cpp"] if HAS_CPP else [])
    if HAS_TRITON and torch.bfloat16 not in dtypes:  # the interpreter has no bfloat16
        out.append("triton")
    return out


def run_power_iteration(case, backend):
    weights, us, vs, w_arg, u_arg, v_arg = build_power_iteration_args(case)

    def go():
        with torch.set_grad_enabled(case["grad_enabled"]):
            sigmas = power_iteration_(w_arg, u_arg, v_arg, case["n_power_iterations"], case["eps"], backend=backend)
        grads = None
        passed = weights[:1] if case["form"] == "single" else weights
        leaves = [w for w in passed if w.requires_grad]
        total = sum(s.float().sum() for s in sigmas) if sigmas else None
        if leaves and total is not None and total.requires_grad:
            grads = [g.detach().clone() if g is not None else None
                     for g in torch.autograd.grad(total, leaves, allow_unused=True)]
        n = len(passed)
        return [s.detach().clone() for s in sigmas], snapshot(us[:n]), snapshot(vs[:n]), grads

    if case["inside_inference_mode"]:
        with torch.inference_mode():
            return go()
    return go()


def truth_of(case):
    """The float64 reference on the same (rounded) inputs: the yardstick for float16/bfloat16."""
    weights, us, vs, *_ = build_power_iteration_args(case)
    up = lambda ts: [t.detach().double().contiguous() for t in ts]  # noqa: E731
    w64, u64, v64 = up(weights), up(us), up(vs)
    with torch.no_grad():
        sigmas = power_iteration_reference_(w64, u64, v64, case["n_power_iterations"], case["eps"])
    return sigmas, u64, v64


def assert_low_precision(ours, ref, truth, dtype, what):
    """max |ours - truth| <= 2 max |ref - truth| + atol over the values whose truth is finite, the
    rule of tests/test_spectral_norm.py's low-precision tests (a NaN or inf where truth is finite
    is an infinite error); where truth is not finite, ours must be NaN / inf where ref is."""
    atol = TOLERANCES[dtype][1]
    ours, ref, truth = ours.double(), ref.double(), truth.double()
    finite = truth.isfinite()
    err_ours = (ours - truth).abs().nan_to_num(math.inf)[finite]
    err_ref = (ref - truth).abs().nan_to_num(math.inf)[finite]
    if err_ours.numel():
        worst, worst_ref = err_ours.max().item(), err_ref.max().item()
        assert worst <= 2 * worst_ref + atol, f"{what}: max error {worst} vs the reference's {worst_ref}"
    assert torch.equal(ours[~finite].isfinite(), ref[~finite].isfinite()), f"{what}: non-finite values differ"


@settings(max_examples=300, deadline=None, derandomize=True, database=None, suppress_health_check=SUPPRESS)
@given(case=power_iteration_cases())
def test_fuzz_power_iteration(case):
    outcomes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for backend in sn_backends(case):
            outcomes[backend] = run(lambda backend=backend: run_power_iteration(case, backend))
    if check_decisions(outcomes, f"power_iteration_ {case}") != "ok":
        return
    sigmas, us, vs, grads = outcomes["reference"][1]
    truth = None
    for backend, (_, (got_sigmas, got_us, got_vs, got_grads)) in outcomes.items():
        if backend == "reference":
            continue
        assert len(got_sigmas) == len(sigmas)
        for name, got, expected, k in (("sigma", got_sigmas, sigmas, 0), ("u", got_us, us, 1), ("v", got_vs, vs, 2)):
            for i, (a, e) in enumerate(zip(got, expected)):
                what = f"power_iteration_ {backend} {name}[{i}] {case}"
                assert a.dtype == e.dtype and a.shape == e.shape, (what, a.dtype, e.dtype, a.shape, e.shape)
                if e.dtype in (torch.float32, torch.float64):
                    assert_close(a, e, e.dtype, what)
                else:
                    truth = truth if truth is not None else truth_of(case)
                    assert_low_precision(a, e, truth[k][i], e.dtype, what)
        if grads is not None:
            for i, (a, e) in enumerate(zip(got_grads, grads)):
                if e is not None and e.dtype in (torch.float32, torch.float64):
                    assert_close(a, e, e.dtype, f"power_iteration_ {backend} grad {i} {case}")


# ----------------------------------------------------------------------------- spectral_norm / spectral_norm_all

LAYERS = {  # kind: (layer of (in, out) features, input shape for a batch of 2)
    "linear": (lambda i, o: nn.Linear(i, o), lambda i: (2, i)),
    "conv1d": (lambda i, o: nn.Conv1d(i, o, 3, padding=1), lambda i: (2, i, 5)),
    "conv2d": (lambda i, o: nn.Conv2d(i, o, (3, 2)), lambda i: (2, i, 4, 5)),
    "convtranspose2d": (lambda i, o: nn.ConvTranspose2d(i, o, 2, stride=2), lambda i: (2, i, 3, 3)),
}


@st.composite
def sn_module_cases(draw):
    return {
        "kind": draw(st.sampled_from(sorted(LAYERS))),
        "features": (draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 2, 3, 5]))),
        "dtype": draw(st.sampled_from(FLOATS)),
        "wrapper": draw(pick(["spectral_norm", "spectral_norm_all", "spectral_norm_all_per_access"])),
        "n_power_iterations": draw(mostly([1, 2], [0, -1, True, "1", 1.0], 8)),
        "eps": draw(pick([1e-12] * 10 + [1e-3] * 2 + [0.0, -1.0, math.nan, math.inf, 1e5, 1e39, 1e300, "x"])),
        "dim": draw(pick([None, None, None, 0, 1, -1, 4, -5, True, "0"])),  # spectral_norm's only
        "seed": draw(st.integers(0, 2 ** 16)),
    }


def run_sn_module(case, backend):
    """Two training-mode forwards of a spectral-normalised layer (or a two-layer critic), the
    backend forced through WGAN_KERNELS_BACKEND: the outputs and the u, v buffers; for
    float16/bfloat16 also the same from a float64 copy of the wrapped model run by the reference
    (the yardstick of tests/test_spectral_norm.py's low-precision tests)."""
    dtype = case["dtype"]
    make, input_shape = LAYERS[case["kind"]]
    torch.manual_seed(case["seed"])
    layer = make(*case["features"]).to(dtype)
    x = torch.randn(input_shape(case["features"][0]), generator=torch.Generator().manual_seed(case["seed"]),
                    dtype=torch.float64).to(dtype)

    def forwards(model, x, backend):
        before = os.environ.get(BACKEND_ENV)
        os.environ[BACKEND_ENV] = backend
        try:
            outs = [model(x).detach().clone() for _ in range(2)]
        finally:
            if before is None:
                del os.environ[BACKEND_ENV]
            else:
                os.environ[BACKEND_ENV] = before
        return outs + [b.detach().clone() for name, b in model.named_buffers() if name.endswith(("_u", "_v"))]

    def wrap():
        if case["wrapper"] == "spectral_norm":
            kwargs = {} if case["dim"] is None else {"dim": case["dim"]}
            return spectral_norm(layer, n_power_iterations=case["n_power_iterations"], eps=case["eps"], **kwargs)
        model = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(1)) if case["kind"] != "linear" \
            else nn.Sequential(layer, nn.LeakyReLU(0.2), nn.Linear(case["features"][1], 1))
        model = model.to(dtype)
        model(x)  # materialise the lazy layer before the wrapper sees it
        return spectral_norm_all(model, n_power_iterations=case["n_power_iterations"], eps=case["eps"],
                                 per_access=case["wrapper"].endswith("per_access"))

    before = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = backend  # spectral_norm's registration runs one iteration
    try:
        model = wrap()
    finally:
        if before is None:
            del os.environ[BACKEND_ENV]
        else:
            os.environ[BACKEND_ENV] = before
    truth = None
    if dtype in (torch.float16, torch.bfloat16):
        truth = forwards(copy.deepcopy(model).double(), x.double(), "reference")
    return forwards(model, x, backend), truth


@settings(max_examples=80, deadline=None, derandomize=True, database=None, suppress_health_check=SUPPRESS)
@given(case=sn_module_cases())
def test_fuzz_spectral_norm_modules(case):
    backends = ["reference"] + (["cpp"] if HAS_CPP else []) + \
        (["triton"] if HAS_TRITON and case["dtype"] != torch.bfloat16 else [])
    outcomes = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LazyLinear's "under development"
        for backend in backends:
            outcomes[backend] = run(lambda backend=backend: run_sn_module(case, backend))
    if check_decisions(outcomes, f"spectral_norm {case}") != "ok":
        return
    expected, ref_truth = outcomes["reference"][1]
    for backend, (_, (got, truth)) in outcomes.items():
        for i, (a, e) in enumerate(zip(got, expected)):
            what = f"spectral_norm {backend} result {i} {case}"
            if truth is None:
                assert_close(a, e, case["dtype"], what)
            elif a.numel():  # each against the float64 run of its own wrapped model
                # Within 2x the reference's error, plus the dtype's rtol of the largest value: the
                # outputs come through layers computed in float16/bfloat16, whose rounding of W / sigma
                # and of the sums makes the reference's own error small or large by chance.
                rtol, atol = TOLERANCES[case["dtype"]]
                worst = (a.double() - truth[i]).abs().nan_to_num(math.inf).max().item()
                worst_ref = (e.double() - ref_truth[i]).abs().nan_to_num(math.inf).max().item()
                allowed = 2 * worst_ref + atol + rtol * truth[i].abs().max().item()
                assert worst <= allowed, f"{what}: max error {worst} vs the reference's {worst_ref}"
