"""FID and KID of generated images through torch-fidelity, only when its Inception weights are on
this machine: ``fid_weights`` (a path), else torch's hub cache (``$TORCH_HOME/hub/checkpoints``).
Nothing is downloaded. The weights file is read with ``torch.load(weights_only=True)`` (a pickle
we did not write is never unpickled) and handed to torch-fidelity as a copy this module wrote.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from pathlib import Path

import torch

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's Inception-v3 (FID)


def cached_weights() -> Path:
    """Where torch-fidelity's download would have left the weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


def setup(fid_weights, cuda: bool = False) -> tuple["Fidelity | None", str | None]:
    """(the metric, None), or (None, a one-line note saying why there is none). An explicit
    ``fid_weights`` that cannot be used is an error (``ValueError`` naming it), before training."""
    explicit = fid_weights is not None
    path = Path(fid_weights) if explicit else cached_weights()
    if not path.is_file():
        if explicit:
            raise ValueError(f"fid_weights: no file at {os.fspath(path)!r}")
        return None, (f"FID/KID: skipped, no Inception weights at {path} (pass --fid-weights PATH to "
                      f"torch-fidelity's {INCEPTION_FILE}); the offline metric is sliced W on pixels")
    name = "fid_weights" if explicit else f"the cached weights {path}"
    state = _read_weights(path, name)  # refused before anything else if it is not plain tensors
    try:  # (it imports torchvision too)
        importlib.import_module("torch_fidelity")
    except ImportError as e:
        if explicit:
            raise ValueError(f"fid_weights: needs torch-fidelity (pip install torch-fidelity): {e}") from None
        return None, f"FID/KID: skipped, torch-fidelity is not installed ({e}); the offline metric is sliced W"
    return Fidelity(state, path, cuda), None


def _read_weights(path: Path, name: str) -> dict:
    """The state dict in ``path``, unpickled with ``weights_only=True``; ``ValueError`` naming
    ``name`` when it is anything but a non-empty dict of tensors."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an unsafe pickle, a truncated or foreign file
        raise ValueError(f"{name}: {os.fspath(path)!r} is not a state dict of tensors "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{name}: {os.fspath(path)!r} is not a state dict of tensors")
    return state


class _Images(torch.utils.data.Dataset):
    """Images in [-1, 1] as torch-fidelity takes them: uint8, 3 channels."""

    def __init__(self, x: torch.Tensor):
        x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        self.x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i].contiguous()


class Fidelity:
    def __init__(self, state: dict, source: Path, cuda: bool = False):
        self.cuda = cuda
        self._dir = tempfile.TemporaryDirectory(prefix="wgan-kernels-fid-")
        self.path = Path(self._dir.name) / INCEPTION_FILE  # our own copy: only tensors in it
        torch.save(state, self.path)
        self.source = source

    def __call__(self, fake: torch.Tensor, real: torch.Tensor) -> dict:
        import torch_fidelity

        n = min(len(fake), len(real))
        out = torch_fidelity.calculate_metrics(
            input1=_Images(fake), input2=_Images(real), fid=True, kid=True, kid_subset_size=n,
            feature_extractor_weights_path=os.fspath(self.path), cuda=self.cuda, save_cpu_ram=True, cache=False,
            verbose=False)
        return {"fid": float(out["frechet_inception_distance"]), "kid": float(out["kernel_inception_distance_mean"])}
