"""The thin trainer: WGAN (clipping), WGAN-GP, WGAN-div and SN-GAN critics on embedded data,
with the fused ops (``backend="fused"``) or plain PyTorch (``backend="eager"``), same models and
seeds. It calls only public ops (``critic_loss``, ``ClippedRMSprop``, ``spectral_norm_all``,
``wgan_kernels.nn.from_torch``); the eager code is the plain-PyTorch version users write.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .. import ClippedRMSprop, critic_loss
from .._checks import finite_number
from ..losses import STRATEGIES, sample_penalty_points
from . import checkpoint as ckpt_io
from . import datasets as ds
from .checkpoint import CheckpointError, RunFolder
from .metrics import metric_for

LOSSES = ("wgan", "wgan-gp", "wgan-div", "sngan")
BACKENDS = ("fused", "eager")
DEFAULT_SAMPLING = {"wgan-gp": "interpolate", "wgan-div": "real+fake"}
# r(x) strategies whose draws split by rows, so N processes draw what one process would; the others
# pair rows across the whole batch (shuffles, batch std) and would need the global batch.
_ROW_WISE_DRAWS = {"interpolate": 1, "real": 0, "fake": 0, "real+fake": 0}


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is left as it was."""


@dataclass
class TrainConfig:
    loss: str = "wgan-div"
    dataset: str = "8gaussians"
    backend: str = "fused"
    steps: int = 1000               # generator steps
    n_critic: int = 5               # critic steps per generator step (the papers' 5)
    batch_size: int | None = None   # 256 for 2-D data, 64 otherwise
    lr: float | None = None         # per-loss default (see _optimizer_defaults)
    hidden: int = 256
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
    progress: bool = True
    extra: dict = field(default_factory=dict)


# What a resumed run may set differently from the run that wrote the checkpoint; every other
# setting changes the training (or what its metrics mean), so a difference is refused.
RESUMABLE = ("steps", "eval_every", "checkpoint_every", "log_every", "progress", "out")
_MAX_SEED = 2**63 - 3  # seed + 2 seeds the device generator


def _int(name: str, v, low: int = 1, *, optional: bool = False, high: int | None = None) -> None:
    if v is None and optional:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        bound = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
        raise ValueError(f"{name}: expected {bound}{' or None' if optional else ''}, got {v!r}")


def _check(cfg: TrainConfig) -> None:
    """Every field checked, the field named in the error; nothing is substituted silently."""
    if not isinstance(cfg, TrainConfig):
        raise ValueError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"loss: expected one of {LOSSES}, got {cfg.loss!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {cfg.backend!r}")
    if not isinstance(cfg.dataset, str):
        raise ValueError(f"dataset: expected one of {ds.DATASETS} (pass tensors as data=), got {cfg.dataset!r}")
    for name in ("steps", "n_critic", "eval_every", "checkpoint_every", "log_every", "hidden", "eval_samples"):
        _int(name, getattr(cfg, name))
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
    _check_device(cfg.device)
    if cfg.out is not None and not isinstance(cfg.out, (str, os.PathLike)):
        raise ValueError(f"out: expected a folder path or None, got {type(cfg.out).__name__}")
    if not isinstance(cfg.progress, bool):
        raise ValueError(f"progress: expected a bool, got {cfg.progress!r}")
    if not isinstance(cfg.extra, dict) or not all(isinstance(k, str) for k in cfg.extra):
        raise ValueError(f"extra: expected a dict with str keys, got {cfg.extra!r}")
    try:  # stored in checkpoints and metrics.json: plain data only
        json.dumps(cfg.extra, allow_nan=False)
    except (TypeError, ValueError):
        raise ValueError("extra: expected plain JSON data (str, numbers, bools, None, lists, dicts)") from None


def _check_device(device) -> None:
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


# ----------------------------------------------------------------------------- models


def _mlp(sizes: list[int], act) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return layers


def build_models(dim: int, shape: tuple[int, ...], hidden: int, z_dim: int) -> tuple[nn.Module, nn.Sequential]:
    """Generator and critic: 3 hidden layers of width ``hidden``; ReLU in G, LeakyReLU(0.2) in D
    (no normalisation layers: the gradient penalty forbids batch norm in the critic)."""
    g_layers = _mlp([z_dim, hidden, hidden, hidden, dim], nn.ReLU)
    d_layers = _mlp([dim, hidden, hidden, hidden, 1], lambda: nn.LeakyReLU(0.2))
    if len(shape) > 1:  # images: flatten in, tanh out
        g_layers += [nn.Tanh(), nn.Unflatten(1, shape)]
        d_layers = [nn.Flatten()] + d_layers
    return nn.Sequential(*g_layers), nn.Sequential(*d_layers)


def _optimizer_defaults(loss: str) -> tuple[str, dict]:
    if loss == "wgan":  # Arjovsky et al. 2017: RMSprop 5e-5, clip 0.01
        return "rmsprop", {"lr": 5e-5}
    if loss == "wgan-gp":  # Gulrajani et al. 2017: Adam 1e-4, betas (0, 0.9)
        return "adam", {"lr": 1e-4, "betas": (0.0, 0.9)}
    if loss == "wgan-div":  # measured on the toys (DESIGN.md): Adam 1e-4, betas (0.5, 0.9)
        return "adam", {"lr": 1e-4, "betas": (0.5, 0.9)}
    return "adam", {"lr": 2e-4, "betas": (0.5, 0.999)}  # SN-GAN (Miyato et al. 2018), n_dis 5


# ----------------------------------------------------------------------------- trainer


class Trainer:
    def __init__(self, cfg: TrainConfig, data=None):
        _check(cfg)
        if cfg.out is not None:
            cfg.out = os.fspath(cfg.out)  # stored as plain data
        self.cfg = cfg
        self.sampler = ds.load(data if data is not None else cfg.dataset)
        toy = self.sampler.dim == 2 and self.sampler.data is None
        self.batch = cfg.batch_size if cfg.batch_size is not None else (256 if self.sampler.dim == 2 else 64)
        self.z_dim = cfg.z_dim if cfg.z_dim is not None else (2 if self.sampler.dim == 2 else 32)
        self.device = torch.device(cfg.device)
        weight = cfg.penalty_weight
        if weight is None:
            weight = 2.0 if cfg.loss == "wgan-div" else (0.1 if toy or self.sampler.dim == 2 else 10.0)
        self.penalty_weight = weight
        self.rank, self.world = _distributed(self.device)
        if self.batch % self.world:
            raise ValueError(f"batch_size: {self.batch} does not split evenly over {self.world} processes")
        self.local = self.batch // self.world  # this process's rows of the global batch
        self.sampling = cfg.sampling or DEFAULT_SAMPLING.get(cfg.loss)
        if self.world > 1 and self.sampling is not None and self.sampling not in _ROW_WISE_DRAWS:
            raise ValueError(f"sampling: {self.sampling!r} pairs rows across the global batch; with "
                             f"{self.world} processes use one of {tuple(_ROW_WISE_DRAWS)}")

        torch.manual_seed(cfg.seed)  # model init: the same for both backends
        self.G, self.D = build_models(self.sampler.dim, self.sampler.shape, cfg.hidden, self.z_dim)
        self.G.to(self.device)
        self.D.to(self.device)
        self.critic = self.D  # what the critic loss runs (the explicit path on the fused backend)
        if cfg.loss == "sngan":
            self._apply_spectral_norm()
        elif cfg.backend == "fused" and cfg.loss in ("wgan-gp", "wgan-div"):
            try:
                from ..nn import from_torch

                self.critic = from_torch(self.D)  # shares the parameters
            except (ImportError, ValueError):
                pass
        kind, hp = _optimizer_defaults(cfg.loss)
        if cfg.lr is not None:
            hp["lr"] = float(cfg.lr)
        self.optimizer = {"optimizer": kind, **hp}  # name, lr (and betas): part of the run's settings
        if kind == "rmsprop":
            self.opt_d = (ClippedRMSprop(self.D.parameters(), clip_value=cfg.clip_value, **hp)
                          if cfg.backend == "fused" else torch.optim.RMSprop(self.D.parameters(), **hp))
            self.opt_g = torch.optim.RMSprop(self.G.parameters(), **hp)
        else:
            self.opt_d = torch.optim.Adam(self.D.parameters(), **hp)
            self.opt_g = torch.optim.Adam(self.G.parameters(), **hp)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)  # data, noise, penalty draws
        self.dev_gen = self.gen if self.device.type == "cpu" else torch.Generator(self.device).manual_seed(cfg.seed + 2)
        self.step = 0
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.wall = 0.0
        self.metric_name, self.metric_fn = metric_for(self.sampler.dim)
        eval_gen = torch.Generator().manual_seed(12345)  # the same evaluation sample for every run
        self.eval_real = self.sampler.sample(cfg.eval_samples, eval_gen)
        self.eval_z = torch.randn(cfg.eval_samples, self.z_dim, generator=eval_gen)
        self.folder = RunFolder(cfg.out) if cfg.out is not None and self.rank == 0 else None  # rank 0 writes
        self._data_id = None

    def _apply_spectral_norm(self) -> None:
        if self.cfg.backend == "fused":
            from ..nn import from_torch
            from ..ops.spectral_norm import spectral_norm_all

            # SNLinear blocks (1/sigma folded into the output, no W / sigma per forward), sharing
            # D's Parameters, iterated once per weight update for all layers; state-dict keys as
            # torch's spectral_norm, so checkpoints move between the backends
            self.D = self.critic = spectral_norm_all(from_torch(self.D))
        else:
            for m in self.D.modules():  # the layers spectral_norm_all covers
                if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d,
                                  nn.ConvTranspose2d, nn.ConvTranspose3d)):
                    torch.nn.utils.parametrizations.spectral_norm(m)

    # ---- one step of each network

    def _noise(self, n):
        return torch.randn(n, self.z_dim, generator=self.gen).to(self.device)

    # ---- data parallel: every process draws the global batch with the same generator and keeps
    # its rows, so N processes make the same updates as one process on the global batch.

    def _local_rows(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.rank * self.local:(self.rank + 1) * self.local] if self.world > 1 else t

    def _skip_draws(self, n: int) -> None:
        if n > 0:  # advance the generator as the other processes' rows of a per-sample draw would
            torch.rand(n, generator=self.dev_gen, device=self.device)

    def _all_reduce_grads(self, module: nn.Module) -> None:
        """Averages gradients over processes: one all-reduce of all of them, flattened."""
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def _critic_step(self, real, fake) -> dict:
        cfg = self.cfg
        self.opt_d.zero_grad(set_to_none=True)
        if cfg.backend == "fused":
            penalty = {"wgan-gp": "gp", "wgan-div": "div"}.get(cfg.loss)
            kw = {}
            if penalty == "gp":
                kw = dict(weight=self.penalty_weight, sampling=self.sampling)
            elif penalty == "div":
                kw = dict(weight=self.penalty_weight, p=cfg.div_p, sampling=self.sampling)
            draws = self._draws()
            self._skip_draws(self.rank * draws)
            loss, stats = critic_loss(self.critic, real, fake, penalty=penalty, generator=self.dev_gen, **kw)
            self._skip_draws((self.world - 1 - self.rank) * draws)
            loss.backward()
            self._all_reduce_grads(self.D)
            self.opt_d.step()  # ClippedRMSprop clamps in the same pass for "wgan"
            return {"loss_d": loss.detach(), "wasserstein": stats["wasserstein"], "penalty": stats["penalty"]}
        draws = self._draws()
        self._skip_draws(self.rank * draws)
        loss, w, pen = self._eager_critic_loss(real, fake)
        self._skip_draws((self.world - 1 - self.rank) * draws)
        loss.backward()
        self._all_reduce_grads(self.D)
        self.opt_d.step()
        if cfg.loss == "wgan":
            for p in self.D.parameters():
                p.data.clamp_(-cfg.clip_value, cfg.clip_value)
        return {"loss_d": loss.detach(), "wasserstein": w, "penalty": pen}

    def _draws(self) -> int:
        """Random numbers one process draws per critic step for its penalty points."""
        return _ROW_WISE_DRAWS.get(self.sampling, 0) * self.local if self.world > 1 else 0

    def _eager_critic_loss(self, real, fake):
        """Plain PyTorch: autograd's double backward; the same random draws as the fused path."""
        cfg, D = self.cfg, self.D
        zero = torch.zeros((), device=real.device)
        if cfg.loss in ("wgan", "sngan"):
            d_real, d_fake = D(real).mean(), D(fake).mean()
            return d_fake - d_real, (d_real - d_fake).detach(), zero
        if self.sampling != DEFAULT_SAMPLING[cfg.loss]:  # another r(x): points drawn as the fused path does
            d_real, d_fake = D(real).mean(), D(fake).mean()
            x = sample_penalty_points(real, fake, self.sampling, self.dev_gen).requires_grad_(True)
            (g,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
            n = g.flatten(1).norm(dim=1)
            pen = (self.penalty_weight * (n - 1).pow(2).mean() if cfg.loss == "wgan-gp"
                   else self.penalty_weight * n.pow(cfg.div_p).mean())
            return d_fake - d_real + pen, (d_real - d_fake).detach(), pen.detach()
        if cfg.loss == "wgan-gp":
            d_real, d_fake = D(real).mean(), D(fake).mean()
            alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), generator=self.dev_gen,
                               device=real.device)
            x = (fake + alpha * (real - fake)).requires_grad_(True)
            (g,) = torch.autograd.grad(D(x).sum(), x, create_graph=True)
            pen = self.penalty_weight * (g.flatten(1).norm(dim=1) - 1).pow(2).mean()
        else:  # wgan-div: k E||grad||^p on real and fake
            r, f = real.detach().requires_grad_(True), fake.detach().requires_grad_(True)
            out_r, out_f = D(r), D(f)
            d_real, d_fake = out_r.mean(), out_f.mean()
            gr, gf = torch.autograd.grad(out_r.sum() + out_f.sum(), (r, f), create_graph=True)
            pen = self.penalty_weight * torch.cat([gr, gf]).flatten(1).norm(dim=1).pow(cfg.div_p).mean()
        return d_fake - d_real + pen, (d_real - d_fake).detach(), pen.detach()

    def _generator_step(self) -> torch.Tensor:
        self.opt_g.zero_grad(set_to_none=True)
        loss = -self.D(self.G(self._local_rows(self._noise(self.batch)))).mean()
        loss.backward()
        self._all_reduce_grads(self.G)
        self.opt_g.step()
        return loss.detach()

    def train_step(self) -> tuple[dict, torch.Tensor]:
        """One generator step: ``n_critic`` critic steps on fresh batches, then the generator's.
        Returns the last critic step's stats and the generator loss (``self.step`` is left to
        ``fit``)."""
        for _ in range(self.cfg.n_critic):
            real = self._local_rows(self.sampler.sample(self.batch, self.gen)).to(self.device)
            with torch.no_grad():
                fake = self.G(self._local_rows(self._noise(self.batch)))
            stats = self._critic_step(real, fake)
        return stats, self._generator_step()

    # ---- evaluation, checkpoints

    @torch.no_grad()
    def evaluate(self) -> float:
        self.G.eval()
        fake = self.G(self.eval_z.to(self.device)).cpu()
        self.G.train()
        return self.metric_fn(fake, self.eval_real)

    def settings(self) -> dict:
        """The resolved settings that determine the training (defaults filled in); stored in
        checkpoints and compared on resume. Fields that do not apply to the loss are left out."""
        cfg = self.cfg
        if self._data_id is None:
            data = self.sampler.data
            self._data_id = (self.sampler.name if self.sampler.name != "tensor" else
                             f"tensor{tuple(data.shape)}:{ckpt_io.digest(data)[:16]}")
        out = {"loss": cfg.loss, "dataset": self._data_id, "backend": cfg.backend, "n_critic": cfg.n_critic,
               "batch_size": self.batch, **self.optimizer, "hidden": cfg.hidden, "z_dim": self.z_dim,
               "seed": cfg.seed, "eval_samples": cfg.eval_samples, "device": self.device.type, "extra": cfg.extra}
        if cfg.loss in ("wgan-gp", "wgan-div"):
            out.update(penalty_weight=self.penalty_weight, sampling=self.sampling)
        if cfg.loss == "wgan-div":
            out["div_p"] = cfg.div_p
        if cfg.loss == "wgan":
            out["clip_value"] = cfg.clip_value
        return out

    def state(self) -> dict:
        return {
            "config": asdict(self.cfg), "settings": self.settings(), "step": self.step, "G": self.G.state_dict(),
            "D": self.D.state_dict(), "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
            "gen": self.gen.get_state(), "dev_gen": self.dev_gen.get_state(), "history": self.history,
            "evals": self.evals, "wall": self.wall,
        }

    def load_state(self, state: dict, source: str = "resume: the checkpoint") -> None:
        """Restores a ``state()``: refused (``CheckpointError``, nothing changed) when it was written
        with other settings than this run's (``RESUMABLE`` lists the ones that may differ) or does
        not fit these models."""
        keys = ("config", "settings", "step", "G", "D", "opt_g", "opt_d", "gen", "dev_gen", "history", "evals",
                "wall")
        missing = [k for k in keys if not isinstance(state, dict) or k not in state]
        if missing:
            raise CheckpointError(f"{source}: not a complete trainer state (missing {', '.join(missing)})")
        saved, now = state["settings"], self.settings()
        if not isinstance(saved, dict):
            raise CheckpointError(f"{source}: its settings are not a dict")
        differ = [f"{k} {saved.get(k, '(unset)')!r} in the checkpoint, {now.get(k, '(unset)')!r} now"
                  for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if differ:
            raise CheckpointError(f"{source} was written with other settings: {'; '.join(differ)} (a resumed run "
                                  f"may change only {', '.join(RESUMABLE)})")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise CheckpointError(f"{source}: step {step!r} is not a step count")
        if step > self.cfg.steps:
            raise CheckpointError(f"{source} is at generator step {step}, past steps={self.cfg.steps}; ask for "
                                  f"steps >= {step}")
        before = copy.deepcopy(self.state())  # to undo a half-applied load (state_dict()s alias the tensors)
        try:
            self._apply(state)
        except Exception as e:
            self._apply(before)
            raise CheckpointError(f"{source} does not fit this run's models or optimizers "
                                  f"({type(e).__name__}: {ckpt_io.first_line(e)})") from e

    def _apply(self, state: dict) -> None:
        self.G.load_state_dict(state["G"])
        self.D.load_state_dict(state["D"])
        self.opt_g.load_state_dict(state["opt_g"])
        self.opt_d.load_state_dict(state["opt_d"])
        self.gen.set_state(state["gen"])
        self.dev_gen.set_state(state["dev_gen"])
        history, evals, wall = state["history"], state["evals"], state["wall"]
        if not (isinstance(history, list) and isinstance(evals, list) and isinstance(wall, (int, float))):
            raise TypeError("history, evals and wall: expected two lists and a number")
        self.step, self.history, self.evals, self.wall = state["step"], list(history), list(evals), float(wall)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Resumes from a checkpoint file: verified, then ``load_state`` (see ``checkpoint.load``)."""
        self.load_state(ckpt_io.load(Path(path)), source=f"resume: {path}")

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Atomic; a failed write leaves the previous checkpoint and no temporary file."""
        ckpt_io.save(Path(path), self.state())

    # ---- the loop

    def acquire_folder(self) -> None:
        """Locks ``out`` for this run (a second run into it is refused), proves it writable and
        large enough for a checkpoint; nested calls are counted. No-op without ``out``."""
        if self.folder is not None:
            self.folder.acquire(expected_bytes=ckpt_io.nbytes(self.state()))

    def release_folder(self) -> None:
        if self.folder is not None:
            self.folder.release()

    def fit(self) -> dict:
        self.acquire_folder()
        try:
            return self._fit()
        finally:
            self.release_folder()

    def _fit(self) -> dict:
        cfg = self.cfg
        out = self.folder.path if self.folder is not None else None
        ckpt = self.folder.checkpoint if self.folder is not None else None
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc=f"{cfg.loss}/{cfg.backend}", dynamic_ncols=True)
        start = time.perf_counter()
        step0 = self.step
        while self.step < cfg.steps:
            stats, loss_g = self.train_step()
            loss_d = stats["loss_d"]
            if not (torch.isfinite(loss_d) and torch.isfinite(loss_g)):
                if bar:
                    bar.close()
                where = f"the last good checkpoint {ckpt} is intact" if ckpt and ckpt.exists() else "no checkpoint"
                raise TrainingDiverged(f"{cfg.loss}/{cfg.backend}: non-finite loss at generator step {self.step} "
                                       f"(critic {loss_d.item()}, generator {loss_g.item()}); {where}")
            self.step += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                row = {"step": self.step, "loss_d": loss_d.item(), "loss_g": loss_g.item(),
                       "wasserstein": stats["wasserstein"].item(), "penalty": float(stats["penalty"])}
                self.history.append(row)
                if bar:  # tqdm shows steps/s itself
                    bar.set_postfix(loss_d=f"{row['loss_d']:.3f}", loss_g=f"{row['loss_g']:.3f}",
                                    w=f"{row['wasserstein']:.3f}", refresh=False)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self.evals.append({"step": self.step, self.metric_name: self.evaluate()})
            if bar:
                bar.update(1)
            if ckpt and (self.step % cfg.checkpoint_every == 0 or self.step == cfg.steps):
                self.wall += time.perf_counter() - start
                start = time.perf_counter()
                self.save_checkpoint(ckpt)
        if bar:
            bar.close()
        self.wall += time.perf_counter() - start
        result = self.summary(steps_timed=self.step - step0)
        if out:
            (out / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")
            from .plots import save_pictures

            save_pictures(self, out)
        return result

    def summary(self, steps_timed: int | None = None) -> dict:
        final = self.evals[-1][self.metric_name] if self.evals else math.nan
        return {
            "config": asdict(self.cfg), "metric": self.metric_name, "final_metric": final,
            "steps": self.step, "wall_s": self.wall,
            "steps_per_s": (self.step / self.wall) if self.wall > 0 else math.nan,
            "penalty_weight": self.penalty_weight, "history": self.history, "evals": self.evals,
        }


def _distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size): joins the process group when launched by torchrun (WORLD_SIZE > 1);
    gloo on CPU, nccl on CUDA."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def train(cfg: TrainConfig | None = None, *, data=None, resume: bool = False, **overrides) -> dict:
    """Trains one GAN and returns its summary (final metric, steps/s, history). ``data``: an
    embedded dataset name, a tensor or a TensorDataset (overrides ``cfg.dataset``). ``resume``:
    continue from ``out/checkpoint.pt`` (the same numbers as an uninterrupted run on CPU), which
    must have been written with the same settings but those in ``RESUMABLE``. ``out`` is locked
    for the run. The models are in ``result["trainer"]``."""
    cfg = cfg or TrainConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"{k}: not a TrainConfig field")
        setattr(cfg, k, v)
    if not isinstance(resume, bool):
        raise ValueError(f"resume: expected a bool, got {resume!r}")
    trainer = Trainer(cfg, data)
    trainer.acquire_folder()  # before reading the checkpoint: no other run writes it meanwhile
    try:
        if resume:
            ckpt = Path(cfg.out) / ckpt_io.CHECKPOINT if cfg.out is not None else None
            if ckpt is None or not ckpt.exists():
                raise CheckpointError(f"resume: no {ckpt_io.CHECKPOINT} in out={cfg.out!r}")
            trainer.load_checkpoint(ckpt)
        result = trainer.fit()
    finally:
        trainer.release_folder()
    result["trainer"] = trainer
    return result


def checkpoint_config(out: str | os.PathLike) -> dict:
    """The ``TrainConfig`` fields of the run that wrote ``out/checkpoint.pt`` (verified), for a
    resume that restates only what it changes (``wgan-kernels train --resume``)."""
    state = ckpt_io.load(Path(out) / ckpt_io.CHECKPOINT)
    config = state.get("config")
    if not isinstance(config, dict):
        raise CheckpointError(f"resume: {Path(out) / ckpt_io.CHECKPOINT}: no run configuration in it")
    return config
