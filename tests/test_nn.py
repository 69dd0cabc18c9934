"""wgan_kernels.nn: explicit input gradients against autograd on the torch layers.

Oracle: the torch module itself (its output) and autograd's double-backward path
(``torch.autograd.grad(out.sum(), x, create_graph=True)`` then ``penalty.backward()``).
"""

import pytest
import torch
from conftest import tol
from torch import nn
from torch._dynamo.utils import counters
from torch.func import functional_call

import wgan_kernels.nn as wn


def rand(shape, dtype, gen, contiguous=True, scale=1.0):
    """Random values (never zeros); non-contiguous: the last two dims are transposed in memory."""
    if contiguous:
        t = torch.randn(*shape, generator=gen, dtype=torch.float64)
    else:
        t = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=torch.float64).transpose(-1, -2)
    return (t * scale).to(dtype)


def autograd_input_grad(module, x):
    x = x.detach().requires_grad_()
    out = module(x)
    return out, torch.autograd.grad(out.sum(), x, create_graph=True)[0]


def gp_penalty(grad_x):
    return ((grad_x.flatten(1).norm(dim=1) - 1) ** 2).mean()


# name -> (torch module factory, input shape, input scale)
BLOCKS = {
    "linear": (lambda: nn.Linear(13, 5), (3, 13), 1.0),
    "linear-3d-nobias": (lambda: nn.Linear(13, 5, bias=False), (3, 2, 13), 1.0),
    "conv-3x3-s2": (lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), (3, 3, 5, 7), 1.0),
    "conv-4x4-s2-odd": (lambda: nn.Conv2d(3, 4, 4, 2, 1), (3, 3, 7, 5), 1.0),
    "conv-dilated-groups": (
        lambda: nn.Conv2d(4, 6, 3, stride=(2, 1), padding=(2, 1), dilation=2, groups=2, bias=False),
        (3, 4, 7, 5), 1.0,
    ),
    "conv-same": (lambda: nn.Conv2d(3, 4, 3, padding="same"), (3, 3, 5, 7), 1.0),
    "conv-unbatched": (lambda: nn.Conv2d(3, 4, 3, stride=2), (3, 5, 7), 1.0),
    "leaky-relu": (lambda: nn.LeakyReLU(0.2), (3, 13), 1.0),
    "relu": (lambda: nn.ReLU(), (3, 2, 5, 7), 1.0),
    "softplus": (lambda: nn.Softplus(beta=2.0, threshold=5.0), (3, 13), 3.0),  # some beta*x > threshold
    "elu": (lambda: nn.ELU(alpha=0.7), (3, 13), 2.0),
    "silu": (lambda: nn.SiLU(), (3, 13), 2.0),
    "tanh": (lambda: nn.Tanh(), (3, 13), 1.5),
    "avgpool": (lambda: nn.AvgPool2d(2), (3, 2, 5, 7), 1.0),
    "avgpool-pad-ceil-exclude": (
        lambda: nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
        (3, 2, 5, 7), 1.0,
    ),
    "avgpool-divisor": (lambda: nn.AvgPool2d((2, 3), stride=(1, 2), divisor_override=4), (3, 2, 5, 7), 1.0),
    "flatten": (lambda: nn.Flatten(), (3, 2, 5, 7), 1.0),
}


def make_block(name, dtype, seed=0):
    factory, shape, scale = BLOCKS[name]
    torch.manual_seed(seed)
    module = factory().to(dtype)
    return module, wn.from_torch(module), shape, scale


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_matches_torch(name, dtype, contiguous, gen):
    """(1) out equals the torch layer's output; (2) grad_x equals autograd's input gradient."""
    module, block, shape, scale = make_block(name, dtype)
    x = rand(shape, dtype, gen, contiguous, scale)
    out, grad_x = block.forward_with_input_grad(x)
    ref_out, ref_grad = autograd_input_grad(module, x)
    msg = lambda what: f"{name} {what}, shape {shape}, {dtype}, contiguous={contiguous}"  # noqa: E731
    torch.testing.assert_close(out, ref_out, **tol(dtype), msg=msg("out"))
    torch.testing.assert_close(block(x), ref_out, **tol(dtype), msg=msg("forward"))
    assert grad_x.shape == x.shape
    torch.testing.assert_close(grad_x, ref_grad, **tol(dtype), msg=msg("grad_x"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(BLOCKS))
def test_block_low_precision(name, dtype, gen):
    """float16/bfloat16: error vs float64 truth <= 2x the torch layer's own low-precision error + atol."""
    module64, _, shape, scale = make_block(name, torch.float64)
    module_low, block_low, _, _ = make_block(name, dtype)
    x64 = rand(shape, torch.float64, gen, contiguous=False, scale=scale).to(dtype).double()
    true_out, true_grad = autograd_input_grad(module64, x64)
    torch_out, torch_grad = autograd_input_grad(module_low, x64.to(dtype))
    out, grad_x = block_low.forward_with_input_grad(x64.to(dtype))
    assert out.dtype == grad_x.dtype == dtype
    atol = tol(dtype)["atol"]
    for what, ours, theirs, truth in (("out", out, torch_out, true_out), ("grad_x", grad_x, torch_grad, true_grad)):
        err = (ours.double() - truth).abs().max().item()
        torch_err = (theirs.double() - truth).abs().max().item()
        assert err <= 2 * torch_err + atol, f"{name} {what} {dtype}: error {err:.3g} vs torch's {torch_err:.3g}"


# ----------------------------------------------------------------------------------------------
# Critics: outputs, input gradients and the penalty's parameter gradients
# ----------------------------------------------------------------------------------------------


def mlp_leaky():
    return nn.Sequential(nn.Linear(13, 16), nn.LeakyReLU(0.2), nn.Linear(16, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))


def mlp_smooth():
    return nn.Sequential(
        nn.Linear(13, 16), nn.Softplus(beta=2.0), nn.Linear(16, 16), nn.ELU(),
        nn.Sequential(nn.Linear(16, 8), nn.SiLU(), nn.Linear(8, 8), nn.Tanh()),  # nested
        nn.Linear(8, 1),
    )


def dcgan_small():
    # 9x7 -> 4x3 -> 2x1
    return nn.Sequential(
        nn.Conv2d(3, 4, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 8, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Flatten(), nn.Linear(16, 1),
    )


def resnet_small():
    """Conv, a downsampling residual block (AvgPool2d on both branches), a plain one, head."""
    down = wn.Residual(
        wn.Sequential(wn.ReLU(), wn.Conv2d(4, 4, 3, 1, 1), wn.ReLU(), wn.Conv2d(4, 4, 3, 1, 1), wn.AvgPool2d(2)),
        shortcut=wn.Sequential(wn.AvgPool2d(2), wn.Conv2d(4, 4, 1)),
    )
    plain = wn.Residual(wn.Sequential(wn.ReLU(), wn.Conv2d(4, 4, 3, 1, 1), wn.SiLU(), wn.Conv2d(4, 4, 3, 1, 1)))
    # 5x7 -> 2x3
    return wn.Sequential(wn.Conv2d(3, 4, 3, 1, 1), down, plain, wn.ReLU(), wn.Flatten(), wn.Linear(24, 1))


CRITICS = {
    "mlp-leaky": (mlp_leaky, (3, 13)),
    "mlp-smooth": (mlp_smooth, (3, 13)),
    "dcgan": (dcgan_small, (3, 3, 9, 7)),
    "resnet-avgpool": (resnet_small, (3, 3, 5, 7)),
}


def param_grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("critic_name", list(CRITICS))
def test_critic_penalty_gradients(critic_name, dtype, gen):
    """(1)-(3) for whole critics: the penalty (+ a critic-loss term) gives the parameter gradients
    of autograd's double-backward path on the reference module."""
    factory, shape = CRITICS[critic_name]
    torch.manual_seed(0)
    reference = factory().to(dtype)  # a torch nn.Sequential, or a wgan_kernels model (own forward)
    critic = wn.from_torch(reference)
    params = list(critic.parameters())
    assert all(p is q for p, q in zip(params, reference.parameters()))
    x = rand(shape, dtype, gen, contiguous=False)

    ref_out, ref_grad = autograd_input_grad(reference, x)
    (10 * gp_penalty(ref_grad) - ref_out.mean()).backward()
    expected = param_grads(params)

    critic.zero_grad()
    out, grad_x = critic.forward_with_input_grad(x)
    (10 * gp_penalty(grad_x) - out.mean()).backward()
    actual = param_grads(params)

    msg = lambda what: f"{critic_name} {what}, {dtype}"  # noqa: E731
    torch.testing.assert_close(out, ref_out, **tol(dtype), msg=msg("out"))
    torch.testing.assert_close(grad_x, ref_grad, **tol(dtype), msg=msg("grad_x"))
    rtol, atol = tol(dtype)["rtol"] * 10, tol(dtype)["atol"] * 10  # two backward passes deep
    for (name, _), a, e in zip(critic.named_parameters(), actual, expected):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=msg(f"d penalty / d {name}"))


# ----------------------------------------------------------------------------------------------
# gradcheck: grad_x as a function of (x, parameters), float64
# ----------------------------------------------------------------------------------------------


class _InputGradOf(nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block.forward_with_input_grad(x)[1]


GRADCHECK = {
    "linear": (lambda: wn.Linear(5, 4), (3, 5), ["weight"]),
    "conv": (lambda: wn.Conv2d(2, 3, 3, stride=2, padding=1, groups=1), (2, 2, 5, 4), ["weight"]),
    "linear-softplus": (lambda: wn.Sequential(wn.Linear(5, 4), wn.Softplus(beta=1.5)), (3, 5), ["0.weight", "0.bias"]),
    "linear-elu": (lambda: wn.Sequential(wn.Linear(5, 4), wn.ELU(0.7)), (3, 5), ["0.weight", "0.bias"]),
    "linear-silu": (lambda: wn.Sequential(wn.Linear(5, 4), wn.SiLU()), (3, 5), ["0.weight", "0.bias"]),
    "conv-tanh-pool": (
        lambda: wn.Sequential(wn.Conv2d(2, 2, 3, padding=1, groups=2), wn.Tanh(), wn.AvgPool2d(2)),
        (2, 2, 5, 4), ["0.weight", "0.bias"],
    ),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck_input_grad(name, gen):
    """(4) grad_x is differentiable, correctly, in x and in the parameters."""
    factory, shape, names = GRADCHECK[name]
    torch.manual_seed(0)
    wrapper = _InputGradOf(factory().double())
    x = rand(shape, torch.float64, gen).requires_grad_()
    values = [wrapper.block.get_parameter(n).detach().clone().requires_grad_() for n in names]

    def grad_x_of(x, *values):
        return functional_call(wrapper, {f"block.{n}": v for n, v in zip(names, values)}, (x,))

    assert torch.autograd.gradcheck(grad_x_of, (x, *values))


# ----------------------------------------------------------------------------------------------
# from_torch, supports_input_grad, state dicts, bad input
# ----------------------------------------------------------------------------------------------


def test_from_torch_shares_parameters(gen):
    """(5) same Parameter objects and state_dict keys; an optimizer on the torch model trains
    the converted one; a fresh block loads the torch state_dict."""
    torch_model = mlp_smooth()
    critic = wn.from_torch(torch_model)
    assert isinstance(critic, wn.Sequential) and isinstance(critic[4], wn.Sequential)
    pairs = list(zip(torch_model.parameters(), critic.parameters()))
    assert len(pairs) == 10 and all(p is q for p, q in pairs)
    assert list(critic.state_dict()) == list(torch_model.state_dict())

    x = rand((3, 13), torch.float32, gen)
    before = critic(x).detach()
    opt = torch.optim.SGD(torch_model.parameters(), lr=0.1)
    torch_model(x).sum().backward()
    opt.step()
    torch.testing.assert_close(critic(x), torch_model(x), **tol(torch.float32))
    assert not torch.allclose(critic(x), before)

    fresh = wn.Sequential(wn.Conv2d(3, 4, 4, 2, 1), wn.LeakyReLU(0.2), wn.Conv2d(4, 8, 4, 2, 1), wn.LeakyReLU(0.2),
                          wn.Flatten(), wn.Linear(16, 1))
    torch_dcgan = dcgan_small()
    fresh.load_state_dict(torch_dcgan.state_dict())
    x = rand((3, 3, 9, 7), torch.float32, gen)
    torch.testing.assert_close(fresh(x), torch_dcgan(x), **tol(torch.float32))


@pytest.mark.parametrize(
    "model,match",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.BatchNorm1d(4)), r"module\[3\]: BatchNorm1d"),
        (nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.MaxPool1d(2))), r"module\[0\]\[1\]: MaxPool1d"),
        (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")), r"module\[0\]: .*padding_mode='reflect'"),
        (nn.Sequential(nn.Conv2d(3, 4, 4, padding="same")), r"module\[0\]: .*padding='same'"),
        (nn.Sequential(torch.nn.utils.parametrizations.orthogonal(nn.Linear(4, 4))), r"module\[0\]: ParametrizedLinear"),
        (nn.Sequential(torch.nn.utils.parametrizations.spectral_norm(nn.Linear(4, 4), dim=1)), r"module\[0\]: .*dim=1"),
        (nn.Sequential(nn.Upsample(scale_factor=2)), r"module\[0\]: Upsample"),
    ],
    ids=["batchnorm", "nested-maxpool", "reflect-padding", "same-even-kernel", "orthogonal", "spectral-norm-dim1",
         "upsample"],
)
def test_from_torch_rejects_unsupported(model, match):
    with pytest.raises(ValueError, match=match):
        wn.from_torch(model)


def test_supports_input_grad():
    assert wn.supports_input_grad(wn.from_torch(dcgan_small()))
    assert wn.supports_input_grad(resnet_small())
    assert not wn.supports_input_grad(dcgan_small())  # torch modules have no explicit path
    assert not wn.supports_input_grad(nn.Linear(3, 3))
    mixed = wn.Sequential(wn.Linear(3, 3), nn.ReLU())
    assert not wn.supports_input_grad(mixed)
    with pytest.raises(ValueError, match=r"module\[1\]: ReLU is not supported"):
        mixed.forward_with_input_grad(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"module.body\[0\]: Dropout"):
        wn.Residual(wn.Sequential(nn.Dropout())).forward_with_input_grad(torch.randn(2, 3))


def test_bad_input():
    critic = wn.from_torch(mlp_leaky())
    with pytest.raises(ValueError, match="x must have a floating-point dtype"):
        critic.forward_with_input_grad(torch.ones(3, 13, dtype=torch.int64))
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):
        critic.forward_with_input_grad([[1.0] * 13])
    with pytest.raises(ValueError, match="x is empty"):
        critic.forward_with_input_grad(torch.randn(0, 13))
    with pytest.raises(ValueError, match="x .*weight"):
        critic.forward_with_input_grad(torch.randn(3, 13, dtype=torch.float64))


class _RecordingHook:
    def __init__(self, log, tag):
        self.log, self.tag = log, tag

    def before(self, module, args):
        self.log.append((self.tag, "before", type(module).__name__, args[0].shape))

    def after(self, module, args, output):
        self.log.append((self.tag, "after", type(module).__name__, output))


def test_input_grad_hooks_run_around_forward_with_input_grad(gen):
    critic = wn.from_torch(mlp_leaky())
    x = torch.randn(3, 13, generator=gen)
    expected = critic.forward_with_input_grad(x)  # no hooks: the one-node chain where it applies
    assert critic._input_grad_hooks == ()
    log = []
    critic.register_input_grad_hook(_RecordingHook(log, "a"))
    critic.register_input_grad_hook(_RecordingHook(log, "b"))
    out, grad_x = critic.forward_with_input_grad(x)  # with hooks: the layer-by-layer path
    torch.testing.assert_close(out, expected[0], msg=lambda m: f"forward_with_input_grad with hooks, out: {m}")
    torch.testing.assert_close(grad_x, expected[1], msg=lambda m: f"forward_with_input_grad with hooks, grad: {m}")
    shape = torch.Size([3, 13])
    assert log == [("a", "before", "Sequential", shape), ("b", "before", "Sequential", shape),
                   ("a", "after", "Sequential", None), ("b", "after", "Sequential", None)], log
    log.clear()
    with pytest.raises(ValueError, match="x .*weight"):  # after runs when the forward raises
        critic.forward_with_input_grad(torch.randn(3, 13, dtype=torch.float64))
    assert [entry[:2] for entry in log] == [("a", "before"), ("b", "before"), ("a", "after"), ("b", "after")], log
    assert type(critic)._input_grad_hooks == (), "hooks must be per instance"
    with pytest.raises(ValueError, match="hook: expected an object with before"):
        critic.register_input_grad_hook(lambda module, args: None)


# ----------------------------------------------------------------------------------------------
# torch.compile: a whole WGAN-GP critic step
# ----------------------------------------------------------------------------------------------


def test_compiled_critic_step(gen):
    """(6) forward_with_input_grad + WGAN-GP penalty + critic loss + .backward() under
    torch.compile(backend="inductor") gives the eager double-backward path's gradients."""
    torch.manual_seed(0)
    torch_critic = nn.Sequential(nn.Linear(2, 8), nn.LeakyReLU(0.2), nn.Linear(8, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    critic = wn.from_torch(torch_critic)
    real, fake = rand((5, 2), torch.float32, gen), rand((5, 2), torch.float32, gen)
    eps = torch.rand(5, 1, generator=gen)

    def critic_step(real, fake, eps):
        x = eps * real + (1 - eps) * fake
        _, grad_x = critic.forward_with_input_grad(x)
        loss = critic(fake).mean() - critic(real).mean() + 10 * gp_penalty(grad_x)
        loss.backward()
        return loss.detach()

    torch._dynamo.reset()
    counters.clear()
    loss = torch.compile(critic_step, backend="inductor")(real, fake, eps)
    compiled_grads = param_grads(critic.parameters())
    # Everything up to loss.backward() is one graph: the only graph break is backward() itself.
    assert counters["graph_break"] and all("backward" in reason for reason in counters["graph_break"])

    torch_critic.zero_grad()
    x = (eps * real + (1 - eps) * fake).requires_grad_()
    grad_x = torch.autograd.grad(torch_critic(x).sum(), x, create_graph=True)[0]
    ref_loss = torch_critic(fake).mean() - torch_critic(real).mean() + 10 * gp_penalty(grad_x)
    ref_loss.backward()

    torch.testing.assert_close(loss, ref_loss.detach(), **tol(torch.float32), msg="compiled critic loss")
    for (name, p), g in zip(torch_critic.named_parameters(), compiled_grads):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-5, msg=f"compiled d loss / d {name}")
