"""Op families, one module each: kernels/launchers, autograd rules, references, dispatch."""

from .clip import ClippedRMSprop, clip_, clip_reference_, rmsprop_clip_reference_

__all__ = ["ClippedRMSprop", "clip_", "clip_reference_", "rmsprop_clip_reference_"]
