"""Presets, r(x) sampling, gradient_penalty and critic_loss against plain-PyTorch references."""

import pytest
import torch

import wgan_kernels as wk
from wgan_kernels.losses import PRESETS, STRATEGIES, gradient_penalty_reference, penalty_config


def mlp_critic(d_in=3, hidden=13):
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.LeakyReLU(0.2),
                               torch.nn.Linear(hidden, hidden), torch.nn.Softplus(),
                               torch.nn.Linear(hidden, 1))


def conv_critic():
    return torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, 2, 1), torch.nn.LeakyReLU(0.2),
                               torch.nn.Conv2d(4, 5, 3, 2, 1), torch.nn.LeakyReLU(0.2),
                               torch.nn.Flatten(), torch.nn.Linear(5 * 2 * 2, 1))


CRITICS = {"mlp": (mlp_critic, (5, 3)), "conv": (conv_critic, (3, 2, 7, 5))}


def pair(shape, device, gen):
    real = torch.randn(*shape, generator=gen).to(device)
    fake = (torch.randn(*shape, generator=gen) * 1.5 + 0.3).to(device)
    return real, fake


def param_grads(critic):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in critic.parameters()]


# ----------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sampling_shapes_and_reproducibility(device, strategy, gen):
    real, fake = pair((6, 2, 3), device, gen)
    g1 = torch.Generator(device=device).manual_seed(7)
    g2 = torch.Generator(device=device).manual_seed(7)
    a = wk.sample_penalty_points(real, fake, strategy, generator=g1)
    b = wk.sample_penalty_points(real, fake, strategy, generator=g2)
    rows = 12 if strategy in ("interpolate-within", "real+fake") else 6
    assert a.shape == (rows, 2, 3) and not a.requires_grad
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_sampling_geometry(gen):
    real, fake = pair((50, 4), "cpu", gen)
    x = wk.sample_penalty_points(real, fake, "interpolate", generator=gen)
    alpha = ((x - fake) / (real - fake))  # one alpha per sample, in [0, 1]
    torch.testing.assert_close(alpha, alpha[:, :1].expand_as(alpha), rtol=1e-4, atol=1e-4)
    assert (alpha >= -1e-5).all() and (alpha <= 1 + 1e-5).all()
    torch.testing.assert_close(wk.sample_penalty_points(real, fake, "real+fake"), torch.cat([real, fake]))
    torch.testing.assert_close(wk.sample_penalty_points(real, fake, "real"), real)
    torch.testing.assert_close(wk.sample_penalty_points(real, fake, "fake"), fake)
    # within: the first half lies in real's box, the second in fake's box
    w = wk.sample_penalty_points(real, fake, "interpolate-within", generator=gen)
    assert (w[:50] >= real.min(0).values - 1e-6).all() and (w[:50] <= real.max(0).values + 1e-6).all()
    assert (w[50:] >= fake.min(0).values - 1e-6).all() and (w[50:] <= fake.max(0).values + 1e-6).all()
    # mixed: every point lies between two samples of the pooled set
    pool = torch.cat([real, fake])
    m = wk.sample_penalty_points(real, fake, "interpolate-mixed", generator=gen)
    assert (m >= pool.min(0).values - 1e-6).all() and (m <= pool.max(0).values + 1e-6).all()
    # DRAGAN: within 0.5 std of the real sample, above it (noise is U(0, 1) scaled)
    d = wk.sample_penalty_points(real, fake, "perturbed-real", generator=gen)
    assert ((d - real) >= -1e-6).all() and ((d - real) <= 0.5 * real.std() + 1e-6).all()


# ----------------------------------------------------------------------------- gradient_penalty


@pytest.mark.parametrize("critic_name", list(CRITICS))
@pytest.mark.parametrize("kind", list(PRESETS))
def test_presets_match_reference(device, critic_name, kind, gen):
    make, shape = CRITICS[critic_name]
    torch.manual_seed(0)
    critic = make().to(device)
    real, fake = pair(shape, device, gen)
    cfg = penalty_config(kind)
    out = wk.gradient_penalty(critic, real, fake, kind=kind, generator=torch.Generator(device).manual_seed(3))
    out.backward()
    ours = param_grads(critic)
    critic.zero_grad()
    points = wk.sample_penalty_points(real, fake, cfg.sampling, torch.Generator(device).manual_seed(3))
    ref = gradient_penalty_reference(critic, points, weight=cfg.weight, center=cfg.center, p=cfg.p,
                                     one_sided=cfg.one_sided)
    ref.backward()
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-6, msg=f"{kind} {critic_name} penalty")
    for i, (a, b) in enumerate(zip(ours, param_grads(critic))):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-5, msg=f"{kind} {critic_name} grad of param {i}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["div", "gp"])
def test_every_strategy_matches_reference(kind, strategy, gen):
    critic = mlp_critic()
    real, fake = pair((7, 3), "cpu", gen)
    out = wk.gradient_penalty(critic, real, fake, kind=kind, sampling=strategy,
                              generator=torch.Generator().manual_seed(5))
    cfg = penalty_config(kind, sampling=strategy)
    points = wk.sample_penalty_points(real, fake, strategy, torch.Generator().manual_seed(5))
    ref = gradient_penalty_reference(critic, points, weight=cfg.weight, center=cfg.center, p=cfg.p)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-6)


def test_explicit_arguments_override_the_preset(gen):
    critic = mlp_critic()
    real, fake = pair((5, 3), "cpu", gen)
    out = wk.gradient_penalty(critic, real, fake, kind="div", weight=3.0, p=4.0, sampling="real")
    ref = gradient_penalty_reference(critic, real, weight=3.0, center=0.0, p=4.0)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-6)


# ----------------------------------------------------------------------------- critic_loss


class CountingCritic(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


@pytest.mark.parametrize("kind,forwards", [("div", 1), ("r1", 1), ("r2", 1), ("gp", 2), ("dragan", 2), (None, 1)])
def test_critic_loss_shares_the_forward_and_matches(kind, forwards, gen):
    critic = CountingCritic(mlp_critic())
    real, fake = pair((6, 3), "cpu", gen)
    loss, stats = wk.critic_loss(critic, real, fake, penalty=kind, generator=torch.Generator().manual_seed(1))
    assert critic.calls == forwards
    loss.backward()
    ours = param_grads(critic)
    critic.zero_grad()
    ref = critic(fake).mean() - critic(real).mean()
    if kind is not None:
        cfg = penalty_config(kind)
        points = wk.sample_penalty_points(real, fake, cfg.sampling, torch.Generator().manual_seed(1))
        pen = gradient_penalty_reference(critic, points, weight=cfg.weight, center=cfg.center, p=cfg.p,
                                         one_sided=cfg.one_sided)
        torch.testing.assert_close(stats["penalty"], pen.detach(), rtol=2e-5, atol=1e-6)
        assert torch.isfinite(stats["grad_norm"]) and stats["grad_norm"] > 0
        ref = ref + pen
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(stats["wasserstein"], (critic(real).mean() - critic(fake).mean()).detach())
    for a, b in zip(ours, param_grads(critic)):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-5)


def test_lazy_regularization(gen):
    critic = CountingCritic(mlp_critic())
    real, fake = pair((6, 3), "cpu", gen)
    full = wk.gradient_penalty(critic, real, fake, kind="div")
    critic.calls = 0
    pens = []
    for _ in range(7):
        loss, stats = wk.critic_loss(critic, real, fake, penalty="div", every=3)
        pens.append(stats["penalty"].item())
    applied = [i for i, v in enumerate(pens) if v != 0]
    assert applied == [0, 3, 6]
    torch.testing.assert_close(torch.tensor(pens[0]), 3 * full.detach(), rtol=2e-5, atol=0)
    assert critic.calls == 7  # one forward per call, none extra when skipped
    with pytest.raises(ValueError, match="every"):
        wk.critic_loss(critic, real, fake, every=0)


@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
def test_autocast_with_grad_scaler(amp_dtype, gen):
    """Under autocast + GradScaler the penalty is computed from the scaled input gradient,
    unscaled in float32: close to the float32 penalty, and finite at p = 6."""
    torch.manual_seed(0)
    critic = mlp_critic(d_in=4, hidden=32)
    real, fake = pair((16, 4), "cpu", gen)
    real, fake = real * 6, fake * 6
    with torch.no_grad():  # gradient norms well above 1: ||g||^6 overflows fp16
        for layer in critic:
            if isinstance(layer, torch.nn.Linear):
                layer.weight.mul_(5)
    ref = wk.gradient_penalty(critic, real, fake, kind="div")
    # a scale such a scaler settles at for these large gradients (a larger one overflows the fp16
    # backward itself, which the scaler then detects and backs off from, as for any loss)
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    with torch.autocast("cpu", dtype=amp_dtype):
        out = wk.gradient_penalty(critic, real, fake, kind="div", scaler=scaler)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    assert ref > 1e4  # the regime where a float16 penalty would overflow
    torch.testing.assert_close(out, ref, rtol=0.1, atol=0)
    if amp_dtype == torch.bfloat16:  # float32's range: the parameter gradients are finite too
        # (in float16, d penalty / d grad ~ p n^(p-1) ~ 1e7 here overflows the half backward: the
        # scaler sees the infs and skips the step, as it is meant to)
        scaler.scale(out).backward()
        assert all(torch.isfinite(p.grad).all() for p in critic.parameters() if p.grad is not None)


def test_bad_input(gen):
    critic = mlp_critic()
    real, fake = pair((4, 3), "cpu", gen)
    with pytest.raises(ValueError, match="fake"):
        wk.gradient_penalty(critic, real, fake[:3])
    with pytest.raises(ValueError, match="fake"):
        wk.gradient_penalty(critic, real, fake.to("meta"))
    with pytest.raises(ValueError, match="real.*empty"):
        wk.gradient_penalty(critic, real[:0], fake[:0])
    with pytest.raises(ValueError, match="real"):
        wk.gradient_penalty(critic, real.long(), fake.long())
    with pytest.raises(ValueError, match="kind"):
        wk.gradient_penalty(critic, real, fake, kind="wgan-lp")
    with pytest.raises(ValueError, match="sampling"):
        wk.gradient_penalty(critic, real, fake, sampling="nearby")
    with pytest.raises(ValueError, match="strategy"):
        wk.sample_penalty_points(real, fake, "nearby")
    with pytest.raises(ValueError, match="p"):
        wk.gradient_penalty(critic, real, fake, p=1.0)
    with pytest.raises(ValueError, match="weight"):
        wk.gradient_penalty(critic, real, fake, weight=-1.0)
    with pytest.raises(ValueError, match="kind"):
        wk.critic_loss(critic, real, fake, penalty="nope")


# ----------------------------------------------------------------------------- the explicit path


@pytest.mark.parametrize("critic_name", list(CRITICS))
@pytest.mark.parametrize("kind", ["gp", "div", "r1", "dragan"])
def test_explicit_path_matches_double_backward(critic_name, kind, gen):
    """A wgan_kernels.nn critic (from_torch: shared parameters) gives the same penalty and the
    same parameter gradients as autograd's double backward on the torch critic."""
    from wgan_kernels.nn import from_torch

    make, shape = CRITICS[critic_name]
    torch.manual_seed(0)
    critic = make()
    explicit = from_torch(critic)
    real, fake = pair(shape, "cpu", gen)
    loss_a, stats_a = wk.critic_loss(explicit, real, fake, penalty=kind, generator=torch.Generator().manual_seed(2))
    loss_a.backward()
    ours = param_grads(critic)
    critic.zero_grad()
    loss_b, stats_b = wk.critic_loss(critic, real, fake, penalty=kind, generator=torch.Generator().manual_seed(2))
    loss_b.backward()
    torch.testing.assert_close(loss_a, loss_b, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(stats_a["penalty"], stats_b["penalty"], rtol=2e-5, atol=1e-6)
    for i, (a, b) in enumerate(zip(ours, param_grads(critic))):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-5, msg=f"{kind} {critic_name} param {i}")


def test_explicit_critic_step_under_torch_compile(gen):
    """The whole critic step (forward, explicit input gradient, fused penalty, first-order
    backward) compiles, and matches the double-backward parameter gradients."""
    from wgan_kernels.nn import from_torch

    torch.manual_seed(0)
    critic = mlp_critic()
    explicit = from_torch(critic)
    real, fake = pair((8, 3), "cpu", gen)

    def step():
        loss, _ = wk.critic_loss(explicit, real, fake, penalty="div")
        loss.backward()
        return loss.detach()

    compiled = torch.compile(step)
    loss_c = compiled()
    compiled_grads = param_grads(critic)
    critic.zero_grad()
    loss_ref, _ = wk.critic_loss(critic, real, fake, penalty="div")
    loss_ref.backward()
    torch.testing.assert_close(loss_c, loss_ref.detach(), rtol=2e-5, atol=1e-6)
    for a, b in zip(compiled_grads, param_grads(critic)):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-5)
