"""Adding a layer type to the explicit path takes one op class (wgan_kernels/nn/explicit_ops.py).

``GELUOp`` (smooth: the layer-by-layer chain) and ``HardtanhOp`` (piecewise-linear: also the
one-node chain) are each that one class and nothing else: no edit to layers.py, convert.py,
_chain.py or nn/__init__.py names them. These tests show the class is all it takes: the block
``wn.GELU`` / ``wn.Hardtanh`` exists, ``from_torch`` converts ``nn.GELU`` / ``nn.Hardtanh``, and
forward, input gradient, penalty gradients and ``critic_loss`` match autograd's double backward
on the plain torch module.

Oracle: the torch module itself and autograd's double backward
(``torch.autograd.grad(out.sum(), x, create_graph=True)``).
"""

import pathlib

import pytest
import torch
from conftest import BothOutputs, tol
from torch import nn
from torch.func import functional_call

import wgan_kernels as wk
import wgan_kernels.nn as wn
from wgan_kernels.nn import _chain, explicit_ops


def rand(shape, dtype, gen, scale=2.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def autograd_input_grad(module, x):
    x = x.detach().requires_grad_()
    out = module(x)
    return out, torch.autograd.grad(out.sum(), x, create_graph=True)[0]


# name -> (torch critic factory, input shape); the new activation between affine layers
CRITICS = {
    "gelu": (lambda: nn.Sequential(nn.Linear(5, 9), nn.GELU(), nn.Linear(9, 7), nn.GELU(), nn.Linear(7, 1)), (6, 5)),
    "gelu-tanh-conv": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, 2, 1), nn.GELU(approximate="tanh"), nn.Flatten(),
                                             nn.Linear(4 * 3 * 3, 1)), (4, 2, 5, 5)),
    "hardtanh": (lambda: nn.Sequential(nn.Linear(5, 9), nn.Hardtanh(-0.5, 1.5), nn.Linear(9, 7), nn.Hardtanh(),
                                       nn.Linear(7, 1)), (6, 5)),
    "hardtanh-conv-2out": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, 2, 1), nn.Hardtanh(-1.0, 0.5), nn.Flatten(),
                                                 nn.Linear(4 * 3 * 3, 2)), (4, 2, 5, 5)),
}
ONE_NODE = {"hardtanh", "hardtanh-conv-2out"}  # piecewise-linear: the one-node chain takes them


def make(name, dtype, seed=0):
    factory, shape = CRITICS[name]
    torch.manual_seed(seed)
    module = factory().to(dtype)
    return module, wn.from_torch(module), shape


def test_one_class_is_all_it_takes():
    """The op classes are registered, their blocks made from them, and only explicit_ops.py
    (where the class is) names them in the package."""
    for torch_type, name in ((nn.GELU, "GELU"), (nn.Hardtanh, "Hardtanh")):
        op = explicit_ops.OPS[torch_type]
        block = getattr(wn, name)
        assert block.op_type is op and issubclass(block, (wn.InputGradModule, torch_type))
        assert block is wn.from_torch(torch_type()).__class__
    package = pathlib.Path(wn.__file__).parent
    for name in ("__init__.py", "layers.py", "convert.py", "_chain.py", "spectral.py"):  # no second description
        text = (package / name).read_text()
        assert "GELU" not in text and "Hardtanh" not in text, name


@pytest.mark.parametrize("module", [nn.GELU(), nn.GELU(approximate="tanh"), nn.Hardtanh(), nn.Hardtanh(-0.3, 2.0)],
                         ids=["gelu", "gelu-tanh", "hardtanh", "hardtanh-custom"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_matches_torch(module, dtype, gen):
    block = wn.from_torch(module)
    assert type(block).__name__ == type(module).__name__ and vars(block).get("approximate") == vars(module).get(
        "approximate") and vars(block).get("min_val") == vars(module).get("min_val")
    x = rand((3, 2, 5, 4), dtype, gen)
    out, grad_x = block.forward_with_input_grad(x)
    ref_out, ref_grad = autograd_input_grad(module, x)
    torch.testing.assert_close(out, ref_out, **tol(dtype), msg=lambda m: f"{module} out: {m}")
    torch.testing.assert_close(grad_x, ref_grad, **tol(dtype), msg=lambda m: f"{module} grad_x: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(CRITICS))
def test_penalty_gradients_match_double_backward(name, dtype, gen):
    """from_torch shares the parameters; out, grad_x and the gradients of a penalty + loss match
    autograd's double backward on the torch critic."""
    module, critic, shape = make(name, dtype)
    params = list(critic.parameters())
    assert all(p is q for p, q in zip(params, module.parameters()))
    x = rand(shape, dtype, gen, scale=1.0)
    assert (_chain.plan(critic, x) is not None) == (name in ONE_NODE)

    def step(fn):
        for p in params:
            p.grad = None
        out, grad_x = fn(x)
        (10 * (grad_x.flatten(1).norm(dim=1) - 1).pow(2).mean() - out.mean()).backward()
        return out, grad_x, [p.grad.clone() for p in params]

    out, grad_x, grads = step(critic.forward_with_input_grad)
    ref_out, ref_grad_x, ref_grads = step(lambda x: autograd_input_grad(module, x))
    torch.testing.assert_close(out, ref_out, **tol(dtype))
    torch.testing.assert_close(grad_x, ref_grad_x, **tol(dtype))
    rtol, atol = tol(dtype)["rtol"] * 10, tol(dtype)["atol"] * 10  # two backward passes deep
    for (n, _), a, e in zip(critic.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"{name} d / d {n}: {m}")


@pytest.mark.parametrize("name", list(CRITICS))
def test_gradcheck(name, gen):
    """(out, grad_x) as a function of (x, parameters), float64, against finite differences; the
    layer-by-layer chain of GELU also twice (gradgradcheck)."""
    module, critic, shape = make(name, torch.float64)
    wrapper = BothOutputs(critic)
    x = rand(shape, torch.float64, gen, scale=1.0).requires_grad_()
    names = [n for n, _ in wrapper.named_parameters()]
    values = [p.detach().clone().requires_grad_() for p in wrapper.parameters()]

    def f(x, *values):
        return functional_call(wrapper, dict(zip(names, values)), (x,))

    assert torch.autograd.gradcheck(f, (x, *values))
    if name not in ONE_NODE:  # the one-node chain is first-order by design
        assert torch.autograd.gradgradcheck(f, (x, *values))


@pytest.mark.parametrize("penalty", ["div", "gp"])
@pytest.mark.parametrize("name", list(CRITICS))
def test_critic_loss_matches_double_backward(name, penalty, gen):
    """critic_loss on the converted critic (its explicit path) == the same loss built by autograd's
    double backward on the torch critic, float64."""
    module, critic, shape = make(name, torch.float64)
    real, fake = rand(shape, torch.float64, gen, scale=1.0), rand(shape, torch.float64, gen, scale=1.5)
    loss, _ = wk.critic_loss(critic, real, fake, penalty=penalty, generator=torch.Generator().manual_seed(5))
    loss.backward()
    ours = [p.grad.clone() for p in critic.parameters()]
    module.zero_grad()  # the two share their parameters
    if penalty == "div":
        r, f = real.clone().requires_grad_(), fake.clone().requires_grad_()
        d_real, d_fake = module(r), module(f)
        gr, gf = torch.autograd.grad(d_real.sum() + d_fake.sum(), (r, f), create_graph=True)
        ref = d_fake.mean() - d_real.mean() + 2.0 * torch.cat([gr, gf]).flatten(1).norm(dim=1).pow(6).mean()
    else:
        xi = wk.sample_penalty_points(real, fake, "interpolate", torch.Generator().manual_seed(5)).requires_grad_()
        (gi,) = torch.autograd.grad(module(xi).sum(), xi, create_graph=True)
        ref = module(fake).mean() - module(real).mean() + 10.0 * (gi.flatten(1).norm(dim=1) - 1).pow(2).mean()
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-7, atol=1e-8)
    for (n, p), a in zip(module.named_parameters(), ours):
        torch.testing.assert_close(a, p.grad, rtol=1e-7, atol=1e-8, msg=lambda m: f"{name} d loss / d {n}: {m}")


@pytest.mark.parametrize("name", ["gelu", "hardtanh-conv-2out"])
def test_op_tree_from_torch_modules(name, gen):
    """The op objects alone, built from the plain torch modules (as a graph tracer would), share
    the parameter tensors and give the forward and input gradient of autograd."""
    module, _, shape = make(name, torch.float64)
    root = explicit_ops.SequentialOp([explicit_ops.OPS[type(m)].from_module(m) for m in module])
    for op, m in zip(root.ops, module):
        assert op.has_params == (len(list(m.parameters())) > 0)
        assert all(p is q for p, q in zip(op.params, m.parameters()))
    x = rand(shape, torch.float64, gen, scale=1.0)
    out, saved = root.forward(root.params, x)
    grad_x = root.vjp(root.params, saved, torch.ones_like(out))
    ref_out, ref_grad = autograd_input_grad(module, x)
    torch.testing.assert_close(out, ref_out, **tol(torch.float64))
    torch.testing.assert_close(grad_x, ref_grad, **tol(torch.float64))
