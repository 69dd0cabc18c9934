"""Op families, one module each: kernels/launchers, autograd rules, references, dispatch.

Nothing here imports ``wgan_kernels.nn`` (or losses, train, eager, models): modules live above ops."""

from .clip import ClippedRMSprop, clip_, clip_reference_, rmsprop_clip_reference_
from .penalty import grad_norm_penalty, grad_norm_penalty_reference
# (spectral norm's modules, SpectralNorm / spectral_norm / spectral_norm_all, live in wgan_kernels.nn;
# here the name spectral_norm is the op's module)
from .spectral_norm import power_iteration_, power_iteration_reference_

__all__ = [
    "ClippedRMSprop",
    "clip_",
    "clip_reference_",
    "grad_norm_penalty",
    "grad_norm_penalty_reference",
    "power_iteration_",
    "power_iteration_reference_",
    "rmsprop_clip_reference_",
]
