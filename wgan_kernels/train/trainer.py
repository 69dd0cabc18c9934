"""The thin trainer: WGAN (clipping), WGAN-GP, WGAN-div and SN-GAN critics on embedded data,
with the fused ops (``backend="fused"``) or plain PyTorch (``backend="eager"``), same models and
seeds. It calls only public ops (``critic_loss``, ``ClippedRMSprop``, ``spectral_norm_all``,
``wgan_kernels.nn.from_torch``); the eager backend runs ``wgan_kernels.eager``, the plain-PyTorch
version users write.

Its parts: ``config`` (settings, checks, defaults), ``datasets``, ``wgan_kernels.models`` (the
networks), ``parallel`` (data parallelism), ``checkpoint`` (run folder, checkpoints), ``metrics``
and ``plots``; this module is the loop.
"""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from .. import ClippedRMSprop, critic_loss
from ..eager import critic_loss_eager
from ..models import DCGANCritic, ResNetCritic, ResNetGenerator, dcgan_generator, mlp_critic, mlp_generator
from ..nn.spectral import SN_LAYERS, spectral_norm_all
from ..nn.trace import in_loss_layout
from . import checkpoint as ckpt_io
from . import datasets as ds
from .checkpoint import CheckpointError, RunFolder
from .config import (BACKENDS, HIDDEN, LOSSES, PENALTY_PRESET, RESOLUTIONS, RESUMABLE, TrainConfig, check,
                     optimizer_defaults, penalty_defaults)
from .metrics import metric_for
from .parallel import DataParallel

__all__ = ["BACKENDS", "LOSSES", "RESUMABLE", "TrainConfig", "Trainer", "TrainingDiverged", "train",
           "checkpoint_config"]


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the last good checkpoint is left as it was."""


class Trainer:
    def __init__(self, cfg: TrainConfig, data=None):
        check(cfg)
        if cfg.out is not None:
            cfg.out = os.fspath(cfg.out)  # stored as plain data
        self.cfg = cfg
        self.sampler = ds.load(data if data is not None else cfg.dataset, cfg.resolution)
        two_d = self.sampler.dim == 2
        self.batch = cfg.batch_size if cfg.batch_size is not None else (256 if two_d else 64)
        # the image models' noise as in the papers (WGAN-GP's CIFAR-10 128), else small
        self.z_dim = cfg.z_dim if cfg.z_dim is not None else (2 if two_d else 32 if cfg.model == "mlp" else 128)
        self.hidden = cfg.hidden if cfg.hidden is not None else HIDDEN[cfg.model]
        self.device = torch.device(cfg.device)
        weight, sampling = penalty_defaults(cfg.loss, two_d)
        self.penalty_weight = cfg.penalty_weight if cfg.penalty_weight is not None else weight
        self.sampling = cfg.sampling if cfg.sampling is not None else sampling
        self.parallel = DataParallel(self.device, self.batch, self.sampling)
        self.rank, self.world = self.parallel.rank, self.parallel.world

        torch.manual_seed(cfg.seed)  # model init: the same for both backends
        self.G, self.D = self._models()
        self._g_couples = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.G.modules())
        self.critic = self.D  # what the critic loss runs (the explicit path on the fused backend)
        self._nhwc_generator_step = cfg.backend == "fused"
        if cfg.loss == "sngan":
            self._apply_spectral_norm()
        elif cfg.backend == "fused" and cfg.loss in PENALTY_PRESET:
            from ..nn import from_torch

            try:
                self.critic = from_torch(self.D)  # shares the parameters
            except ValueError as e:  # said once, not silently: the penalty then takes double backward
                warnings.warn(f"wgan_kernels.train: the critic has no explicit input-gradient path ({e}); the "
                              "fused backend computes its penalty with double backward", RuntimeWarning, stacklevel=2)
        kind, hp = optimizer_defaults(cfg.loss, image=cfg.model != "mlp")
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
        # FID/KID: images of 32 px or more (not the 8x8 digits), Inception weights on this machine
        self.fidelity, self.fidelity_note = None, None
        if self.sampler.is_image and self.sampler.shape[-1] >= 32:
            from . import fidelity

            self.fidelity, self.fidelity_note = fidelity.setup(cfg.fid_weights, cuda=self.device.type == "cuda")
        elif cfg.fid_weights is not None:
            raise ValueError(f"fid_weights: FID/KID are for images of 32 px or more, not dataset "
                             f"{self.sampler.name!r} (samples of shape {self.sampler.shape})")
        if cfg.tensorboard:
            import importlib.util

            if importlib.util.find_spec("tensorboard") is None:  # torch.utils.tensorboard writes with it
                raise ValueError("tensorboard: needs the tensorboard package (pip install tensorboard)")
        eval_gen = torch.Generator().manual_seed(12345)  # the same evaluation sample for every run
        self.eval_real = self.sampler.sample(cfg.eval_samples, eval_gen)
        self.eval_z = torch.randn(cfg.eval_samples, self.z_dim, generator=eval_gen)
        self.folder = RunFolder(cfg.out) if cfg.out is not None and self.rank == 0 else None  # rank 0 writes
        self.board = None  # the TensorBoard writer, while fit() runs with tensorboard=True
        self._data_id = None

    def _models(self):
        """(G, D) of ``cfg.model`` for the data's shape, on the device (the same init on both
        backends: the seed is set before)."""
        cfg, shape = self.cfg, self.sampler.shape
        if cfg.model == "mlp":
            return (mlp_generator(self.z_dim, self.hidden, shape).to(self.device),
                    mlp_critic(self.hidden, self.sampler.dim, shape).to(self.device))
        if len(shape) != 3 or shape[1] != shape[2] or shape[1] not in RESOLUTIONS:
            raise ValueError(f"model: {cfg.model!r} needs images of 32x32 or 64x64 (e.g. dataset digits32; image "
                             f"files are resized by resolution=), got samples of shape {shape}")
        c, res, width = shape[0], shape[1], self.hidden
        if cfg.model == "dcgan":
            return (dcgan_generator(self.z_dim, c, res, width).to(self.device),
                    DCGANCritic(c, res, width).to(self.device))
        # SN-GAN's ResNet critic sums over space where WGAN-GP's averages
        return (ResNetGenerator(self.z_dim, c, res, width).to(self.device),
                ResNetCritic(c, res, width, pool="sum" if cfg.loss == "sngan" else "mean").to(self.device))

    def _apply_spectral_norm(self) -> None:
        if self.cfg.backend == "fused":
            from ..nn import from_torch

            # SNLinear blocks (1/sigma folded into the output, no W / sigma per forward), sharing
            # D's Parameters, iterated once per weight update for all layers; state-dict keys as
            # torch's spectral_norm, so checkpoints move between the backends
            # (a conv critic stays the torch module: its layers become the SN blocks, and critic_loss
            # traces it, running the batched iteration around its explicit path)
            self.D = self.critic = spectral_norm_all(from_torch(self.D) if self.cfg.model == "mlp" else self.D)
        else:
            for m in self.D.modules():  # the layers spectral_norm_all covers
                if isinstance(m, SN_LAYERS):
                    torch.nn.utils.parametrizations.spectral_norm(m)

    # ---- one step of each network

    def _noise(self, n):
        return torch.randn(n, self.z_dim, generator=self.gen).to(self.device)

    def _fake(self, z: torch.Tensor) -> torch.Tensor:
        """This process's rows of G(z) for the global noise batch z. A generator with BatchNorm
        (the image models') runs on all of z in every process, so that its batch statistics are
        the global batch's and N processes make the updates of one (SyncBatchNorm needs CUDA);
        one without runs on its rows only."""
        if self.parallel.world > 1 and self._g_couples:
            return self.parallel.rows(self.G(z))
        return self.G(self.parallel.rows(z))

    def _critic_step(self, real, fake) -> dict:
        cfg = self.cfg
        self.opt_d.zero_grad(set_to_none=True)
        penalty = PENALTY_PRESET.get(cfg.loss)
        kw = {}
        if penalty is not None:
            kw = dict(weight=self.penalty_weight, sampling=self.sampling, p=cfg.div_p if penalty == "div" else None)
        self.parallel.skip_before(self.dev_gen)  # the lower ranks' rows of the penalty draws
        if cfg.backend == "fused":
            loss, stats = critic_loss(self.critic, real, fake, penalty=penalty, generator=self.dev_gen, **kw)
            w, pen = stats["wasserstein"], stats["penalty"]
        else:
            loss, w, pen = critic_loss_eager(self.D, real, fake, penalty=penalty, generator=self.dev_gen, **kw)
        self.parallel.skip_after(self.dev_gen)
        loss.backward()
        self.parallel.all_reduce_grads(self.D)
        self.opt_d.step()  # ClippedRMSprop clamps in the same pass for "wgan"
        if cfg.loss == "wgan" and cfg.backend == "eager":
            for p in self.D.parameters():
                p.data.clamp_(-cfg.clip_value, cfg.clip_value)
        return {"loss_d": loss.detach(), "wasserstein": w, "penalty": pen}

    def _generator_step(self) -> torch.Tensor:
        self.opt_g.zero_grad(set_to_none=True)
        # the critic's parameters need no gradient here (the next critic step starts from none):
        # frozen, the backward through D computes only the input gradients (as WGAN-GP's code does)
        frozen = [p for p in self.D.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            fake = self._fake(self._noise(self.batch))
            if self._nhwc_generator_step:  # (the layout of the critic's convolutions in its critic step)
                fake = in_loss_layout(self.critic, fake)
            loss = -self.D(fake).mean()
        finally:
            for p in frozen:
                p.requires_grad_(True)
        loss.backward()
        self.parallel.all_reduce_grads(self.G)
        self.opt_g.step()
        return loss.detach()

    def train_step(self) -> tuple[dict, torch.Tensor]:
        """One generator step: ``n_critic`` critic steps on fresh batches, then the generator's.
        Returns the last critic step's stats and the generator loss (``self.step`` is left to
        ``fit``)."""
        for _ in range(self.cfg.n_critic):
            real = self.parallel.rows(self.sampler.sample(self.batch, self.gen)).to(self.device)
            with torch.no_grad():
                fake = self._fake(self._noise(self.batch))
            stats = self._critic_step(real, fake)
        return stats, self._generator_step()

    # ---- evaluation, checkpoints

    @torch.no_grad()
    def samples(self, n: int | None = None) -> torch.Tensor:
        """The generator's samples of the fixed evaluation noise (the first ``n``), on the CPU."""
        self.G.eval()
        fake = self.G(self.eval_z[:n].to(self.device)).cpu()
        self.G.train()
        return fake

    def evaluate(self) -> float:
        """The offline metric (W1 on 2-D data, sliced W on pixels otherwise)."""
        return self.metric_fn(self.samples(), self.eval_real)

    def evaluation(self) -> dict:
        """One evaluation row: the offline metric, FID and KID when they are set up; on image data
        with ``out``, the sample grid of the fixed noise in ``out/samples/step_NNNNNN.png``."""
        fake = self.samples()
        row = {"step": self.step, self.metric_name: self.metric_fn(fake, self.eval_real)}
        if self.fidelity is not None:
            row.update(self.fidelity(fake, self.eval_real))
        picture = None
        if self.sampler.is_image and (self.folder is not None or self.board is not None):
            from .images import grid, write_png

            picture = grid(fake[:64])
            if self.folder is not None:
                (self.folder.path / "samples").mkdir(exist_ok=True)
                write_png(picture, self.folder.path / "samples" / f"step_{self.step:06d}.png")
        if self.board is not None:
            for k, v in row.items():
                if k != "step":
                    self.board.add_scalar(f"eval/{k}", v, self.step)
            if picture is not None:
                self.board.add_image("samples", picture, self.step, dataformats="HWC")
        return row

    def settings(self) -> dict:
        """The resolved settings that determine the training (defaults filled in); stored in
        checkpoints and compared on resume. Fields that do not apply to the loss are left out."""
        cfg = self.cfg
        if self._data_id is None:
            data = self.sampler.data
            if self.sampler.name == "tensor":  # data= given as a tensor
                self._data_id = f"tensor{tuple(data.shape)}:{ckpt_io.digest(data)[:16]}"
            elif hasattr(data, "digest"):  # image files: their content, not only the path
                self._data_id = f"{self.sampler.name}:{data.digest()[:16]}"
            else:
                self._data_id = self.sampler.name
        out = {"loss": cfg.loss, "dataset": self._data_id, "backend": cfg.backend, "n_critic": cfg.n_critic,
               "batch_size": self.batch, **self.optimizer, "hidden": self.hidden, "z_dim": self.z_dim,
               "seed": cfg.seed, "eval_samples": cfg.eval_samples, "device": self.device.type, "extra": cfg.extra}
        if cfg.loss in ("wgan-gp", "wgan-div"):
            out.update(penalty_weight=self.penalty_weight, sampling=self.sampling)
        if cfg.loss == "wgan-div":
            out["div_p"] = cfg.div_p
        if cfg.loss == "wgan":
            out["clip_value"] = cfg.clip_value
        if cfg.model != "mlp":
            out["model"] = cfg.model
        if self.sampler.is_image:
            out["resolution"] = self.sampler.shape[-1]
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
        if self.folder is not None:  # the size estimate builds a state: only for the outermost acquire
            self.folder.acquire(expected_bytes=0 if self.folder.held else ckpt_io.nbytes(self.state()))

    def release_folder(self) -> None:
        if self.folder is not None:
            self.folder.release()

    def fit(self) -> dict:
        self.acquire_folder()
        try:
            if self.cfg.tensorboard and self.folder is not None:
                from torch.utils.tensorboard import SummaryWriter

                self.board = SummaryWriter(os.fspath(self.folder.path / "tensorboard"))
            if self.fidelity_note and self.rank == 0:
                print(f"wgan-kernels train: {self.fidelity_note}", file=sys.stderr, flush=True)
            return self._fit()
        finally:
            if self.board is not None:
                self.board.close()
                self.board = None
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
                if self.board is not None:
                    for k, v in row.items():
                        if k != "step":
                            self.board.add_scalar(f"train/{k}", v, self.step)
            if self.step % cfg.eval_every == 0 or self.step == cfg.steps:
                self.evals.append(self.evaluation())
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
