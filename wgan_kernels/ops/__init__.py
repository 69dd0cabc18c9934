"""Op families, one module each: kernels/launchers, autograd rules, references, dispatch."""

from .clip import ClippedRMSprop, clip_, clip_reference_, rmsprop_clip_reference_
from .penalty import grad_norm_penalty, grad_norm_penalty_reference
# (the spectral_norm function is exported from wgan_kernels: here the name is its module's)
from .spectral_norm import SpectralNorm, power_iteration_, power_iteration_reference_, spectral_norm_all

__all__ = [
    "ClippedRMSprop",
    "SpectralNorm",
    "clip_",
    "clip_reference_",
    "grad_norm_penalty",
    "grad_norm_penalty_reference",
    "power_iteration_",
    "power_iteration_reference_",
    "rmsprop_clip_reference_",
    "spectral_norm_all",
]
