"""Property-based fuzzing of the penalty API: grad_norm_penalty, sample_penalty_points,
penalty_config, gradient_penalty, critic_loss and the activation-mask ops.

For every input hypothesis draws (odd, 1-element and empty shapes; 1-D gradients; transposed,
step-sliced and expanded layouts; float32/float64/float16/bfloat16 and bad dtypes; hyper-parameters
that are 0, negative, NaN, infinite, huge, bools, strings, numpy scalars, lists), each backend
available on CPU (the extension, Triton on the interpreter, the reference) either returns the
reference's result within the dtype's tolerance (conftest.TOLERANCES), forward and backward, or
raises a ValueError whose message starts with the name of an argument of the call; and all
backends make the same decision with the same message. Any other exception fails the test.

The Triton interpreter has no bfloat16: bfloat16 inputs run on the other backends only.
Bounded and deterministic (``derandomize=True``, no example database): about 15 s on 2 CPU cores.
Layouts reach the ops as drawn: each backend gets its own ``detach()`` of the input (a view, same
strides), never a ``clone()`` (which would make a sliced or expanded tensor contiguous).
"""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import tol

from wgan_kernels._backend import available

from hypothesis import HealthCheck, event, given, settings  # noqa: E402 - a test dependency (pyproject's [test])
from hypothesis import strategies as st  # noqa: E402

import wgan_kernels as wk  # noqa: E402
from wgan_kernels.losses import PRESETS, STRATEGIES, penalty_config  # noqa: E402
from wgan_kernels.ops.activation import (leaky_relu_with_mask, leaky_relu_with_mask_reference,  # noqa: E402
                                         masked_scale, masked_scale_reference)
from wgan_kernels.ops.penalty import grad_norm_penalty, grad_norm_penalty_reference  # noqa: E402

pytestmark = pytest.mark.filterwarnings(  # the interpreter's numpy warns where float32 overflows, as meant
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning")

FUZZ = settings(deadline=None, derandomize=True, database=None, print_blob=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

PENALTY_BACKENDS = [b for b in ("cpp", "triton", "reference") if available(b, "cpu")]
ACTIVATION_BACKENDS = [b for b in ("triton", "reference") if available(b, "cpu")]
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BAD_DTYPES = (torch.int32, torch.int64, torch.bool, torch.complex64)
SIZES = (1, 2, 3, 5, 7)


def runs_on(backend: str, dtype) -> bool:
    """The interpreter has no bfloat16 (see tests/test_penalty.py): such cases skip Triton."""
    return not (backend == "triton" and dtype == torch.bfloat16)


# ----------------------------------------------------------------------------- drawing inputs

LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")


def build(shape, dtype, layout, seed, scale=1.0):
    """A tensor of ``shape``/``dtype`` with random values (never zeros) in the given memory layout:
    transposed (last two dims swapped in memory), step-sliced (every other element of the last
    dim), expanded (stride 0 along the last dim). Layouts that need more dims fall back to contiguous."""
    gen = torch.Generator().manual_seed(seed)
    shape = list(shape)
    if layout == "transposed" and len(shape) >= 2:
        storage = shape[:-2] + [shape[-1], shape[-2]]
    elif layout == "sliced" and shape:
        storage = shape[:-1] + [2 * shape[-1]]
    elif layout == "expanded" and shape:
        storage = shape[:-1] + [1]
    else:
        storage, layout = shape, "contiguous"
    base = torch.randn(tuple(storage), generator=gen, dtype=torch.float64)
    base = base.sign() * (base.abs() + 0.05) * scale
    if dtype.is_floating_point:
        t = base.to(dtype)
    elif dtype.is_complex:
        t = base.to(dtype)
    elif dtype == torch.bool:
        t = base > 0
    else:
        t = (base * 10).to(dtype)
    if layout == "transposed":
        t = t.transpose(-1, -2)
    elif layout == "sliced":
        t = t[..., ::2]
    elif layout == "expanded":
        t = t.expand(*shape)
    assert tuple(t.shape) == tuple(shape)
    return t


def mostly(valid, *others, times=6):
    """``valid`` about ``times`` times as often as each of ``others``: most examples should get past
    the argument checks, to the comparison of the backends' results. (``st.one_of`` with ``valid``
    repeated would not do: it picks among distinct branches.)"""
    pick = st.sampled_from([-1] * times + list(range(len(others))))
    return pick.flatmap(lambda i: valid if i < 0 else others[i])


@st.composite
def tensor_specs(draw, min_dims=0, max_dims=4, dtypes=FLOATS, bad_dtypes=BAD_DTYPES, empty=True):
    """A spec for ``build``: 1 to ``max_dims`` dims mostly, sometimes 0-d (when ``min_dims`` is 0),
    sizes from SIZES, sometimes an empty dim; a floating dtype mostly, sometimes a bad one."""
    dims = draw(mostly(st.integers(max(min_dims, 1), max_dims), st.just(min_dims), times=8))
    shape = [draw(st.sampled_from(SIZES)) for _ in range(dims)]
    if empty and shape and draw(st.integers(0, 11)) == 0:
        shape[draw(st.integers(0, dims - 1))] = 0
    dtype = draw(mostly(st.sampled_from(dtypes), st.sampled_from(bad_dtypes), times=8) if bad_dtypes
                 else st.sampled_from(dtypes))
    return dict(shape=tuple(shape), dtype=dtype, layout=draw(st.sampled_from(LAYOUTS)),
                seed=draw(st.integers(0, 2 ** 16)), scale=draw(st.sampled_from((1e-2, 0.3, 1.0, 4.0))))


JUNK = (None, "10", True, False, np.bool_(True), [1.0], (2.0,), {"w": 1}, 10 ** 400, torch.tensor(1.0))


def numbers(valid, junk=JUNK):
    """Mostly valid values (numpy scalars among them); then any float (NaN, +-inf, +-huge, tiny),
    small ints (0, negative), and junk (bools, strings, None, lists, a huge int, a tensor)."""
    return mostly(st.sampled_from(valid + (np.float32(valid[0]), np.int64(2))),
                  st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 8), st.sampled_from(junk))


WEIGHTS = numbers((10.0, 2.0, 0.0, 0.1, 5))
CENTERS = numbers((1.0, 0.0, 0.4, -0.5))
POWERS = numbers((2.0, 6.0, 1.5, 3, 2.5, 1.0001))
SIDES = mostly(st.booleans(), st.sampled_from((0, 1, "yes", None, np.bool_(False))))


# ----------------------------------------------------------------------------- comparing outcomes


def attempt(fn):
    """("ok", result) or ("error", message) for a ValueError; any other exception propagates and
    fails the test (a raw torch error, a TypeError or an IndexError is a defect)."""
    try:
        return "ok", fn()
    except ValueError as e:
        return "error", str(e)


def check_decisions(outcomes: dict, arguments: set) -> str | None:
    """All backends decided alike, with one message naming an argument; returns that message."""
    kinds = {b: o[0] for b, o in outcomes.items()}
    messages = {b: o[1] for b, o in outcomes.items() if o[0] == "error"}
    assert len(set(kinds.values())) == 1, f"backends disagree: {kinds}; errors: {messages}"
    if not messages:
        event("accepted")  # (--hypothesis-show-statistics: how the examples split)
        return None
    assert len(set(messages.values())) == 1, f"backends refuse with different messages: {messages}"
    message = next(iter(messages.values()))
    name = message.split(":", 1)[0].split("[", 1)[0]
    assert name in arguments, f"the error does not name an argument of the call ({sorted(arguments)}): {message}"
    event(f"refused: {name}")
    return message


def close_to_truth(actual, reference, truth, dtype, what):
    """``|actual - truth| <= 2 |reference - truth| + tolerance`` (FlashAttention's rule: a kernel may
    be off the float64 truth by twice what the plain reference in the same dtype is, which covers
    ill-conditioned cases, plus the dtype's tolerance); where the reference is not finite (an
    overflow, a NaN) the kernel gives the same special value."""
    a, r, t = actual.double(), reference.double(), truth.double()
    rtol, atol = tol(dtype)["rtol"], tol(dtype)["atol"]
    finite = t[torch.isfinite(t)]
    scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    ok = (a - t).abs() <= 2 * (r - t).abs() + rtol * t.abs() + atol * scale
    same_special = (a == r) | (a.isnan() & r.isnan())
    ok = torch.where(torch.isfinite(r) & torch.isfinite(t), ok, same_special | ok)
    if not ok.all():
        i = (~ok).nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int((~ok).sum())} of {ok.numel()} off; first at {i}: actual {a[tuple(i)]}, "
                             f"reference {r[tuple(i)]}, float64 truth {t[tuple(i)]}")


def close(actual, expected, dtype, what):
    t = tol(dtype)
    scale = 1.0
    finite = expected[torch.isfinite(expected)] if expected.numel() else expected
    if finite.numel():
        scale = max(1.0, finite.abs().max().item())
    torch.testing.assert_close(actual.double(), expected.double(), rtol=max(t["rtol"], 1e-5) if dtype != torch.float64
                               else t["rtol"], atol=t["atol"] * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------- grad_norm_penalty


@settings(FUZZ, max_examples=600)
@given(spec=mostly(tensor_specs(max_dims=4), tensor_specs(min_dims=1, max_dims=1),
                    st.sampled_from(({"junk": [1.0, 2.0]}, {"junk": 3.0}, {"junk": None},
                                     {"junk": np.ones((2, 2))})), times=4),
       weight=WEIGHTS, center=CENTERS, p=POWERS, one_sided=SIDES, requires_grad=st.booleans())
def test_fuzz_grad_norm_penalty(spec, weight, center, p, one_sided, requires_grad):
    grads = spec["junk"] if "junk" in spec else build(**spec)
    is_float = isinstance(grads, torch.Tensor) and grads.dtype in FLOATS
    dtype = grads.dtype if is_float else None
    outcomes, results = {}, {}
    for backend in PENALTY_BACKENDS:
        if is_float and not runs_on(backend, dtype):
            continue
        x = grads.detach().requires_grad_(requires_grad) if is_float else grads

        def call(x=x, backend=backend):
            out = grad_norm_penalty(x, weight=weight, center=center, p=p, one_sided=one_sided, backend=backend)
            if requires_grad and is_float:
                # the gradient, then the derivative of <gradient, v> (the double-backward path)
                (first,) = torch.autograd.grad(out, x, create_graph=True)
                v = torch.linspace(-1, 1, first.numel(), dtype=torch.float64).view(first.shape).to(first.dtype)
                second = None
                if first.requires_grad:
                    (second,) = torch.autograd.grad((first * v).sum(), x, allow_unused=True)
                return out, first, second
            return out, None, None

        outcomes[backend] = attempt(call)
    if check_decisions(outcomes, {"grads", "weight", "center", "p", "one_sided"}) is not None:
        return
    # accepted: a float tensor of shape (B, ...), B >= 1, and valid hyper-parameters. The value
    # (accumulated in float32, or float64) against the float64 truth on the same rounded input,
    # within twice the error of the reference (which also tells how an overflow at the edge of
    # float32's range may come out: like the reference, or right)
    kw = dict(weight=float(weight), center=float(center), p=float(p), one_sided=one_sided)
    truth = grad_norm_penalty_reference(grads.detach().double(), **kw)
    ref_out = grad_norm_penalty_reference(grads.detach(), **kw)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    for backend, (_, (out, first, second)) in outcomes.items():
        what = f"{backend} shape={tuple(grads.shape)} {dtype} {spec['layout']} {kw}"
        assert out.dtype == acc and out.shape == (), what
        close_to_truth(out, ref_out, truth, acc, what + " value")
        results[backend] = (first, second)
    if not requires_grad:
        return
    # backward against the float64 truth, within twice the error of the reference in the input's
    # dtype (rows whose norm is 0 have a NaN reference gradient, documented: none here, inputs are
    # never zero). The second derivative for float64 input only: its terms cancel (a(n) and
    # n a'(n) nearly opposite when p ~ 1), so a float32 result is off by ~eps * |a(n)|, which
    # neither the result nor the reference's own error bounds.
    def derivatives(x):
        x = x.detach().requires_grad_()
        out = grad_norm_penalty_reference(x, **kw)
        (first,) = torch.autograd.grad(out, x, create_graph=True)
        v = torch.linspace(-1, 1, first.numel(), dtype=torch.float64).view(first.shape).to(first.dtype)
        (second,) = torch.autograd.grad((first * v).sum(), x)
        return first, second

    ref_first, ref_second = derivatives(grads)
    true_first, true_second = derivatives(grads.double())
    for backend, (first, second) in results.items():
        what = f"{backend} shape={tuple(grads.shape)} {dtype} {spec['layout']} {kw}"
        assert first.dtype == dtype and first.shape == grads.shape, what
        close_to_truth(first, ref_first, true_first, dtype, what + " gradient")
        if dtype == torch.float64:
            assert second is not None, what
            close_to_truth(second, ref_second, true_second, dtype, what + " 2nd derivative")


# ----------------------------------------------------------------------------- penalty_config


@settings(FUZZ, max_examples=200)
@given(kind=mostly(st.sampled_from(tuple(PRESETS)), st.sampled_from(("wgan", "", None, 3, ["gp"], "GP"))),
       weight=st.one_of(st.none(), WEIGHTS), center=st.one_of(st.none(), CENTERS), p=st.one_of(st.none(), POWERS),
       one_sided=st.one_of(st.none(), SIDES),
       sampling=mostly(st.one_of(st.none(), st.sampled_from(STRATEGIES)), st.sampled_from(("nearby", 1, ["real"]))))
def test_fuzz_penalty_config(kind, weight, center, p, one_sided, sampling):
    outcome = attempt(lambda: penalty_config(kind, weight=weight, center=center, p=p, one_sided=one_sided,
                                             sampling=sampling))
    message = check_decisions({"-": outcome}, {"kind", "weight", "center", "p", "one_sided", "sampling"})
    if message is None:
        cfg = outcome[1]
        assert type(cfg.weight) is float and type(cfg.center) is float and type(cfg.p) is float
        assert math.isfinite(cfg.weight) and cfg.weight >= 0 and cfg.p > 1 and isinstance(cfg.one_sided, bool)
        assert cfg.sampling in STRATEGIES
        # the same config through grad_norm_penalty is accepted
        grad_norm_penalty(torch.ones(2, 3), weight=cfg.weight, center=cfg.center, p=cfg.p, one_sided=cfg.one_sided)


# ----------------------------------------------------------------------------- sample_penalty_points


@settings(FUZZ, max_examples=300)
@given(real_spec=tensor_specs(min_dims=0, max_dims=3, bad_dtypes=(torch.int64, torch.complex64)),
       fake_change=mostly(st.just("same"), st.sampled_from(("dtype", "shape", "int", "junk"))),
       strategy=mostly(st.sampled_from(STRATEGIES), st.sampled_from(("nearby", None, 0))),
       generator=mostly(st.sampled_from(("none", "cpu")), st.sampled_from(("int", "meta-samples"))))
def test_fuzz_sample_penalty_points(real_spec, fake_change, strategy, generator):
    real = build(**real_spec)
    fake_spec = dict(real_spec, seed=real_spec["seed"] + 1)
    if fake_change == "dtype":
        fake_spec["dtype"] = torch.float64 if real_spec["dtype"] != torch.float64 else torch.float32
    elif fake_change == "shape":
        fake_spec["shape"] = real_spec["shape"][:-1] + (real_spec["shape"][-1] + 1,) if real_spec["shape"] else (1,)
    elif fake_change == "int":
        fake_spec["dtype"] = torch.int32
    fake = [1.0] if fake_change == "junk" else build(**fake_spec)
    gen = {"none": None, "cpu": torch.Generator().manual_seed(5), "int": 5,
           "meta-samples": torch.Generator().manual_seed(5)}[generator]
    if generator == "meta-samples":  # a CPU generator for samples on another device
        real = real.to("meta")
        fake = fake.to("meta") if isinstance(fake, torch.Tensor) else fake
    outcome = attempt(lambda: wk.sample_penalty_points(real, fake, strategy, generator=gen))
    if check_decisions({"-": outcome}, {"real", "fake", "strategy", "generator"}) is not None:
        return
    points = outcome[1]
    b = real.shape[0]
    rows = 2 * b if strategy in ("interpolate-within", "real+fake") else b
    assert points.shape == (rows,) + tuple(real.shape[1:]) and points.dtype == real.dtype
    assert points.device == real.device and not points.requires_grad
    if generator == "cpu":  # reproducible from the generator's seed
        again = wk.sample_penalty_points(real, fake, strategy, generator=torch.Generator().manual_seed(5))
        torch.testing.assert_close(points, again, rtol=0, atol=0)
    if strategy == "interpolate":  # each point on the segment between its real and fake sample
        lo, hi = torch.minimum(real, fake).double(), torch.maximum(real, fake).double()
        slack = 1e-2 * (hi - lo) + 1e-3 * (1 + hi.abs())
        assert ((points.double() >= lo - slack) & (points.double() <= hi + slack)).all()
    assert torch.isfinite(points.double()).all()


# ----------------------------------------------------------------------------- gradient_penalty / critic_loss


def make_critic(d_in: int, seed: int, one_dim: bool):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(d_in, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    if not one_dim:
        return net

    class Scalar(torch.nn.Module):  # a critic of 1-D samples (B,)
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.unsqueeze(-1)).squeeze(-1)

    return Scalar()


@settings(FUZZ, max_examples=300)
@given(batch=st.sampled_from((1, 2, 3, 5)), d_in=st.sampled_from((0, 1, 2, 3)), seed=st.integers(0, 1000),
       dtype=st.sampled_from((torch.float32, torch.float32, torch.float64)),
       mismatch=mostly(st.just("none"), st.sampled_from(("dtype", "shape")), times=12),
       function=st.sampled_from(("critic_loss", "critic_loss", "gradient_penalty")),
       penalty=mostly(st.sampled_from(tuple(PRESETS) + (None,)), st.sampled_from(("wgan-lp", 1)), times=12),
       weight=mostly(st.none(), WEIGHTS, times=3), center=mostly(st.none(), CENTERS, times=3),
       p=mostly(st.none(), POWERS, times=3), one_sided=mostly(st.none(), SIDES, times=3),
       sampling=mostly(st.none(), st.sampled_from(STRATEGIES), st.just("nearby"), times=3),
       every=mostly(st.sampled_from((1, 2, 3)), st.sampled_from((0, -1, True, 2.0, "2")), times=8),
       generator=mostly(st.sampled_from(("none", "cpu")), st.just("int"), times=12),
       critic_kind=mostly(st.just("mlp"), st.sampled_from(("none", "scalar-output", "tuple-output")), times=16))
def test_fuzz_gradient_penalty_and_critic_loss(batch, d_in, seed, dtype, mismatch, function, penalty, weight, center,
                                               p, one_sided, sampling, every, generator, critic_kind):
    one_dim = d_in == 0
    shape = (batch,) if one_dim else (batch, d_in)
    real = build(shape, dtype, "contiguous", seed)
    fake = build(shape, dtype, "contiguous", seed + 1, scale=1.5)
    if mismatch == "dtype":
        fake = fake.to(torch.float64 if dtype == torch.float32 else torch.float32)
    elif mismatch == "shape":
        fake = build((batch + 1,) + shape[1:], dtype, "contiguous", seed + 1)
    base = make_critic(max(d_in, 1), seed, one_dim).to(dtype)
    overrides = dict(weight=weight, center=center, p=p, one_sided=one_sided, sampling=sampling)
    outcomes = {}
    for backend in PENALTY_BACKENDS:
        module = copy.deepcopy(base)  # own parameters and own lazy-regularization count per backend
        critic = {"mlp": module, "none": None, "scalar-output": lambda x, m=module: m(x).sum(),
                  "tuple-output": lambda x, m=module: (m(x),)}[critic_kind]
        gen = {"none": None, "cpu": torch.Generator().manual_seed(seed), "int": seed}[generator]

        def call(critic=critic, gen=gen, backend=backend, module=module):
            torch.manual_seed(seed + 1)  # without a generator, every backend draws the same points
            if function == "gradient_penalty":
                out = wk.gradient_penalty(critic, real, fake, kind=penalty, generator=gen, backend=backend,
                                          **overrides)
                stats = {}
            else:
                out, stats = wk.critic_loss(critic, real, fake, penalty=penalty, every=every, generator=gen,
                                            backend=backend, **overrides)
            out.backward()
            return out.detach(), stats, [q.grad for q in module.parameters()]

        outcomes[backend] = attempt(call)
    arguments = {"critic", "real", "fake", "kind", "penalty", "weight", "center", "p", "one_sided", "sampling",
                 "every", "generator", "backend", "scaler"}
    if check_decisions(outcomes, arguments) is not None:
        return
    base_out, base_stats, base_grads = outcomes["reference"][1]
    loose = dict(rtol=2e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-9, atol=1e-11)
    for backend, (_, (out, stats, grads)) in outcomes.items():
        what = f"{function} {backend} {penalty} {overrides} every={every} {shape} {dtype}"
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32), what
        torch.testing.assert_close(out, base_out, equal_nan=True, msg=lambda m: f"{what} value: {m}", **loose)
        for key, value in stats.items():
            torch.testing.assert_close(value, base_stats[key], equal_nan=True, msg=lambda m: f"{what} {key}: {m}",
                                       **loose)
        for i, (a, b) in enumerate(zip(grads, base_grads)):
            if a is None or b is None:
                assert a is None and b is None, what
                continue
            scale = max(1.0, b.abs().max().item()) if torch.isfinite(b).all() else 1.0
            torch.testing.assert_close(a, b, rtol=loose["rtol"], atol=loose["atol"] * scale, equal_nan=True,
                                       msg=lambda m: f"{what} d/d param {i}: {m}")


# ----------------------------------------------------------------------------- activation masks

SLOPES = numbers((0.2, 0.0, 0.01, 1.0, -0.3), junk=JUNK + (1e39, -3.5e38))


@settings(FUZZ, max_examples=300)
@given(x_spec=tensor_specs(min_dims=0, max_dims=4), slope=SLOPES,
       bias=mostly(st.sampled_from(("none", "channels")),
                   st.sampled_from(("wrong-shape", "wrong-dtype", "list", "int")), times=8),
       requires_grad=st.booleans())
def test_fuzz_leaky_relu_with_mask(x_spec, slope, bias, requires_grad):
    x = build(**x_spec)
    dtype = x.dtype
    channels = x.shape[1] if x.dim() >= 2 else 1
    b = {"none": None, "channels": build((channels,), dtype if dtype in FLOATS else torch.float32, "sliced", 3),
         "wrong-shape": build((channels + 1,), torch.float32, "contiguous", 3),
         "wrong-dtype": build((channels,), torch.float64 if dtype != torch.float64 else torch.float32, "contiguous", 3),
         "list": [0.1] * channels, "int": build((channels,), torch.int64, "contiguous", 3)}[bias]
    grad_ok = requires_grad and dtype in FLOATS
    outcomes = {}
    for backend in ACTIVATION_BACKENDS:
        if not runs_on(backend, dtype):
            continue
        xi = x.detach().requires_grad_(grad_ok) if dtype in FLOATS else x
        bi = b.detach().requires_grad_(grad_ok) if isinstance(b, torch.Tensor) and b.dtype in FLOATS else b

        def call(xi=xi, bi=bi, backend=backend):
            y, mask = leaky_relu_with_mask(xi, slope, bi, backend=backend)
            grads = None
            if grad_ok:
                w = build(tuple(y.shape), y.dtype, "contiguous", 11)
                inputs = [xi] + ([bi] if isinstance(bi, torch.Tensor) else [])
                grads = torch.autograd.grad((y * w).sum(), inputs)
            return y, mask, grads

        outcomes[backend] = attempt(call)
    if check_decisions(outcomes, {"x", "negative_slope", "bias", "backend"}) is not None:
        return
    ry, rmask = leaky_relu_with_mask_reference(x, float(slope), b)
    for backend, (_, (y, mask, grads)) in outcomes.items():
        what = f"leaky_relu_with_mask {backend} {tuple(x.shape)} {dtype} {x_spec['layout']} slope={slope} bias={bias}"
        assert mask.dtype == torch.bool and torch.equal(mask, rmask), what
        close(y, ry, dtype, what)
        if grads is not None:
            base = outcomes.get("reference", (None, (None, None, grads)))[1][2]
            for g, r in zip(grads, base):
                close(g, r, dtype, what + " gradient")


@settings(FUZZ, max_examples=300)
@given(g_spec=tensor_specs(min_dims=0, max_dims=4), slope=SLOPES,
       mask_kind=mostly(st.sampled_from(("same", "transposed", "expanded")),
                        st.sampled_from(("float", "wrong-shape", "junk"))),
       requires_grad=st.booleans())
def test_fuzz_masked_scale(g_spec, slope, mask_kind, requires_grad):
    g = build(**g_spec)
    dtype = g.dtype
    shape = tuple(g.shape)
    mask_seed = g_spec["seed"] + 7
    if mask_kind == "same":
        mask = build(shape, torch.bool, "contiguous", mask_seed)
    elif mask_kind in ("transposed", "expanded"):
        mask = build(shape, torch.bool, mask_kind, mask_seed)
    elif mask_kind == "float":
        mask = build(shape, torch.float32, "contiguous", mask_seed)
    elif mask_kind == "wrong-shape":
        mask = build(shape + (2,), torch.bool, "contiguous", mask_seed)
    else:
        mask = "mask"
    grad_ok = requires_grad and dtype in FLOATS
    outcomes = {}
    for backend in ACTIVATION_BACKENDS:
        if not runs_on(backend, dtype):
            continue
        gi = g.detach().requires_grad_(grad_ok) if dtype in FLOATS else g

        def call(gi=gi, backend=backend):
            out = masked_scale(gi, mask, slope, backend=backend)
            first = second = None
            if grad_ok:  # the backward is the op itself: check it to second order
                w = build(shape, dtype, "contiguous", 13).requires_grad_()
                (first,) = torch.autograd.grad((out * w).sum(), gi, create_graph=True)
                (second,) = torch.autograd.grad((first * first).sum(), w)
            return out, first, second

        outcomes[backend] = attempt(call)
    if check_decisions(outcomes, {"g", "mask", "negative_slope", "backend"}) is not None:
        return
    ref = masked_scale_reference(g, mask, float(slope))
    base = outcomes.get("reference", next(iter(outcomes.values())))[1]
    for backend, (_, (out, first, second)) in outcomes.items():
        what = f"masked_scale {backend} {shape} {dtype} {g_spec['layout']} mask={mask_kind} slope={slope}"
        close(out, ref, dtype, what)
        if first is not None:
            close(first, base[1], dtype, what + " gradient")
            close(second, base[2], dtype, what + " second derivative")


# ----------------------------------------------------------------------------- backend names


@settings(FUZZ, max_examples=100)
@given(backend=st.one_of(st.sampled_from(("auto", "cpp", "triton", "reference")), st.none(),
                         st.text(max_size=8), st.integers(),
                         st.sampled_from((["cpp"], b"cpp", "CPP", " cpp", np.array(["cpp"]), np.str_("cpp")))))
def test_fuzz_backend_names(backend):
    """Every op accepts a known, available backend, and refuses anything else by name."""
    g = torch.randn(3, 4)
    x = torch.randn(2, 3)
    critic = torch.nn.Linear(4, 1)
    calls = {
        "grad_norm_penalty": lambda: grad_norm_penalty(g, weight=1.0, center=1.0, p=2.0, backend=backend),
        "gradient_penalty": lambda: wk.gradient_penalty(critic, g, g + 1, backend=backend),
        "critic_loss": lambda: wk.critic_loss(critic, g, g + 1, backend=backend),
        "critic_loss(penalty=None)": lambda: wk.critic_loss(critic, g, g + 1, penalty=None, backend=backend),
        "leaky_relu_with_mask": lambda: leaky_relu_with_mask(x, 0.2, backend=backend),
        "masked_scale": lambda: masked_scale(x, x > 0, 0.2, backend=backend),
    }
    for name, call in calls.items():
        try:
            kind, result = attempt(call)
        except RuntimeError as e:  # a known backend this machine lacks (Triton with a CPU-only torch)
            assert isinstance(backend, str) and backend in ("cpp", "triton") and not available(backend, "cpu"), \
                f"{name}(backend={backend!r}): {e}"
            assert str(e).startswith(f"backend: {backend!r} was requested") and "not available" in str(e), str(e)
            continue
        if kind == "error":
            assert result.startswith("backend: "), f"{name}(backend={backend!r}): {result}"
        else:
            assert isinstance(backend, (str, type(None))) and backend in (None, "auto", "cpp", "triton", "reference"), \
                f"{name} accepted backend={backend!r}"
