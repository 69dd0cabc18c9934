"""The two grids and their settings: ``SweepConfig``, its checks, the cells of a grid and the
``TrainConfig`` of one run (only the cell's parameters differ between runs)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GRIDS = ("kp", "rx")
# The six r(x) of the paper's section 5 (DRAGAN's perturbed-real is not one of them).
RX_STRATEGIES = ("interpolate", "interpolate-within", "interpolate-mixed", "real+fake", "fake", "real")
RX_LOSSES = ("wgan-div", "wgan-gp")
KP_K = (0.5, 2.0, 10.0)
KP_P = (2.0, 4.0, 6.0, 8.0)
PAPER_KP = (2.0, 6.0)


@dataclass
class SweepConfig:
    grid: str = "rx"
    dataset: str = "8gaussians"
    seeds: int | None = None        # 3 (quick: 1)
    steps: int | None = None        # generator steps per run: 600 on the 2-D toys, 800 on digits (quick: 150)
    hidden: int = 128
    lr: float = 5e-4                # Adam for both losses; higher than the papers' 1e-4 so short runs converge
    batch_size: int | None = None   # the trainer's: 256 on 2-D data, 64 on digits
    eval_every: int | None = None   # steps // 10
    eval_samples: int = 1000
    k: tuple = KP_K
    p: tuple = KP_P
    strategies: tuple = RX_STRATEGIES
    losses: tuple = RX_LOSSES
    gp_weight: float | None = None  # the trainer's default (0.1 on 2-D data, 10 on digits)
    workers: int | None = None      # parallel runs; default: the CPU cores, at most 4
    backend: str = "fused"
    device: str = "cpu"
    out: str | None = None
    quick: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # more TrainConfig fields for every run


def check(cfg: SweepConfig) -> None:
    from ..datasets import DATASETS
    from ..trainer import BACKENDS

    if cfg.grid not in GRIDS:
        raise ValueError(f"grid: expected one of {GRIDS}, got {cfg.grid!r}")
    if cfg.dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {cfg.dataset!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {cfg.backend!r}")
    for name in ("seeds", "steps", "eval_every", "workers", "hidden", "eval_samples", "batch_size"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if not cfg.k or any(not (math.isfinite(k) and k >= 0) for k in cfg.k):
        raise ValueError(f"k: expected finite numbers >= 0, got {cfg.k!r}")
    if not cfg.p or any(not (math.isfinite(p) and p > 1) for p in cfg.p):
        raise ValueError(f"p: expected finite numbers > 1, got {cfg.p!r}")
    bad = [s for s in cfg.strategies if s not in RX_STRATEGIES]
    if not cfg.strategies or bad:
        raise ValueError(f"strategies: expected some of {RX_STRATEGIES}, got {cfg.strategies!r}")
    bad = [x for x in cfg.losses if x not in RX_LOSSES]
    if not cfg.losses or bad:
        raise ValueError(f"losses: expected some of {RX_LOSSES}, got {cfg.losses!r}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr: expected a finite number > 0, got {cfg.lr!r}")


def num(x: float) -> str:
    return f"{x:g}"


def cells(cfg: SweepConfig) -> list[dict]:
    """The grid's cells, in table order: dicts of the TrainConfig fields each one sets."""
    if cfg.grid == "kp":
        return [{"cell": f"k={num(k)},p={num(p)}", "loss": "wgan-div", "k": float(k), "p": float(p),
                 "sampling": "real+fake"} for k in cfg.k for p in cfg.p]
    out = []
    for loss in cfg.losses:
        for s in cfg.strategies:
            if loss == "wgan-div":
                k, p = PAPER_KP
            else:
                k, p = cfg.gp_weight, 2.0
            out.append({"cell": f"{loss.removeprefix('wgan-')}/{s}", "loss": loss, "k": k, "p": p, "sampling": s})
    return out


def run_steps(cfg: SweepConfig) -> int:
    if cfg.steps is not None:
        return cfg.steps
    if cfg.quick:
        return 150
    return 800 if cfg.dataset.startswith("digits") else 600


def train_config(cfg: SweepConfig, cell: dict, seed: int):
    from ..trainer import TrainConfig

    steps = run_steps(cfg)
    tc = TrainConfig(loss=cell["loss"], dataset=cfg.dataset, backend=cfg.backend, steps=steps, hidden=cfg.hidden,
                     lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
                     eval_every=cfg.eval_every or max(1, steps // 10), eval_samples=cfg.eval_samples,
                     checkpoint_every=steps, device=cfg.device, out=None, progress=False,
                     penalty_weight=cell["k"], sampling=cell["sampling"])
    if cell["loss"] == "wgan-div":
        tc.div_p = cell["p"]
    for key, value in cfg.extra.items():
        if not hasattr(tc, key):
            raise ValueError(f"extra: {key!r} is not a TrainConfig field")
        setattr(tc, key, value)
    return tc
