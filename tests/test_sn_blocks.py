"""SNLinear / SNConv2d (1/sigma folded into the output, explicit input gradient) against torch's
spectral_norm parametrization: init, outputs, gradients, u, v over training steps, the gradient
penalty through an SN critic, spectral_norm_all on block critics, state dicts, eval mode,
torch.compile, gradcheck, bad input."""

import copy

import pytest
import torch
from conftest import DEVICES, tol
from torch import nn
from torch._dynamo.utils import counters

import wgan_kernels as wk
from wgan_kernels import nn as wn
from wgan_kernels.losses import gradient_penalty_reference

torch_sn = nn.utils.parametrizations.spectral_norm

# odd shapes: a Linear, a strided padded conv on an odd input, a grouped dilated conv without bias
CASES = {
    "linear": (lambda: nn.Linear(7, 5), lambda **kw: wn.SNLinear(7, 5, **kw), (3, 7)),
    "conv": (lambda: nn.Conv2d(3, 5, 3, 2, 1), lambda **kw: wn.SNConv2d(3, 5, 3, 2, 1, **kw), (2, 3, 11, 13)),
    "conv-grouped": (lambda: nn.Conv2d(4, 6, 3, 1, 2, dilation=2, groups=2, bias=False),
                     lambda **kw: wn.SNConv2d(4, 6, 3, 1, 2, dilation=2, groups=2, bias=False, **kw), (2, 4, 9, 7)),
}


def twins(case, seed=0, n_power_iterations=1, device="cpu", dtype=torch.float32):
    make_torch, make_block, shape = CASES[case]
    torch.manual_seed(seed)
    theirs = torch_sn(make_torch(), n_power_iterations=n_power_iterations)
    torch.manual_seed(seed)
    ours = make_block(n_power_iterations=n_power_iterations)
    return ours.to(device, dtype), theirs.to(device, dtype), shape


def sn_of(theirs):
    return theirs.parametrizations.weight[0]


def params_by_name(m):
    """Parameters under our names (a parametrized weight's original as ``weight``)."""
    return {k.replace("parametrizations.weight.original", "weight"): v for k, v in m.named_parameters()}


def assert_same_grads(ours, theirs, what, **t):
    theirs_p = params_by_name(theirs)
    for name, a in ours.named_parameters():
        torch.testing.assert_close(a.grad, theirs_p[name].grad, **t, msg=lambda m: f"{what} {name} grad: {m}")


def raw_weight(m):
    return m.weight if isinstance(m, wn.SNLinear | wn.SNConv2d) else m.parametrizations.weight.original


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_block_matches_torch_over_training_steps(case, dtype, device, gen):
    """float32: equal to torch within rounding. bfloat16: folding 1/sigma into the output rounds
    differently from W / sigma, so each is compared with a float64 twin: our error at most 2x
    torch's (plus bf16's atol)."""
    ours, theirs, shape = twins(case, n_power_iterations=2, device=device, dtype=dtype)
    # the same init: draws, 15 warm-up iterations and registration's one training forward
    assert torch.equal(ours._u, sn_of(theirs)._u) and torch.equal(ours._v, sn_of(theirs)._v)
    truth = twins(case, n_power_iterations=2, device=device, dtype=torch.float64)[1]
    models = [ours, theirs, truth]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    t = dict(rtol=1e-5, atol=1e-5)

    def check(a, b, c, what):
        if dtype == torch.float32:
            torch.testing.assert_close(a, b, **t, msg=lambda m: f"{case} {what}: {m}")
        else:
            err_ours, err_theirs = (a.double() - c).abs().max().item(), (b.double() - c).abs().max().item()
            assert err_ours <= 2 * err_theirs + tol(dtype)["atol"], (case, what, err_ours, err_theirs)

    for step in range(3):
        x = torch.randn(*shape[:-1], shape[-1] + 3, generator=gen, dtype=torch.float64)[..., 1:-2]  # not contiguous
        xs = [x.to(device, m_dtype).requires_grad_() for m_dtype in (dtype, dtype, torch.float64)]
        ys = [m(xi) for m, xi in zip(models, xs)]
        check(*ys, f"output step {step}")
        g = torch.randn(ys[0].shape, generator=gen, dtype=torch.float64).to(device)
        for y in ys:
            y.backward(g.to(y.dtype))
        check(*(xi.grad for xi in xs), f"input grad step {step}")
        named = [params_by_name(m) for m in models]
        for name in named[0]:
            check(*(p[name].grad for p in named), f"{name} grad step {step}")
        for opt in opts:
            opt.step()
            opt.zero_grad()
        check(ours._u, sn_of(theirs)._u, sn_of(truth)._u, f"u step {step}")
        check(ours._v, sn_of(theirs)._v, sn_of(truth)._v, f"v step {step}")
    check(ours.normalized_weight(), theirs.weight, truth.weight, "W / sigma")


@pytest.mark.parametrize("case", sorted(CASES))
def test_explicit_input_grad_matches_double_backward(case, gen):
    ours, theirs, shape = twins(case)
    ours.eval(), theirs.eval()  # u, v fixed, so the two functions are the same
    x = torch.randn(*shape, generator=gen)
    out, grad_x = ours.forward_with_input_grad(x)
    xb = x.clone().requires_grad_()
    (grad_b,) = torch.autograd.grad(theirs(xb).sum(), xb, create_graph=True)
    torch.testing.assert_close(out, theirs(x))
    torch.testing.assert_close(grad_x, grad_b)
    # and the second-order part: a penalty on grad_x reaches W through sigma (sums of many
    # products in another order: float32 rounding relative to the gradient's size)
    grad_x.square().sum().backward()
    grad_b.square().sum().backward()
    torch.testing.assert_close(ours.weight.grad, raw_weight(theirs).grad, rtol=1e-4, atol=1e-4)


def sn_critic_pair(seed=0):
    """A torch critic with torch's spectral_norm on every layer and its block twin (the same
    weights and u, v; independent copies)."""
    torch.manual_seed(seed)
    theirs = nn.Sequential(nn.Conv2d(2, 5, 3, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(5, 4, 3, 1, 1), nn.Softplus(),
                           nn.Flatten(), nn.Linear(4 * 5 * 5, 1))
    for m in theirs:
        if isinstance(m, nn.Linear | nn.Conv2d):
            torch_sn(m)
    ours = wn.from_torch(copy.deepcopy(theirs))
    return ours, theirs


def test_from_torch_converts_spectral_norm_and_shares_state():
    torch.manual_seed(0)
    theirs = nn.Sequential(torch_sn(nn.Linear(3, 6)), nn.ReLU(), wk.spectral_norm(nn.Conv2d(1, 1, 1)))
    ours = wn.from_torch(theirs[:2])
    assert isinstance(ours[0], wn.SNLinear) and wn.supports_input_grad(ours)
    assert ours[0].weight is theirs[0].parametrizations.weight.original and ours[0].bias is theirs[0].bias
    assert ours[0]._u is sn_of(theirs[0])._u  # the same buffers: both advance the same vectors
    assert isinstance(wn.from_torch(theirs[2]), wn.SNConv2d)  # wgan_kernels' parametrization too
    assert list(ours.state_dict()) == list(theirs[:2].state_dict())


def test_gradient_penalty_through_sn_critic_matches_torch(gen):
    """WGAN-div penalty through an SN conv critic: the explicit path on SN blocks vs autograd's
    double backward through torch's parametrization (each one power iteration per forward)."""
    ours, theirs = sn_critic_pair()
    real, fake = torch.randn(6, 2, 9, 9, generator=gen), torch.randn(6, 2, 9, 9, generator=gen)
    assert wn.supports_input_grad(ours)
    pen_ours = wk.gradient_penalty(ours, real, fake, kind="div")
    pen_theirs = gradient_penalty_reference(theirs, torch.cat([real, fake]), weight=2.0, center=0.0, p=6.0)
    torch.testing.assert_close(pen_ours, pen_theirs)
    pen_ours.backward()
    pen_theirs.backward()
    assert_same_grads(ours, theirs, "penalty")
    for a, b in zip(ours, theirs):
        if isinstance(a, wn.SNLinear | wn.SNConv2d):
            torch.testing.assert_close(a._u, sn_of(b)._u)


def test_spectral_norm_all_on_block_critic_swaps_and_batches(gen):
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(3, 9), nn.LeakyReLU(0.2), nn.Linear(9, 9), nn.LeakyReLU(0.2), nn.Linear(9, 1))
    theirs = copy.deepcopy(plain)
    torch.manual_seed(1)
    for m in theirs:
        if isinstance(m, nn.Linear):
            torch_sn(m)
    critic = wn.from_torch(copy.deepcopy(plain))
    params = list(critic.parameters())
    torch.manual_seed(1)
    assert wk.spectral_norm_all(critic) is critic
    assert all(isinstance(critic[i], wn.SNLinear) for i in (0, 2, 4))
    assert {id(p) for p in critic.parameters()} == {id(p) for p in params}  # the same Parameter objects
    # in torch's order after its spectral norm (bias, weight): optimizer state dicts move between the two
    assert [p.shape for p in critic.parameters()] == [p.shape for p in theirs.parameters()]
    assert list(critic.state_dict()) == list(theirs.state_dict())
    for i in (0, 2, 4):  # u, v drawn in module order, as torch's spectral_norm on each layer
        assert torch.equal(critic[i]._u, sn_of(theirs[i])._u)
    real, fake = torch.randn(8, 3, generator=gen), torch.randn(8, 3, generator=gen)
    opt = torch.optim.SGD(critic.parameters(), lr=0.05)
    us = []
    for step in range(3):
        loss, _ = wk.critic_loss(critic, real, fake, penalty="gp", generator=torch.Generator().manual_seed(step))
        loss.backward()
        us.append(critic[0]._u.clone())
        critic(real)  # more forwards on the same weights: no more iterations
        us.append(critic[0]._u.clone())
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(us[2 * k], us[2 * k + 1]) for k in range(3))
    assert not torch.equal(us[0], us[2]) and not torch.equal(us[2], us[4])
    # the batched critic's step equals torch's critic advanced once per step, then frozen
    critic2, theirs2 = wn.from_torch(copy.deepcopy(plain)), copy.deepcopy(theirs)
    wk.spectral_norm_all(critic2)
    for a, b in zip(critic2, theirs2):
        if isinstance(a, wn.SNLinear):
            a._u.copy_(sn_of(b)._u)
            a._v.copy_(sn_of(b)._v)
    loss_a, _ = wk.critic_loss(critic2, real, fake, penalty="div")
    theirs2(real)  # one iteration, then frozen for the step's forwards
    theirs2.eval()
    both = torch.cat([real, fake]).requires_grad_()
    out = theirs2(both)
    (g,) = torch.autograd.grad(out.sum(), both, create_graph=True)
    loss_b = out[8:].mean() - out[:8].mean() + 2 * g.norm(dim=1).pow(6).mean()
    torch.testing.assert_close(loss_a, loss_b)
    loss_a.backward()
    loss_b.backward()
    assert_same_grads(critic2, theirs2, "batched critic step")
    with pytest.raises(ValueError, match="critic: spectral_norm_all was already applied"):
        wk.spectral_norm_all(critic2)
    # the batching is the critic's one input-gradient hook; a deep copy's hook drives the copy's layers
    (hook,) = critic2._input_grad_hooks
    assert [id(m) for m in hook.layers] == [id(critic2[i]) for i in (0, 2, 4)]
    twin = copy.deepcopy(critic2)
    (twin_hook,) = twin._input_grad_hooks
    assert twin_hook is not hook and [id(m) for m in twin_hook.layers] == [id(twin[i]) for i in (0, 2, 4)]


def test_eval_mode_freezes_u_v(gen):
    ours, _, shape = twins("conv")
    ours.eval()
    u, v = ours._u.clone(), ours._v.clone()
    x = torch.randn(*shape, generator=gen)
    y1, y2 = ours(x), ours.forward_with_input_grad(x)[0]
    assert torch.equal(u, ours._u) and torch.equal(v, ours._v) and torch.equal(y1, y2)
    ours.train()
    ours(x)
    assert not torch.equal(u, ours._u)


def test_state_dict_round_trips_with_torch():
    for case in sorted(CASES):
        ours, theirs, shape = twins(case, seed=3)
        other, _, _ = twins(case, seed=4)
        assert list(ours.state_dict()) == list(theirs.state_dict())
        other.load_state_dict(theirs.state_dict())  # torch -> ours
        for a, b in zip(other.state_dict().values(), theirs.state_dict().values()):
            assert torch.equal(a, b)
        _, theirs_other, _ = twins(case, seed=5)
        theirs_other.load_state_dict(ours.state_dict())  # ours -> torch
        for a, b in zip(theirs_other.state_dict().values(), ours.state_dict().values()):
            assert torch.equal(a, b)
    # the old hook-based torch.nn.utils.spectral_norm's keys load too
    torch.manual_seed(0)
    legacy = nn.utils.spectral_norm(nn.Linear(7, 5))
    block = wn.SNLinear(7, 5)
    block.load_state_dict(legacy.state_dict())
    assert torch.equal(block.weight, legacy.weight_orig) and torch.equal(block._u, legacy.weight_u)
    # a missing entry is reported under torch's name
    sd = wn.SNLinear(7, 5).state_dict()
    del sd["parametrizations.weight.0._u"]
    with pytest.raises(RuntimeError, match=r"parametrizations\.weight\.0\._u"):
        wn.SNLinear(7, 5).load_state_dict(sd)


def test_compiled_sn_critic_step(gen):
    """A WGAN-GP critic step through an SN block critic (explicit path) under torch.compile gives
    the same loss and parameter gradients as eager."""
    ours, _ = sn_critic_pair(seed=2)
    twin = copy.deepcopy(ours)
    real, fake = torch.randn(4, 2, 9, 9, generator=gen), torch.randn(4, 2, 9, 9, generator=gen)
    alpha = torch.rand(4, 1, 1, 1, generator=gen)

    def step(critic, real, fake, alpha):
        x = alpha * real + (1 - alpha) * fake
        _, grad_x = critic.forward_with_input_grad(x)
        loss = critic(fake).mean() - critic(real).mean() + 10 * (grad_x.flatten(1).norm(dim=1) - 1).square().mean()
        loss.backward()
        return loss.detach()

    torch._dynamo.reset()
    counters.clear()
    loss_c = torch.compile(step)(ours, real, fake, alpha)
    loss_e = step(twin, real, fake, alpha)
    torch.testing.assert_close(loss_c, loss_e)
    for (name, a), b in zip(ours.named_parameters(), twin.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m: f"compiled grad {name}: {m}")
    for a, b in zip(ours.buffers(), twin.buffers()):  # u, v advanced alike (three forwards, three iterations)
        torch.testing.assert_close(a, b)
    # the power iteration is a custom op inside the graph: the only graph break is backward() itself
    assert counters["graph_break"] and all("backward" in reason for reason in counters["graph_break"]), \
        dict(counters["graph_break"])


@pytest.mark.parametrize("case", ["linear", "conv"])
def test_gradcheck_float64(case, gen):
    ours, _, shape = twins(case)
    ours = ours.double().eval()
    x = torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = ours.weight.detach().clone().requires_grad_()

    def out(x, w):
        return torch.func.functional_call(ours, {"weight": w}, (x,))

    def input_grad(x, w):
        return _with_weight(ours, w, lambda: ours.forward_with_input_grad(x)[1])

    assert torch.autograd.gradcheck(out, (x, w))
    assert torch.autograd.gradcheck(input_grad, (x, w))
    assert torch.autograd.gradgradcheck(out, (x, w))


def _with_weight(module, w, fn):
    saved = module._parameters["weight"]
    module._parameters["weight"] = w
    try:
        return fn()
    finally:
        module._parameters["weight"] = saved


def test_bad_input():
    with pytest.raises(ValueError, match="n_power_iterations"):
        wn.SNLinear(3, 4, n_power_iterations=0)
    with pytest.raises(ValueError, match="eps"):
        wn.SNConv2d(3, 4, 3, eps=0.0)
    with pytest.raises(ValueError, match="x "):
        wn.SNLinear(3, 4)(torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="x "):
        wn.SNLinear(3, 4).forward_with_input_grad(torch.ones(2, 3, dtype=torch.int64))


def test_spectral_norm_all_scales_gradcheck_float64(gen):
    """spectral_norm_all's per-forward scales (1/sigma and b sigma of every block in one autograd
    node) in float64: gradcheck and gradgradcheck of the critic's output w.r.t. the input and
    every weight and bias, in eval mode (sigma = u . W v with u, v held, the function that the
    analytic gradient u v^T differentiates exactly)."""
    torch.manual_seed(0)
    critic = wk.spectral_norm_all(nn.Sequential(nn.Conv2d(2, 3, 3, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(),
                                                nn.Linear(3 * 3 * 3, 1))).double().eval()
    names = [n for n, _ in critic.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in critic.parameters()]
    x = torch.randn(2, 2, 5, 6, generator=gen, dtype=torch.float64, requires_grad=True)

    def out(x, *ps):
        return torch.func.functional_call(critic, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(out, (x, *params))
    assert torch.autograd.gradgradcheck(out, (x, *params))


def test_spectral_norm_all_later_forwards_see_the_current_weights(gen):
    """D(real), D(fake) on the same weights: one iteration; each forward has its own graph, so that
    separate backward calls work (as the original WGAN code does); a weight written through
    ``.data`` (WGAN code's ``p.data.clamp_``, no version bump) between forwards is normalised by
    its own sigma (u . W v with the current u, v), not a stale one."""
    torch.manual_seed(0)
    critic = wk.spectral_norm_all(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1)))
    x = torch.randn(3, 4, generator=gen)
    first = critic(x).sum()
    us = [m._u.clone() for m in critic if hasattr(m, "_u")]
    second = critic(x).sum()
    assert all(torch.equal(a, m._u) for a, m in zip(us, [m for m in critic if hasattr(m, "_u")])), "iterated twice"
    torch.testing.assert_close(first, second)
    first.backward()
    grads = [p.grad.clone() for p in critic.parameters()]
    second.backward()  # its own graph: not freed by the first backward
    for g, p in zip(grads, critic.parameters()):
        torch.testing.assert_close(p.grad, 2 * g)
    with torch.no_grad():
        critic[0].weight.data.mul_(-0.5)
        critic[0].weight.data[0, 0] += 1.0
    h = x
    for m in critic:  # the reference: W / (u . W v) with the buffers as they are
        if isinstance(m, nn.Linear):
            sigma = torch.dot(m._u, m.weight @ m._v)
            h = h @ (m.weight / sigma).T + m.bias
        else:
            h = m(h)
    torch.testing.assert_close(critic(x), h)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_spectral_norm_all_16bit_matches_float32(dtype, gen):
    """In 16-bit types the batched scales carry no ``b sigma`` (the bias is added after the scale,
    as torch's W / sigma layer does): a 16-bit critic under spectral_norm_all gives the float32
    twin's output and gradients to 16-bit rounding, over two steps."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 4 * 4, 1))
    ours = wk.spectral_norm_all(copy.deepcopy(base).to(dtype))
    twin = wk.spectral_norm_all(copy.deepcopy(base))
    x = torch.randn(5, 3, 7, 8, generator=gen)
    for step in range(2):
        for m in (ours, twin):
            m.zero_grad()
        out, ref = ours(x.to(dtype)), twin(x)
        torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05, msg=lambda m: f"step {step} output: {m}")
        out.float().sum().backward()
        ref.sum().backward()
        for (name, a), b in zip(ours.named_parameters(), twin.parameters()):
            scale = b.grad.abs().max().clamp_min(1e-3)
            torch.testing.assert_close(a.grad.float() / scale, b.grad / scale, rtol=0, atol=0.05,
                                       msg=lambda m: f"step {step} {name} grad: {m}")
        with torch.no_grad():
            for a, b in zip(ours.parameters(), twin.parameters()):
                a.add_(0.01)
                b.add_(0.01)


def test_spectral_norm_all_checks_buffers_changed_after_a_checked_call():
    """The hook skips the batched call's checks only for the tensors of the last checked call: a u
    replaced by one of the wrong length, or set to require grad, is refused as power_iteration_
    refuses it (ValueError naming it), not written through."""
    critic = wk.spectral_norm_all(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 1)))
    x = torch.randn(3, 4)
    critic(x)
    with torch.no_grad():
        critic[0].weight.add_(0.1)
    critic[0]._u.requires_grad_()
    with pytest.raises(ValueError, match=r"us\[0\].*require grad"):
        critic(x)
    critic[0]._u = torch.randn(5)  # the wrong length for a 6 x 4 weight
    with pytest.raises(ValueError, match=r"us\[0\]"):
        critic(x)
