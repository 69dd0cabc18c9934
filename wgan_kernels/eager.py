"""The plain-PyTorch WGAN critic losses people write: autograd's double backward
(``create_graph=True``) and the norms in torch ops, nothing of this package's kernels. It is the
eager baseline of the trainer (``backend="eager"``) and of the critic-step benchmarks, and what
the fused path is tested against end to end (``tests/test_train.py``)."""

from __future__ import annotations

import torch

from .losses import PRESETS, sample_penalty_points

__all__ = ["critic_loss_eager"]

PENALTIES = ("gp", "div")


def critic_loss_eager(critic, real, fake, *, penalty: str | None = None, weight: float | None = None,
                      p: float | None = None, sampling: str | None = None, generator=None):
    """``(loss, wasserstein, penalty)``: ``mean D(fake) - mean D(real) + penalty``, the last two
    detached. ``penalty``: None, ``"gp"`` (WGAN-GP: ``weight * E(||grad|| - 1)^2``) or ``"div"``
    (WGAN-div: ``weight * E||grad||^p``); weight, p and the points r(x) (``sampling``) default to
    the preset's. The random draws are those of ``critic_loss`` with the same ``generator``."""
    if penalty is None:
        d_real, d_fake = critic(real).mean(), critic(fake).mean()
        return d_fake - d_real, (d_real - d_fake).detach(), torch.zeros((), device=real.device)
    if penalty not in PENALTIES:
        raise ValueError(f"penalty: expected None or one of {PENALTIES}, got {penalty!r}")
    preset = PRESETS[penalty]
    weight = preset.weight if weight is None else weight
    p = preset.p if p is None else p
    sampling = preset.sampling if sampling is None else sampling
    if sampling == "real+fake":  # WGAN-div's points: the loss's own forward gives the gradients
        r, f = real.detach().requires_grad_(True), fake.detach().requires_grad_(True)
        out_r, out_f = critic(r), critic(f)
        d_real, d_fake = out_r.mean(), out_f.mean()
        grads = torch.autograd.grad(out_r.sum() + out_f.sum(), (r, f), create_graph=True)
        g = torch.cat(grads)
    else:
        d_real, d_fake = critic(real).mean(), critic(fake).mean()
        if sampling == "interpolate":  # as the WGAN-GP code writes it
            alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), generator=generator, device=real.device)
            x = (fake + alpha * (real - fake)).requires_grad_(True)
        else:
            x = sample_penalty_points(real, fake, sampling, generator).requires_grad_(True)
        (g,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    norms = g.flatten(1).norm(dim=1)
    pen = weight * ((norms - 1).pow(2).mean() if penalty == "gp" else norms.pow(p).mean())
    return d_fake - d_real + pen, (d_real - d_fake).detach(), pen.detach()
