"""The one-node path for Linear/(Leaky)ReLU MLPs (wgan_kernels/nn/_mlp.py).

Oracle: the layer-by-layer explicit chain (``InputGradModule.forward_with_input_grad`` on the same
Sequential, itself tested against autograd's double backward in test_nn.py) and, for the
parameter gradients, autograd's double backward on the torch module.
"""

import pytest
import torch
from conftest import tol
from torch import nn

import wgan_kernels as wk
import wgan_kernels.nn as wn
from wgan_kernels.nn import _mlp
from wgan_kernels.nn.layers import InputGradModule


def layer_by_layer(seq, x):
    return InputGradModule.forward_with_input_grad(seq, x)


def rand(shape, dtype, gen, contiguous=True):
    if contiguous:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    else:
        t = torch.randn(shape[1], shape[0], generator=gen, dtype=torch.float64).t()
    return t.to(dtype)


# name -> (torch module factory, input shape)
MLPS = {
    "leaky-4": (lambda: nn.Sequential(nn.Linear(3, 17), nn.LeakyReLU(0.2), nn.Linear(17, 9), nn.LeakyReLU(0.2),
                                      nn.Linear(9, 11), nn.LeakyReLU(0.2), nn.Linear(11, 1)), (7, 3)),
    "relu-nobias-2out": (lambda: nn.Sequential(nn.Linear(5, 13, bias=False), nn.ReLU(), nn.Linear(13, 2)), (6, 5)),
    "mixed-slopes": (lambda: nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.01), nn.Linear(8, 8, bias=False),
                                           nn.ReLU(), nn.Linear(8, 3, bias=False)), (1, 4)),
}


def make(name, dtype, seed=0):
    factory, shape = MLPS[name]
    torch.manual_seed(seed)
    module = factory().to(dtype)
    return module, wn.from_torch(module), shape


def test_plan_takes_the_mlps():
    for name in MLPS:
        _, critic, shape = make(name, torch.float32)
        assert _mlp.plan(critic, torch.randn(shape)) is not None, name


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(MLPS))
def test_matches_layer_by_layer(name, dtype, contiguous, gen):
    """out, grad_x and every gradient (parameters and x) of a loss using both outputs."""
    _, critic, shape = make(name, dtype)
    x = rand(shape, dtype, gen, contiguous)
    ca, cb = torch.randn(shape[0], critic[-1].out_features, generator=gen, dtype=dtype), \
        torch.randn(shape, generator=gen, dtype=dtype)
    results = []
    for fn in (critic.forward_with_input_grad, lambda x: layer_by_layer(critic, x)):
        xg = x.detach().clone().requires_grad_()
        out, grad_x = fn(xg)
        loss = (out * ca).sum() + (grad_x * cb).sum() + grad_x.norm(dim=1).pow(6).mean()
        grads = torch.autograd.grad(loss, [xg, *critic.parameters()])
        results.append((out, grad_x, grads))
    (out, grad_x, grads), (ref_out, ref_grad_x, ref_grads) = results
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_PiecewiseLinearMLPBackward"
    torch.testing.assert_close(out, ref_out, **tol(dtype))
    torch.testing.assert_close(grad_x, ref_grad_x, **tol(dtype))
    names = ["x"] + [n for n, _ in critic.named_parameters()]
    for n, a, e in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=tol(dtype)["rtol"] * 10, atol=tol(dtype)["atol"] * 10, msg=f"{name} d/d {n}")


@pytest.mark.parametrize("use", ["out", "grad_x"])
def test_one_output_used(use, gen):
    """A loss of only one output: the other's chain is skipped, the gradients still right (the
    hidden biases get zeros from grad_x alone, as from autograd, so an optimizer steps on them
    alike; the last bias gets None)."""
    _, critic, shape = make("leaky-4", torch.float64)
    x = rand(shape, torch.float64, gen)
    grads = []
    for fn in (critic.forward_with_input_grad, lambda x: layer_by_layer(critic, x)):
        out, grad_x = fn(x)
        loss = out.sum() if use == "out" else grad_x.pow(2).sum()
        grads.append(torch.autograd.grad(loss, list(critic.parameters()), allow_unused=True))
    for a, e in zip(*grads):  # zeros where the chain gives zeros (the biases, from grad_x)
        torch.testing.assert_close(a, e, **tol(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(MLPS))
def test_penalty_gradients_match_double_backward(name, dtype, gen):
    """The WGAN-div step of critic_loss on the one-node path == autograd's double backward on the
    torch module (the library's eager reference); a critic with k outputs: means over all of them."""
    module, critic, shape = make(name, dtype)
    real, fake = rand(shape, dtype, gen), rand(shape, dtype, gen) * 1.5
    loss, _ = wk.critic_loss(critic, real, fake, penalty="div")
    loss.backward()
    ours = [p.grad.clone() for p in critic.parameters()]
    module.zero_grad()
    r, f = real.clone().requires_grad_(), fake.clone().requires_grad_()
    d_real, d_fake = module(r), module(f)
    gr, gf = torch.autograd.grad(d_real.sum() + d_fake.sum(), (r, f), create_graph=True)
    norms = torch.cat([gr, gf]).flatten(1).float().norm(dim=1)
    ref = d_fake.float().mean() - d_real.float().mean() + 2.0 * norms.pow(6).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach().to(loss.dtype), rtol=1e-5, atol=1e-6)
    for (n, p), a in zip(module.named_parameters(), ours):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5, msg=f"{name} d loss / d {n}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(dtype, gen):
    """float16/bfloat16: error vs float64 <= 2x the layer-by-layer chain's own error + atol."""
    _, critic64, shape = make("leaky-4", torch.float64)
    _, critic_low, _ = make("leaky-4", dtype)
    x = rand(shape, torch.float64, gen).to(dtype)
    truth = critic64.forward_with_input_grad(x.double())
    ours = critic_low.forward_with_input_grad(x)
    chain = layer_by_layer(critic_low, x)
    for what, t, o, c in zip(("out", "grad_x"), truth, ours, chain):
        assert o.dtype == dtype
        err, chain_err = (o.double() - t).abs().max().item(), (c.double() - t).abs().max().item()
        assert err <= 2 * chain_err + tol(dtype)["atol"], f"{what} {dtype}: {err:.3g} vs {chain_err:.3g}"


class _BothOutputs(nn.Module):
    def __init__(self, critic):
        super().__init__()
        self.critic = critic

    def forward(self, x):
        return self.critic.forward_with_input_grad(x)


def test_gradcheck(gen):
    """(out, grad_x) as a function of (x, parameters) on the one-node path, float64, finite
    differences."""
    _, critic, _ = make("mixed-slopes", torch.float64)
    wrapper = _BothOutputs(critic)
    x = rand((3, 4), torch.float64, gen).requires_grad_()
    names = [n for n, _ in wrapper.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in wrapper.parameters()]

    def f(x, *values):
        out, grad_x = torch.func.functional_call(wrapper, dict(zip(names, values)), (x,))
        assert type(out.grad_fn).__name__ == "_PiecewiseLinearMLPBackward"
        return out, grad_x

    assert torch.autograd.gradcheck(f, (x, *values))


def test_double_backward_is_refused(gen):
    _, critic, shape = make("leaky-4", torch.float64)
    out, grad_x = critic.forward_with_input_grad(rand(shape, torch.float64, gen))
    (g,) = torch.autograd.grad(grad_x.pow(2).sum(), critic[0].weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_falls_back_where_it_does_not_apply(gen, monkeypatch):
    """Other critics, inputs and modes are not planned (they take the layer-by-layer chain)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, generator=gen)
    cases = {
        "smooth activation": wn.Sequential(wn.Linear(3, 5), wn.SiLU(), wn.Linear(5, 1)),
        "negative slope": wn.Sequential(wn.Linear(3, 5), wn.LeakyReLU(-0.1), wn.Linear(5, 1)),
        "SN layer": wn.Sequential(wn.SNLinear(3, 5), wn.LeakyReLU(0.2), wn.Linear(5, 1)),
        "one layer": wn.Sequential(wn.Linear(3, 1)),
        "activation last": wn.Sequential(wn.Linear(3, 5), wn.ReLU()),
    }
    for what, critic in cases.items():
        assert _mlp.plan(critic, x) is None, what
    _, critic, _ = make("leaky-4", torch.float32)
    assert _mlp.plan(critic, x.reshape(2, 2, 3)) is None  # 3-D input
    assert _mlp.plan(critic, x.double()) is None  # dtype differs from the weights'
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _mlp.plan(critic, x) is None
    for forced in ("reference", "triton"):  # the layer-by-layer chain: aten ops / Triton mask kernels
        monkeypatch.setenv("WGAN_KERNELS_BACKEND", forced)
        assert _mlp.plan(critic, x) is None
    monkeypatch.delenv("WGAN_KERNELS_BACKEND")
    assert _mlp.plan(critic, x) is not None


def test_bad_input_still_named(gen):
    _, critic, _ = make("leaky-4", torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        critic.forward_with_input_grad(torch.randn(7, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point"):
        critic.forward_with_input_grad(torch.ones(7, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        critic.forward_with_input_grad(torch.randn(0, 3))
