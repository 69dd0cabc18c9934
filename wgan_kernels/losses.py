"""Critic losses and gradient penalties: presets, the r(x) sampling strategies of the WGAN-div
paper, ``gradient_penalty`` and the fused ``critic_loss``.

Built on ``ops.penalty.grad_norm_penalty`` (the fused reduction). The input gradient comes from
the critic's explicit path (``forward_with_input_grad``, the ``wgan_kernels.nn`` blocks: one
first-order backward, works under torch.compile) when the critic has one, else from autograd's
double backward (``create_graph=True``).
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, replace

import torch

from .ops.penalty import grad_norm_penalty_and_norms

__all__ = ["PenaltyConfig", "PRESETS", "STRATEGIES", "sample_penalty_points", "input_gradient", "gradient_penalty",
           "critic_loss", "penalty_config", "gradient_penalty_reference"]


@dataclass(frozen=True)
class PenaltyConfig:
    weight: float
    center: float
    p: float
    one_sided: bool
    sampling: str


PRESETS: dict[str, PenaltyConfig] = {
    # WGAN-GP (Gulrajani et al. 2017): lambda 10, ||grad|| -> 1 on real<->fake interpolates.
    "gp": PenaltyConfig(weight=10.0, center=1.0, p=2.0, one_sided=False, sampling="interpolate"),
    # one-sided GP (same paper, appendix): only norms above 1 are penalised.
    "gp-one-sided": PenaltyConfig(weight=10.0, center=1.0, p=2.0, one_sided=True, sampling="interpolate"),
    # WGAN-div (Wu et al. 2018): k E||grad||^p with k 2, p 6 on real and fake samples.
    "div": PenaltyConfig(weight=2.0, center=0.0, p=6.0, one_sided=False, sampling="real+fake"),
    # R1 / R2 (Mescheder et al. 2018): gamma/2 E||grad||^2 on real / fake, gamma 10.
    "r1": PenaltyConfig(weight=5.0, center=0.0, p=2.0, one_sided=False, sampling="real"),
    "r2": PenaltyConfig(weight=5.0, center=0.0, p=2.0, one_sided=False, sampling="fake"),
    # DRAGAN (Kodali et al. 2017): lambda 10, ||grad|| -> 1 around perturbed real samples.
    "dragan": PenaltyConfig(weight=10.0, center=1.0, p=2.0, one_sided=False, sampling="perturbed-real"),
    # zero-centred GP (Thanh-Tung et al. 2019): ||grad|| -> 0 on interpolates.
    "zero-gp": PenaltyConfig(weight=10.0, center=0.0, p=2.0, one_sided=False, sampling="interpolate"),
}

STRATEGIES = ("interpolate", "interpolate-within", "interpolate-mixed", "real+fake", "real", "fake", "perturbed-real")
# Strategies whose points are the real/fake samples themselves: the loss's forward serves the penalty.
_SHARED_FORWARD = {"real+fake": (True, True), "real": (True, False), "fake": (False, True)}


def penalty_config(kind: str = "gp", *, weight=None, center=None, p=None, one_sided=None, sampling=None) -> PenaltyConfig:
    """The preset ``kind`` with any explicit argument overriding it (values checked later)."""
    if kind not in PRESETS:
        raise ValueError(f"kind: expected one of {tuple(PRESETS)}, got {kind!r}")
    overrides = {k: v for k, v in dict(weight=weight, center=center, p=p, one_sided=one_sided,
                                       sampling=sampling).items() if v is not None}
    cfg = replace(PRESETS[kind], **overrides)
    if cfg.sampling not in STRATEGIES:
        raise ValueError(f"sampling: expected one of {STRATEGIES}, got {cfg.sampling!r}")
    return cfg


def _check_pair(real, fake) -> None:
    for name, t in (("real", real), ("fake", fake)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.dim() < 1 or t.shape[0] == 0:
            raise ValueError(f"{name}: expected shape (B, ...) with B >= 1, got {tuple(t.shape)} (empty batch)")
    if real.shape != fake.shape:
        raise ValueError(f"fake: expected the shape of real {tuple(real.shape)}, got {tuple(fake.shape)}")
    if real.device != fake.device:
        raise ValueError(f"fake: expected the device of real ({real.device}), got {fake.device}")


def _uniform(shape, like, generator):
    return torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)


def _per_sample(t: torch.Tensor, generator) -> torch.Tensor:
    return _uniform((t.shape[0],) + (1,) * (t.dim() - 1), t, generator)


def _lerp(a, b, alpha):
    return a + alpha * (b - a)


def sample_penalty_points(real, fake, strategy: str = "interpolate", generator: torch.Generator | None = None):
    """Points x ~ r(x) where the penalty is evaluated (detached from any graph).

    ``"interpolate"``          real<->fake, one alpha ~ U(0, 1) per sample (B points)
    ``"interpolate-within"``   real<->shuffled real and fake<->shuffled fake (2B points)
    ``"interpolate-mixed"``    real+fake shuffled, random pairs interpolated (B points)
    ``"real+fake"``            the samples themselves (2B points: real, then fake)
    ``"real"`` / ``"fake"``    one side (B points)
    ``"perturbed-real"``       DRAGAN: real<->(real + 0.5 std(real) U(0,1) noise) (B points)
    ``generator``: a torch.Generator on the samples' device, for reproducible draws.
    """
    _check_pair(real, fake)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    real, fake = real.detach(), fake.detach()
    b = real.shape[0]

    def perm(n):
        return torch.randperm(n, generator=generator, device="cpu").to(real.device)

    if strategy == "interpolate":
        return _lerp(fake, real, _per_sample(real, generator))
    if strategy == "interpolate-within":
        r = _lerp(real, real[perm(b)], _per_sample(real, generator))
        f = _lerp(fake, fake[perm(b)], _per_sample(fake, generator))
        return torch.cat([r, f])
    if strategy == "interpolate-mixed":
        pool = torch.cat([real, fake])[perm(2 * b)]
        return _lerp(pool[:b], pool[b:], _per_sample(real, generator))
    if strategy == "real+fake":
        return torch.cat([real, fake])
    if strategy == "real":
        return real
    if strategy == "fake":
        return fake
    # perturbed-real (DRAGAN)
    noisy = real + 0.5 * real.std() * _uniform(real.shape, real, generator)
    return _lerp(real, noisy, _per_sample(real, generator))


def _supports_input_grad(critic) -> bool:
    from .nn import supports_input_grad  # noqa: PLC0415 - the layer below, imported on first use

    return supports_input_grad(critic)


def input_gradient(critic, x, *, scaler=None):
    """``(out, grad_x)`` with ``grad_x = d sum(critic(x)) / dx``, differentiable w.r.t. the
    critic's parameters: the explicit path when the critic has one, else autograd with
    ``create_graph=True``. With a ``GradScaler`` (AMP), the double-backward path scales the
    output before differentiating and unscales the gradient in float32 (PyTorch's AMP notes)."""
    if _supports_input_grad(critic):
        out, grad_x = critic.forward_with_input_grad(x)
        return out, grad_x
    x = x.detach().requires_grad_(True)
    out = critic(x)
    seed = out.sum() if scaler is None else scaler.scale(out.float().sum())
    (grad_x,) = torch.autograd.grad(seed, x, create_graph=True)
    if scaler is not None:
        grad_x = grad_x.float() * (1.0 / scaler.get_scale())
    return out, grad_x


def gradient_penalty_reference(critic, points, *, weight: float, center: float, p: float, one_sided: bool = False):
    """Plain PyTorch, the test oracle: autograd's double backward at ``points`` and
    ``weight * mean phi(per-sample norm over all non-batch dims)``, in float32."""
    x = points.detach().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    n = grad_x.flatten(1).float().norm(dim=1)
    d = n - center
    return weight * (d.clamp_min(0) if one_sided else d.abs()).pow(p).mean()


def _penalty(grad_x, cfg: PenaltyConfig, backend):
    return grad_norm_penalty_and_norms(grad_x, weight=cfg.weight, center=cfg.center, p=cfg.p,
                                       one_sided=cfg.one_sided, backend=backend)


def gradient_penalty(critic, real, fake, *, kind: str = "gp", weight=None, center=None, p=None, one_sided=None,
                     sampling=None, generator=None, scaler=None, backend: str | None = None):
    """The penalty ``weight * mean phi(||grad_x D(x)||)`` over ``x ~ r(x)``, a 0-d float32 tensor
    differentiable w.r.t. the critic's parameters.

    ``kind``: a preset of ``PRESETS`` (``"gp"``, ``"gp-one-sided"``, ``"div"``, ``"r1"``, ``"r2"``,
    ``"dragan"``, ``"zero-gp"``); explicit ``weight``, ``center``, ``p``, ``one_sided``,
    ``sampling`` override it. ``scaler``: a GradScaler when the critic runs under autocast.
    """
    cfg = penalty_config(kind, weight=weight, center=center, p=p, one_sided=one_sided, sampling=sampling)
    x = sample_penalty_points(real, fake, cfg.sampling, generator)
    _, grad_x = input_gradient(critic, x, scaler=scaler)
    return _penalty(grad_x, cfg, backend)[0]


@functools.lru_cache(maxsize=64)
def _signs(b: int, k: int, device: torch.device) -> torch.Tensor:
    """-1/(b k) for the b real rows of k outputs, +1/(b k) for the fake ones (float32)."""
    w = torch.full((2 * b * k,), 1.0 / (b * k), device=device)
    w[: b * k] *= -1
    return w


def _mean_difference(out: torch.Tensor, b: int) -> torch.Tensor:
    """mean D(fake) - mean D(real) in float32 from ``out = D(cat(real, fake))``: one dot product
    (one autograd node) in eager mode; under torch.compile the plain means, which inductor fuses."""
    flat = out.float().reshape(2 * b, -1)
    if torch.compiler.is_compiling():
        return flat[b:].mean() - flat[:b].mean()
    return flat.reshape(-1) @ _signs(b, flat.shape[1], out.device)


_lazy_calls: "weakref.WeakKeyDictionary[torch.nn.Module, int]" = weakref.WeakKeyDictionary()


def critic_loss(critic, real, fake, *, penalty: str | None = "div", weight=None, center=None, p=None,
                one_sided=None, sampling=None, every: int = 1, generator=None, scaler=None,
                backend: str | None = None):
    """The whole critic loss ``mean D(fake) - mean D(real) + penalty`` and a stats dict.

    ``penalty``: a preset name (see ``gradient_penalty``) or None for no penalty; explicit
    arguments override the preset. Where r(x) is made of the samples themselves (``real+fake``,
    ``real``, ``fake``: WGAN-div, R1, R2) ONE critic forward on ``cat(real, fake)`` serves both the
    loss and the penalty. ``every=N``: lazy regularization (StyleGAN2): the penalty, scaled by N,
    is applied on every N-th call for this critic (the first call included) and its cost is skipped
    on the others. Returns ``(loss, stats)``, stats holding detached 0-d tensors ``wasserstein``
    (mean D(real) - mean D(fake)), ``penalty`` and ``grad_norm`` (mean norm; NaN when skipped).
    """
    _check_pair(real, fake)
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every: expected an int >= 1, got {every!r}")
    cfg = None
    if penalty is not None:
        cfg = penalty_config(penalty, weight=weight, center=center, p=p, one_sided=one_sided, sampling=sampling)
    apply = cfg is not None
    if apply and every > 1:
        count = _lazy_calls.get(critic, 0)
        _lazy_calls[critic] = count + 1
        apply = count % every == 0
        cfg = replace(cfg, weight=cfg.weight * every)
    b = real.shape[0]
    both = torch.cat([real.detach(), fake.detach()])
    pen = None
    if apply and cfg.sampling in _SHARED_FORWARD:
        out, grad_x = input_gradient(critic, both, scaler=scaler)
        use_real, use_fake = _SHARED_FORWARD[cfg.sampling]
        grad_x = grad_x if (use_real and use_fake) else (grad_x[:b] if use_real else grad_x[b:])
        pen, norms = _penalty(grad_x, cfg, backend)
    else:
        out = critic(both)
        if apply:
            x = sample_penalty_points(real, fake, cfg.sampling, generator)
            _, grad_x = input_gradient(critic, x, scaler=scaler)
            pen, norms = _penalty(grad_x, cfg, backend)
    difference = _mean_difference(out, b)  # mean D(fake) - mean D(real)
    loss = difference
    if pen is not None:
        loss = loss + pen
        grad_norm = norms.detach().float().mean()
    else:  # NaN on the samples' device, like the other stats
        grad_norm = torch.full((), math.nan, device=real.device)
    stats = {
        "wasserstein": -difference.detach(),
        "penalty": pen.detach() if pen is not None else torch.zeros((), device=loss.device),
        "grad_norm": grad_norm,
    }
    return loss, stats
