"""The one dispatch point: which implementation of an op runs for a given device.

Backends:
  ``"triton"``     Triton kernels (CUDA tensors; CPU tensors only under ``TRITON_INTERPRET=1``).
  ``"cpp"``        the compiled extension ``wgan_kernels._C`` (CPU; CUDA when built with it).
  ``"reference"``  plain PyTorch: the test oracle and benchmark baseline.
  ``"auto"``       the first available of the op's preferred backends for the device, else
                   ``"reference"``.

``backend=`` on an op, else the environment variable ``WGAN_KERNELS_BACKEND``, else ``"auto"``.
A missing extension is reported once (a warning) and remembered for ``wgan-kernels info``;
``WGAN_KERNELS_STRICT=1`` turns that fallback into an error (CI sets it).

Every choice of implementation is made here, nowhere else:

- ``resolve(op, device, backend)``: the backend of one op call; ``resolve_tensors`` for ops that
  take tensors on several devices at once (clip, RMSprop: a build without the CUDA half sends
  CUDA tensors to the reference);
- ``chain_path(x)``: how ``wgan_kernels.nn`` runs a critic's explicit input-gradient chain:
  ``"one-node"`` (one autograd node for the piecewise-linear critics, nn/_chain.py) or
  ``"layer-by-layer"`` (each block's ops, differentiable twice);
- ``layer_activation(device)``: on the layer-by-layer chain, whether the piecewise-linear
  activations use the Triton mask kernels (``"triton"``) or aten's (``"reference"``);
- ``compiling()``: the one switch for ``torch.compile``, where ops take their traceable form.
"""

from __future__ import annotations

import functools
import warnings

import torch

from . import _triton
from ._env import getenv

BACKENDS = ("auto", "triton", "cpp", "reference")
BACKEND_ENV = "WGAN_KERNELS_BACKEND"
STRICT_ENV = "WGAN_KERNELS_STRICT"

# op -> device type -> fast backends in order of preference ("reference" is always last).
PREFERENCES: dict[str, dict[str, tuple[str, ...]]] = {
    "clip_": {"cpu": ("cpp",), "cuda": ("cpp",)},
    "rmsprop_clip_": {"cpu": ("cpp",), "cuda": ("cpp",)},
    "rmsprop_clip_momentum_": {},  # ClippedRMSprop with momentum or centered: torch's update, then the clamp
    "grad_norm_penalty": {"cpu": ("cpp",), "cuda": ("triton",)},
    "power_iteration_": {"cpu": ("cpp",), "cuda": ("triton",)},
    # the explicit chain's (bias +) leaky ReLU with a 1-byte mask; on CPU the blocks keep aten's kernels
    "activation_mask": {"cuda": ("triton",)},
}

_ext = None
_ext_error: str | None = None
_ext_loaded = False
_warned = False


def compiling() -> bool:
    """Whether torch.compile (Dynamo) is tracing this call: ops then take their traceable form
    (inductor fuses plain ops itself, and traced tensors have no addresses to compare)."""
    return torch.compiler.is_compiling()


def _strict() -> bool:
    return getenv(STRICT_ENV, "0").lower() in ("1", "true", "yes", "on")


def extension():
    """The compiled module ``wgan_kernels._C``, or None if it could not be loaded."""
    global _ext, _ext_error, _ext_loaded
    if not _ext_loaded:
        _ext_loaded = True
        try:
            from . import _C  # noqa: PLC0415

            _ext = _C
        except Exception as e:  # ImportError, or an undefined symbol from a stale build
            _ext_error = f"{type(e).__name__}: {e}"
    return _ext


def extension_error() -> str | None:
    """Why the extension could not be loaded (None when it loaded)."""
    extension()
    return _ext_error


def _missing_extension(op: str) -> None:
    global _warned
    msg = (
        f"wgan_kernels: the compiled extension is not available ({_ext_error}); {op} and the other "
        "extension ops fall back to plain PyTorch. Rebuild with `pip install --no-build-isolation -e .`."
    )
    if _strict():
        raise RuntimeError(msg + f" ({STRICT_ENV}=1 makes this an error.)")
    if not _warned:
        _warned = True
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def available(backend: str, device_type: str) -> bool:
    """Whether ``backend`` can run on tensors of ``device_type`` in this process."""
    if backend == "reference":
        return True
    if backend == "cpp":
        ext = extension()
        return ext is not None and (device_type == "cpu" or (device_type == "cuda" and ext.has_cuda))
    if backend == "triton":
        return _triton.available() and (device_type == "cuda" or (device_type == "cpu" and _triton.interpreting()))
    return False


def requested_backend(backend: str | None) -> str:
    name = backend if backend is not None else getenv(BACKEND_ENV, "auto")
    if name not in BACKENDS:
        source = "backend" if backend is not None else BACKEND_ENV
        raise ValueError(f"{source}: expected one of {BACKENDS}, got {name!r}")
    return name


@functools.lru_cache(maxsize=None)
def _resolve(op: str, device_type: str, name: str, interpreting: bool) -> str:
    preferred = PREFERENCES[op].get(device_type, ())
    if name == "auto":
        for candidate in preferred:
            if available(candidate, device_type):
                return candidate
        if "cpp" in preferred and extension() is None:
            _missing_extension(op)
        return "reference"
    # A Triton kernel written for CUDA also runs on CPU tensors under the interpreter (when forced).
    implemented = preferred
    if device_type == "cpu" and "triton" in PREFERENCES[op].get("cuda", ()):
        implemented = implemented + ("triton",)
    if name != "reference" and name not in implemented:
        raise ValueError(f"backend: {op} has no {name!r} implementation for {device_type} tensors "
                         f"(it has {implemented + ('reference',)})")
    if not available(name, device_type):
        if name == "triton":
            why = "Triton is not importable, or CPU tensors without TRITON_INTERPRET=1"
        else:
            why = _ext_error or "the extension was built without its CUDA half"
        raise RuntimeError(f"backend: {name!r} was requested for {op} on {device_type} but is not available: {why}")
    return name


def resolve(op: str, device: torch.device | str, backend: str | None = None) -> str:
    """The backend that runs ``op`` on ``device``; ``backend`` (or the env variable) forces one.
    Runs on every op call, so a CPU/CUDA device string skips building a ``torch.device``."""
    if isinstance(device, torch.device):
        device_type = device.type
    else:
        device_type = device if device in ("cpu", "cuda") else torch.device(device).type
    name = backend if backend is not None else getenv(BACKEND_ENV, "auto")
    if name not in BACKENDS:
        requested_backend(backend)  # raises, naming the argument or the variable
    return _resolve(op, device_type, name, _triton.interpreting())


def resolve_tensors(op: str, tensors: list, backend: str | None = None) -> str:
    """``resolve`` for an op that takes tensors on several devices in one call: the backend of
    the first tensor's device, unless that is the extension built without its CUDA half and a
    CUDA tensor is among them (then the choice for CUDA: the reference, or an error if forced)."""
    first = tensors[0]
    device = ("cpu" if first.is_cpu else first.device) if isinstance(first, torch.Tensor) else "cpu"
    name = resolve(op, device, backend)
    if name == "cpp" and not extension().has_cuda:
        if any(isinstance(t, torch.Tensor) and t.is_cuda for t in tensors):
            return resolve(op, "cuda", backend)
    return name


CHAIN_PATHS = ("one-node", "layer-by-layer")


def chain_path(x: torch.Tensor) -> str:
    """How wgan_kernels.nn runs a critic's explicit chain on ``x`` (``CHAIN_PATHS``).

    ``"one-node"``, the default, for critics that qualify (piecewise-linear ones: nn/_chain.py
    decides from the critic); ``"layer-by-layer"`` inside torch.compile (inductor fuses the
    block ops itself), under autocast (each op picks its own dtype), and when
    ``WGAN_KERNELS_BACKEND`` is ``reference`` (aten ops only, the oracle) or ``triton`` (the
    blocks' Triton activation kernels, which only the layer-by-layer chain calls)."""
    if compiling() or torch.is_autocast_enabled(x.device.type):
        return "layer-by-layer"
    if requested_backend(None) in ("reference", "triton"):
        return "layer-by-layer"
    return "one-node"


def layer_activation(device) -> str:
    """The layer-by-layer chain's piecewise-linear activations on ``device``: ``"triton"`` (the
    bias + leaky ReLU kernel saving a 1-byte mask; CUDA, or CPU under TRITON_INTERPRET=1 when
    forced) or ``"reference"`` (aten's kernels: on CPU, inside torch.compile, and when
    ``WGAN_KERNELS_BACKEND`` is ``cpp`` or ``reference``)."""
    if compiling():
        return "reference"
    name = requested_backend(None)
    if name in ("cpp", "reference"):
        return "reference"
    return resolve("activation_mask", device, name)
