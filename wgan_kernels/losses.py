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
import warnings
import weakref
from dataclasses import dataclass, replace

import torch

from ._backend import BACKENDS, compiling
from ._checks import acc_dtype
from .ops.penalty import check_parameters, grad_norm_penalty_and_norms

__all__ = ["ALIASES", "LOSSES", "REDUCTIONS", "PenaltyConfig", "PRESETS", "STRATEGIES", "sample_penalty_points",
           "input_gradient", "gradient_penalty", "critic_loss", "penalty_config", "gradient_penalty_reference"]


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

# the trainer's loss names (and underscore spellings) for the presets they use
ALIASES = {"wgan-gp": "gp", "wgan_gp": "gp", "wgan-div": "div", "wgan_div": "div", "wgan-gp-one-sided": "gp-one-sided",
           "zero_gp": "zero-gp", "gp_one_sided": "gp-one-sided"}
REDUCTIONS = ("mean", "max")
LOSSES = ("wasserstein", "logistic", "hinge")

STRATEGIES = ("interpolate", "interpolate-within", "interpolate-mixed", "real+fake", "real", "fake", "perturbed-real")
# Strategies whose points are the real/fake samples themselves: the loss's forward serves the penalty.
_SHARED_FORWARD = {"real+fake": (True, True), "real": (True, False), "fake": (False, True)}


def penalty_config(kind: str = "gp", *, weight=None, center=None, p=None, one_sided=None, sampling=None) -> PenaltyConfig:
    """The preset ``kind`` with any explicit argument overriding it, checked here with
    ``grad_norm_penalty``'s rules (a ValueError naming the argument): finite numbers, ``weight >= 0``,
    ``p > 1``, ``one_sided`` a bool, ``sampling`` one of ``STRATEGIES``."""
    return _config(kind, "kind", weight, center, p, one_sided, sampling)


def _config(kind, kind_name: str, weight, center, p, one_sided, sampling) -> PenaltyConfig:
    """``penalty_config`` with the preset argument's own name (``kind`` or ``penalty``) in its error.
    The presets are valid as they stand; overrides are checked, and cached (a training loop
    passes the same ones every step): the check is then one dict look-up."""
    if isinstance(kind, str):
        kind = ALIASES.get(kind, kind)
    if not isinstance(kind, str) or kind not in PRESETS:
        raise ValueError(f"{kind_name}: expected a preset kind, one of {tuple(PRESETS)} (or {tuple(ALIASES)}), "
                         f"got {kind!r}")
    if weight is None and center is None and p is None and one_sided is None and sampling is None:
        return PRESETS[kind]
    key = (kind, weight, center, p, one_sided, sampling)
    try:
        # (value, type) pairs: 1 and True, or 2 and 2.0, are equal keys but not the same argument
        key = tuple((v, type(v)) for v in key)
        return _overridden[key]
    except (KeyError, TypeError):  # not seen yet, or an unhashable argument (refused below)
        pass
    base = PRESETS[kind]
    cfg = PenaltyConfig(*check_parameters(base.weight if weight is None else weight,
                                          base.center if center is None else center,
                                          base.p if p is None else p,
                                          base.one_sided if one_sided is None else one_sided),
                        sampling=base.sampling if sampling is None else sampling)
    if not isinstance(cfg.sampling, str) or cfg.sampling not in STRATEGIES:
        raise ValueError(f"sampling: expected one of {STRATEGIES}, got {cfg.sampling!r}")
    if len(_overridden) < 256:
        _overridden[key] = cfg
    return cfg


_overridden: dict[tuple, PenaltyConfig] = {}


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
    if real.dtype != fake.dtype:  # else torch.cat promotes silently, or the critic fails in its first matmul
        raise ValueError(f"fake: expected the dtype of real ({real.dtype}), got {fake.dtype}")
    if real.device != fake.device:
        raise ValueError(f"fake: expected the device of real ({real.device}), got {fake.device}")


def _check_generator(generator, real: torch.Tensor) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device
    if device != real.device and device.type != real.device.type:  # (.type costs ~1 us: only when they differ)
        raise ValueError(f"generator: expected a torch.Generator on the samples' device ({real.device.type}), "
                         f"got one on {generator.device}")


def _check_strategy_fits(strategy: str, real: torch.Tensor) -> None:
    if strategy == "perturbed-real" and real.numel() < 2:  # std of one value: NaN points
        raise ValueError(f"real: perturbed-real scales its noise by real's std, which needs 2 or more values, "
                         f"got shape {tuple(real.shape)}")


def _check_critic(critic) -> None:
    if not callable(critic):
        raise ValueError(f"critic: expected a callable (a Module or a function of a batch), "
                         f"got {type(critic).__name__}")


def _check_output(out, rows: int) -> None:
    """The critic's output on ``rows`` samples: a floating tensor of shape (rows, ...), one or more
    values per sample."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"critic: expected a tensor output, got {type(out).__name__}")
    if out.dim() == 0 or out.shape[0] != rows or out.numel() == 0:
        raise ValueError(f"critic: expected an output of shape ({rows}, ...) with one or more values per input "
                         f"sample, got {tuple(out.shape)}")
    if not out.is_floating_point():
        raise ValueError(f"critic: expected a floating-point output, got {out.dtype}")


def _check_backend(backend) -> None:
    """An unknown ``backend`` is refused up front, also where no penalty runs (``penalty=None``,
    a step skipped by ``every``); a known one is checked against the device where the penalty runs."""
    if backend is not None and (not isinstance(backend, str) or backend not in BACKENDS):
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def _check_scaler(scaler) -> None:
    if scaler is not None and not (callable(getattr(scaler, "scale", None))
                                   and callable(getattr(scaler, "get_scale", None))):
        raise ValueError(f"scaler: expected a torch.amp.GradScaler or None, got {type(scaler).__name__}")


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
    ``"perturbed-real"``       DRAGAN: real<->(real + 0.5 std(real) U(0,1) noise) (B points;
                               real needs 2 or more values for its std)
    ``generator``: a torch.Generator on the samples' device, for reproducible draws.
    real and fake: floating tensors (B, ...) of one shape, dtype and device.
    """
    _check_pair(real, fake)
    _check_generator(generator, real)
    return _sample(real, fake, strategy, generator)


def _sample(real, fake, strategy, generator):
    """``sample_penalty_points`` once real, fake and generator are checked."""
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {STRATEGIES}, got {strategy!r}")
    _check_strategy_fits(strategy, real)
    real, fake = real.detach(), fake.detach()
    b = real.shape[0]

    def perm(n):  # on the generator's device (= the samples'): a CUDA generator cannot draw on the CPU
        return torch.randperm(n, generator=generator, device=real.device)

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


_WRAPPERS = ("DataParallel",)  # wrappers whose forward the explicit path cannot stand in for
# critic -> the fallback reasons already said (a warning once per critic and reason)
_noted: "weakref.WeakKeyDictionary[torch.nn.Module, set]" = weakref.WeakKeyDictionary()


def _explicit(critic, x):
    """``(out, grad_x)`` on the critic's explicit path, or None (then autograd's double backward):
    a wgan_kernels.nn critic; a torch module through its traced graph (nn/trace.py), with a
    one-time note (a warning, once per critic and reason) when the graph has no explicit path."""
    from .nn import supports_input_grad  # noqa: PLC0415 - the layer below, imported on first use
    from .nn.trace import Unsupported, traced_critic  # noqa: PLC0415

    if supports_input_grad(critic):
        return critic.forward_with_input_grad(x)
    if not isinstance(critic, torch.nn.Module):
        return None
    if isinstance(critic, torch.nn.parallel.DistributedDataParallel):
        return _explicit_ddp(critic, x)
    if type(critic).__name__ in _WRAPPERS:
        _note(critic, f"{type(critic).__name__} wraps the critic (replicas per device), and its forward would be "
                      "skipped by the explicit path; DistributedDataParallel is supported")
        return None
    if type(critic).__name__ == "OptimizedModule" and isinstance(getattr(critic, "_orig_mod", None), torch.nn.Module):
        return _explicit_compiled(critic, x)
    try:
        return traced_critic(critic).forward_with_input_grad(x)
    except Unsupported as e:
        _note(critic, str(e))
        return None


def _explicit_compiled(compiled, x):
    """A torch.compile'd critic: aot_autograd has no double backward, so the input gradient runs
    the explicit path of the module it compiled (said once); a clear error when it has none."""
    from .nn import supports_input_grad  # noqa: PLC0415
    from .nn.trace import Unsupported, traced_critic  # noqa: PLC0415

    inner = compiled._orig_mod
    _note(compiled, "compiled", "wgan_kernels: a torch.compile'd critic: its input gradient (the penalty) runs the "
          "explicit path of the module it wraps, uncompiled (torch.compile's aot_autograd has no double backward); "
          "the loss's own forward stays compiled")
    if supports_input_grad(inner):
        return inner.forward_with_input_grad(x)
    try:
        return traced_critic(inner).forward_with_input_grad(x)
    except Unsupported as e:
        raise ValueError(f"critic: a torch.compile'd critic needs the explicit input-gradient path (aot_autograd has "
                         f"no double backward), which its module does not have: {e}") from None


def _note(critic, reason: str, message: str | None = None) -> None:
    """Warns once per critic and reason (``message``: the words, else the double-backward note)."""
    said = _noted.setdefault(critic, set())
    if reason not in said:
        said.add(reason)
        warnings.warn(message or f"wgan_kernels: {type(critic).__name__} takes autograd's double backward for the "
                      f"gradient penalty (no explicit input-gradient path): {reason}", UserWarning, stacklevel=5)


def _explicit_ddp(ddp, x):
    """The explicit path of the module a ``DistributedDataParallel`` wraps, inside DDP's own
    forward bookkeeping (``_pre_forward``: buffer sync, bucket rebuilds; ``_post_forward``: the
    reducer prepared for this backward), so its gradient all-reduce runs as for ``ddp(x)``: one
    forward per backward when r(x) is the samples (WGAN-div, R1, R2: critic_loss's shared forward)."""
    from .nn import supports_input_grad  # noqa: PLC0415
    from .nn.trace import Unsupported, traced_critic  # noqa: PLC0415

    inner = ddp.module
    if not (hasattr(ddp, "_pre_forward") and hasattr(ddp, "_post_forward")):
        _note(ddp, "this torch's DistributedDataParallel has no _pre_forward / _post_forward")
        return None
    if supports_input_grad(inner):
        run = inner.forward_with_input_grad
    else:
        traced = traced_critic(inner)
        try:
            traced.program(x, (), {})  # built (or refused) before DDP's bookkeeping starts
        except Unsupported as e:
            _note(ddp, str(e))
            return None
        run = traced.forward_with_input_grad
    with torch.autograd.profiler.record_function("DistributedDataParallel.forward"):
        (x,), _ = ddp._pre_forward(x)
        return ddp._post_forward(run(x))


def input_gradient(critic, x, *, scaler=None):
    """``(out, grad_x)`` with ``grad_x = d sum(critic(x)) / dx``, differentiable w.r.t. the
    critic's parameters: the explicit path when the critic has one (a wgan_kernels.nn critic, or
    a torch module whose traced graph has one: see ``wgan_kernels.nn.from_torch``), else autograd
    with ``create_graph=True``. With a ``GradScaler`` (AMP), the double-backward path scales the
    output before differentiating and unscales the gradient in float32 (PyTorch's AMP notes)."""
    _check_critic(critic)
    explicit = _explicit(critic, x)
    if explicit is not None:
        out, grad_x = explicit
        _check_output(out, x.shape[0])
        return out, grad_x
    if not torch.is_grad_enabled():
        # under no_grad (an evaluation), the input gradient still needs autograd; no graph is kept
        if torch.is_inference_mode_enabled():
            raise RuntimeError("the gradient penalty needs autograd (d critic(x) / dx), which torch.inference_mode() "
                               "turns off; evaluate it under torch.no_grad() instead")
        with torch.enable_grad():
            out, grad_x = _autograd_input_gradient(critic, x, scaler, create_graph=False)
        return out.detach(), grad_x.detach()
    return _autograd_input_gradient(critic, x, scaler, create_graph=True)


def _autograd_input_gradient(critic, x, scaler, create_graph: bool):
    x = x.detach().requires_grad_(True)
    out = critic(x)
    _check_output(out, x.shape[0])
    if not out.requires_grad:
        raise ValueError("critic: its output does not depend on its input through autograd (it has no grad_fn); "
                         "the gradient penalty needs d critic(x) / dx")
    seed = out.sum() if scaler is None else scaler.scale(out.float().sum())
    (grad_x,) = torch.autograd.grad(seed, x, create_graph=create_graph, allow_unused=True)
    if grad_x is None:  # a critic whose output ignores x (a constant): its input gradient is 0, not an error
        grad_x = torch.zeros_like(x)
    if scaler is not None:
        grad_x = grad_x.float() * (1.0 / scaler.get_scale())
    return out, grad_x


def gradient_penalty_reference(critic, points, *, weight: float, center: float, p: float, one_sided: bool = False):
    """Plain PyTorch, the test oracle: autograd's double backward at ``points`` and
    ``weight * mean phi(per-sample norm over all non-batch dims)``, in float32 (float64 for a
    float64 gradient)."""
    x = points.detach().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    return weight * _phi_terms(grad_x, center, p, one_sided)[0].mean()


def _phi_terms(grad_x, center: float, p: float, one_sided: bool):
    """``(phi(n_i), n_i)`` in plain torch ops: the per-sample norms over all non-batch dims in
    float32 (float64 for a float64 gradient) and ``|n - center|^p`` (``max(0, n - center)^p``)."""
    n = grad_x.reshape(grad_x.shape[0], -1).to(acc_dtype(grad_x.dtype)).norm(dim=1)
    d = n - center
    return (d.clamp_min(0) if one_sided else d.abs()).pow(p), n


def _penalty(grad_x, cfg: PenaltyConfig, backend, reduction: str = "mean"):
    """(penalty, per-sample norms). ``reduction="max"``: ``weight * max_i phi(n_i)`` (StudioGAN's
    max-GP), in plain torch ops (float32 accumulation, as the fused kernels)."""
    if reduction == "mean":
        return grad_norm_penalty_and_norms(grad_x, weight=cfg.weight, center=cfg.center, p=cfg.p,
                                           one_sided=cfg.one_sided, backend=backend)
    terms, n = _phi_terms(grad_x, cfg.center, cfg.p, cfg.one_sided)
    return cfg.weight * terms.max(), n.detach()


def _check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


_NEEDS_FAKE = ("interpolate", "interpolate-within", "interpolate-mixed", "real+fake", "fake")


def gradient_penalty(critic, real, fake=None, *, kind: str = "gp", weight=None, center=None, p=None,
                     one_sided=None, sampling=None, generator=None, scaler=None, reduction: str = "mean",
                     backend: str | None = None):
    """The penalty ``weight * mean phi(||grad_x D(x)||)`` over ``x ~ r(x)``, a 0-d float32 tensor
    differentiable w.r.t. the critic's parameters.

    ``kind``: a preset of ``PRESETS`` (``"gp"``, ``"gp-one-sided"``, ``"div"``, ``"r1"``, ``"r2"``,
    ``"dragan"``, ``"zero-gp"``; also the trainer's ``"wgan-gp"``, ``"wgan-div"``); explicit
    ``weight``, ``center``, ``p``, ``one_sided``, ``sampling`` override it. ``fake`` may be None
    where r(x) does not use it (R1, DRAGAN). ``reduction="max"``: the largest per-sample term
    instead of the mean (max-GP). ``scaler``: a GradScaler when the critic runs under autocast.
    """
    _check_critic(critic)
    cfg = _config(kind, "kind", weight, center, p, one_sided, sampling)
    if fake is None:
        if cfg.sampling in _NEEDS_FAKE:
            raise ValueError(f"fake: sampling={cfg.sampling!r} uses the fake samples; pass them")
        fake = real  # (not read by this strategy)
    _check_pair(real, fake)
    _check_generator(generator, real)
    _check_scaler(scaler)
    _check_backend(backend)
    _check_reduction(reduction)
    x = _sample(real, fake, cfg.sampling, generator)
    _, grad_x = input_gradient(critic, x, scaler=scaler)
    return _penalty(grad_x, cfg, backend, reduction)[0]


@functools.lru_cache(maxsize=64)
def _signs(b: int, k: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """-1/(b k) for the b real rows of k outputs, +1/(b k) for the fake ones."""
    w = torch.full((2 * b * k,), 1.0 / (b * k), device=device, dtype=dtype)
    w[: b * k] *= -1
    return w


def _mean_difference(out: torch.Tensor, b: int) -> torch.Tensor:
    """mean D(fake) - mean D(real) from ``out = D(cat(real, fake))``, in float32 (float64 for a
    float64 critic, whose loss would otherwise be rounded to float32): one dot product (one
    autograd node) in eager mode; under torch.compile the plain means, which inductor fuses."""
    flat = (out if out.dtype == torch.float64 else out.float()).reshape(2 * b, -1)  # (.float(): cheaper than .to)
    if compiling():
        return flat[b:].mean() - flat[:b].mean()
    return flat.reshape(-1) @ _signs(b, flat.shape[1], out.device, flat.dtype)


# critic -> calls so far (every > 1); a bound method counts under its object and function, since
# `module.forward` is a new object at each access and would never be found again.
_lazy_calls: "weakref.WeakKeyDictionary[object, dict]" = weakref.WeakKeyDictionary()


def _wrapped_module(critic, depth: int = 0):
    """The torch module a critic callable wraps: the module itself, a bound method's object, a
    ``functools.partial``'s function or arguments, or a closure's cells (``lambda x: D(x, y)``,
    StudioGAN's ``lambda x: D(x, y)["adv_output"]``); None when none is found."""
    if isinstance(critic, torch.nn.Module):
        return critic
    if depth > 3:
        return None
    owner = getattr(critic, "__self__", None)
    if isinstance(owner, torch.nn.Module):
        return owner
    if isinstance(critic, functools.partial):
        for part in (critic.func, *critic.args, *critic.keywords.values()):
            found = _wrapped_module(part, depth + 1)
            if found is not None:
                return found
        return None
    for cell in getattr(critic, "__closure__", None) or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(content, torch.nn.Module) or callable(content):
            found = _wrapped_module(content, depth + 1)
            if found is not None:
                return found
    return None


def _lazy_count(critic) -> int:
    """How many calls with ``critic`` came before this one (``every > 1``, no ``step``); counts
    this one. A callable that wraps a module (a lambda, a partial, a bound method) counts under
    that module, so a new wrapper per call does not restart the count."""
    owner, func = getattr(critic, "__self__", None), getattr(critic, "__func__", None)
    wrapped = _wrapped_module(critic)
    if wrapped is not None:
        owner, func = wrapped, None
    elif owner is None or func is None:  # not a bound method
        owner, func = critic, None
    try:
        counts = _lazy_calls.setdefault(owner, {})
    except TypeError:
        raise ValueError(f"critic: every > 1 keeps a call count per critic, which needs a critic that can be weakly "
                         f"referenced (a Module, a function, a bound method), got {type(critic).__name__}") from None
    count = counts.get(func, 0)
    counts[func] = count + 1
    return count


_BATCH_STATISTICS = (torch.nn.modules.batchnorm._BatchNorm,)


def _is_per_sample(critic) -> bool:
    """Whether ``critic(cat(real, fake))`` gives each sample what ``critic(real)`` /
    ``critic(fake)`` give it: no layer normalising with the batch's statistics (a BatchNorm in
    training mode, or one without running statistics) in the module the critic is or wraps. A
    callable that wraps no module found here is taken as per-sample (functions of the samples)."""
    module = _wrapped_module(critic)
    if module is None:
        return True
    for m in module.modules():
        if isinstance(m, _BATCH_STATISTICS) and (m.training or not m.track_running_stats):
            return False
    return True


def _critic_loss_apart(critic, real, fake, cfg, generator, scaler, backend, reduction, adversarial):
    """critic_loss for a batch-coupled critic: D(real) and D(fake) separately, as the user's own
    code runs them (a training BatchNorm then normalises each half with its own statistics);
    the penalty at the samples (WGAN-div, R1, R2) from those same forwards, at other points
    (interpolates) from one more."""
    b = real.shape[0]
    use_real, use_fake = _SHARED_FORWARD.get(cfg.sampling, (False, False)) if cfg is not None else (False, False)
    grads = []
    outs = []
    for x, used in ((real.detach(), use_real), (fake.detach(), use_fake)):
        if used:
            out, grad_x = input_gradient(critic, x, scaler=scaler)
            grads.append(grad_x)
        else:
            out = critic(x)
            _check_output(out, b)
        outs.append(out)
    pen = norms = None
    if cfg is not None:
        if not grads:
            x = _sample(real, fake, cfg.sampling, generator)
            grads.append(input_gradient(critic, x, scaler=scaler)[1])
        grad_x = grads[0] if len(grads) == 1 else torch.cat(grads)
        pen, norms = _penalty(grad_x, cfg, backend, reduction)
    return _loss_and_stats(torch.cat(outs), b, pen, norms, adversarial)


def critic_loss(critic, real, fake, *, penalty: str | None = "div", weight=None, center=None, p=None,
                one_sided=None, sampling=None, every: int = 1, step: int | None = None, generator=None,
                scaler=None, shared_forward: bool | None = None, loss: str = "wasserstein",
                reduction: str = "mean", backend: str | None = None):
    """The whole critic loss ``mean D(fake) - mean D(real) + penalty`` and a stats dict.

    ``loss``: the adversarial term: ``"wasserstein"`` (default), ``"logistic"`` (the
    non-saturating GAN's ``softplus(-D(real)) + softplus(D(fake))``, what R1 / R2 are mostly used
    with) or ``"hinge"`` (``relu(1 - D(real)) + relu(1 + D(fake))``). ``reduction``: ``"mean"``
    of the per-sample penalty terms, or ``"max"`` (max-GP).

    ``penalty``: a preset name (see ``gradient_penalty``) or None for no penalty; explicit
    arguments override the preset. Where r(x) is made of the samples themselves (``real+fake``,
    ``real``, ``fake``: WGAN-div, R1, R2) ONE critic forward on ``cat(real, fake)`` serves both the
    loss and the penalty.

    ``shared_forward``: whether real and fake go through the critic in one batch. None (default):
    yes unless the critic (or the module a callable wraps) holds a BatchNorm normalising with the
    batch's statistics (training mode): then ``D(real)`` and ``D(fake)`` run apart, as the user's
    own code does, so each half is normalised with its own statistics. True / False force it.

    ``every=N``: lazy regularization (StyleGAN2): the penalty, scaled by N, is applied when
    ``step % N == 0`` (``step``: the caller's training step), or, without ``step``, on every N-th
    call for this critic (the first call included; counted per module: a lambda, partial or bound
    method wrapping a module counts under that module, so a new wrapper per call is the same
    critic); its cost is skipped on the other calls.
    Returns ``(loss, stats)``, stats holding detached 0-d tensors ``wasserstein``
    (mean D(real) - mean D(fake)), ``penalty`` and ``grad_norm`` (mean norm; NaN when skipped);
    the loss is float32 (float64 for a float64 critic, which then passes a float64 gradcheck).

    Every argument is checked up front, whether or not this call's penalty runs, with a ValueError
    naming it: real and fake of one shape, dtype and device; a critic output of shape (2B, ...);
    ``weight`` etc. only with a ``penalty``.
    """
    _check_critic(critic)
    _check_pair(real, fake)
    if type(every) is not int or every < 1:  # (type, not isinstance: a bool is an int)
        raise ValueError(f"every: expected an int >= 1, got {every!r}")
    if step is not None and (type(step) is not int or step < 0):
        raise ValueError(f"step: expected an int >= 0 (the training step; the penalty runs when step % every == 0), "
                         f"got {step!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
    _check_reduction(reduction)
    if shared_forward not in (None, True, False):
        raise ValueError(f"shared_forward: expected None (decide from the critic), True or False, got {shared_forward!r}")
    _check_generator(generator, real)
    _check_scaler(scaler)
    _check_backend(backend)
    cfg = None
    if penalty is not None:
        cfg = _config(penalty, "penalty", weight, center, p, one_sided, sampling)
        _check_strategy_fits(cfg.sampling, real)  # before the critic runs, and also on steps `every` skips
    else:
        for name, value in (("weight", weight), ("center", center), ("p", p), ("one_sided", one_sided),
                            ("sampling", sampling)):
            if value is not None:
                raise ValueError(f"{name}: has no effect with penalty=None (no penalty); pass a penalty preset "
                                 f"or leave {name} out, got {value!r}")
    apply = cfg is not None
    if apply and every > 1:
        apply = (step if step is not None else _lazy_count(critic)) % every == 0
        cfg = replace(cfg, weight=cfg.weight * every)
    b = real.shape[0]
    if shared_forward is None:
        shared_forward = _is_per_sample(critic)
    if not shared_forward:
        return _critic_loss_apart(critic, real, fake, cfg if apply else None, generator, scaler, backend, reduction,
                                  loss)
    both = torch.cat([real.detach(), fake.detach()])
    pen = norms = None
    if apply and cfg.sampling in _SHARED_FORWARD:
        out, grad_x = input_gradient(critic, both, scaler=scaler)
        use_real, use_fake = _SHARED_FORWARD[cfg.sampling]
        grad_x = grad_x if (use_real and use_fake) else (grad_x[:b] if use_real else grad_x[b:])
        pen, norms = _penalty(grad_x, cfg, backend, reduction)
    else:
        from .nn.trace import in_loss_layout  # noqa: PLC0415 - the layer below, imported on first use

        out = critic(in_loss_layout(critic, both))
        _check_output(out, 2 * b)
        if apply:
            x = _sample(real, fake, cfg.sampling, generator)
            _, grad_x = input_gradient(critic, x, scaler=scaler)
            pen, norms = _penalty(grad_x, cfg, backend, reduction)
    return _loss_and_stats(out, b, pen, norms, loss)


def _loss_and_stats(out, b, pen, norms, adversarial="wasserstein"):
    """The adversarial term of ``out = D(cat(real, fake))`` (``mean D(fake) - mean D(real)`` for
    ``"wasserstein"``; ``softplus(-D(real)) + softplus(D(fake))`` means for ``"logistic"``, the
    non-saturating GAN loss; ``relu(1 - D(real)) + relu(1 + D(fake))`` means for ``"hinge"``),
    plus the penalty, and the stats dict (``wasserstein``: mean D(real) - mean D(fake) always)."""
    difference = _mean_difference(out, b)
    loss = difference
    if adversarial != "wasserstein":
        flat = (out if out.dtype == torch.float64 else out.float()).reshape(2 * b, -1)
        r, f = flat[:b], flat[b:]
        if adversarial == "logistic":
            loss = torch.nn.functional.softplus(-r).mean() + torch.nn.functional.softplus(f).mean()
        else:
            loss = torch.relu(1 - r).mean() + torch.relu(1 + f).mean()
    if pen is not None:
        loss = loss + pen
        grad_norm = norms.detach().mean()  # float32 (float64 for a float64 gradient), like the penalty
    else:  # NaN, in the loss's dtype on the samples' device, like the other stats
        grad_norm = difference.new_full((), math.nan)
    stats = {
        "wasserstein": -difference.detach(),
        "penalty": pen.detach() if pen is not None else difference.new_zeros(()),
        "grad_norm": grad_norm,
    }
    return loss, stats
