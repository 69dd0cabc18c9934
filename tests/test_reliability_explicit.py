"""Second derivatives through the explicit input-gradient path: right, or a clear error.

``forward_with_input_grad`` gives ``(out, grad_x)`` without a double backward. A second derivative
of a loss built on it (a Hessian-vector product in the parameters or in x, ``gradgradcheck``) must
either equal autograd's on the plain torch critic (double backward, then one more backward) or raise
``wgan_kernels.nn._chain.SECOND_ORDER_ERROR``, never come back as None or zeros. The one-node path
(nn/_chain.py) is first-order and refuses; the layer-by-layer chain (forced with
``WGAN_KERNELS_BACKEND=reference`` or ``triton``, or taken by critics the one-node path declines:
smooth activations, spectral norm) is made of differentiable ops and must agree with autograd.

For a piecewise-linear critic some second derivatives are genuinely zero almost everywhere (the
masks are piecewise constant); autograd gives zeros (or None) there too, so comparing with it,
None read as zeros, tells those apart from a lost derivative.
"""

import pytest
import torch
from conftest import BothOutputs
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import wgan_kernels as wk
from wgan_kernels._backend import available
import wgan_kernels.nn as wn
from wgan_kernels.nn import _chain

DTYPE = torch.float64
TOL = {"rtol": 1e-7, "atol": 1e-9}  # float64, same ops up to summation order
REFUSED = r"explicit input-gradient path is first-order \(once_differentiable\).*plain torch critic"


def _leaky():
    return nn.LeakyReLU(0.2)


def _resnet():
    # wgan_kernels.nn blocks: their forward is plain torch, so the module is its own autograd oracle
    return wn.Sequential(
        wn.Conv2d(2, 4, 3, 1, 1),
        wn.Residual(wn.Sequential(wn.ReLU(), wn.Conv2d(4, 4, 3, 1, 1), wn.LeakyReLU(0.1), wn.Conv2d(4, 4, 3, 1, 1))),
        wn.Residual(wn.Sequential(wn.ReLU(), wn.Conv2d(4, 4, 3, 1, 1), wn.AvgPool2d(2)),
                    wn.Sequential(wn.AvgPool2d(2), wn.Conv2d(4, 4, 1))),
        wn.ReLU(), wn.Flatten(), wn.Linear(64, 1))


# name -> (torch critic factory, input shape, whether the one-node path takes it)
CRITICS = {
    "mlp-leaky": (lambda: nn.Sequential(nn.Linear(3, 9), _leaky(), nn.Linear(9, 7), _leaky(), nn.Linear(7, 1)),
                  (6, 3), True),
    "conv": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, 2, 1), _leaky(), nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU(),
                                   nn.Flatten(), nn.Linear(64, 1)), (4, 2, 8, 8), True),
    "resnet": (_resnet, (4, 2, 8, 8), True),
    "smooth": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, 2, 1), nn.SiLU(), nn.AvgPool2d(2), nn.Conv2d(4, 4, 1),
                                     nn.ELU(), nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 8),
                                     nn.Softplus(), nn.Linear(8, 1)), (4, 2, 8, 8), False),
    "sn": (lambda: nn.Sequential(spectral_norm(nn.Conv2d(2, 4, 3, 2, 1)), _leaky(), nn.Flatten(),
                                 spectral_norm(nn.Linear(64, 8)), _leaky(), nn.Linear(8, 1)), (4, 2, 8, 8), False),
}

# "one-node": WGAN_KERNELS_BACKEND unset (the one-node path where it applies); the others force
# the layer-by-layer chain (aten ops, or the Triton activation-mask kernels under the interpreter)
# (Triton where it can run on CPU tensors: the interpreter; a CPU-only torch has no Triton)
_TRITON = ["triton"] if available("triton", "cpu") else []
PATHS = {"one-node": None, "layer-reference": "reference", **{f"layer-{b}": b for b in _TRITON}}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    if PATHS[request.param] is None:
        monkeypatch.delenv("WGAN_KERNELS_BACKEND", raising=False)
    else:
        monkeypatch.setenv("WGAN_KERNELS_BACKEND", PATHS[request.param])
    return request.param


def make(name, seed=0):
    """``(torch critic, explicit critic sharing its Parameters, x, reset)``; ``reset()`` puts the
    spectral-norm u, v buffers (shared by both critics, advanced by every training forward) back."""
    factory, shape, _ = CRITICS[name]
    torch.manual_seed(seed)
    plain = factory().to(DTYPE)
    explicit = wn.from_torch(plain)
    x = torch.randn(shape, dtype=DTYPE, generator=torch.Generator().manual_seed(seed + 1)).requires_grad_()
    buffers = list(plain.buffers())
    snapshot = [b.clone() for b in buffers]

    def reset():
        with torch.no_grad():
            for b, s in zip(buffers, snapshot):
                b.copy_(s)

    return plain, explicit, x, reset


def _Autograd(critic):
    """A critic seen as a plain function: critic_loss takes autograd's double backward on it (a
    module would be traced onto the explicit path)."""
    return lambda x: critic(x)


def takes_one_node(explicit, x):
    return _chain.plan(explicit, x) is not None


def plain_input_grad(critic, x):
    out = critic(x)
    (grad_x,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return out, grad_x


def gp_loss(out, grad_x):
    """A loss term and a nonlinear penalty: both incoming gradients of the chain are used."""
    return 0.7 * out.mean() + (grad_x.flatten(1).norm(dim=1) - 1).pow(2).mean()


def linear_loss(out, grad_x):
    """A penalty linear in grad_x: the incoming gradients do not require grad."""
    return out.mean() + grad_x.sum()


def second_derivative(input_grad, params, x, wrt, loss_fn, directions):
    """d/d(params, x) of ``sum(direction * d loss / d wrt)`` (None where unused)."""
    first_wrt = params if wrt == "params" else [x]
    loss = loss_fn(*input_grad(x))
    first = torch.autograd.grad(loss, first_wrt, create_graph=True, allow_unused=True)
    total = sum((f * v).sum() for f, v in zip(first, directions) if f is not None)
    return torch.autograd.grad(total, params + [x], allow_unused=True)


def assert_same(got, expected, what):
    for i, (g, e) in enumerate(zip(got, expected)):
        g = torch.zeros((), dtype=DTYPE) if g is None else g
        e = torch.zeros((), dtype=DTYPE) if e is None else e
        g, e = torch.broadcast_tensors(g, e)
        torch.testing.assert_close(g, e, **TOL, msg=lambda m, i=i: f"{what}, tensor {i}: {m}")


def check_second_order(name, wrt, loss_fn, path):
    plain, explicit, x, reset = make(name)
    params = list(plain.parameters())
    torch.manual_seed(7)
    directions = [torch.randn_like(t) for t in (params if wrt == "params" else [x])]
    reset()
    expected = second_derivative(lambda x: plain_input_grad(plain, x), params, x, wrt, loss_fn, directions)
    assert any(e is not None and e.abs().max() > 0 for e in expected), "the oracle has no second derivative here"
    reset()
    one_node = takes_one_node(explicit, x)
    assert one_node == (path == "one-node" and CRITICS[name][2]), "the path under test is not the one taken"
    what = f"{name}, {path}, d/d(params, x) of d loss/d {wrt}"
    if one_node:
        with pytest.raises(RuntimeError, match=REFUSED):
            second_derivative(explicit.forward_with_input_grad, params, x, wrt, loss_fn, directions)
    else:
        got = second_derivative(explicit.forward_with_input_grad, params, x, wrt, loss_fn, directions)
        assert_same(got, expected, what)


# ----------------------------------------------------------------------------------------------
# Second derivatives: autograd's, or the clear error
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrt", ["params", "x"])
@pytest.mark.parametrize("name", list(CRITICS))
def test_second_derivative_is_right_or_refused(name, wrt, path):
    check_second_order(name, wrt, gp_loss, path)


@pytest.mark.parametrize("name", ["mlp-leaky", "conv"])
def test_second_derivative_with_a_penalty_linear_in_grad_x(name, path):
    """The incoming gradients are constants: once_differentiable returned constants here."""
    check_second_order(name, "params", linear_loss, path)


@pytest.mark.parametrize("name", list(CRITICS))
def test_critic_loss_hessian_vector_product(name, path):
    """``critic_loss(explicit, ..., penalty="div")``: its gradient in the parameters, differentiated again."""
    plain, explicit, x, reset = make(name)
    params = list(plain.parameters())
    b = x.shape[0] // 2
    real, fake = x.detach()[:b], x.detach()[b:]
    torch.manual_seed(7)
    directions = [torch.randn_like(p) for p in params]

    def hvp(critic):
        reset()
        loss, _ = wk.critic_loss(critic, real, fake, penalty="div")
        first = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        total = sum((f * v).sum() for f, v in zip(first, directions) if f is not None)
        return torch.autograd.grad(total, params, allow_unused=True)

    expected = hvp(_Autograd(plain))
    if takes_one_node(explicit, torch.cat([real, fake])):
        with pytest.raises(RuntimeError, match=REFUSED):
            hvp(explicit)
    else:
        assert_same(hvp(explicit), expected, f"{name}, {path}, critic_loss Hessian-vector product")


def test_backward_of_a_second_order_quantity_is_refused():
    """``.backward()`` (no inputs: nothing pruned) raises the same error."""
    _, explicit, x, _ = make("conv")
    out, grad_x = explicit.forward_with_input_grad(x)
    assert type(out.grad_fn).__name__ == "_PiecewiseLinearChainBackward"
    (g,) = torch.autograd.grad(gp_loss(out, grad_x), explicit[0].weight, create_graph=True)
    with pytest.raises(RuntimeError, match=REFUSED):
        g.pow(2).sum().backward()


def _functional(explicit):
    wrapper = BothOutputs(explicit)
    names = [n for n, _ in wrapper.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in wrapper.parameters()]

    def f(x, *values):
        return torch.func.functional_call(wrapper, dict(zip(names, values)), (x,))

    return f, values


@pytest.mark.parametrize("name", ["mlp-leaky", "conv", "resnet"])
def test_gradgradcheck_one_node_path_raises(name, monkeypatch):
    """Not a Jacobian mismatch: the error."""
    monkeypatch.delenv("WGAN_KERNELS_BACKEND", raising=False)
    _, explicit, x, _ = make(name)
    assert takes_one_node(explicit, x)
    f, values = _functional(explicit)
    with pytest.raises(RuntimeError, match=REFUSED):
        torch.autograd.gradgradcheck(f, (x.detach().requires_grad_(), *values), fast_mode=True)


@pytest.mark.parametrize("backend", ["reference"] + _TRITON)
@pytest.mark.parametrize("name", ["mlp-leaky", "smooth"])
def test_gradgradcheck_layer_by_layer(name, backend, monkeypatch):
    monkeypatch.setenv("WGAN_KERNELS_BACKEND", backend)
    _, explicit, x, _ = make(name)
    assert not takes_one_node(explicit, x)
    f, values = _functional(explicit)
    assert torch.autograd.gradgradcheck(f, (x.detach().requires_grad_(), *values), fast_mode=True)


# ----------------------------------------------------------------------------------------------
# First order: unchanged, with or without create_graph
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CRITICS))
def test_first_order_unchanged(name, path):
    """autograd.grad without create_graph, with create_graph (not differentiated further) and
    loss.backward() give the plain critic's gradients in the parameters and in x."""
    plain, explicit, x, reset = make(name)
    params = list(plain.parameters())
    reset()
    expected = torch.autograd.grad(gp_loss(*plain_input_grad(plain, x)), params + [x], allow_unused=True)
    for create_graph in (False, True):
        reset()
        got = torch.autograd.grad(gp_loss(*explicit.forward_with_input_grad(x)), params + [x],
                                  create_graph=create_graph, allow_unused=True)
        assert_same(got, expected, f"{name}, {path}, first order, create_graph={create_graph}")
    reset()
    for t in params + [x]:
        t.grad = None
    gp_loss(*explicit.forward_with_input_grad(x)).backward()
    assert_same([t.grad for t in params + [x]], expected, f"{name}, {path}, first order, .backward()")
