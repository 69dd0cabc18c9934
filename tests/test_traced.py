"""The explicit path of critics written as public GAN code writes them (tests/real_critics.py),
through their traced graph (wgan_kernels/nn/trace.py), against autograd's double backward."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import tol
from real_critics import CRITICS, by_name
from torch import nn

import wgan_kernels as wk
import wgan_kernels.nn as wn
from wgan_kernels.nn import _chain
from wgan_kernels.nn.trace import TracedCritic, Unsupported, traced_critic

EXPLICIT = [c.name for c in CRITICS if c.explicit]
FALLBACK = [c.name for c in CRITICS if not c.explicit]
# the piecewise-linear ones: the whole graph is one autograd node
ONE_NODE = {"wgan_gp_toy_mlp", "pytorch_gan_wgan_gp_mlp", "pytorch_gan_wgan_div_bn_eval",
            "pytorch_gan_dropout2d_train_no_bn", "wgan_gp_mnist_conv", "sngan_resnet32", "sngan_cnn_parametrized_sn",
            "video_conv3d", "dilated_grouped_same_padding", "progan_equalized_lr"}


def build(name, dtype, batch=4, seed=0):
    rc = by_name(name)
    torch.manual_seed(seed)
    module = rc.build().to(dtype)
    args, kwargs = rc.inputs(batch, dtype)
    return rc, module, args[0], args[1:], kwargs


def select(out, rc):
    return out if rc.output_key is None else out[rc.output_key]


def double_backward(module, rc, x, extra, kwargs):
    xr = x.detach().requires_grad_(True)
    out = select(module(xr, *extra, **kwargs), rc)
    (grad_x,) = torch.autograd.grad(out.sum(), xr, create_graph=True)
    return out, grad_x


def loss_of(out, grad_x):
    """A WGAN-div-like loss on (out, grad_x): both chains reach every parameter (in float32 for
    16-bit values)."""
    if out.dtype in (torch.float16, torch.bfloat16):
        out, grad_x = out.float(), grad_x.float()
    norms = grad_x.flatten(1).norm(dim=1)
    return out.mean() + 2.0 * norms.pow(6).mean()


def compare(name, dtype, batch=4):
    """(out, grad_x) and every parameter gradient of ``loss_of`` on the explicit path against
    autograd's double backward on a copy, from the same random state (dropout masks) and the
    same buffers (spectral norm's u, v; batch-norm statistics)."""
    rc, module, x, extra, kwargs = build(name, dtype, batch)
    reference = copy.deepcopy(module)
    traced = wn.from_torch(module, output=rc.output_key)
    state = torch.get_rng_state()
    out, grad_x = traced.forward_with_input_grad(x, *extra, **kwargs)
    torch.set_rng_state(state)
    out_r, grad_x_r = double_backward(reference, rc, x, extra, kwargs)
    t = tol(dtype)
    torch.testing.assert_close(out, out_r, **t)
    torch.testing.assert_close(grad_x, grad_x_r, **t)
    params = [p for p in module.parameters() if p.requires_grad]
    params_r = [p for p in reference.parameters() if p.requires_grad]
    got = torch.autograd.grad(loss_of(out, grad_x), params, allow_unused=True)
    want = torch.autograd.grad(loss_of(out_r, grad_x_r), params_r, allow_unused=True)
    for (pname, _), g, w in zip(module.named_parameters(), got, want):
        if w is None:
            assert g is None or g.abs().max() == 0, pname
            continue
        assert g is not None, f"{name}: no gradient for {pname}"
        scale = w.abs().max().clamp_min(1)
        torch.testing.assert_close(g / scale, w / scale, **t, msg=f"{name}: gradient of {pname}")
    for b, b_r in zip(module.buffers(), reference.buffers()):  # u, v advanced alike; statistics alike
        torch.testing.assert_close(b, b_r, **t)
    return traced, out, x


@pytest.mark.parametrize("name", EXPLICIT)
def test_matches_double_backward_float64(name):
    traced, out, x = compare(name, torch.float64)
    one_node = type(out.grad_fn).__name__ == "_PiecewiseLinearChainBackward"
    assert one_node == (name in ONE_NODE), f"{name}: expected the {'one-node' if name in ONE_NODE else 'layer'} path"


@pytest.mark.parametrize("name", EXPLICIT)
def test_matches_double_backward_float32(name):
    compare(name, torch.float32, batch=5 if name != "progan_minibatch_stddev" else 4)


@pytest.mark.parametrize("name", ["wgan_gp_toy_mlp", "wgan_gp_mnist_conv", "sngan_resnet32", "dcgan_layernorm",
                                  "mlp_unflatten_mixed_activations"])
def test_bfloat16(name):
    rc, module, x, extra, kwargs = build(name, torch.bfloat16)
    reference = copy.deepcopy(module)
    out, grad_x = wn.from_torch(module, output=rc.output_key).forward_with_input_grad(x, *extra, **kwargs)
    out_r, grad_x_r = double_backward(reference, rc, x, extra, kwargs)  # autograd, in bfloat16 too
    assert out.dtype == grad_x.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_r)  # the same forward ops
    scale = grad_x_r.float().abs().max()
    torch.testing.assert_close(grad_x.float() / scale, grad_x_r.float() / scale, atol=2e-2, rtol=0)


@pytest.mark.parametrize("name", ["wgan_gp_toy_mlp", "mlp_unflatten_mixed_activations", "dcgan_layernorm"])
def test_gradcheck(name):
    """float64 gradcheck of the penalty-style loss in x and in one weight, through the chain."""
    rc, module, x, extra, kwargs = build(name, torch.float64, batch=2)
    traced = wn.from_torch(module, output=rc.output_key)
    weight_name, weight = next((n, p) for n, p in module.named_parameters() if p.dim() >= 2)

    class Loss(nn.Module):
        def __init__(self):
            super().__init__()
            self.traced = traced

        def forward(self, x):
            return loss_of(*self.traced.forward_with_input_grad(x, *extra, **kwargs))

    wrapper = Loss()

    def f(w, xx):
        return torch.func.functional_call(wrapper, {f"traced.{weight_name}": w}, (xx,))

    assert torch.autograd.gradcheck(f, (weight.detach().clone().requires_grad_(True),
                                        x.detach().clone().requires_grad_(True)), atol=1e-6, fast_mode=True)


@pytest.mark.parametrize("name", FALLBACK)
def test_fallback_names_its_reason_once(name):
    rc, module, x, extra, kwargs = build(name, torch.float32, batch=8)
    reference = copy.deepcopy(module)
    real, fake = x[:4], x[4:]
    if rc.reason == "control flow":
        with pytest.raises(ValueError, match="control flow"):
            wn.from_torch(module)
    torch.manual_seed(5)  # (dropout masks)
    with pytest.warns(UserWarning, match=f"(?i){rc.reason}") as caught:
        loss, _ = wk.critic_loss(module, real, fake, penalty="gp", generator=torch.Generator().manual_seed(1))
    assert len([w for w in caught if "wgan_kernels" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wk.critic_loss(module, real, fake, penalty="gp", generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)
    expected, _ = wk.critic_loss(lambda v: reference(v), real, fake, penalty="gp",
                                 generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(loss, expected)


def test_critic_loss_takes_the_traced_path_on_a_torch_module():
    rc, module, x, _, _ = build("sngan_resnet32", torch.float32, batch=8)
    reference = copy.deepcopy(module)
    real, fake = x[:4], x[4:]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, stats = wk.critic_loss(module, real, fake, penalty="div")
    assert type(traced_critic(module)) is TracedCritic
    loss_r, stats_r = wk.critic_loss(lambda v: reference(v), real, fake, penalty="div")
    torch.testing.assert_close(loss, loss_r, **tol(torch.float32))
    torch.testing.assert_close(stats["grad_norm"], stats_r["grad_norm"], **tol(torch.float32))
    loss.backward()
    loss_r.backward()
    for p, q in zip(module.parameters(), reference.parameters()):
        scale = q.grad.abs().max().clamp_min(1e-3)
        torch.testing.assert_close(p.grad / scale, q.grad / scale, rtol=0, atol=1e-3)  # (float32 sums)


def test_shares_parameters_and_state_dict_keys():
    rc, module, x, extra, kwargs = build("studiogan_resnet_projection_sn", torch.float32)
    traced = wn.from_torch(module, output="adv_output")
    assert list(traced.state_dict()) == list(module.state_dict())
    assert all(a is b for a, b in zip(traced.parameters(), module.parameters()))
    traced.eval()
    assert not module.training and not any(m.training for m in module.modules())
    torch.testing.assert_close(traced(x, *extra), module(x, *extra)["adv_output"])  # (eval: u, v frozen)


def test_dict_output_needs_a_key():
    rc, module, x, extra, kwargs = build("studiogan_resnet_projection_sn", torch.float32)
    with pytest.raises(Unsupported, match="output=<key>"):
        wn.from_torch(module).forward_with_input_grad(x, *extra)


def test_mode_switch_rebuilds():
    """eval-mode BatchNorm is explicit; the same critic in training mode falls back, and back."""
    rc, module, x, extra, kwargs = build("pytorch_gan_wgan_div_bn_eval", torch.float32)
    traced = wn.from_torch(module)
    traced.forward_with_input_grad(x)
    module.train()
    with pytest.raises(Unsupported, match="BatchNorm2d in training mode"):
        traced.forward_with_input_grad(x)
    module.eval()
    out, _ = traced.forward_with_input_grad(x)
    assert type(out.grad_fn).__name__ == "_PiecewiseLinearChainBackward"


def test_other_batch_sizes_and_a_non_contiguous_input():
    rc, module, x, extra, kwargs = build("sngan_resnet32", torch.float64, batch=3)
    traced = wn.from_torch(module)
    for batch in (3, 7, 1):
        xb = torch.randn(batch, 32, 32, 3, dtype=torch.float64).permute(0, 3, 1, 2)  # channels-last strides
        out, grad_x = traced.forward_with_input_grad(xb)
        out_r, grad_x_r = double_backward(module, rc, xb, (), {})
        torch.testing.assert_close(grad_x, grad_x_r)


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def test_a_python_side_effect_falls_back_and_tracing_leaves_no_trace():
    module = _Counting()
    with pytest.raises(ValueError, match="assigns _Counting.calls"):
        wn.from_torch(module)
    assert module.calls == 0
    x = torch.randn(6, 3)
    with pytest.warns(UserWarning, match="side effect"):
        wk.critic_loss(module, x[:3], x[3:])
    assert module.calls == 1


class _MergesBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 1)

    def forward(self, x):
        h = F.relu(self.fc(x)).view(-1)  # (N,) fine
        return h - h.mean()  # the batch mean: couples the samples


class _MixesSamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x).view(1, -1).sum(1, keepdim=True).expand(x.shape[0], 1)


@pytest.mark.parametrize("module", [_MergesBatch(), _MixesSamples()], ids=["batch-mean", "view-of-the-batch"])
def test_coupling_the_samples_is_refused(module):
    with pytest.raises(Unsupported, match="mixes the samples of a minibatch"):
        wn.from_torch(module).forward_with_input_grad(torch.randn(5, 4))


class _Residual(nn.Module):
    """Values used twice, an in-place activation on a value used again, constant shifts, a
    scalar multiple and a concatenation: the graph is not a chain."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(8, 1)

    def forward(self, x):
        h = self.a(x)
        skip = h
        h = F.relu(h, inplace=True)  # eager: skip is relu'd too
        h = self.b(h) + 0.5 * skip - 1.0
        h = torch.cat([h, 2 - h], dim=1)
        return self.c(F.leaky_relu(h, 0.2)) - 3


def test_inplace_aliasing_and_constants():
    module = _Residual().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    out, grad_x = wn.from_torch(module).forward_with_input_grad(x)
    rc = by_name("wgan_gp_toy_mlp")
    out_r, grad_x_r = double_backward(module, rc, x, (), {})
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(grad_x, grad_x_r)
    assert type(out.grad_fn).__name__ == "_PiecewiseLinearChainBackward"


def test_one_node_program_is_planned_for_piecewise_linear_graphs():
    rc, module, x, extra, kwargs = build("sngan_resnet32", torch.float32)
    traced = wn.from_torch(module)
    program = traced.program(x, (), {})
    from wgan_kernels.nn.trace import _bind

    _bind(module, program, x, (), {})
    assert _chain.plan_root(program.graph_op, x) is not None


def test_forward_hooks_anywhere_keep_the_double_backward():
    """The explicit path does not call the module, so a forward hook on the critic or on a module
    it traces through would not run: refused, and the program is rebuilt when hooks come or go."""
    rc, module, x, _, _ = build("sngan_resnet32", torch.float32)
    traced = wn.from_torch(module)
    traced.forward_with_input_grad(x)
    handle = module.block2.register_forward_hook(lambda m, a, o: None)
    with pytest.raises(Unsupported, match="block2: DBlock has forward hooks"):
        traced.forward_with_input_grad(x)
    handle.remove()
    traced.forward_with_input_grad(x)


def test_spectral_norm_all_on_a_torch_critic_runs_on_the_traced_path():
    """spectral_norm_all's batched iteration (a forward pre-hook / hook on the critic) runs around
    the traced explicit path: the same loss, gradients and u, v as autograd's double backward."""
    from wgan_kernels.models import ResNet32Critic

    torch.manual_seed(0)
    critic = wk.spectral_norm_all(ResNet32Critic(8).double())
    reference = copy.deepcopy(critic)
    real, fake = torch.randn(3, 3, 32, 32, dtype=torch.float64), torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for step in range(2):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            loss, _ = wk.critic_loss(critic, real, fake, penalty="div")
        loss_r, _ = wk.critic_loss(lambda v: reference(v), real, fake, penalty="div")
        torch.testing.assert_close(loss, loss_r)
        loss.backward()
        loss_r.backward()
        for p, q in zip(critic.parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        for b, c in zip(critic.buffers(), reference.buffers()):
            torch.testing.assert_close(b, c)
        with torch.no_grad():  # an update: the next step iterates again
            for p, q in zip(critic.parameters(), reference.parameters()):
                p.sub_(0.01 * p.grad)
                q.sub_(0.01 * q.grad)


def test_a_deep_copy_is_its_own_critic():
    """copy.deepcopy of a from_torch result (an EMA critic, say) traces and updates the copy."""
    rc, module, x, _, _ = build("sngan_resnet32", torch.float64)
    traced = wn.from_torch(module)
    traced.forward_with_input_grad(x)
    twin = copy.deepcopy(traced)
    assert twin.critic is not module and all(a is not b for a, b in zip(twin.parameters(), module.parameters()))
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.5)
    out, grad_x = twin.forward_with_input_grad(x)
    out_r, grad_x_r = double_backward(twin.critic, rc, x, (), {})
    torch.testing.assert_close(grad_x, grad_x_r)
    torch.testing.assert_close(out, out_r)
    assert not torch.allclose(out, traced.forward_with_input_grad(x)[0])


def test_a_replaced_layer_is_used():
    rc, module, x, _, _ = build("wgan_gp_toy_mlp", torch.float64)
    traced = wn.from_torch(module)
    traced.forward_with_input_grad(x)
    torch.manual_seed(3)
    module.main[0] = nn.Linear(2, module.main[0].out_features).double()
    out, grad_x = traced.forward_with_input_grad(x)
    out_r, grad_x_r = double_backward(module, rc, x, (), {})
    torch.testing.assert_close(grad_x, grad_x_r)


def _one_image_input(rc) -> bool:
    args, kwargs = rc.inputs(2, torch.float32)
    return rc.explicit and len(args) == 1 and not kwargs and rc.output_key is None and args[0].dim() == 4


IMAGE_CRITICS = [c.name for c in CRITICS if _one_image_input(c)]
# those whose penalty runs the one-node chain's convolutions in channels_last and whose forward
# reads no layout (the others: layer-by-layer normalisation critics, a view of a multi-channel map)
LOSS_NHWC = {"pytorch_gan_wgan_div_bn_eval", "pytorch_gan_dropout2d_train_no_bn", "sngan_resnet32",
             "sngan_cnn_parametrized_sn", "progan_equalized_lr"}


def _gp_twice(module, real, fake, monkeypatch):
    """critic_loss(module, ...) with WGAN-GP twice (fresh gradients each time) against autograd's
    double backward on a copy from the same random state; returns, per call, whether the module's
    own forward (the loss forward) got channels_last samples at its first convolution."""
    reference = copy.deepcopy(module)
    conv2d, seen = F.conv2d, []

    def spy(inp, *args, **kwargs):  # the module's Conv2d.forward calls F.conv2d (the chain holds its own)
        if isinstance(inp, torch.fx.Proxy):  # tracing: fx records the function itself
            return conv2d(inp, *args, **kwargs)
        seen.append(inp.stride(1) == 1 and inp.is_contiguous(memory_format=torch.channels_last))
        return conv2d(inp, *args, **kwargs)

    firsts = []
    for call in range(2):
        module.zero_grad(set_to_none=True)
        reference.zero_grad(set_to_none=True)
        seen.clear()
        with monkeypatch.context() as m:
            m.setattr(F, "conv2d", spy)
            torch.manual_seed(call)
            loss, stats = wk.critic_loss(module, real, fake, penalty="gp",
                                         generator=torch.Generator().manual_seed(call))
        firsts.append(seen[-1] if seen else None)
        torch.manual_seed(call)
        loss_r, stats_r = wk.critic_loss(lambda v: reference(v), real, fake, penalty="gp",
                                         generator=torch.Generator().manual_seed(call))
        torch.testing.assert_close(loss, loss_r, **tol(torch.float32))
        torch.testing.assert_close(stats["grad_norm"], stats_r["grad_norm"], **tol(torch.float32))
        loss.backward()
        loss_r.backward()
        for (name, p), q in zip(module.named_parameters(), reference.parameters()):
            assert (p.grad is None) == (q.grad is None), name
            if q.grad is not None:
                scale = q.grad.abs().max().clamp_min(1e-3)
                torch.testing.assert_close(p.grad / scale, q.grad / scale, rtol=0, atol=1e-4, msg=name)
    return firsts


@pytest.mark.parametrize("name", IMAGE_CRITICS)
def test_loss_forward_in_channels_last_changes_nothing(name, monkeypatch):
    """WGAN-GP's loss forward (critic(cat(real, fake)), apart from the penalty's) runs on
    channels_last samples from the second call on (the first call's penalty tells whether the
    chain runs its convolutions in that layout) where the forward reads no layout; the loss, the
    stats and every parameter gradient stay those of autograd's double backward, dropout masks
    included."""
    rc, module, x, _, _ = build(name, torch.float32, batch=6)
    firsts = _gp_twice(module, x[:3], x[3:], monkeypatch)
    from wgan_kernels.nn.trace import loss_channels_last

    assert loss_channels_last(module, x) == (name in LOSS_NHWC)
    assert firsts == [False, name in LOSS_NHWC] or (firsts == [None, None] and name not in LOSS_NHWC)


class _ViewCritic(nn.Module):
    """The DCGAN critic of many repositories: conv features, then ``view`` (or ``flatten``) and a
    Linear score."""

    def __init__(self, flatten: bool):
        super().__init__()
        self.flatten = flatten
        self.c1, self.c2 = nn.Conv2d(3, 8, 4, 2, 1), nn.Conv2d(8, 16, 4, 2, 1)
        self.fc = nn.Linear(16 * 2 * 2, 1)

    def forward(self, img):
        h = F.leaky_relu(self.c2(F.leaky_relu(self.c1(img), 0.2)), 0.2)
        return self.fc(h.flatten(1) if self.flatten else h.view(h.shape[0], -1))


@pytest.mark.parametrize("flatten", [False, True])
def test_a_view_of_a_feature_map_keeps_the_loss_forward_contiguous(flatten, monkeypatch):
    """``h.view(n, -1)`` of a multi-channel map fails on a channels_last tensor: such a critic's
    loss forward keeps the caller's layout (and runs); with ``flatten`` it takes channels_last."""
    torch.manual_seed(0)
    module = _ViewCritic(flatten)
    x = torch.randn(6, 3, 8, 8)
    assert _gp_twice(module, x[:3], x[3:], monkeypatch) == [False, flatten]
    assert traced_critic(module).program(x, (), {}).layout_free == flatten


def test_random_draws_per_element_keep_the_loss_forward_contiguous():
    """Dropout's mask is drawn in memory order: on channels_last samples the same seed would give
    another mask, so a critic with training-mode Dropout (a module or F.dropout) or RReLU keeps the
    layout; Dropout2d (a draw per channel) and eval mode do not matter."""
    from wgan_kernels.nn.trace import _layout_free, _probe

    def layout_free(module):
        graph = traced_critic(module)._graph
        x = torch.randn(2, 3, 8, 8)
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        seen = _probe(module, graph, {placeholders[0].target: x})
        return _layout_free(graph, set(graph.nodes), seen, dict(module.named_modules()))

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return F.dropout(self.c(x), 0.3, self.training).flatten(1).sum(1)

    for drop, free in ((nn.Dropout(0.3), False), (nn.Dropout2d(0.3), True), (nn.RReLU(), False)):
        module = nn.Sequential(nn.Conv2d(3, 4, 3), drop, nn.Flatten(), nn.Linear(4 * 6 * 6, 1))
        assert layout_free(module) == free, drop
        module.eval()
        assert layout_free(module), drop
    assert not layout_free(Functional())
    seq = wn.Sequential(wn.Conv2d(3, 4, 3), wn.Dropout(0.3), wn.LeakyReLU(0.2), wn.Flatten(), wn.Linear(4 * 6 * 6, 1))
    x = torch.randn(2, 3, 8, 8)
    assert not seq.channels_last_for(x) and seq.eval().channels_last_for(x)


def test_the_first_gp_step_of_an_eval_batchnorm_critic_backpropagates():
    """Regression: WGAN-GP's loss forward runs before the penalty's, whose first call builds the
    program (a probe forward, buffers restored after it). The restore bumped the version of the
    running statistics the eval-mode batch norm of the loss forward had saved, and backward
    raised "modified by an inplace operation"; the restore is now invisible to autograd."""
    rc, module, x, _, _ = build("pytorch_gan_wgan_div_bn_eval", torch.float32, batch=6)
    loss, _ = wk.critic_loss(module, x[:3], x[3:], penalty="gp", generator=torch.Generator().manual_seed(0))
    loss.backward()
    assert all(p.grad is not None for p in module.parameters())
