"""critic_loss as a drop-in for code people already have: batch-coupled critics (BatchNorm),
lazy regularization with wrapper callables and an explicit step."""

import copy
import functools

import pytest
import torch
from torch import nn

import wgan_kernels as wk


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
