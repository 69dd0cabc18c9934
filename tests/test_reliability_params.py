"""Regression tests for defects found by fuzzing clip_, ClippedRMSprop and power_iteration_
(tests/test_fuzz_params.py is the fuzzer): each backend decides alike, with one ValueError that
names the argument, and gives the reference's numbers where it accepts."""

import decimal
import math
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import FLOAT_DTYPES
from torch import nn

import wgan_kernels as wk
from wgan_kernels._backend import available, extension
from wgan_kernels._checks import overlapping_pair
from wgan_kernels.nn.spectral import spectral_norm, spectral_norm_all
from wgan_kernels.ops.clip import clip_reference_
from wgan_kernels.ops.spectral_norm import power_iteration_

PARAM_BACKENDS = ["reference"] + (["cpp"] if extension() is not None else [])
SN_BACKENDS = PARAM_BACKENDS + (["triton"] if available("triton", "cpu") else [])


def refusals(fn, backends):
    """{backend: message} of the ValueError fn(backend) raises on each backend (fails if one accepts)."""
    out = {}
    for backend in backends:
        with pytest.raises(ValueError) as info:
            fn(backend)
        out[backend] = str(info.value)
    return out


def one_message(fn, backends, match):
    """fn(backend) refused on every backend with the same message, which matches ``match``."""
    messages = refusals(fn, backends)
    assert len(set(messages.values())) == 1, messages
    message = next(iter(messages.values()))
    assert re.search(match, message), message
    return message


def unit(n, gen, dtype=torch.float32):
    return F.normalize(torch.randn(n, generator=gen, dtype=torch.float64), dim=0).to(dtype)


# ----------------------------------------------------------------------------- (a) aliasing u / v / W


def test_power_iteration_refuses_overlapping_u_and_v(gen):
    """buf[0:4] and buf[2:6] start at different addresses but share two values: the old check
    compared start pointers only, and cpp / triton gave sigma 2.344 where the reference gave 1.612."""
    w = torch.randn(4, 4, generator=gen)
    buf = unit(6, gen)

    def call(backend):
        b = buf.clone()
        power_iteration_([w], [b[0:4]], [b[2:6]], backend=backend)

    one_message(call, SN_BACKENDS, r"^us, vs: us\[0\] and vs\[0\] share memory")


def test_power_iteration_refuses_u_or_v_aliasing_a_weight(gen):
    """u = W[0] used to be accepted and W modified by the iteration."""
    w0 = torch.randn(4, 4, generator=gen)

    def u_is_row(backend):
        w = w0.clone()
        try:
            power_iteration_([w], [w[0]], [unit(4, gen)], backend=backend)
        finally:
            assert torch.equal(w, w0), f"{backend} modified W"

    one_message(u_is_row, SN_BACKENDS, r"^us\[0\]: overlaps weights\[0\]")

    def v_in_another_entry(backend):  # across entries: vs[1] inside weights[0]
        w = w0.clone()
        power_iteration_([w, torch.randn(3, 4, generator=gen)], [unit(4, gen), unit(3, gen)],
                         [unit(4, gen), w[:, 2]], backend=backend)

    one_message(v_in_another_entry, SN_BACKENDS, r"^vs\[1\]: overlaps weights\[0\]")

    def u_is_another_v(backend):
        v0 = unit(4, gen)
        power_iteration_([w0, w0.clone()], [unit(4, gen), v0], [v0, unit(4, gen)], backend=backend)

    one_message(u_is_another_v, SN_BACKENDS, r"^us, vs: us\[1\] and vs\[0\] share memory")


def test_power_iteration_refuses_expanded_u(gen):
    w = torch.randn(4, 3, generator=gen)
    one_message(lambda b: power_iteration_([w], [torch.ones(1).expand(4)], [unit(3, gen)], backend=b),
                SN_BACKENDS, r"^us\[0\]: its elements share memory")


@pytest.mark.parametrize("backend", SN_BACKENDS)
def test_power_iteration_accepts_disjoint_views_and_shared_weights(backend, gen):
    """Disjoint views of one buffer (u and v side by side, as a flat state vector would hold them)
    and one weight read by two entries are fine, with the numbers of separate tensors."""
    w = torch.randn(4, 5, generator=gen)
    u0, v0 = unit(4, gen), unit(5, gen)
    buf = torch.cat([u0, v0, u0, v0])
    views_u, views_v = [buf[0:4], buf[9:13]], [buf[4:9], buf[13:18]]
    got = power_iteration_([w, w], views_u, views_v, 2, backend=backend)
    sep_u, sep_v = [u0.clone(), u0.clone()], [v0.clone(), v0.clone()]
    expected = power_iteration_([w, w], sep_u, sep_v, 2, backend=backend)
    for a, e in zip(got + views_u + views_v, expected + sep_u + sep_v):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


def test_overlapping_pair_is_by_byte_range():
    buf = torch.zeros(10)
    w = torch.zeros(3, 3)
    assert overlapping_pair([buf[0:2], buf[2:4]]) is None
    assert overlapping_pair([buf[0:3], buf[2:4]]) == (0, 1)
    assert overlapping_pair([buf[::2], buf[1::2]]) == (0, 1)  # conservative: interleaved ranges intersect
    assert overlapping_pair([w, w.t()], read_only=2) is None  # two reads
    assert overlapping_pair([w, w[2, 1:]], read_only=1) == (0, 1)
    assert overlapping_pair([w[:2], w[2]], read_only=1) is None  # the row after the view
    assert overlapping_pair([buf[5:5], buf[0:10]]) is None  # no elements: no memory
    assert overlapping_pair([buf[6:9], buf[0:7]]) == (0, 1)  # indices in argument order, whatever the addresses
    assert overlapping_pair([w, buf[0:2], w[0]], read_only=1) == (0, 2)  # past a read that overlaps nothing


# ----------------------------------------------------------------------------- (b) inference tensors


def inference_tensor(*shape, gen, scale=1.0):
    values = torch.randn(*shape, generator=gen) * scale
    with torch.inference_mode():
        return values.clone()


def test_clip_refuses_inference_tensors_outside_inference_mode(gen):
    """cpp used to write into them where torch (and the reference) refuse."""
    def call(backend):
        t = inference_tensor(5, gen=gen, scale=3.0)
        before = t.clone()
        try:
            wk.clip_([torch.randn(3), torch.randn(4, 2).t(), t], 0.1, backend=backend)
        finally:
            assert torch.equal(t, before)

    one_message(call, PARAM_BACKENDS, r"^params\[2\]: an inference tensor \(created under torch.inference_mode\(\)\) "
                                      r"cannot be updated in place outside inference mode")


@pytest.mark.parametrize("backend", PARAM_BACKENDS)
def test_clip_inside_inference_mode_updates_inference_tensors(backend, gen):
    """Inside inference mode torch allows in-place updates of inference (and normal) tensors: so do we."""
    t, n = inference_tensor(7, gen=gen, scale=3.0), torch.randn(7, generator=gen) * 3
    expected = [t.clone().clamp_(-0.5, 0.5), n.clone().clamp_(-0.5, 0.5)]
    with torch.inference_mode():
        wk.clip_([t, n[::1]], 0.5, backend=backend)
        wk.clip_([t[::2]], 0.5, backend=backend)  # the grouping path (not dense)
    torch.testing.assert_close(t, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(n, expected[1], rtol=0, atol=0)


def test_clipped_rmsprop_refuses_inference_tensors(gen):
    one_message(lambda b: wk.ClippedRMSprop([inference_tensor(3, gen=gen)], backend=b), PARAM_BACKENDS,
                r"^params\[0\]: an inference tensor")

    def state_from_inference_mode(backend):
        # a first step under inference mode makes inference-tensor state; a later step outside
        # it must not write into that state through the kernel
        p = nn.Parameter(torch.randn(4, generator=gen))
        opt = wk.ClippedRMSprop([p], backend=backend)
        p.grad = torch.randn(4, generator=gen)
        with torch.inference_mode():
            opt.step()
        state = opt.state[p]["square_avg"].clone()
        try:
            opt.step()
        finally:
            assert torch.equal(opt.state[p]["square_avg"], state)

    one_message(state_from_inference_mode, PARAM_BACKENDS, r"^square_avgs\[0\]: an inference tensor")


def test_power_iteration_inference_tensors(gen):
    w = torch.randn(5, 3, generator=gen)
    one_message(lambda b: power_iteration_([w], [unit(5, gen)], [inference_tensor(3, gen=gen)], backend=b),
                SN_BACKENDS, r"^vs\[0\]: an inference tensor")
    results = {}
    for backend in SN_BACKENDS:  # inside inference mode: accepted, the same numbers
        with torch.inference_mode():
            u, v = unit(5, torch.Generator().manual_seed(1)), unit(3, torch.Generator().manual_seed(2))
            sigma = power_iteration_([w], [u], [v], 3, backend=backend)[0]
        results[backend] = (sigma, u, v)
    for backend, got in results.items():
        for a, e in zip(got, results["reference"]):
            torch.testing.assert_close(a, e, msg=lambda m: f"{backend}: {m}")


def test_power_iteration_under_inference_mode_with_grad_mode_on(gen):
    """Found by the fuzzer: under torch.inference_mode() with torch.enable_grad() inside it and a
    weight that requires grad, cpp and triton raised torch's "Inference tensors cannot be saved
    for backward" (they built an autograd node); the reference returned sigma."""
    w = torch.randn(5, 3, generator=gen, requires_grad=True)
    results = {}
    for backend in SN_BACKENDS:
        u, v = unit(5, torch.Generator().manual_seed(1)), unit(3, torch.Generator().manual_seed(2))
        with torch.inference_mode(), torch.enable_grad():
            results[backend] = power_iteration_([w], [u], [v], 2, backend=backend)[0]
    for backend, sigma in results.items():
        assert not sigma.requires_grad
        torch.testing.assert_close(sigma, results["reference"], msg=lambda m: f"{backend}: {m}")


# ----------------------------------------------------------------------------- (c) huge clip values


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_value_beyond_the_dtype_range(dtype, gen):
    """reference clip_ raised torch's RuntimeError ('cannot be converted ... without overflow') for
    1e300 where cpp accepted. Now: the bound is rounded to the dtype, inf beyond it (no clipping)."""
    values = torch.cat([torch.randn(20, generator=gen) * 1e4, torch.tensor([math.inf, -math.inf, math.nan])])
    for clip_value in (1e300, 65510.0, 1e5, 3.39e38, 1e-300):
        expected_bound = float(torch.tensor(clip_value, dtype=torch.float64).to(dtype))  # inf beyond the range
        results = {}
        for backend in PARAM_BACKENDS:
            t = values.to(dtype)
            wk.clip_([t], clip_value, backend=backend)
            results[backend] = t
        expected = values.to(dtype).double().clamp(-expected_bound, expected_bound).to(dtype)
        for backend, t in results.items():
            torch.testing.assert_close(t, expected, rtol=0, atol=0, equal_nan=True,
                                       msg=lambda m: f"clip_ {backend} {dtype} {clip_value}: {m}")
    half = torch.tensor([math.inf, 7e4, -1e3], dtype=torch.float16)
    clip_reference_([half], 65510.0)  # rounds to float16's largest value
    assert half.tolist() == [65504.0, 65504.0, -1e3]


def test_clipped_rmsprop_huge_clip_value_on_every_backend(gen):
    results = []
    for backend in PARAM_BACKENDS:
        params = [nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(0)).to(d)) for d in FLOAT_DTYPES]
        opt = wk.ClippedRMSprop(params, lr=0.1, clip_value=1e300, backend=backend)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        results.append([p.detach().clone() for p in params])
    for got in results[1:]:
        for a, e in zip(got, results[0]):
            torch.testing.assert_close(a, e)


# ----------------------------------------------------------------------------- (d) backend names


def test_backend_is_checked_up_front():
    """ClippedRMSprop(backend="gpu") used to fail only at the first step; clip_ and
    power_iteration_ with nothing to do never looked at it."""
    p = [nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match=r"^backend: expected one of"):
        wk.ClippedRMSprop(p, backend="gpu")
    with pytest.raises(ValueError, match=r"^backend: rmsprop_clip_ has no 'triton'"):
        wk.ClippedRMSprop(p, backend="triton")
    with pytest.raises(ValueError, match=r"^backend"):
        wk.clip_([], backend="gpu")
    with pytest.raises(ValueError, match=r"^backend"):
        wk.clip_([], backend="triton")
    with pytest.raises(ValueError, match=r"^backend"):
        power_iteration_([], [], [], backend="gpu")
    with pytest.raises(ValueError, match=r"^backend"):
        power_iteration_([], [], [], backend=3)
    for backend in (None, "auto", *PARAM_BACKENDS):
        wk.ClippedRMSprop(p, backend=backend)
        wk.clip_([], backend=backend)
    assert power_iteration_([], [], [], backend="triton") == []


# ----------------------------------------------------------------------------- (e) found by the fuzzer


def test_messages_are_the_same_on_every_backend():
    """The extension named dtypes, layouts, shapes and types its own way ("Long", "Sparse", "[3]",
    "decimal.Decimal") where the reference path said torch.int64, torch.sparse_coo, (3,), Decimal;
    a sparse tensor got torch's own error from the reference, an expanded one torch's RuntimeError
    from both."""
    cases = [
        ([torch.randn(2), torch.ones(3, dtype=torch.int64)], r"^params\[1\]: .* got torch.int64$"),
        ([torch.ones(3, dtype=torch.complex64)], r"^params\[0\]: .* got torch.complex64$"),
        ([torch.randn(2), torch.randn(3).to_sparse()], r"^params\[1\]: expected a dense \(strided\) tensor, got "
                                                        r"torch.sparse_coo$"),
        ([torch.randn(2), decimal.Decimal(1)], r"^params\[1\]: expected a tensor, got Decimal$"),
        ([torch.randn(2), torch.randn(1, 3).expand(4, 3)], r"^params\[1\]: its elements share memory"),
    ]
    for params, match in cases:
        one_message(lambda b, params=params: wk.clip_(params, 0.1, backend=b), PARAM_BACKENDS, match)

    def bad_state(backend):
        q = nn.Parameter(torch.randn(3))
        q.grad = torch.randn(3)
        opt = wk.ClippedRMSprop([q], backend=backend)
        opt.state[q] = {"step": torch.tensor(0.0), "square_avg": torch.zeros(4, dtype=torch.float64)}
        opt.step()

    one_message(bad_state, PARAM_BACKENDS, r"^square_avgs\[0\]: expected dtype torch.float32, device cpu and shape "
                                           r"\(3,\) like params\[0\], got torch.float64, cpu, \(4,\)$")


def test_power_iteration_eps_beyond_the_weight_dtype(gen):
    """eps=1e300 on float32 weights: the reference raised torch's RuntimeError from F.normalize
    while cpp and triton accepted (eps overflowed to inf in float32: u = v = 0, sigma 0)."""
    for dtype, eps in ((torch.float32, 1e300), (torch.float16, 1e5), (torch.bfloat16, 3.4e38)):
        w = torch.randn(3, 4, generator=gen).to(dtype)
        backends = [b for b in SN_BACKENDS if not (b == "triton" and dtype == torch.bfloat16)]
        one_message(lambda b: power_iteration_([w], [unit(3, gen, dtype)], [unit(4, gen, dtype)], 1, eps, backend=b),
                    backends, r"^eps: expected a number <= .* the dtype of weights\[0\]")
    with pytest.raises(ValueError, match=r"^eps"):
        spectral_norm(nn.Linear(3, 4), eps=1e300)  # raised torch's RuntimeError from its warm-up
    with pytest.raises(ValueError, match=r"^eps"):
        spectral_norm_all(wk.nn.Sequential(wk.nn.Linear(3, 4), wk.nn.Linear(4, 1)), eps=1e300)  # SN blocks, too
    power_iteration_([torch.randn(3, 4, dtype=torch.float64)], [unit(3, gen, torch.float64)],
                     [unit(4, gen, torch.float64)], 1, 1e300)  # fits float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clipped_rmsprop_rounds_like_torch_in_16_bit(dtype):
    """A float16 square_avg of 0 (alpha=1, or a zero gradient history) with eps=1e-8: torch's
    denominator sqrt(0) + 1e-8 rounds to 0 in float16 (an infinite step); the extension used to
    keep it in float32 and take a finite step of -lr g / 1e-8."""
    results = {}
    for backend in PARAM_BACKENDS:
        p = nn.Parameter(torch.tensor([0.001, -0.002, 0.003], dtype=dtype))
        opt = wk.ClippedRMSprop([p], lr=1e-3, alpha=1.0, eps=1e-8, clip_value=None, backend=backend)
        p.grad = torch.tensor([0.368, -0.25, 0.0], dtype=dtype)
        opt.step()
        results[backend] = p.detach().clone()
    theirs = nn.Parameter(torch.tensor([0.001, -0.002, 0.003], dtype=dtype))
    theirs.grad = torch.tensor([0.368, -0.25, 0.0], dtype=dtype)
    torch.optim.RMSprop([theirs], lr=1e-3, alpha=1.0, eps=1e-8, foreach=False).step()
    for backend, got in results.items():
        torch.testing.assert_close(got, theirs.detach(), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{backend} {dtype}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_clipped_rmsprop_square_avg_is_torchs(dtype):
    """On a large tensor (torch's vectorised kernels) the extension's square_avg is torch's bit for
    bit, step after step: the same fused multiply-add in addcmul_ and the same roundings (it used to
    differ by an ulp). Parameters agree within tolerance (torch's sqrt is not always correctly rounded)."""
    if extension() is None:
        pytest.skip("extension not built")
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        pytest.skip("torch's vectorised kernels use fused multiply-adds on AVX2 / AVX-512 CPUs")
    p_cpp = nn.Parameter((torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype))
    p_ref = nn.Parameter(p_cpp.detach().clone())
    opt_cpp = wk.ClippedRMSprop([p_cpp], lr=1e-2, alpha=0.9, eps=1e-6, clip_value=None, backend="cpp")
    opt_ref = torch.optim.RMSprop([p_ref], lr=1e-2, alpha=0.9, eps=1e-6, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):  # a square_avg that is not 0: the fused multiply-add shows
        grad = (torch.randn(5000, generator=gen) * 3).to(dtype)
        p_cpp.grad, p_ref.grad = grad.clone(), grad.clone()
        opt_cpp.step()
        opt_ref.step()
    torch.testing.assert_close(opt_cpp.state[p_cpp]["square_avg"], opt_ref.state[p_ref]["square_avg"], rtol=0, atol=0)
    torch.testing.assert_close(p_cpp, p_ref)


def test_clipped_rmsprop_hyper_parameters_and_params_checked():
    p = [nn.Parameter(torch.randn(3))]
    # 1e300 overflowed float32 in the kernel (inf) and made the reference raise torch's RuntimeError
    for name in ("lr", "eps", "weight_decay"):
        with pytest.raises(ValueError, match=rf"^{name}: expected a finite number <="):
            wk.ClippedRMSprop(p, **{name: 1e300})
    with pytest.raises(ValueError, match=r"^lr: expected a finite number"):
        wk.ClippedRMSprop(p, lr=10 ** 400)  # raised OverflowError
    # torch.optim's TypeError / unnamed ValueError
    with pytest.raises(ValueError, match=r"^params: expected an iterable"):
        wk.ClippedRMSprop(torch.randn(3))
    with pytest.raises(ValueError, match=r"^params: got an empty list"):
        wk.ClippedRMSprop([])
    with pytest.raises(ValueError, match=r"^params\[1\]: expected a tensor, got float"):
        wk.ClippedRMSprop([p[0], 3.0])
    with pytest.raises(ValueError, match=r"^params\[0\]: an in-place update of a non-leaf"):
        wk.ClippedRMSprop([p[0] * 2])
    with pytest.raises(ValueError, match=r"^params\[0\]: expected a floating-point tensor"):
        wk.ClippedRMSprop([torch.ones(2, dtype=torch.complex64, requires_grad=True)])
    opt = wk.ClippedRMSprop(p)
    with pytest.raises(ValueError, match=r"^lr"):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(2))], "lr": -1.0})
    with pytest.raises(ValueError, match=r"^param_group"):
        opt.add_param_group([nn.Parameter(torch.randn(2))])
    # hyper-parameters edited after construction (a scheduler, a user) are checked at the step
    p[0].grad = torch.randn(3)
    for backend in PARAM_BACKENDS:
        opt = wk.ClippedRMSprop(p, backend=backend)
        opt.param_groups[0]["lr"] = "0.1"  # the extension raised pybind11's TypeError
        with pytest.raises(ValueError, match=r"^lr"):
            opt.step()
        opt.param_groups[0]["lr"] = 1  # an int is fine
        opt.step()


def test_clipped_rmsprop_refuses_parameters_sharing_memory():
    """The same parameter twice (torch.optim only warns) or overlapping views: a step updated that
    memory twice, and on cpp, for tensors past one task (32K values), from two threads at once."""
    p = nn.Parameter(torch.randn(40_000))
    with pytest.raises(ValueError, match=r"^params\[0\], params\[1\]: two parameters share memory"):
        wk.ClippedRMSprop([p, p])
    buf = torch.zeros(10)
    with pytest.raises(ValueError, match=r"^params\[0\], params\[1\]"):
        wk.ClippedRMSprop([buf[0:6].requires_grad_(), buf[4:10].requires_grad_()])
    opt = wk.ClippedRMSprop([buf[0:5].requires_grad_()])  # disjoint views are fine
    with pytest.raises(ValueError, match=r"^param_groups\[0\]\['params'\]\[0\], param_groups\[1\]\['params'\]\[0\]"):
        opt.add_param_group({"params": [buf[4:6].requires_grad_()]})
    opt.add_param_group({"params": [buf[5:10].requires_grad_()]})
