"""wgan_kernels: fused kernels for Wasserstein GAN critics.

Ops: weight clipping (``clip_``, ``ClippedRMSprop``). Every op has a plain-PyTorch reference
beside it and chooses its backend at one dispatch point (``wgan_kernels._backend``).
"""

__version__ = "0.1.0"

from ._backend import resolve as resolve_backend
from .ops.clip import ClippedRMSprop, clip_

__all__ = ["__version__", "ClippedRMSprop", "clip_", "resolve_backend"]
