"""wgan_kernels: fused kernels for Wasserstein GAN critics.

Ops: gradient-norm penalties (``grad_norm_penalty``, ``gradient_penalty``, ``critic_loss``,
``sample_penalty_points``), spectral norm (``power_iteration_``, ``spectral_norm``,
``spectral_norm_all``) and weight clipping (``clip_``, ``ClippedRMSprop``). Every op has a
plain-PyTorch reference beside it and chooses its backend at one dispatch point
(``wgan_kernels._backend``).
"""

__version__ = "0.1.0"

from . import nn
from ._backend import resolve as resolve_backend
from .losses import PRESETS, STRATEGIES, critic_loss, gradient_penalty, sample_penalty_points
from .nn.spectral import spectral_norm, spectral_norm_all
from .ops.clip import ClippedRMSprop, clip_
from .ops.penalty import grad_norm_penalty
from .ops.spectral_norm import power_iteration_

__all__ = [
    "__version__",
    "ClippedRMSprop",
    "PRESETS",
    "STRATEGIES",
    "clip_",
    "critic_loss",
    "grad_norm_penalty",
    "nn",
    "power_iteration_",
    "gradient_penalty",
    "resolve_backend",
    "sample_penalty_points",
    "spectral_norm",
    "spectral_norm_all",
]
