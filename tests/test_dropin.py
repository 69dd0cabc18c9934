"""critic_loss as a drop-in for code people already have: batch-coupled critics (BatchNorm),
lazy regularization with wrapper callables and an explicit step."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wgan_kernels as wk
import wgan_kernels.nn as wn


def bn_critic():
    """The issue's reproducer: a StudioGAN-style WGAN-GP critic with a training BatchNorm."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Linear(512, 1))


def images(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 8, 8, generator=g), torch.randn(n, 3, 8, 8, generator=g) * 1.3 + 0.2


def forwards(module):
    """A counter of forward calls (a forward hook on the module)."""
    calls = []
    module.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    return calls


def test_batchnorm_critic_runs_real_and_fake_apart():
    critic = bn_critic()
    reference = copy.deepcopy(critic)
    real, fake = images()
    loss, stats = wk.critic_loss(critic, real, fake, penalty=None)
    out_real = reference(real)  # what the user's code computes, in its order
    expected = reference(fake).mean() - out_real.mean()
    torch.testing.assert_close(loss, expected)
    for m, r in zip(critic.modules(), reference.modules()):  # the running statistics moved alike
        if isinstance(m, nn.BatchNorm2d):
            torch.testing.assert_close(m.running_mean, r.running_mean)


def test_batchnorm_critic_wgan_div_matches_the_users_code():
    critic = bn_critic()
    reference = copy.deepcopy(critic)
    real, fake = images()
    loss, stats = wk.critic_loss(critic, real, fake, penalty="div")
    # PyTorch-GAN's wgan_div: gradients from the same forwards as the loss
    r, f = real.clone().requires_grad_(True), fake.clone().requires_grad_(True)
    out_r, out_f = reference(r), reference(f)
    (g_r,) = torch.autograd.grad(out_r.sum(), r, create_graph=True)
    (g_f,) = torch.autograd.grad(out_f.sum(), f, create_graph=True)
    norms = torch.cat([g_r, g_f]).flatten(1).norm(dim=1)
    expected = out_f.mean() - out_r.mean() + 2.0 * norms.pow(6).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    loss.backward()
    expected.backward()
    for p, q in zip(critic.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:wgan_kernels")  # (the counting hook keeps the critic off the explicit path)
@pytest.mark.parametrize("penalty,calls", [(None, [4, 4]), ("div", [4, 4]), ("gp", [4, 4, 4])])
def test_batchnorm_forwards(penalty, calls):
    critic = bn_critic()
    seen = forwards(critic)
    real, fake = images()
    wk.critic_loss(critic, real, fake, penalty=penalty)
    assert seen == calls


@pytest.mark.filterwarnings("ignore:wgan_kernels")
def test_shared_forward_when_per_sample_or_forced():
    critic = bn_critic()
    seen = forwards(critic)
    real, fake = images()
    wk.critic_loss(critic, real, fake, penalty=None, shared_forward=True)  # forced: one batch of 8
    assert seen == [8]
    critic.eval()  # running statistics: per sample, one shared forward
    wk.critic_loss(critic, real, fake, penalty="div")
    assert seen == [8, 8]
    critic.train()
    wk.critic_loss(lambda x: critic(x), real, fake, penalty=None)  # a wrapper: the module it wraps decides
    assert seen == [8, 8, 4, 4]
    with pytest.raises(ValueError, match="shared_forward"):
        wk.critic_loss(critic, real, fake, shared_forward="yes")


def test_every_counts_the_wrapped_module_not_the_wrapper():
    """StudioGAN's pattern: a new lambda per call. The count follows the module it wraps."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    applied = []
    for i in range(7):
        wrapper = (lambda x: critic(x) * 1.0) if i % 2 else functools.partial(critic.forward)
        _, stats = wk.critic_loss(wrapper, real, fake, penalty="div", every=3)
        applied.append(bool(stats["penalty"] != 0))
    assert applied == [True, False, False, True, False, False, True]


def test_every_with_an_explicit_step():
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    full = wk.critic_loss(critic, real, fake, penalty="div")[1]["penalty"]
    for step in (0, 1, 4, 8):
        _, stats = wk.critic_loss(critic, real, fake, penalty="div", every=4, step=step)
        if step % 4 == 0:
            torch.testing.assert_close(stats["penalty"], 4 * full)
        else:
            assert stats["penalty"] == 0
    for bad in (-1, 1.0, True, "3"):
        with pytest.raises(ValueError, match="step"):
            wk.critic_loss(critic, real, fake, every=2, step=bad)


# ----------------------------------------------------------------------------------------------
# the options real GAN code needs
# ----------------------------------------------------------------------------------------------


def small_critic():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))


def manual(critic, real, fake, adversarial, reduction, weight=2.0, p=6.0):
    """The user's code: two forwards, autograd's double backward, the penalty at real and fake."""
    r, f = real.clone().requires_grad_(True), fake.clone().requires_grad_(True)
    out_r, out_f = critic(r), critic(f)
    g = torch.cat([torch.autograd.grad(out_r.sum(), r, create_graph=True)[0],
                   torch.autograd.grad(out_f.sum(), f, create_graph=True)[0]])
    terms = g.flatten(1).norm(dim=1).pow(p)
    pen = weight * (terms.max() if reduction == "max" else terms.mean())
    if adversarial == "logistic":
        adv = F.softplus(-out_r).mean() + F.softplus(out_f).mean()
    elif adversarial == "hinge":
        adv = F.relu(1 - out_r).mean() + F.relu(1 + out_f).mean()
    else:
        adv = out_f.mean() - out_r.mean()
    return adv + pen


@pytest.mark.parametrize("reduction", ["mean", "max"])
@pytest.mark.parametrize("adversarial", ["wasserstein", "logistic", "hinge"])
def test_losses_and_reductions(adversarial, reduction):
    critic = small_critic()
    real, fake = torch.randn(5, 3), torch.randn(5, 3) * 2
    loss, stats = wk.critic_loss(critic, real, fake, penalty="div", loss=adversarial, reduction=reduction)
    expected = manual(copy.deepcopy(critic), real, fake, adversarial, reduction)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, list(critic.parameters()))
    reference = copy.deepcopy(critic)
    want = torch.autograd.grad(manual(reference, real, fake, adversarial, reduction), list(reference.parameters()))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_max_gp_in_gradient_penalty():
    critic = small_critic()
    real = torch.randn(6, 3)
    got = wk.gradient_penalty(critic, real, kind="r1", reduction="max")
    x = real.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    torch.testing.assert_close(got, 5.0 * g.norm(dim=1).pow(2).max())


def test_fake_is_optional_where_r_does_not_use_it():
    critic = small_critic()
    real = torch.randn(6, 3)
    for kind in ("r1", "dragan"):
        gen = torch.Generator().manual_seed(3)
        alone = wk.gradient_penalty(critic, real, kind=kind, generator=gen)
        gen = torch.Generator().manual_seed(3)
        torch.testing.assert_close(alone, wk.gradient_penalty(critic, real, torch.randn(6, 3), kind=kind,
                                                              generator=gen))
    for kind in ("gp", "div", "r2"):
        with pytest.raises(ValueError, match="fake: sampling="):
            wk.gradient_penalty(critic, real, kind=kind)


def test_loss_name_spellings():
    critic = small_critic()
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    for alias, kind in (("wgan-gp", "gp"), ("wgan_div", "div"), ("wgan-div", "div")):
        g1 = torch.Generator().manual_seed(0)
        g2 = torch.Generator().manual_seed(0)
        torch.testing.assert_close(wk.critic_loss(critic, real, fake, penalty=alias, generator=g1)[0],
                                   wk.critic_loss(critic, real, fake, penalty=kind, generator=g2)[0])
    for bad, name in ((dict(loss="nsgan"), "loss"), (dict(reduction="sum"), "reduction")):
        with pytest.raises(ValueError, match=name):
            wk.critic_loss(critic, real, fake, **bad)
    with pytest.raises(ValueError, match="penalty: expected a preset"):
        wk.critic_loss(critic, real, fake, penalty="wgan")


def test_trainer_accepts_the_preset_spellings():
    from wgan_kernels.train import TrainConfig
    from wgan_kernels.train.config import check

    for alias, name in (("gp", "wgan-gp"), ("div", "wgan-div"), ("wgan_gp", "wgan-gp")):
        cfg = TrainConfig(loss=alias)
        check(cfg)
        assert cfg.loss == name
    with pytest.raises(ValueError, match="loss: expected one of"):
        check(TrainConfig(loss="hinge-gp"))


# ----------------------------------------------------------------------------------------------
# old-style spectral norm (torch.nn.utils.spectral_norm: weight_orig, weight_u, weight_v, a hook)
# ----------------------------------------------------------------------------------------------


def old_sn_critic():
    torch.manual_seed(0)
    sn = torch.nn.utils.spectral_norm
    return nn.Sequential(sn(nn.Conv2d(3, 8, 3, 2, 1)), nn.LeakyReLU(0.1), nn.Flatten(), sn(nn.Linear(128, 1)))


def test_from_torch_takes_old_style_spectral_norm_as_sn_blocks():
    critic = old_sn_critic().eval()  # eval: u, v frozen, so both compute the same sigma from the same u, v
    blocks = wn.from_torch(critic)
    assert isinstance(blocks[0], wn.SNConv2d) and isinstance(blocks[3], wn.SNLinear)
    assert blocks[0].weight is critic[0].weight_orig and blocks[0]._u is critic[0].weight_u
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(blocks(x), critic(x), rtol=1e-5, atol=1e-6)
    out, grad_x = blocks.forward_with_input_grad(x)
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(critic(xr).sum(), xr)
    torch.testing.assert_close(grad_x, g, rtol=1e-4, atol=1e-6)


def test_old_style_checkpoint_loads_into_sn_blocks():
    critic = old_sn_critic()
    state = critic.state_dict()
    assert "0.weight_orig" in state and "0.weight_u" in state
    fresh = wn.Sequential(wn.SNConv2d(3, 8, 3, 2, 1), wn.LeakyReLU(0.1), wn.Flatten(), wn.SNLinear(128, 1))
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh[0].weight, critic[0].weight_orig)
    torch.testing.assert_close(fresh[0]._u, critic[0].weight_u)


def test_old_style_spectral_norm_traced_is_torchs_own():
    """Inside a custom module the traced path runs torch's own hook: the old API's v-first
    iteration, exactly."""
    class Critic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = old_sn_critic()

        def forward(self, x):
            return self.body(x).view(-1)

    critic = Critic()
    reference = copy.deepcopy(critic)
    x = torch.randn(4, 3, 8, 8)
    out, grad_x = wn.from_torch(critic).forward_with_input_grad(x)
    xr = x.clone().requires_grad_(True)
    out_r = reference(xr)
    (g,) = torch.autograd.grad(out_r.sum(), xr)
    torch.testing.assert_close(out, out_r)
    torch.testing.assert_close(grad_x, g)
    torch.testing.assert_close(critic.body[0].weight_u, reference.body[0].weight_u)


def test_spectral_norm_all_takes_old_style_layers():
    """Old-style SN layers continue as SN blocks (their weight_orig, u, v), batched with the rest;
    their checkpoint keys (weight_orig, weight_u, weight_v) still load."""
    critic = old_sn_critic()
    state = copy.deepcopy(critic.state_dict())
    weight, u = critic[0].weight_orig, critic[0].weight_u
    wk.spectral_norm_all(critic)
    assert isinstance(critic[0], wn.SNConv2d) and isinstance(critic[3], wn.SNLinear)
    assert critic[0].weight is weight and critic[0]._u is u
    critic.eval()
    blocks_out = critic(torch.randn(2, 3, 8, 8))
    assert blocks_out.shape == (2, 1)
    critic.load_state_dict(state)  # the old keys
    torch.testing.assert_close(critic[0]._u, state["0.weight_u"])
    bad = nn.Sequential(torch.nn.utils.spectral_norm(nn.Conv1d(3, 4, 3)))
    with pytest.raises(ValueError, match="remove_spectral_norm"):
        wk.spectral_norm_all(bad)


# ----------------------------------------------------------------------------------------------
# ClippedRMSprop with momentum / centered, as torch.optim.RMSprop has them
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("momentum,centered", [(0.9, False), (0.0, True), (0.5, True)])
def test_clipped_rmsprop_momentum_centered(momentum, centered, dtype):
    torch.manual_seed(0)
    params = [torch.randn(7, 5, dtype=dtype).mul_(0.02), torch.randn(13, dtype=dtype).mul_(0.02)]
    ours = [p.clone().requires_grad_(True) for p in params]
    theirs = [p.clone().requires_grad_(True) for p in params]
    opt = wk.ClippedRMSprop(ours, lr=1e-3, momentum=momentum, centered=centered, weight_decay=0.01, clip_value=0.01)
    ref = torch.optim.RMSprop(theirs, lr=1e-3, momentum=momentum, centered=centered, weight_decay=0.01)
    for _ in range(4):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
        with torch.no_grad():
            for q in theirs:
                c = float(torch.tensor(0.01, dtype=q.dtype))
                q.clamp_(-c, c)
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=0, atol=0)
    # state dicts load both ways
    again = torch.optim.RMSprop([p.detach().clone().requires_grad_(True) for p in params], lr=1e-3,
                                momentum=momentum, centered=centered)
    again.load_state_dict(opt.state_dict())
    back = wk.ClippedRMSprop([p.detach().clone().requires_grad_(True) for p in params], lr=1e-3)
    back.load_state_dict(ref.state_dict())
    assert back.param_groups[0]["momentum"] == momentum and back.param_groups[0]["centered"] == centered


def test_clipped_rmsprop_momentum_argument_checks():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="momentum"):
        wk.ClippedRMSprop(p, momentum=-0.1)
    with pytest.raises(ValueError, match="centered"):
        wk.ClippedRMSprop(p, centered="yes")
    with pytest.raises(ValueError, match="backend: rmsprop_clip_momentum_ has no 'cpp'"):
        wk.ClippedRMSprop(p, momentum=0.9, backend="cpp")


# ----------------------------------------------------------------------------------------------
# torch.compile'd critics
# ----------------------------------------------------------------------------------------------


def test_critic_loss_on_a_compiled_critic():
    """aot_autograd has no double backward: the input gradient runs the explicit path of the
    module torch.compile wraps (said once), the loss's forward stays compiled."""
    torch.manual_seed(0)
    critic = nn.Sequential(nn.Linear(3, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    reference = copy.deepcopy(critic)
    compiled = torch.compile(critic, backend="aot_eager")
    real, fake = torch.randn(4, 3), torch.randn(4, 3)
    for penalty in ("gp", "div"):
        gen = torch.Generator().manual_seed(1)
        with pytest.warns(UserWarning, match="torch.compile'd critic") if penalty == "gp" else _quiet():
            loss, _ = wk.critic_loss(compiled, real, fake, penalty=penalty, generator=gen)
        gen = torch.Generator().manual_seed(1)
        expected, _ = wk.critic_loss(lambda x: reference(x), real, fake, penalty=penalty, generator=gen)
        torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
        loss.backward()


class _quiet:
    def __enter__(self):
        import warnings

        self._c = warnings.catch_warnings()
        self._c.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *a):
        return self._c.__exit__(*a)


def test_a_compiled_critic_without_an_explicit_path_says_why():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 1)

        def forward(self, x):
            h = self.fc(x)
            return h * 2 if h.sum() > 0 else h

    compiled = torch.compile(Branchy(), backend="aot_eager")
    with pytest.raises(ValueError, match="torch.compile'd critic needs the explicit"):
        wk.critic_loss(compiled, torch.randn(4, 3), torch.randn(4, 3), penalty="gp")


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel: the explicit path inside DDP's forward bookkeeping
# ----------------------------------------------------------------------------------------------


class _SmallConvCritic(nn.Module):
    """A custom module (traced onto the one-node path)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, 2, 1)
        self.fc = nn.Linear(6 * 4 * 4, 1)

    def forward(self, x):
        h = F.leaky_relu(self.conv(x), 0.2)
        return self.fc(h.view(x.shape[0], -1))


def _global_batch():
    g = torch.Generator().manual_seed(11)
    return torch.randn(8, 3, 8, 8, generator=g), torch.randn(8, 3, 8, 8, generator=g) * 1.5


def _ddp_step(rank, world, init_file, penalty, out_file):
    import warnings

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        critic = _SmallConvCritic()
        ddp = DDP(critic)
        real, fake = _global_batch()
        local = real.shape[0] // world
        rows = slice(rank * local, (rank + 1) * local)
        gen = torch.Generator().manual_seed(5)
        torch.rand(rank * local, generator=gen)  # the lower ranks' per-row draws (interpolates)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the explicit path, no double-backward fallback
            loss, _ = wk.critic_loss(ddp, real[rows], fake[rows], penalty=penalty, generator=gen)
        loss.backward()
        torch.save([p.grad for p in critic.parameters()], f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("penalty", ["div", "gp"])
def test_ddp_two_processes_match_one_on_the_global_batch(tmp_path, penalty):
    import torch.multiprocessing as mp

    out = str(tmp_path / "grads")
    mp.spawn(_ddp_step, args=(2, str(tmp_path / "init"), penalty, out), nprocs=2, join=True)
    torch.manual_seed(0)
    critic = _SmallConvCritic()
    real, fake = _global_batch()
    loss, _ = wk.critic_loss(critic, real, fake, penalty=penalty, generator=torch.Generator().manual_seed(5))
    loss.backward()
    for rank in (0, 1):
        for p, g in zip(critic.parameters(), torch.load(f"{out}.{rank}", weights_only=True)):
            torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)
