"""clip_ and ClippedRMSprop against their plain-PyTorch references."""

import copy
import math

import pytest
import torch
from conftest import DEVICES, FLOAT_DTYPES, tol

import wgan_kernels as wk
from wgan_kernels._backend import extension
from wgan_kernels.ops.clip import clip_reference_, rmsprop_clip_reference_

BACKENDS = ["cpp", "reference"] if extension() is not None else ["reference"]


def odd_tensors(device, dtype, gen, scale=3.0):
    """Random tensors of odd shapes and layouts: 1 element, odd sizes, a transpose (dense, not
    contiguous), a strided slice (not dense), an expanded-free 3-D permute, an empty one."""
    def r(*shape):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return [
        r(1),
        r(7),
        r(13, 5),
        r(9, 4).t(),
        r(6, 10)[::2, 1:8],
        r(3, 4, 5).permute(2, 0, 1),
        r(0, 3),
        r(40_001),  # crosses the CPU kernel's 32K-element task boundary
    ]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_matches_reference(device, dtype, backend, gen):
    tensors = odd_tensors(device, dtype, gen)
    expected = [t.clone() for t in tensors]
    clip_reference_(expected, 0.5)
    wk.clip_(tensors, 0.5, backend=backend)
    for i, (a, e) in enumerate(zip(tensors, expected)):
        torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"clip_ {backend} {dtype} tensor {i}: {m}")
        assert a.abs().max() <= 0.5 if a.numel() else True


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_clip_uniform_list(device, dtype, gen):
    """One dtype, one device, every tensor dense (contiguous, transposed, permuted, crossing the
    CPU kernel's task boundary): the extension's fast path. Values and version counters."""
    def r(*shape):
        return (torch.randn(*shape, generator=gen) * 0.5).to(device=device, dtype=dtype)
    tensors = [r(7, 3), r(1), r(9, 4).t(), r(3, 4, 5).permute(2, 0, 1), r(40_001), r(33, 17)]
    tensors += [torch.nn.Parameter(r(5, 6)) for _ in range(3)]
    expected = [t.detach().clone() for t in tensors]
    clip_reference_(expected, 0.2)
    versions = [t._version for t in tensors]
    wk.clip_(tensors, 0.2)
    for i, (a, e) in enumerate(zip(tensors, expected)):
        torch.testing.assert_close(a.detach(), e, rtol=0, atol=0, msg=lambda m: f"tensor {i}: {m}")
        assert a._version > versions[i], f"tensor {i}: version counter not bumped"


@pytest.fixture
def threads():
    """Sets torch's CPU thread count for one test, then restores it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.mark.parametrize("num_threads", [1, 2, 3, 5])
def test_cpu_task_boundaries(num_threads, threads, gen):
    """Odd span sizes whose task boundaries fall inside spans (moved to 64-byte multiples there):
    every element is updated exactly once, whatever the thread count (a twice-applied RMSprop
    step or a skipped element would show)."""
    threads(num_threads)
    sizes = [70_001, 5, 33_333, 0, 40_001, 17, 65_536]
    for dtype in FLOAT_DTYPES:
        tensors = [torch.randn(n, generator=gen).to(dtype) for n in sizes]
        expected = [t.clone() for t in tensors]
        clip_reference_(expected, 0.4)
        wk.clip_(tensors, 0.4)
        for n, a, e in zip(sizes, tensors, expected):
            torch.testing.assert_close(a, e, rtol=0, atol=0, msg=lambda m: f"clip_ {dtype} size {n}: {m}")
    ours = [torch.nn.Parameter(torch.randn(n, generator=gen) * 0.02) for n in sizes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    grads = random_grads(ours, 3, gen)
    hp = dict(lr=3e-3, alpha=0.9, eps=1e-6, weight_decay=0.0)
    run_steps(wk.ClippedRMSprop(ours, clip_value=0.01, **hp), ours, grads)
    run_steps(torch.optim.RMSprop(theirs, foreach=False, **hp), theirs, grads, clip_after=0.01)
    for n, a, b in zip(sizes, ours, theirs):
        torch.testing.assert_close(a, b, msg=lambda m: f"ClippedRMSprop size {n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_many_tensors_mixed_dtypes(device, backend, gen):
    # More tensors than one CUDA launch table holds, mixed dtypes, Parameters and plain tensors.
    tensors = []
    for i in range(230):
        dtype = FLOAT_DTYPES[i % len(FLOAT_DTYPES)]
        t = torch.randn(1 + (i * 37) % 300, generator=gen).to(device=device, dtype=dtype)
        tensors.append(torch.nn.Parameter(t) if i % 3 == 0 else t)
    expected = [t.detach().clone().clamp_(-0.01, 0.01) for t in tensors]
    wk.clip_(iter(tensors), backend=backend)  # an iterator, default clip_value 0.01
    for a, e in zip(tensors, expected):
        torch.testing.assert_close(a.detach(), e, rtol=0, atol=0)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_clip_mixed_devices(gen):
    tensors = [torch.randn(100, generator=gen), torch.randn(100, generator=gen).cuda()]
    expected = [t.clone().clamp_(-0.1, 0.1) for t in tensors]
    wk.clip_(tensors, 0.1)
    for a, e in zip(tensors, expected):
        torch.testing.assert_close(a, e, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_nan_inf(backend):
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.3, -0.002])
    wk.clip_([t], 0.1, backend=backend)
    assert math.isnan(t[0])
    torch.testing.assert_close(t[1:], torch.tensor([0.1, -0.1, 0.1, -0.002]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_parameters_and_version_counter(backend, gen):
    critic = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LeakyReLU(0.2), torch.nn.Linear(7, 1))
    x = torch.randn(4, 5, generator=gen)
    out = critic(x).sum()  # saves the weights for backward
    wk.clip_(critic.parameters(), 0.05, backend=backend)  # a Parameter update, allowed in grad mode
    assert all(p.abs().max() <= 0.05 for p in critic.parameters())
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()  # the old values are gone: fail loudly, not silently


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_bad_input(backend):
    good = [torch.randn(3)]
    for bad in (0, -1.0, float("nan"), float("inf"), "0.1", True, None):
        with pytest.raises(ValueError, match="clip_value"):
            wk.clip_(good, bad, backend=backend)
    with pytest.raises(ValueError, match=r"params\[1\]"):
        wk.clip_([torch.randn(3), torch.ones(3, dtype=torch.int64)], backend=backend)
    with pytest.raises(ValueError, match=r"params\[0\]"):
        wk.clip_([torch.ones(3, dtype=torch.bool)], backend=backend)
    with pytest.raises(ValueError, match=r"params\[1\]"):
        wk.clip_([torch.randn(2), 3.0], backend=backend)
    with pytest.raises(ValueError, match="params"):
        wk.clip_(5, backend=backend)
    leaf = torch.randn(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"params\[0\].*non-leaf"):
        wk.clip_([leaf * 2], backend=backend)
    wk.clip_([], backend=backend)  # nothing to do is fine
    wk.clip_(torch.randn(4), backend=backend)  # a single tensor is fine


# ----------------------------------------------------------------------------- ClippedRMSprop


def make_params(device, dtype, gen):
    shapes = [(7, 3), (1,), (5, 4, 3), (64,), (9, 2)]
    params = [torch.nn.Parameter((torch.randn(*s, generator=gen) * 0.02).to(device=device, dtype=dtype))
              for s in shapes]
    params.append(torch.nn.Parameter((torch.randn(6, 11, generator=gen) * 0.02).to(device, dtype).t()))
    return params


def run_steps(opt, params, grads_per_step, clip_after=None):
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
        if clip_after is not None:
            clip_reference_(params, clip_after)


def random_grads(params, steps, gen, skip=()):
    return [[None if i in skip else torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for i, p in
             enumerate(params)] for _ in range(steps)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.3])
@pytest.mark.parametrize("clip_value", [0.01, None])
@pytest.mark.parametrize("grad_layout", ["contiguous", "like_param"])
def test_clipped_rmsprop_matches_torch(device, backend, weight_decay, clip_value, grad_layout, gen):
    ours = make_params(device, torch.float32, gen)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    grads = random_grads(ours, 20, gen)
    if grad_layout == "like_param":  # every (param, grad, state) of one layout: the extension's fast path
        grads = [[torch.empty_like(p).copy_(g) for p, g in zip(ours, step)] for step in grads]
    hp = dict(lr=3e-3, alpha=0.9, eps=1e-6, weight_decay=weight_decay)
    run_steps(wk.ClippedRMSprop(ours, clip_value=clip_value, backend=backend, **hp), ours, grads)
    run_steps(torch.optim.RMSprop(theirs, foreach=False, **hp), theirs, grads, clip_after=clip_value)
    for i, (a, b) in enumerate(zip(ours, theirs)):
        torch.testing.assert_close(a, b, msg=lambda m: f"ClippedRMSprop {backend} param {i}: {m}")
    if clip_value is not None:
        assert all(p.abs().max() <= clip_value for p in ours)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_clipped_rmsprop_low_precision(device, dtype, gen):
    """Error against a float64 run within 2x torch's own error in that dtype (plus atol)."""
    base = make_params(device, torch.float64, gen)
    grads64 = random_grads(base, 5, gen)
    hp = dict(lr=1e-3, alpha=0.9, eps=1e-6)
    truth = [torch.nn.Parameter(p.detach().clone()) for p in base]
    run_steps(torch.optim.RMSprop(truth, **hp), truth, grads64, clip_after=0.03)
    ours = [torch.nn.Parameter(p.detach().to(dtype)) for p in base]
    theirs = [torch.nn.Parameter(p.detach().to(dtype)) for p in base]
    lowp_grads = [[g.to(dtype) for g in step] for step in grads64]
    run_steps(wk.ClippedRMSprop(ours, clip_value=0.03, **hp), ours, lowp_grads)
    run_steps(torch.optim.RMSprop(theirs, foreach=False, **hp), theirs, lowp_grads, clip_after=0.03)
    atol = tol(dtype)["atol"]
    for a, b, t in zip(ours, theirs, truth):
        err_ours = (a.double() - t).abs().max().item()
        err_torch = (b.double() - t).abs().max().item()
        assert err_ours <= 2 * err_torch + atol, (dtype, err_ours, err_torch)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_clipped_rmsprop_cuda_is_torchs_foreach(dtype, weight_decay):
    """On CUDA the kernel rounds each intermediate to the dtype where torch's default (foreach)
    RMSprop stores one, with the same fused multiply-adds: square_avg and parameters bit for bit,
    on the kernel's vector path (aligned, with a tail) and its scalar path (a misaligned view)."""
    if extension() is None or not extension().has_cuda:
        pytest.skip("extension built without CUDA")
    gen = torch.Generator().manual_seed(1)
    ours = [torch.nn.Parameter((torch.randn(n, generator=gen) * 0.05).to("cuda", dtype)) for n in (5000, 4097, 3, 1)]
    # a view one element into its allocation: misaligned, so the kernel's scalar path
    ours.append(torch.nn.Parameter((torch.randn(302, generator=gen) * 0.05).to("cuda", dtype)[1:]))
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    hp = dict(lr=1e-2, alpha=0.9, eps=1e-6, weight_decay=weight_decay)
    opt_ours = wk.ClippedRMSprop(ours, clip_value=None, backend="cpp", **hp)
    opt_theirs = torch.optim.RMSprop(theirs, foreach=True, **hp)
    for _ in range(3):  # a square_avg that is not 0
        for p, q in zip(ours, theirs):
            p.grad = (torch.randn(p.shape, generator=gen) * 3).to("cuda", dtype)
            q.grad = p.grad.clone()
        opt_ours.step()
        opt_theirs.step()
    for i, (p, q) in enumerate(zip(ours, theirs)):
        msg = lambda m: f"ClippedRMSprop cuda {dtype} param {i}: {m}"  # noqa: E731
        torch.testing.assert_close(opt_ours.state[p]["square_avg"], opt_theirs.state[q]["square_avg"], rtol=0,
                                   atol=0, msg=msg)
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=msg)


def test_clipped_rmsprop_skips_params_without_grad(device, gen):
    params = make_params(device, torch.float32, gen)
    before = [p.detach().clone() for p in params]
    opt = wk.ClippedRMSprop(params, lr=1e-2)
    run_steps(opt, params, random_grads(params, 3, gen, skip={1, 4}))
    for i in (1, 4):
        assert torch.equal(params[i], before[i]) and not opt.state[params[i]]
    assert opt.state[params[0]]["step"].item() == 3


def test_clipped_rmsprop_state_dict_round_trips(gen):
    params = make_params("cpu", torch.float32, gen)
    hp = dict(lr=2e-3, alpha=0.95, eps=1e-7)
    grads = random_grads(params, 10, gen)

    # ours -> torch RMSprop (+ clamp) and ours -> ours continue identically
    a = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_a = wk.ClippedRMSprop(a, **hp)
    run_steps(opt_a, a, grads[:5])
    sd = opt_a.state_dict()
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = torch.optim.RMSprop(b, **hp)
    opt_b.load_state_dict(copy.deepcopy(sd))  # load_state_dict keeps the tensors it is given
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_c = wk.ClippedRMSprop(c, lr=99.0)  # hyper-parameters come from the state dict
    opt_c.load_state_dict(copy.deepcopy(sd))
    run_steps(opt_a, a, grads[5:])
    run_steps(opt_b, b, grads[5:], clip_after=0.01)
    run_steps(opt_c, c, grads[5:])
    for x, y, z in zip(a, b, c):
        torch.testing.assert_close(x, y)
        torch.testing.assert_close(x, z, rtol=0, atol=0)

    # torch RMSprop -> ours
    d = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_d = torch.optim.RMSprop(d, **hp)
    run_steps(opt_d, d, grads[:5])
    e = [torch.nn.Parameter(p.detach().clone()) for p in d]
    opt_e = wk.ClippedRMSprop(e)
    opt_e.load_state_dict(copy.deepcopy(opt_d.state_dict()))
    assert opt_e.param_groups[0]["clip_value"] == 0.01 and opt_e.param_groups[0]["lr"] == 2e-3
    run_steps(opt_d, d, grads[5:], clip_after=0.01)
    run_steps(opt_e, e, grads[5:])
    for x, y in zip(d, e):
        torch.testing.assert_close(x, y)

    # a momentum / centered torch state loads with its settings (the momentum form, tests/test_dropin.py)
    f = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt_f = torch.optim.RMSprop(f, momentum=0.9, centered=True)
    opt_g = wk.ClippedRMSprop(f)
    opt_g.load_state_dict(opt_f.state_dict())
    assert opt_g.param_groups[0]["momentum"] == 0.9 and opt_g.param_groups[0]["centered"] is True


def test_clipped_rmsprop_bad_input():
    p = [torch.nn.Parameter(torch.randn(3))]
    for name, kwargs in [("lr", dict(lr=-1e-3)), ("lr", dict(lr=float("nan"))), ("alpha", dict(alpha=1.5)),
                         ("alpha", dict(alpha=-0.1)), ("eps", dict(eps=-1.0)), ("weight_decay", dict(weight_decay=-1)),
                         ("clip_value", dict(clip_value=0.0)), ("clip_value", dict(clip_value=float("inf")))]:
        with pytest.raises(ValueError, match=name):
            wk.ClippedRMSprop(p, **kwargs)
    for backend in BACKENDS:  # a state that does not fit its parameter (e.g. a bad checkpoint)
        q = torch.nn.Parameter(torch.randn(3))
        q.grad = torch.randn(3)
        opt = wk.ClippedRMSprop([q], backend=backend)
        opt.state[q] = {"step": torch.tensor(0.0), "square_avg": torch.zeros(4)}
        with pytest.raises(ValueError, match=r"square_avgs\[0\]"):
            opt.step()


def test_rmsprop_reference_is_torch_rmsprop(gen):
    """The oracle itself: the reference equals torch.optim.RMSprop + clamp step for step."""
    params = make_params("cpu", torch.float32, gen)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = random_grads(params, 4, gen)
    state = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    for step_grads in grads:
        rmsprop_clip_reference_(params, step_grads, state, steps, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.1,
                                clip_value=0.02)
    run_steps(torch.optim.RMSprop(theirs, lr=1e-2, weight_decay=0.1), theirs, grads, clip_after=0.02)
    for a, b in zip(params, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert steps[0].item() == 4
