"""Quality metrics computed offline: the exact W1 between two 2-D samples (POT's network
simplex), and a sliced Wasserstein distance for images."""

from __future__ import annotations

import numpy as np
import torch


def exact_w1(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W1 between the empirical measures of samples a and b (Euclidean ground cost)."""
    import ot

    x, y = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()
    cost = ot.dist(x, y, metric="euclidean")
    return float(ot.emd2(np.full(len(x), 1 / len(x)), np.full(len(y), 1 / len(y)), cost, numItermax=1_000_000))


def sliced_w(a: torch.Tensor, b: torch.Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced W1: the mean over random unit directions of the 1-D W1 of the projections."""
    x, y = a.detach().flatten(1).double().cpu(), b.detach().flatten(1).double().cpu()
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    px, py = (x @ dirs).sort(0).values, (y @ dirs).sort(0).values
    n = min(len(px), len(py))  # match quantiles when the sizes differ
    qs = torch.linspace(0, 1, n, dtype=torch.float64)
    ix = (qs * (len(px) - 1)).round().long()
    iy = (qs * (len(py) - 1)).round().long()
    return float((px[ix] - py[iy]).abs().mean())


def metric_for(dataset_dim: int):
    """(name, function) of the metric used for data of this many dimensions."""
    return ("w1", exact_w1) if dataset_dim == 2 else ("sliced_w", sliced_w)
