"""Spectral norm: power_iteration_ on every backend against its reference, and the module
wrappers against torch.nn.utils.parametrizations.spectral_norm (numbers, gradients, state dicts)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, tol
from torch import nn

from wgan_kernels._backend import available, extension
from wgan_kernels.nn.spectral import spectral_norm, spectral_norm_all
from wgan_kernels.ops.spectral_norm import power_iteration_, power_iteration_reference_

torch_spectral_norm = nn.utils.parametrizations.spectral_norm


def backends_for(device: str):
    out = ["reference"]
    if available("triton", device):
        out.append("triton")
    if device == "cpu" and extension() is not None and hasattr(extension(), "power_iteration_"):
        out.append("cpp")
    return out


def cases(dtypes):
    """(device, backend, dtype) triples; the Triton interpreter has no bfloat16."""
    return [(d, b, t) for d in DEVICES for b in backends_for(d) for t in dtypes
            if not (b == "triton" and d == "cpu" and t == torch.bfloat16)]


def mixed_problem(device, dtype, gen):
    """Weights of mixed odd shapes (1 row, 1 column, a transposed one: not contiguous, one larger
    than a Triton block in both dims) with unit u, v (two of them strided)."""
    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)
    weights = [r(7, 5), r(1, 13), r(40, 19).t(), r(6, 1), r(3, 70), r(37, 150)]  # the last spans 2x2 blocks
    us = [F.normalize(r(w.shape[0]), dim=0) for w in weights]
    vs = [F.normalize(r(w.shape[1]), dim=0) for w in weights]
    cast = lambda ts: [t.to(device=device, dtype=dtype) for t in ts]  # noqa: E731
    weights, us, vs = cast(weights), cast(us), cast(vs)
    us[4] = torch.zeros(6, device=device, dtype=dtype)[::2].copy_(us[4])  # strided u and v
    vs[0] = torch.zeros(10, device=device, dtype=dtype)[1::2].copy_(vs[0])
    return weights, us, vs


def clones(ts):
    return [t.clone() for t in ts]


# ----------------------------------------------------------------------------- power_iteration_


@pytest.mark.parametrize("device,backend,dtype", cases([torch.float32, torch.float64]))
def test_power_iteration_matches_reference(device, backend, dtype, gen):
    weights, us, vs = mixed_problem(device, dtype, gen)
    ref_u, ref_v = clones(us), clones(vs)
    expected = power_iteration_reference_(weights, ref_u, ref_v, 3, 1e-12)
    got = power_iteration_(weights, us, vs, 3, backend=backend)
    for i in range(len(weights)):
        what = f"power_iteration_ {backend} {dtype} weights[{i}] {tuple(weights[i].shape)}"
        torch.testing.assert_close(got[i], expected[i], **tol(dtype), msg=lambda m: f"{what} sigma: {m}")
        torch.testing.assert_close(us[i], ref_u[i], **tol(dtype), msg=lambda m: f"{what} u: {m}")
        torch.testing.assert_close(vs[i], ref_v[i], **tol(dtype), msg=lambda m: f"{what} v: {m}")
        assert got[i].dtype == dtype and got[i].dim() == 0


@pytest.mark.parametrize("device,backend,dtype", cases([torch.float16, torch.bfloat16]))
def test_power_iteration_low_precision(device, backend, dtype, gen):
    """Error against a float64 run within 2x the reference's own error in that dtype (plus atol)."""
    weights, us, vs = mixed_problem(device, torch.float64, gen)
    truth_u, truth_v = clones(us), clones(vs)
    truth = power_iteration_reference_(weights, truth_u, truth_v, 2, 1e-12)
    low = lambda ts: [t.to(dtype) for t in ts]  # noqa: E731
    ref_u, ref_v, our_u, our_v = low(us), low(vs), low(us), low(vs)
    ref = power_iteration_reference_(low(weights), ref_u, ref_v, 2, 1e-12)
    ours = power_iteration_(low(weights), our_u, our_v, 2, backend=backend)
    atol = tol(dtype)["atol"]
    for name, a, r, t in (("sigma", ours, ref, truth), ("u", our_u, ref_u, truth_u), ("v", our_v, ref_v, truth_v)):
        for i in range(len(weights)):
            err_ours = (a[i].double() - t[i]).abs().max().item()
            err_ref = (r[i].double() - t[i]).abs().max().item()
            assert err_ours <= 2 * err_ref + atol, (backend, dtype, name, i, err_ours, err_ref)


@pytest.mark.parametrize("device,backend,dtype", cases([torch.float32]))
def test_power_iteration_sigma_gradient(device, backend, dtype, gen):
    """d sigma / dW = u v^T with the updated u, v held constant; u, v get version bumps."""
    weights, us, vs = mixed_problem(device, dtype, gen)
    weights = [w.detach().requires_grad_() for w in weights]
    versions = [t._version for t in us + vs]
    sigmas = power_iteration_(weights, us, vs, 2, backend=backend)
    torch.autograd.backward(sigmas, [torch.full((), 1.0 + i, device=device) for i in range(len(sigmas))])
    for i, (w, u, v) in enumerate(zip(weights, us, vs)):
        torch.testing.assert_close(w.grad, (1.0 + i) * torch.outer(u, v), **tol(dtype),
                                   msg=lambda m: f"power_iteration_ {backend} grad of weights[{i}]: {m}")
    assert all(t._version > old for t, old in zip(us + vs, versions)), "u, v version counters not bumped"


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_power_iteration_gradcheck(backend, gen):
    """gradcheck in float64. The analytic gradient u v^T holds u, v constant; it is the true
    derivative of sigma(W) once u, v have converged, so W has a wide singular-value gap (5 vs 1:
    the error shrinks 25x per iteration) and 12 iterations converge in float64."""
    q1, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=torch.float64))
    w = (q1[:, :4] * torch.tensor([5.0, 1.0, 0.5, 0.2], dtype=torch.float64)) @ q2.T
    u0 = F.normalize(torch.randn(5, generator=gen, dtype=torch.float64), dim=0)
    v0 = F.normalize(torch.randn(4, generator=gen, dtype=torch.float64), dim=0)

    def sigma(weight):
        return power_iteration_([weight], [u0.clone()], [v0.clone()], 12, backend=backend)[0]

    assert torch.autograd.gradcheck(sigma, (w.requires_grad_(),), eps=1e-6, atol=1e-7)


def test_power_iteration_bad_input():
    w, u, v = torch.randn(4, 3), torch.randn(4), torch.randn(3)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="n_power_iterations"):
            power_iteration_([w], [u], [v], bad)
    for bad in (0.0, -1e-12, float("nan"), float("inf"), "x"):
        with pytest.raises(ValueError, match="eps"):
            power_iteration_([w], [u], [v], 1, bad)
    with pytest.raises(ValueError, match=r"weights\[0\].*2-D"):
        power_iteration_([torch.randn(4)], [u], [v])
    with pytest.raises(ValueError, match=r"weights\[0\]"):
        power_iteration_([torch.ones(4, 3, dtype=torch.int64)], [u], [v])
    with pytest.raises(ValueError, match=r"us\[0\]"):
        power_iteration_([w], [torch.randn(3)], [v])
    with pytest.raises(ValueError, match=r"vs\[1\]"):
        power_iteration_([w, w], [u, u.clone()], [v, torch.randn(4)])
    with pytest.raises(ValueError, match=r"us\[0\]"):
        power_iteration_([w], [u.double()], [v])
    with pytest.raises(ValueError, match=r"vs\[0\].*grad"):
        power_iteration_([w], [u], [torch.randn(3, requires_grad=True)])
    with pytest.raises(ValueError, match="us, vs"):
        power_iteration_([w, w], [u], [v])
    with pytest.raises(ValueError, match="us, vs"):
        power_iteration_([w, w], [u, u], [v, v.clone()])  # one buffer twice
    with pytest.raises(ValueError, match="weights"):
        power_iteration_(3, [u], [v])
    assert power_iteration_([], [], []) == []


# ----------------------------------------------------------------------------- spectral_norm vs torch

LAYERS = {
    "linear": lambda: nn.Linear(7, 5),
    "conv2d": lambda: nn.Conv2d(3, 5, (3, 2), padding=1),
    "convtranspose2d": lambda: nn.ConvTranspose2d(3, 4, (3, 2), stride=2),
}
INPUTS = {"linear": (6, 7), "conv2d": (2, 3, 5, 6), "convtranspose2d": (2, 3, 4, 5)}


def twin_layers(kind, seed=0, **kwargs):
    """torch's spectral_norm and ours on copies of one layer, initialised from the same RNG state."""
    layer = LAYERS[kind]()
    torch.manual_seed(seed)
    theirs = torch_spectral_norm(copy.deepcopy(layer), **kwargs)
    torch.manual_seed(seed)
    ours = spectral_norm(copy.deepcopy(layer), **kwargs)
    return ours, theirs


def sn_state(m):
    p = m.parametrizations.weight
    return {"u": p[0]._u, "v": p[0]._v, "original": p.original}


def train_steps(module, xs, lr=0.05):
    opt = torch.optim.SGD(module.parameters(), lr=lr)
    outs, grads = [], []
    for x in xs:
        opt.zero_grad()
        out = module(x)
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in module.parameters()])
        opt.step()
    return outs, grads


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("kind", sorted(LAYERS))
def test_spectral_norm_matches_torch(kind, backend, monkeypatch, gen):
    monkeypatch.setenv("WGAN_KERNELS_BACKEND", backend)
    ours, theirs = twin_layers(kind, n_power_iterations=2)
    # Same init: RNG draws, 15 warm-up iterations (the reference), 2 at registration (the backend).
    exact = dict(rtol=0, atol=0) if backend == "reference" else {}
    for name, a in sn_state(ours).items():
        torch.testing.assert_close(a, sn_state(theirs)[name], **exact, msg=lambda m: f"{kind} init {name}: {m}")
    xs = [torch.randn(*INPUTS[kind], generator=gen) for _ in range(3)]
    our_outs, our_grads = train_steps(ours, xs)
    their_outs, their_grads = train_steps(theirs, xs)
    what = f"spectral_norm {kind} {backend}"
    for step, (a, b) in enumerate(zip(our_outs, their_outs)):
        torch.testing.assert_close(a, b, msg=lambda m: f"{what} output step {step}: {m}")
    for step, (ga, gb) in enumerate(zip(our_grads, their_grads)):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, msg=lambda m: f"{what} grad step {step}: {m}")
    for name, a in sn_state(ours).items():
        torch.testing.assert_close(a, sn_state(theirs)[name], msg=lambda m: f"{what} {name}: {m}")
    torch.testing.assert_close(ours.weight, theirs.weight, msg=lambda m: f"{what} weight: {m}")


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_spectral_norm_low_precision(backend, monkeypatch, gen):
    """float16 (bfloat16 off the interpreter) Linear: weight error against a float64 twin within 2x torch's error."""
    monkeypatch.setenv("WGAN_KERNELS_BACKEND", backend)
    for dtype in (torch.float16,) if backend == "triton" else (torch.float16, torch.bfloat16):
        ours, theirs = twin_layers("linear")
        truth = copy.deepcopy(theirs).double()
        ours, theirs = ours.to(dtype), theirs.to(dtype)
        for _ in range(3):
            w_ours, w_theirs, w_truth = ours.weight, theirs.weight, truth.weight
        err_ours = (w_ours.double() - w_truth).abs().max().item()
        err_theirs = (w_theirs.double() - w_truth).abs().max().item()
        assert err_ours <= 2 * err_theirs + tol(dtype)["atol"], (backend, dtype, err_ours, err_theirs)


def critic_pair(seed=0, **kwargs):
    critic = nn.Sequential(nn.Linear(3, 17), nn.LeakyReLU(0.2), nn.Linear(17, 9), nn.LeakyReLU(0.2), nn.Linear(9, 1))
    theirs = copy.deepcopy(critic)
    torch.manual_seed(seed)
    for m in theirs:
        if isinstance(m, nn.Linear):
            torch_spectral_norm(m)
    ours = copy.deepcopy(critic)
    torch.manual_seed(seed)
    spectral_norm_all(ours, **kwargs)
    return ours, theirs


def wgan_gp_loss(critic, real, fake, alpha):
    interp = (alpha * real + (1 - alpha) * fake).requires_grad_()
    (g,) = torch.autograd.grad(critic(interp).sum(), interp, create_graph=True)
    return critic(fake).mean() - critic(real).mean() + 10 * (g.norm(dim=1) - 1).square().mean()


@pytest.mark.parametrize("per_access", [False, True])
def test_wgan_gp_double_backward_matches_torch(per_access, gen):
    """WGAN-GP through an SN critic (double backward, three critic forwards): same loss and
    parameter gradients as torch. per_access=True is torch exactly; the default mode iterates once
    for the three forwards, so it is compared with a torch critic given one iteration, then frozen."""
    ours, theirs = critic_pair(per_access=per_access)
    real, fake, alpha = (torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen),
                         torch.rand(8, 1, generator=gen))
    if not per_access:  # ours iterates once per weight update: give torch the one iteration, then freeze it
        theirs(real)
        theirs.eval()
    loss_ours = wgan_gp_loss(ours, real, fake, alpha)
    loss_theirs = wgan_gp_loss(theirs, real, fake, alpha)
    loss_ours.backward()
    loss_theirs.backward()
    torch.testing.assert_close(loss_ours, loss_theirs, msg=lambda m: f"WGAN-GP loss per_access={per_access}: {m}")
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"WGAN-GP grad {name} per_access={per_access}: {m}")


def test_eval_mode_freezes_u_v(gen):
    ours, theirs = twin_layers("conv2d")
    x = torch.randn(*INPUTS["conv2d"], generator=gen)
    ours.eval(), theirs.eval()
    before = {k: t.clone() for k, t in sn_state(ours).items()}
    for _ in range(3):
        out_ours, out_theirs = ours(x), theirs(x)
    for name, a in sn_state(ours).items():
        torch.testing.assert_close(a, before[name], rtol=0, atol=0, msg=lambda m: f"eval changed {name}: {m}")
    torch.testing.assert_close(out_ours, out_theirs, msg=lambda m: f"eval output: {m}")
    ours.train()
    ours(x)
    assert not torch.equal(ours.parametrizations.weight[0]._u, before["u"]), "training mode did not iterate"


def test_state_dict_round_trips(gen):
    x = torch.randn(*INPUTS["convtranspose2d"], generator=gen)
    # torch -> ours
    _, theirs = twin_layers("convtranspose2d", seed=1)
    train_steps(theirs, [x, x])
    ours, _ = twin_layers("convtranspose2d", seed=2)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    out_ours, out_theirs = train_steps(ours, [x, x])[0], train_steps(theirs, [x, x])[0]
    for a, b in zip(out_ours, out_theirs):
        torch.testing.assert_close(a, b, msg=lambda m: f"torch -> ours: {m}")
    # ours -> torch
    fresh_theirs = twin_layers("convtranspose2d", seed=3)[1]
    fresh_theirs.load_state_dict(ours.state_dict())
    out_ours, out_theirs = train_steps(ours, [x])[0], train_steps(fresh_theirs, [x])[0]
    torch.testing.assert_close(out_ours[0], out_theirs[0], msg=lambda m: f"ours -> torch: {m}")
    # a whole critic: spectral_norm_all's state dict is torch's
    ours_critic, theirs_critic = critic_pair()
    assert ours_critic.state_dict().keys() == theirs_critic.state_dict().keys()
    ours_critic.load_state_dict(theirs_critic.state_dict())
    theirs_critic.load_state_dict(ours_critic.state_dict())


# ----------------------------------------------------------------------------- spectral_norm_all


def _sn(m):
    """A layer's spectral state: an SN block itself (what spectral_norm_all makes of torch's Linear
    and Conv2d), else its parametrization."""
    return m if hasattr(m, "_u") else m.parametrizations.weight[0]


def _raw_weight(m):
    return m.weight if hasattr(m, "_u") else m.parametrizations.weight.original


def _u_of(critic):
    return [_sn(m)._u.clone() for m in critic if isinstance(m, nn.Linear)]


def test_spectral_norm_all_iterates_once_per_weight_update(gen):
    x = torch.randn(5, 3, generator=gen)
    ours, theirs = critic_pair()
    per_access, _ = critic_pair(per_access=True)
    calls = []
    import wgan_kernels.nn.spectral as sn_module  # where the modules call the power iteration
    names = ("power_iteration_", "power_iteration_values_")  # per layer / the critic's batched hook
    real = {name: getattr(sn_module, name) for name in names}

    def counting(name):
        def count(weights, *args, **kwargs):
            calls.append(len(weights))
            return real[name](weights, *args, **kwargs)
        return count

    for name in names:
        setattr(sn_module, name, counting(name))
    try:
        for _ in range(3):  # D(real), D(fake), D(interp) on the same weights
            ours(x), per_access(x)
    finally:
        for name in names:
            setattr(sn_module, name, real[name])
    assert calls[0] == 3 and calls.count(3) == 1, f"expected one batched call over 3 layers first, got {calls}"
    assert calls.count(1) == 9, f"per_access: one call per layer per forward, got {calls}"
    theirs(x)  # torch after one forward == ours after three; per_access == torch after three
    for a, b in zip(_u_of(ours), _u_of(theirs)):
        torch.testing.assert_close(a, b, msg=lambda m: f"spectral_norm_all one iteration: {m}")
    theirs(x), theirs(x)
    for a, b in zip(_u_of(per_access), _u_of(theirs)):
        torch.testing.assert_close(a, b, msg=lambda m: f"spectral_norm_all per_access three iterations: {m}")
    # an optimizer step changes the weights: the next forward iterates again
    before = _u_of(ours)
    with torch.no_grad():
        _raw_weight(ours[0]).mul_(1.5)
    ours(x)
    assert not torch.equal(_u_of(ours)[0], before[0]), "no iteration after a weight update"
    after = _u_of(ours)
    ours(x)
    assert all(torch.equal(a, b) for a, b in zip(after, _u_of(ours))), "iterated again on unchanged weights"
    # eval mode: frozen; a deep copy iterates its own buffers
    ours.eval()
    frozen = _u_of(ours)
    ours(x)
    assert all(torch.equal(a, b) for a, b in zip(frozen, _u_of(ours)))
    ours.train()
    twin = copy.deepcopy(ours)
    with torch.no_grad():
        _raw_weight(twin[2]).mul_(2.0)
    twin(x)
    assert all(torch.equal(a, b) for a, b in zip(frozen, _u_of(ours))), "the copy's hook touched the original"


def test_spectral_norm_all_matches_torch_one_forward_per_step(gen):
    """One forward per step: the batched path is numerically torch's, step after step."""
    ours, theirs = critic_pair()
    xs = [torch.randn(6, 3, generator=gen) for _ in range(4)]
    our_outs, our_grads = train_steps(ours, xs)
    their_outs, their_grads = train_steps(theirs, xs)
    for step, (a, b) in enumerate(zip(our_outs, their_outs)):
        torch.testing.assert_close(a, b, msg=lambda m: f"spectral_norm_all output step {step}: {m}")
    for a, b in zip(our_grads[-1], their_grads[-1]):
        torch.testing.assert_close(a, b, msg=lambda m: f"spectral_norm_all grads: {m}")
    for a, b in zip(_u_of(ours), _u_of(theirs)):
        torch.testing.assert_close(a, b, msg=lambda m: f"spectral_norm_all u: {m}")


def test_module_bad_input():
    with pytest.raises(ValueError, match="name"):
        spectral_norm(nn.Linear(3, 4), name="kernel")
    with pytest.raises(ValueError, match="name"):
        spectral_norm(nn.LeakyReLU(), name="weight")
    with pytest.raises(ValueError, match="n_power_iterations"):
        spectral_norm(nn.Linear(3, 4), n_power_iterations=0)
    with pytest.raises(ValueError, match="eps"):
        spectral_norm(nn.Linear(3, 4), eps=0.0)
    with pytest.raises(ValueError, match="dim"):
        spectral_norm(nn.Linear(3, 4), dim=2)
    with pytest.raises(ValueError, match="module"):
        spectral_norm("not a module")
    with pytest.raises(ValueError, match="n_power_iterations"):
        spectral_norm_all(nn.Sequential(nn.Linear(2, 2)), n_power_iterations=-1)
    with pytest.raises(ValueError, match="eps"):
        spectral_norm_all(nn.Sequential(nn.Linear(2, 2)), eps=-1.0)
    with pytest.raises(ValueError, match="critic"):
        spectral_norm_all(nn.Sequential(torch_spectral_norm(nn.Linear(2, 2))))
    with pytest.raises(ValueError, match="critic"):
        spectral_norm_all([nn.Linear(2, 2)])


def test_one_dim_weight_is_normalised_like_torch(gen):
    """A 1-D weight (e.g. a norm layer's) is normalised as torch does; no u, v."""
    layer = nn.LayerNorm(6)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(6, generator=gen))
    ours, theirs = spectral_norm(copy.deepcopy(layer)), torch_spectral_norm(copy.deepcopy(layer))
    torch.testing.assert_close(ours.weight, theirs.weight, msg=lambda m: f"1-D weight: {m}")


def test_power_iteration_under_compile_matches_eager(gen):
    """Two iterations in one compiled function: each sigma's gradient uses the u, v of its own
    iteration (a compiled backward that read the final u, v would give a different W gradient)."""
    w0 = torch.randn(5, 18, generator=gen)
    u0, v0 = F.normalize(torch.randn(5, generator=gen), dim=0), F.normalize(torch.randn(18, generator=gen), dim=0)

    def f(w, u, v):
        s1 = power_iteration_([w], [u], [v])[0]
        s2 = power_iteration_([w.t()], [v], [u])[0]  # a transposed view and swapped vectors too
        return s1 + 2 * s2

    results = []
    torch._dynamo.reset()
    for fn in (f, torch.compile(f)):
        w, u, v = w0.clone().requires_grad_(), u0.clone(), v0.clone()
        out = fn(w, u, v)
        out.backward()
        results.append((out.detach(), w.grad, u, v))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)


def test_power_iteration_custom_op_opcheck(gen):
    from wgan_kernels.ops.spectral_norm import _power_iteration_op

    backend = "cpp" if "cpp" in backends_for("cpu") else "triton"
    weights = [torch.randn(4, 6, generator=gen), torch.randn(3, 2, generator=gen)]
    us = [F.normalize(torch.randn(w.shape[0], generator=gen), dim=0) for w in weights]
    vs = [F.normalize(torch.randn(w.shape[1], generator=gen), dim=0) for w in weights]
    torch.library.opcheck(_power_iteration_op, (weights, us, vs, 2, 1e-12, backend))


def aligned_problem(device, dtype, gen):
    """Contiguous weights whose rows are 16-byte aligned (the launch group's ALIGN > 1)."""
    weights = [torch.randn(s, generator=gen, dtype=torch.float64) for s in ((40, 192), (24, 160), (9, 16))]
    us = [F.normalize(torch.randn(w.shape[0], generator=gen, dtype=torch.float64), dim=0) for w in weights]
    vs = [F.normalize(torch.randn(w.shape[1], generator=gen, dtype=torch.float64), dim=0) for w in weights]
    return [[t.to(device=device, dtype=dtype) for t in ts] for ts in (weights, us, vs)]


@pytest.mark.skipif(not available("triton", "cpu"), reason="Triton cannot run on CPU tensors here (no TRITON_INTERPRET)")
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
@pytest.mark.parametrize("problem", [mixed_problem, aligned_problem], ids=["mixed", "aligned"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_iteration_split_and_fused_paths(monkeypatch, split, problem, dtype, gen):
    """The split path (forced at small sizes: every weight is 'large', ranges of about 64 values of
    W) gives several programs per weight and the reference's numbers, as the fused path does."""
    from conftest import LaunchGrids

    from wgan_kernels.ops import spectral_norm as sn

    if split:
        monkeypatch.setattr(sn, "_SPLIT_NUMEL", 0)
        monkeypatch.setattr(sn, "_PROGRAM_NUMEL", 64)
    launches = {name: LaunchGrids(getattr(sn, name)) for name in (
        "_power_iteration_kernel", "_power_iteration_rows_kernel", "_power_iteration_cols_kernel",
        "_power_iteration_finish_kernel")}
    for name, recorder in launches.items():
        monkeypatch.setattr(sn, name, recorder)
    weights, us, vs = problem("cpu", dtype, gen)
    ref_u, ref_v = clones(us), clones(vs)
    expected = power_iteration_reference_(weights, ref_u, ref_v, 3, 1e-12)
    got = power_iteration_(weights, us, vs, 3, backend="triton")
    n = len(weights)
    if split:
        assert launches["_power_iteration_kernel"].grids == []
        assert len(launches["_power_iteration_rows_kernel"].grids) == 3  # one per iteration
        assert len(launches["_power_iteration_cols_kernel"].grids) == 3
        assert launches["_power_iteration_rows_kernel"].grids[0][0] > n
        assert launches["_power_iteration_cols_kernel"].grids[0][0] > n
        assert launches["_power_iteration_finish_kernel"].grids == [(n,)]
    else:
        assert launches["_power_iteration_kernel"].grids == [(n,)]
        assert launches["_power_iteration_rows_kernel"].grids == []
    for i in range(n):
        what = f"power_iteration_ triton {'split' if split else 'fused'} {dtype} weights[{i}] {tuple(weights[i].shape)}"
        torch.testing.assert_close(got[i], expected[i], **tol(dtype), msg=lambda m: f"{what} sigma: {m}")
        torch.testing.assert_close(us[i], ref_u[i], **tol(dtype), msg=lambda m: f"{what} u: {m}")
        torch.testing.assert_close(vs[i], ref_v[i], **tol(dtype), msg=lambda m: f"{what} v: {m}")
