"""The trainer's settings: ``TrainConfig``, its checks (every field, named in the error), and the
per-loss defaults (optimizers from the papers; penalty weight and r(x) from ``losses.PRESETS``)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch

from .._checks import finite_number
from ..losses import PRESETS, STRATEGIES
from . import datasets as ds

LOSSES = ("wgan", "wgan-gp", "wgan-div", "sngan")
MODELS = ("mlp", "dcgan", "resnet")
# the models' width when ``hidden`` is not given: MLP units; DCGAN: the first conv's channels
# (doubling per stage); ResNet: the channels of every block (WGAN-GP's CIFAR-10 128)
HIDDEN = {"mlp": 256, "dcgan": 64, "resnet": 128}
RESOLUTIONS = (32, 64)
# the penalty presets' names (and underscore spellings) for the trainer's losses
LOSS_ALIASES = {"gp": "wgan-gp", "div": "wgan-div", "wgan_gp": "wgan-gp", "wgan_div": "wgan-div", "sn-gan": "sngan"}
BACKENDS = ("fused", "eager")
# The trainer's losses and the penalty presets they use (sampling and weight defaults read from them).
PENALTY_PRESET = {"wgan-gp": "gp", "wgan-div": "div"}


@dataclass
class TrainConfig:
    loss: str = "wgan-div"
    dataset: str = "8gaussians"
    backend: str = "fused"
    steps: int = 1000               # generator steps
    n_critic: int = 5               # critic steps per generator step (the papers' 5)
    batch_size: int | None = None   # 256 for 2-D data, 64 otherwise
    lr: float | None = None         # per-loss default (see optimizer_defaults)
    hidden: int | None = None       # the model's width (HIDDEN: MLP 256 units, DCGAN 64, ResNet 128 channels)
    model: str = "mlp"              # "mlp", "dcgan" or "resnet" (the last two: images, e.g. digits32)
    resolution: int | None = None   # image side for image data: 32 or 64 (None: the data's own, else 32)
    z_dim: int | None = None        # 2 for 2-D data, 32 otherwise
    penalty_weight: float | None = None  # GP: 0.1 on 2-D data (WGAN-GP toys), 10 otherwise; div: k 2
    div_p: float = 6.0
    sampling: str | None = None     # r(x) for wgan-gp / wgan-div: None = "interpolate" (GP), "real+fake" (div)
    clip_value: float = 0.01
    seed: int = 0
    eval_every: int = 100
    eval_samples: int = 1000
    checkpoint_every: int = 200
    log_every: int = 10
    device: str = "cpu"
    out: str | None = None
    tensorboard: bool = False       # scalars and sample grids for TensorBoard in out/tensorboard
    fid_weights: str | None = None  # Inception weights (torch-fidelity's .pth) for FID/KID; None: its cache
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if isinstance(self.loss, str):  # one name per loss from here on (checkpoints, metrics, resume)
            self.loss = LOSS_ALIASES.get(self.loss, self.loss)


# What a resumed run may set differently from the run that wrote the checkpoint; every other
# setting changes the training (or what its metrics mean), so a difference is refused.
RESUMABLE = ("steps", "eval_every", "checkpoint_every", "log_every", "progress", "out", "tensorboard",
             "fid_weights")
_MAX_SEED = 2**63 - 3  # seed + 2 seeds the device generator


def _int(name: str, v, low: int = 1, *, optional: bool = False, high: int | None = None) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        bound = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name}: expected {bound}{' or None' if optional else ''}, got {v!r}")


def check(cfg: TrainConfig) -> None:
    """Every field checked, the field named in the error; nothing is substituted silently."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    if isinstance(cfg.loss, str):
        cfg.loss = LOSS_ALIASES.get(cfg.loss, cfg.loss)  # (also when set after construction)
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES} (or {tuple(LOSS_ALIASES)}), got {cfg.loss!r}")
    if cfg.model not in MODELS:
        raise ValueError(f"model: expected one of {MODELS}, got {cfg.model!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {cfg.backend!r}")
    if not isinstance(cfg.dataset, str):
        raise ValueError(f"dataset: expected one of {ds.DATASETS} or {ds.FILE_KINDS} (pass tensors as data=), "
                         f"got {cfg.dataset!r}")
    for name in ("steps", "n_critic", "eval_every", "checkpoint_every", "log_every", "eval_samples"):
        _int(name, getattr(cfg, name))
    _int("hidden", cfg.hidden, optional=True)
    if cfg.resolution is not None and (isinstance(cfg.resolution, bool) or cfg.resolution not in RESOLUTIONS):
        raise ValueError(f"resolution: expected one of {RESOLUTIONS} or None, got {cfg.resolution!r}")
    _int("batch_size", cfg.batch_size, optional=True)
    _int("z_dim", cfg.z_dim, optional=True)
    _int("seed", cfg.seed, 0, high=_MAX_SEED)
    if cfg.sampling is not None:
        if cfg.loss not in ("wgan-gp", "wgan-div"):
            raise ValueError(f"sampling: only for wgan-gp and wgan-div, not {cfg.loss!r}")
        if cfg.sampling not in STRATEGIES:
            raise ValueError(f"sampling: expected one of {STRATEGIES}, got {cfg.sampling!r}")
    if cfg.lr is not None:
        finite_number("lr", cfg.lr, low=0, low_inclusive=False)
    if cfg.penalty_weight is not None:
        finite_number("penalty_weight", cfg.penalty_weight, low=0)
    finite_number("div_p", cfg.div_p, low=1, low_inclusive=False)
    finite_number("clip_value", cfg.clip_value, low=0, low_inclusive=False)  # both backends alike
    check_device(cfg.device)
    if cfg.out is not None and not isinstance(cfg.out, (str, os.PathLike)):
        raise ValueError(f"out: expected a folder path or None, got {type(cfg.out).__name__}")
    for name in ("progress", "tensorboard"):
        if not isinstance(getattr(cfg, name), bool):
            raise ValueError(f"{name}: expected a bool, got {getattr(cfg, name)!r}")
    if cfg.tensorboard and cfg.out is None:
        raise ValueError("tensorboard: needs out= (the event files go to out/tensorboard)")
    if cfg.fid_weights is not None and not isinstance(cfg.fid_weights, (str, os.PathLike)):
        raise ValueError(f"fid_weights: expected a file path or None, got {type(cfg.fid_weights).__name__}")
    if not isinstance(cfg.extra, dict) or not all(isinstance(k, str) for k in cfg.extra):
        raise ValueError(f"extra: expected a dict with str keys, got {cfg.extra!r}")
    try:  # stored in checkpoints and metrics.json: plain data only
        json.dumps(cfg.extra, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError("extra: expected plain JSON data (str, numbers, bools, None, lists, dicts)") from None


def check_device(device) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device: {device!r} requested, but torch sees no CUDA device here (torch "
                             f"{torch.__version__}, CUDA {torch.version.cuda or 'none'})")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device: {device!r} requested, but torch sees {n} CUDA device(s)")


def penalty_defaults(loss: str, two_d: bool) -> tuple[float | None, str | None]:
    """(weight, r(x)) of a loss's penalty: the preset's, except WGAN-GP's weight 0.1 on 2-D data
    (the WGAN-GP toy code's); (None, None) for losses without a penalty."""
    preset = PRESETS.get(PENALTY_PRESET.get(loss, ""))
    if preset is None:
        return None, None
    weight = 0.1 if loss == "wgan-gp" and two_d else preset.weight
    return weight, preset.sampling


def optimizer_defaults(loss: str, image: bool = False) -> tuple[str, dict]:
    """(optimizer, hyper-parameters) of a loss; ``image``: the conv models' (the WGAN-div paper's
    Adam 2e-4, betas (0.5, 0.999) for WGAN-div on images)."""
    if loss == "wgan":  # Arjovsky et al. 2017: RMSprop 5e-5, clip 0.01
        return "rmsprop", {"lr": 5e-5}
    if loss == "wgan-gp":  # Gulrajani et al. 2017: Adam 1e-4, betas (0, 0.9)
        return "adam", {"lr": 1e-4, "betas": (0.0, 0.9)}
    if loss == "wgan-div":
        if image:  # Wu et al. 2018, their CIFAR-10 / CelebA / LSUN settings
            return "adam", {"lr": 2e-4, "betas": (0.5, 0.999)}
        return "adam", {"lr": 1e-4, "betas": (0.5, 0.9)}  # measured on the toys (DESIGN.md)
    return "adam", {"lr": 2e-4, "betas": (0.5, 0.999)}  # SN-GAN (Miyato et al. 2018), n_dis 5
