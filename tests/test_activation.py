"""Activation masks of the explicit chain: the Triton kernels (CPU interpreter here, CUDA on a GPU)
against the plain-PyTorch references, their derivatives, and the wgan_kernels.nn blocks on the mask
path (bias fused into the activation after a Conv2d) against the aten path."""

import pytest
import torch
from conftest import DEVICES, tol
from test_nn import dcgan_small, gp_penalty, mlp_leaky, rand, resnet_small

import wgan_kernels.nn as wn
from wgan_kernels._backend import available, layer_activation
from wgan_kernels.ops import activation as act
from wgan_kernels.ops.activation import (leaky_relu_with_mask, leaky_relu_with_mask_reference, masked_scale,
                                         masked_scale_reference)


def cases():
    """(device, dtype) pairs where the Triton backend runs; the interpreter has no bfloat16."""
    out = []
    for device in DEVICES:
        if not available("triton", device):
            continue
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            if device == "cpu" and dtype == torch.bfloat16:
                continue
            out.append((device, dtype))
    return out


CASES = cases()
needs_triton = pytest.mark.skipif(not CASES, reason="Triton cannot run here (no CUDA, no TRITON_INTERPRET=1)")
SHAPES = [(3, 5), (2, 3, 5, 7), (4, 3, 7)]


def away_from_zero(shape, gen, dtype, device, margin=0.05):
    """Random values with |x| >= margin (the mask must not depend on rounding)."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = x.sign() * (x.abs() + margin)
    return x.to(device=device, dtype=dtype)


@needs_triton
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("device,dtype", CASES, ids=str)
def test_leaky_relu_with_mask_matches_reference(device, dtype, shape, slope, with_bias, contiguous, gen):
    x = rand(shape, torch.float64, gen, contiguous=contiguous).to(device=device, dtype=dtype)
    assert contiguous == x.is_contiguous()
    bias = (torch.randn(shape[1], generator=gen, dtype=torch.float64) * 0.5).to(device=device, dtype=dtype)
    bias = bias if with_bias else None
    grad_y = rand(shape, torch.float64, gen).to(device=device, dtype=dtype)

    def run(fn):
        xi = x.detach().clone().requires_grad_()
        bi = None if bias is None else bias.detach().clone().requires_grad_()
        y, mask = fn(xi, slope, bi)
        y.backward(grad_y)
        return y, mask, xi.grad, None if bi is None else bi.grad

    y, mask, gx, gb = run(lambda x_, s, b: leaky_relu_with_mask(x_, s, b, backend="triton"))
    ry, rmask, rgx, rgb = run(leaky_relu_with_mask_reference)
    assert mask.dtype == torch.bool and mask.shape == x.shape
    assert torch.equal(mask, rmask)
    assert 0 < mask.sum() < mask.numel()  # both branches exercised
    torch.testing.assert_close(y, ry, **tol(dtype))
    torch.testing.assert_close(gx, rgx, **tol(dtype))
    if with_bias:
        rtol, atol = tol(dtype)["rtol"], tol(dtype)["atol"] * shape[0] * x[0, 0].numel()
        torch.testing.assert_close(gb, rgb, rtol=rtol, atol=atol)


@needs_triton
@pytest.mark.parametrize("slope", [0.0, 0.2])
@pytest.mark.parametrize("device,dtype", CASES, ids=str)
def test_masked_scale_matches_reference_to_second_order(device, dtype, slope, gen):
    shape = (3, 2, 5, 7)
    g = rand(shape, torch.float64, gen, contiguous=False).to(device=device, dtype=dtype)
    mask = rand(shape, torch.float64, gen).to(device) > 0
    outer = rand(shape, torch.float64, gen).to(device=device, dtype=dtype)

    def run(fn):
        gi, oi = g.detach().clone().requires_grad_(), outer.detach().clone().requires_grad_()
        out = fn(gi, mask, slope)
        (first,) = torch.autograd.grad((out * oi).sum(), gi, create_graph=True)  # masked_scale(outer)
        (second,) = torch.autograd.grad((first * first).sum(), oi)  # through the backward's backward
        return out, first, second

    out, first, second = run(lambda g_, m, s: masked_scale(g_, m, s, backend="triton"))
    rout, rfirst, rsecond = run(masked_scale_reference)
    torch.testing.assert_close(out, rout, **tol(dtype))
    torch.testing.assert_close(first, rfirst, **tol(dtype))
    torch.testing.assert_close(second, rsecond, **tol(dtype))
    assert first.requires_grad  # the backward is itself differentiable


@needs_triton
def test_gradcheck_float64(gen):
    device = CASES[0][0]
    x = away_from_zero((3, 4, 3, 2), gen, torch.float64, device, margin=0.5).requires_grad_()
    bias = (torch.rand(4, generator=gen, dtype=torch.float64) * 0.4 - 0.2).to(device).requires_grad_()
    mask = rand((3, 4, 3, 2), torch.float64, gen).to(device) > 0
    g = rand((3, 4, 3, 2), torch.float64, gen).to(device).requires_grad_()

    assert torch.autograd.gradcheck(lambda x_, b: leaky_relu_with_mask(x_, 0.2, b, backend="triton")[0], (x, bias))
    assert torch.autograd.gradcheck(lambda g_: masked_scale(g_, mask, 0.3, backend="triton"), (g,))
    assert torch.autograd.gradgradcheck(lambda g_: masked_scale(g_, mask, 0.3, backend="triton"), (g,))


@pytest.mark.parametrize("call,match", [
    (lambda x, m: leaky_relu_with_mask(x.long(), 0.2), "x: expected a floating-point"),
    (lambda x, m: leaky_relu_with_mask(x, float("nan")), "negative_slope"),
    (lambda x, m: leaky_relu_with_mask(x, 0.2, torch.ones(4)), r"bias: expected shape \(3,\)"),
    (lambda x, m: leaky_relu_with_mask(x, 0.2, torch.ones(3, dtype=torch.float64)), "bias: expected x's dtype"),
    (lambda x, m: leaky_relu_with_mask(x[0, 0, 0], 0.2, torch.ones(1)), "bias: needs x of shape"),
    (lambda x, m: leaky_relu_with_mask(x[:0], 0.2), "x: expected a non-empty"),
    (lambda x, m: leaky_relu_with_mask(x, 0.2, backend="cpp"), "backend"),
    (lambda x, m: masked_scale(x, m.float(), 0.2), "mask: expected a torch.bool"),
    (lambda x, m: masked_scale(x, m[:1], 0.2), "mask: expected the shape of g"),
    (lambda x, m: masked_scale(x, "m", 0.2), "mask: expected a tensor"),
    (lambda x, m: masked_scale(x.int(), m, 0.2), "g: expected a floating-point"),
])
def test_bad_input_names_the_argument(call, match, gen):
    x = rand((2, 3, 4, 5), torch.float32, gen)
    with pytest.raises(ValueError, match=match):
        call(x, x > 0)


# ----------------------------------------------------------------------------------------------
# The blocks on the mask path (what a CUDA run takes by default) against the aten path
# ----------------------------------------------------------------------------------------------


def test_cpu_default_keeps_aten_kernels(monkeypatch):
    monkeypatch.delenv("WGAN_KERNELS_BACKEND", raising=False)
    assert layer_activation(torch.device("cpu")) == "reference"
    monkeypatch.setenv("WGAN_KERNELS_BACKEND", "cpp")  # forcing another op's backend keeps aten here
    assert layer_activation(torch.device("cpu")) == "reference"


def count_calls(monkeypatch):
    calls = {"lrelu": 0, "lrelu+bias": 0, "scale": 0}
    lrelu, scale = act._LeakyReLUWithMask.apply, act._MaskedScale.apply

    def counted_lrelu(x, bias, slope):
        calls["lrelu+bias" if bias is not None else "lrelu"] += 1
        return lrelu(x, bias, slope)

    def counted_scale(g, mask, slope):
        calls["scale"] += 1
        return scale(g, mask, slope)

    monkeypatch.setattr(act._LeakyReLUWithMask, "apply", counted_lrelu)
    monkeypatch.setattr(act._MaskedScale, "apply", counted_scale)
    return calls


# critic -> (factory, input shape, fused bias+activation pairs, activations without a fused bias)
CRITICS = {
    "mlp-leaky": (mlp_leaky, (3, 13), 0, 2),
    "dcgan": (dcgan_small, (3, 3, 9, 7), 2, 0),
    "resnet": (resnet_small, (3, 3, 5, 7), 1, 3),
}


@needs_triton
@pytest.mark.parametrize("critic_name", list(CRITICS))
def test_blocks_on_the_mask_path_match_the_aten_path(critic_name, monkeypatch, gen):
    """Penalty + loss parameter gradients: mask path (Triton kernels, conv bias fused into the
    activation) == the default CPU path (aten kernels on the saved input), float64."""
    factory, shape, n_fused, n_plain = CRITICS[critic_name]
    if not any(d == "cpu" for d, _ in CASES):
        pytest.skip("the CPU comparison needs the Triton interpreter")
    torch.manual_seed(0)
    critic = wn.from_torch(factory()).double()
    x = rand(shape, torch.float64, gen, contiguous=False)

    def step():
        critic.zero_grad()
        out, grad_x = critic.forward_with_input_grad(x)
        (10 * gp_penalty(grad_x) - out.mean()).backward()
        return out.detach(), grad_x.detach(), [p.grad.clone() for p in critic.parameters()]

    monkeypatch.delenv("WGAN_KERNELS_BACKEND", raising=False)
    expected = step()
    calls = count_calls(monkeypatch)
    monkeypatch.setenv("WGAN_KERNELS_BACKEND", "triton")
    actual = step()
    assert calls["lrelu+bias"] == n_fused and calls["lrelu"] == n_plain
    assert calls["scale"] >= 2 * (n_fused + n_plain)  # the chain's forward and the penalty's backward
    for a, e in zip(actual[:2], expected[:2]):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)
    for (name, _), a, e in zip(critic.named_parameters(), actual[2], expected[2]):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12, msg=f"{critic_name}: d loss / d {name}")


@needs_triton
@pytest.mark.parametrize("shape", [(2, 3, 16, 17), (1, 2, 40, 40)], ids=str)
@pytest.mark.parametrize("device,dtype", CASES, ids=str)
def test_bias_on_planes_takes_the_channel_aware_grid(monkeypatch, device, dtype, shape, gen):
    """Planes of 256+ values with a bias: one program per (sample, channel) block, the bias one
    scalar per program; the same numbers as the reference."""
    from conftest import LaunchGrids

    kernel = LaunchGrids(act._leaky_relu_mask_kernel)
    monkeypatch.setattr(act, "_leaky_relu_mask_kernel", kernel)
    x = away_from_zero(shape, gen, dtype, device)
    bias = (torch.randn(shape[1], generator=gen, dtype=torch.float64) * 0.5).to(device=device, dtype=dtype)
    y, mask = leaky_relu_with_mask(x, 0.2, bias, backend="triton")
    ry, rmask = leaky_relu_with_mask_reference(x, 0.2, bias)
    inner = shape[2] * shape[3]
    block = min(1024, 1 << (inner - 1).bit_length())
    assert kernel.grids == [(shape[0] * shape[1], -(-inner // block))]
    assert torch.equal(mask, rmask)
    torch.testing.assert_close(y, ry, **tol(dtype), msg=f"leaky_relu_with_mask triton planes {shape} {dtype}")
