"""The one-node path for piecewise-linear critics (wgan_kernels/nn/_chain.py): Linear, Conv2d,
(Leaky)ReLU, AvgPool2d and Flatten blocks in Sequential and Residual blocks.

Oracle: the layer-by-layer explicit chain (``InputGradModule.forward_with_input_grad`` on the same
Sequential, itself tested against autograd's double backward in test_nn.py) and, for the
parameter gradients, autograd's double backward on the torch module.
"""

import copy

import pytest
import torch
from conftest import BothOutputs, tol
import torch.nn.functional as F
from torch import nn

import wgan_kernels as wk
import wgan_kernels.nn as wn
from wgan_kernels.nn import _chain
from wgan_kernels.nn.layers import InputGradModule


def layer_by_layer(seq, x):
    return InputGradModule.forward_with_input_grad(seq, x)


def rand(shape, dtype, gen, contiguous=True, device="cpu"):
    """Random values; non-contiguous: the last two dims transposed in memory."""
    if contiguous:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    else:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64).transpose(-1, -2)
    return t.to(device=device, dtype=dtype)


def _leaky():
    return nn.LeakyReLU(0.2)


# name -> (torch module factory, input shape). One output per sample takes the fused backward
# (the loss chain folded into the penalty's); several outputs walk the loss chain on its own.
CRITICS = {
    "mlp-leaky-4": (lambda: nn.Sequential(nn.Linear(3, 17), _leaky(), nn.Linear(17, 9), _leaky(),
                                          nn.Linear(9, 11), _leaky(), nn.Linear(11, 1)), (7, 3)),
    "mlp-relu-nobias-2out": (lambda: nn.Sequential(nn.Linear(5, 13, bias=False), nn.ReLU(), nn.Linear(13, 2)),
                             (6, 5)),
    "mlp-mixed-slopes-3out": (lambda: nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.01), nn.Linear(8, 8, bias=False),
                                                    nn.ReLU(), nn.Linear(8, 3, bias=False)), (1, 4)),
    "mlp-one-layer": (lambda: nn.Sequential(nn.Linear(6, 1)), (5, 6)),
    "mlp-activation-first-and-last": (lambda: nn.Sequential(_leaky(), nn.Linear(4, 6), nn.ReLU()), (3, 4)),
    "conv-dcgan": (lambda: nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), _leaky(), nn.Conv2d(8, 16, 4, 2, 1), _leaky(),
                                         nn.Conv2d(16, 1, 4, 1, 0), nn.Flatten()), (5, 3, 16, 16)),
    "conv-odd-2out": (lambda: nn.Sequential(
        nn.Conv2d(2, 6, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding="same"), nn.LeakyReLU(0.1),
        nn.Conv2d(6, 6, 3, stride=(2, 1), padding=2, dilation=2, groups=3), nn.Flatten(),
        nn.Linear(6 * 3 * 4, 2)), (3, 2, 9, 7)),
    "conv-then-mlp": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, 2, 1), _leaky(), nn.Flatten(), nn.Linear(64, 7),
                                            _leaky(), nn.Linear(7, 1)), (4, 3, 8, 8)),
    # ResNet critics: wgan_kernels.nn blocks (their forward is plain torch, so they are also the
    # double-backward reference); residuals with a pooled conv shortcut and with the identity
    "resnet": (lambda: wn.Sequential(
        wn.Residual(wn.Sequential(wn.Conv2d(3, 4, 3, 1, 1), wn.ReLU(), wn.Conv2d(4, 4, 3, 1, 1), wn.AvgPool2d(2)),
                    wn.Sequential(wn.AvgPool2d(2), wn.Conv2d(3, 4, 1))),
        wn.Residual(wn.Sequential(wn.ReLU(), wn.Conv2d(4, 4, 3, 1, 1), wn.ReLU(), wn.Conv2d(4, 4, 3, 1, 1))),
        wn.ReLU(), wn.AvgPool2d(4), wn.Flatten(), wn.Linear(4, 1)), (3, 3, 8, 8)),
    "resnet-odd-2out": (lambda: wn.Sequential(
        wn.Conv2d(2, 3, 3, 1, 1, bias=False), wn.LeakyReLU(0.1),
        wn.Residual(wn.Sequential(wn.LeakyReLU(0.3), wn.Conv2d(3, 3, 3, 1, 1)),
                    wn.Sequential(wn.Conv2d(3, 3, 1, bias=False), wn.Residual(wn.ReLU()))),
        wn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False), wn.ReLU(),
        wn.Flatten(), wn.Linear(3 * 4 * 3, 2)), (2, 2, 7, 5)),
}


def make(name, dtype, seed=0, device="cpu"):
    factory, shape = CRITICS[name]
    torch.manual_seed(seed)
    module = factory().to(device=device, dtype=dtype)
    return module, wn.from_torch(module), shape


def test_plan_takes_the_critics():
    for name in CRITICS:
        _, critic, shape = make(name, torch.float32)
        assert _chain.plan(critic, torch.randn(shape)) is not None, name


def _loss_of_both(out, grad_x, seed):
    """A loss using both outputs, the same for both paths (coefficients from a fixed seed)."""
    g = torch.Generator().manual_seed(seed)
    ca = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    cb = torch.randn(grad_x.shape, generator=g, dtype=torch.float64).to(grad_x)
    return (out * ca).sum() + (grad_x * cb).sum() + grad_x.flatten(1).norm(dim=1).pow(6).mean()


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CRITICS))
def test_matches_layer_by_layer(name, dtype, contiguous, device, gen):
    """out, grad_x and every gradient (parameters and x) of a loss using both outputs."""
    _, critic, shape = make(name, dtype, device=device)
    x = rand(shape, dtype, gen, contiguous, device)
    results = []
    for fn in (critic.forward_with_input_grad, lambda x: layer_by_layer(critic, x)):
        xg = x.detach().clone().requires_grad_()
        out, grad_x = fn(xg)
        grads = torch.autograd.grad(_loss_of_both(out, grad_x, seed=7), [xg, *critic.parameters()])
        results.append((out, grad_x, grads))
    (out, grad_x, grads), (ref_out, ref_grad_x, ref_grads) = results
    assert type(out.grad_fn).__name__ == "_PiecewiseLinearChainBackward"
    torch.testing.assert_close(out, ref_out, **tol(dtype))
    torch.testing.assert_close(grad_x, ref_grad_x, **tol(dtype))
    names = ["x"] + [n for n, _ in critic.named_parameters()]
    for n, a, e in zip(names, grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=tol(dtype)["rtol"] * 10, atol=tol(dtype)["atol"] * 10, msg=lambda m: f"{name} d/d {n}: {m}")


@pytest.mark.parametrize("name", ["mlp-leaky-4", "conv-dcgan", "conv-odd-2out", "resnet", "resnet-odd-2out"])
@pytest.mark.parametrize("use", ["out", "grad_x"])
def test_one_output_used(name, use, gen):
    """A loss of only one output: the other's chain is skipped, the gradients still right (the
    hidden biases get zeros from grad_x alone, as from autograd, so an optimizer steps on them
    alike; the last bias gets None)."""
    _, critic, shape = make(name, torch.float64)
    x = rand(shape, torch.float64, gen)
    grads = []
    for fn in (critic.forward_with_input_grad, lambda x: layer_by_layer(critic, x)):
        out, grad_x = fn(x)
        loss = (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum() if use == "out" \
            else grad_x.pow(2).sum()
        grads.append(torch.autograd.grad(loss, list(critic.parameters()), allow_unused=True))
    for a, e in zip(*grads):  # zeros where the chain gives zeros (the biases, from grad_x)
        if e is None:
            assert a is None
        else:
            torch.testing.assert_close(a, e, **tol(torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CRITICS))
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
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name} d loss / d {n}: {m}")


@pytest.mark.parametrize("name", ["mlp-leaky-4", "conv-dcgan", "resnet"])
def test_gp_step_matches_double_backward(name, gen):
    """WGAN-GP: the penalty at interpolates (the node's grad_x alone), the loss on a plain forward
    of real and fake; float64, against autograd's double backward at the same points."""
    module, critic, shape = make(name, torch.float64)
    real, fake = rand(shape, torch.float64, gen), rand(shape, torch.float64, gen)
    loss, _ = wk.critic_loss(critic, real, fake, penalty="gp", generator=torch.Generator().manual_seed(5))
    loss.backward()
    ours = [p.grad.clone() for p in critic.parameters()]
    module.zero_grad()  # the two share their parameters
    xi = wk.sample_penalty_points(real, fake, "interpolate", torch.Generator().manual_seed(5)).requires_grad_()
    (gi,) = torch.autograd.grad(module(xi).sum(), xi, create_graph=True)
    ref = module(fake).mean() - module(real).mean() + 10.0 * (gi.flatten(1).norm(dim=1) - 1).pow(2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-7, atol=1e-8)  # the penalty kernel's safe norm (eps)
    for (n, p), a in zip(module.named_parameters(), ours):
        torch.testing.assert_close(a, p.grad, rtol=1e-7, atol=1e-8, msg=lambda m: f"{name} d loss / d {n}: {m}")


@pytest.mark.parametrize("name", ["mlp-leaky-4", "conv-dcgan", "resnet"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(name, dtype, gen):
    """float16/bfloat16: error vs float64 <= 2x the layer-by-layer chain's own error + atol, for
    the outputs and for the parameter gradients of a loss of both."""
    _, critic64, shape = make(name, torch.float64)
    _, critic_low, _ = make(name, dtype)
    x = rand(shape, torch.float64, gen).to(dtype)

    def run(critic, fn, x):
        out, grad_x = fn(x)
        return (out, grad_x, *torch.autograd.grad(_loss_of_both(out, grad_x, seed=3), list(critic.parameters())))

    truth = run(critic64, critic64.forward_with_input_grad, x.double())
    ours = run(critic_low, critic_low.forward_with_input_grad, x)
    chain = run(critic_low, lambda x: layer_by_layer(critic_low, x), x)
    names = ["out", "grad_x"] + [n for n, _ in critic_low.named_parameters()]
    for what, t, o, c in zip(names, truth, ours, chain):
        assert o.dtype == dtype
        scale = t.abs().max().item()
        err, chain_err = (o.double() - t).abs().max().item(), (c.double() - t).abs().max().item()
        assert err <= 2 * chain_err + tol(dtype)["atol"] * max(scale, 1.0), f"{what} {dtype}: {err:.3g} vs {chain_err:.3g}"


@pytest.mark.parametrize("critic_and_shape", [
    ("mlp-mixed-slopes-3out", (3, 4)),
    (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, 2, 1), nn.LeakyReLU(0.3), nn.Conv2d(3, 1, 3, 1, 0), nn.Flatten()),
     (2, 2, 5, 5)),
    (lambda: wn.Sequential(wn.Residual(wn.Sequential(wn.Conv2d(2, 2, 3, 1, 1), wn.ReLU(), wn.AvgPool2d(2)),
                                       wn.AvgPool2d(2)), wn.LeakyReLU(0.2), wn.Flatten(), wn.Linear(8, 1)),
     (2, 2, 4, 4)),
], ids=["mlp-3out", "conv-1out", "resnet-1out"])
def test_gradcheck(critic_and_shape, gen):
    """(out, grad_x) as a function of (x, parameters) on the one-node path, float64, finite
    differences: the fused backward (one output per sample) and the separate loss chain."""
    spec, shape = critic_and_shape
    if isinstance(spec, str):
        _, critic, _ = make(spec, torch.float64)
    else:
        torch.manual_seed(0)
        critic = wn.from_torch(spec().double())
    wrapper = BothOutputs(critic)
    x = rand(shape, torch.float64, gen).requires_grad_()
    names = [n for n, _ in wrapper.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in wrapper.parameters()]

    def f(x, *values):
        out, grad_x = torch.func.functional_call(wrapper, dict(zip(names, values)), (x,))
        assert type(out.grad_fn).__name__ == "_PiecewiseLinearChainBackward"
        return out, grad_x

    assert torch.autograd.gradcheck(f, (x, *values))


def test_double_backward_is_refused(gen):
    _, critic, shape = make("mlp-leaky-4", torch.float64)
    out, grad_x = critic.forward_with_input_grad(rand(shape, torch.float64, gen))
    (g,) = torch.autograd.grad(grad_x.pow(2).sum(), critic[0].weight, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_falls_back_where_it_does_not_apply(gen, monkeypatch):
    """Other critics, inputs and modes are not planned (they take the layer-by-layer chain)."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, generator=gen)
    img = torch.randn(2, 3, 8, 8, generator=gen)
    cases = {
        "smooth activation": (wn.Sequential(wn.Linear(3, 5), wn.SiLU(), wn.Linear(5, 1)), x),
        "negative slope": (wn.Sequential(wn.Linear(3, 5), wn.LeakyReLU(-0.1), wn.Linear(5, 1)), x),
        "SN layer": (wn.Sequential(wn.SNLinear(3, 5), wn.LeakyReLU(0.2), wn.Linear(5, 1)), x),
        "no affine layer": (wn.Sequential(wn.ReLU()), x),
        "reflect padding": (wn.Sequential(wn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect")), img),
        "smooth activation in a residual": (wn.Sequential(wn.Residual(wn.Sequential(wn.Conv2d(3, 3, 3, padding=1),
                                                                                   wn.Tanh()))), img),
        "pooling a 2-D input": (wn.Sequential(wn.Linear(3, 4), wn.AvgPool2d(2)), x),
        "linear on 4-D": (wn.Sequential(wn.Linear(8, 1)), img),
        "conv on 2-D": (wn.Sequential(wn.Conv2d(3, 1, 1)), x),
        "unbatched conv": (wn.Sequential(wn.Conv2d(3, 1, 3)), img[0]),
        "batch flattened away": (wn.Sequential(wn.Linear(3, 1), wn.Flatten(0)), x),
    }
    for what, (critic, inp) in cases.items():
        assert _chain.plan(critic, inp) is None, what
    bad = wn.Sequential(wn.Residual(wn.Conv2d(3, 3, 3)))  # branches of different sizes: torch's own error
    for fn in (bad, bad.forward_with_input_grad, lambda x: layer_by_layer(bad, x)):
        with pytest.raises(RuntimeError, match="size"):
            fn(img)
    _, critic, _ = make("mlp-leaky-4", torch.float32)
    assert _chain.plan(critic, x.reshape(2, 2, 3)) is None  # 3-D input to a Linear
    assert _chain.plan(critic, x.double()) is None  # dtype differs from the weights'
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _chain.plan(critic, x) is None
    for forced in ("reference", "triton"):  # the layer-by-layer chain: aten ops / Triton mask kernels
        monkeypatch.setenv("WGAN_KERNELS_BACKEND", forced)
        assert _chain.plan(critic, x) is None
    monkeypatch.delenv("WGAN_KERNELS_BACKEND")
    assert _chain.plan(critic, x) is not None


def test_bad_input_still_named(gen):
    _, critic, _ = make("mlp-leaky-4", torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        critic.forward_with_input_grad(torch.randn(7, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point"):
        critic.forward_with_input_grad(torch.ones(7, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        critic.forward_with_input_grad(torch.randn(0, 3))


def test_conv_chain_runs_channels_last_on_cpu_and_returns_the_callers_layout():
    """On CPU the one-node chain runs 2-D convolutions in channels_last (oneDNN is faster there);
    what it hands back is in the caller's layout: grad_x of an NCHW input is contiguous (user code
    does grad.view(n, -1)), a channels_last input keeps its layout, and the parameters' gradients
    are stored in the parameters' layout; the values are the NCHW chain's."""
    torch.manual_seed(0)
    critic = wn.Sequential(wn.Conv2d(3, 4, 3, 2, 1), wn.LeakyReLU(0.2), wn.Conv2d(4, 2, 3, 1, 1), wn.ReLU(),
                           wn.Flatten(), wn.Linear(2 * 4 * 4, 1))
    x = torch.randn(5, 3, 7, 8, requires_grad=True)
    out, grad_x = critic.forward_with_input_grad(x)
    assert grad_x.is_contiguous() and grad_x.view(5, -1).shape == (5, 3 * 7 * 8)
    (out.sum() + grad_x.square().sum()).backward()
    assert all(p.grad.is_contiguous() for p in critic.parameters())
    ref = torch.autograd.grad(critic(x).sum(), x, create_graph=True)[0]
    torch.testing.assert_close(grad_x, ref)
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    out_cl, grad_cl = critic.forward_with_input_grad(x_cl)
    assert grad_cl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(grad_cl, grad_x)
    torch.testing.assert_close(out_cl, out)



def test_gp_loss_forward_takes_channels_last_samples_on_cpu():
    """WGAN-GP's loss forward (critic(cat(real, fake)), apart from the penalty's chain) gets the
    samples in channels_last when the chain runs the critic's convolutions in it (2 CPU threads,
    DCGAN-64 critic step: 756 -> 685 ms); the loss and every gradient stay those of autograd's
    double backward on the torch critic. A critic without 2-D convolutions is left as it is."""
    torch.manual_seed(0)
    torch_critic = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 4, 2, 1), torch.nn.LeakyReLU(0.2),
                                       torch.nn.Conv2d(6, 8, 4, 2, 1), torch.nn.LeakyReLU(0.2),
                                       torch.nn.Flatten(), torch.nn.Linear(8 * 2 * 2, 1))
    critic = wn.from_torch(copy.deepcopy(torch_critic))
    layouts = []
    critic[0].register_forward_pre_hook(
        lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                       and not args[0].is_contiguous()))
    real, fake = torch.randn(5, 3, 8, 8), torch.randn(5, 3, 8, 8)
    loss, _ = wk.critic_loss(critic, real, fake, penalty="gp", generator=torch.Generator().manual_seed(0))
    loss_r, _ = wk.critic_loss(lambda v: torch_critic(v), real, fake, penalty="gp",
                               generator=torch.Generator().manual_seed(0))
    assert layouts == [True]
    torch.testing.assert_close(loss, loss_r)
    loss.backward()
    loss_r.backward()
    for p, q in zip(critic.parameters(), torch_critic.parameters()):
        assert p.grad.is_contiguous()
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)
    mlp = wn.from_torch(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 1)))
    assert not mlp.channels_last_for(real) and critic.channels_last_for(real)
    # one channel (MNIST): contiguous(memory_format=channels_last) keeps NCHW strides there, which
    # a convolution with NCHW weights runs in NCHW; the samples get channels_last strides
    gray = wn.from_torch(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 4, 2, 1), torch.nn.ReLU(), torch.nn.Flatten(),
                                             torch.nn.Linear(4 * 4 * 4, 1)))
    strides = []
    gray[0].register_forward_pre_hook(lambda m, args: strides.append(args[0].stride()))
    wk.critic_loss(gray, torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), penalty="gp")
    assert strides == [(64, 1, 8, 1)]

def _program(critic, x):
    """The one-node program of a ``wgan_kernels.nn`` critic or a traced torch module on ``x``."""
    if isinstance(critic, wn.Sequential):
        return _chain.plan(critic, x)[0]
    from wgan_kernels.nn.trace import _bind

    program = critic.program(x, (), {})
    _bind(critic.critic, program, x, (), {})
    return _chain.plan_root(program.graph_op, x)[0]


def _owned(program):
    """What the program lets each leaf overwrite: [(op class name, sorted kinds)] in slot order."""
    return [(type(op).__name__, sorted(program.own.get(op.slot, ())))
            for op in sorted(program.root.leaves(), key=lambda op: op.slot)]


def test_hand_over_lets_an_op_overwrite_only_what_is_its_alone():
    """The chain works in place (fewer fresh buffers: on CPU every buffer of 32 MB or more is
    fresh pages at each allocation) exactly where nothing else reads the tensor: an activation
    on an affine op's output (its forward and tangent: "fwd") and on the input gradient of an
    affine op after it ("grad"), an affine op on the tangent an op before it made ("psi").
    Never on the chain's input, on a value two ops read (a residual's input), through a reshape
    or at a graph value that is also summed."""
    dcgan = wn.from_torch(CRITICS["conv-dcgan"][0]())
    x = torch.randn(2, 3, 16, 16)
    assert _owned(_program(dcgan, x)) == [
        ("Conv2dOp", []), ("LeakyReLUOp", ["fwd", "grad"]), ("Conv2dOp", ["psi"]), ("LeakyReLUOp", ["fwd", "grad"]),
        ("Conv2dOp", ["psi"]), ("FlattenOp", [])]
    first = wn.from_torch(CRITICS["mlp-activation-first-and-last"][0]())
    assert _owned(_program(first, torch.randn(2, 4))) == [
        ("LeakyReLUOp", ["grad"]), ("LinearOp", ["psi"]), ("ReLUOp", ["fwd"])]
    resnet = wn.from_torch(CRITICS["resnet"][0]())  # the second block's first ReLU reads the block's input
    owned = _owned(_program(resnet, torch.randn(2, 3, 8, 8)))
    assert owned[:8] == [
        ("Conv2dOp", []), ("ReLUOp", ["fwd", "grad"]), ("Conv2dOp", ["psi"]), ("AvgPool2dOp", []),
        ("AvgPool2dOp", []), ("Conv2dOp", []), ("ReLUOp", ["grad"]), ("Conv2dOp", ["psi"])]

    class Shared(nn.Module):  # a conv output read by the activation and by a sum
        def __init__(self):
            super().__init__()
            self.conv, self.out = nn.Conv2d(3, 4, 3, 1, 1), nn.Linear(4 * 6 * 6, 1)

        def forward(self, x):
            h = self.conv(x)
            return self.out((F.leaky_relu(h, 0.2) + h).view(x.shape[0], -1))

    traced = wn.from_torch(Shared())
    assert [k for _, k in _owned(_program(traced, torch.randn(2, 3, 6, 6)))] == [[], [], [], []]


def _step_grads(critic, real, fake, loss):
    critic.zero_grad(set_to_none=True)
    x = real.clone().requires_grad_()
    total, _ = wk.critic_loss(critic, x, fake, penalty=loss, generator=torch.Generator().manual_seed(3))
    total.backward()
    return [total.detach(), x.grad] + [p.grad for p in critic.parameters()]


@pytest.mark.parametrize("loss", ["div", "gp"])
@pytest.mark.parametrize("name", ["conv-dcgan", "conv-odd-2out", "conv-then-mlp", "resnet", "resnet-odd-2out",
                                  "mlp-activation-first-and-last", "custom-dcgan", "custom-resnet"])
def test_working_in_place_changes_no_value(name, loss, gen, monkeypatch):
    """The in-place chain gives bit for bit what the chain that allocates every tensor gives: the
    loss, the input's and every parameter's gradient (the same kernels; a tensor overwritten
    while something still reads it would change them)."""
    from wgan_kernels.models import DCGAN64Critic, ResNetCritic

    if name == "custom-dcgan":
        torch.manual_seed(0)
        critic, shape = wn.from_torch(DCGAN64Critic(width=4)), (3, 3, 64, 64)
    elif name == "custom-resnet":
        torch.manual_seed(0)
        critic, shape = wn.from_torch(ResNetCritic(channels=3, resolution=32, width=8)), (3, 3, 32, 32)
    else:
        critic, shape = make(name, torch.float32)[1:]
    real, fake = rand(shape, torch.float32, gen), rand(shape, torch.float32, gen) * 1.3
    _step_grads(critic, real, fake, loss)  # (a traced critic's first GP step runs its loss forward in NCHW)
    in_place = _step_grads(critic, real, fake, loss)
    assert any(_program(critic, real).own.values())
    monkeypatch.setattr(_chain._Tape, "owned", lambda self, slot: ())
    allocating = _step_grads(critic, real, fake, loss)
    for a, b in zip(in_place, allocating):
        assert (a is None) == (b is None)
        assert a is None or torch.equal(a, b)
