"""The WGAN-div paper's two ablations at toy scale (Wu et al., "Wasserstein Divergence for GANs",
2018), on the fused ops:

- ``kp``: WGAN-div's penalty ``k E||grad T||^p`` over a grid of k and p (the paper: k 2, p 6 best);
- ``rx``: the six sampling strategies r(x) of the penalty points, each under WGAN-div and WGAN-GP
  (the paper: under div they all do about equally well; under GP they differ more, and GP's best
  is worse than div's worst).

Every run trains the trainer's MLP GAN with the same settings (only the cell's parameters differ)
and is scored with the same metric on the same evaluation sample (the trainer's fixed evaluation
draw): exact W1 on the 2-D toys, sliced Wasserstein on digits; lower is better. Runs go to worker
processes; each finished run is appended to ``runs.csv`` at once, so a sweep started again runs
only the missing (cell, seed) pairs. A run whose loss becomes non-finite is recorded as diverged.

Modules: ``grid`` (settings and cells), ``runner`` (the runs), ``store`` (``runs.csv``), ``verdict``
(means and the paper's claims), ``render`` (tables, pictures, README section).
"""

from .grid import GRIDS, KP_K, KP_P, PAPER_KP, RX_LOSSES, RX_STRATEGIES, SweepConfig, train_config, cells
from .render import readme_block, real_floor, update_readme, write_report
from .runner import sweep
from .store import COLUMNS, read_runs
from .verdict import summarize, verdict

__all__ = ["GRIDS", "KP_K", "KP_P", "PAPER_KP", "RX_LOSSES", "RX_STRATEGIES", "COLUMNS", "SweepConfig", "cells",
           "sweep", "read_runs", "summarize", "verdict", "write_report", "real_floor", "readme_block",
           "update_readme", "train_config"]
