"""Embedded datasets: nothing is downloaded. 2-D toys as in the WGAN-GP toy experiments, and
scikit-learn's bundled 8x8 digits (and the same upscaled to 32x32, for the conv models)."""

from __future__ import annotations

import math

import torch

TOY = ("8gaussians", "25gaussians", "swissroll")
DATASETS = TOY + ("digits", "digits32")


class Sampler:
    """Draws batches of a dataset with an explicit torch.Generator (reproducible, resumable)."""

    def __init__(self, name: str, data: torch.Tensor | None = None):
        self.name = name
        self.data = data  # finite datasets (digits, user tensors): rows are samples
        self.dim = int(data[0].numel()) if data is not None else 2
        self.shape = tuple(data.shape[1:]) if data is not None else (2,)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.data is not None:
            idx = torch.randint(0, self.data.shape[0], (n,), generator=generator)
            return self.data[idx]
        if self.name == "8gaussians":
            centers = torch.tensor([(math.cos(a), math.sin(a)) for a in torch.arange(8).mul(math.pi / 4).tolist()])
            c = centers[torch.randint(0, 8, (n,), generator=generator)] * 2.0
            return (c + 0.02 * torch.randn(n, 2, generator=generator)) / 1.414
        if self.name == "25gaussians":
            grid = torch.stack(torch.meshgrid(torch.arange(-2, 3.0), torch.arange(-2, 3.0), indexing="ij"), -1)
            c = grid.reshape(25, 2)[torch.randint(0, 25, (n,), generator=generator)] * 2.0
            return (c + 0.05 * torch.randn(n, 2, generator=generator)) / 2.828
        if self.name == "swissroll":
            t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=generator))
            x = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
            return (x + 0.5 * torch.randn(n, 2, generator=generator)) / 7.5
        raise ValueError(f"dataset: unknown {self.name!r}")


def load(name_or_data) -> Sampler:
    """A Sampler for an embedded dataset name, a tensor (rows are samples) or a TensorDataset."""
    if isinstance(name_or_data, str):
        if name_or_data in TOY:
            return Sampler(name_or_data)
        if name_or_data in ("digits", "digits32"):
            from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

            x = torch.tensor(load_digits().data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 * 2 - 1  # [-1, 1]
            if name_or_data == "digits32":  # upscaled (bilinear) to 32x32 for the conv models
                x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
            return Sampler(name_or_data, x.clamp(-1, 1))
        raise ValueError(f"dataset: expected one of {DATASETS}, a tensor or a TensorDataset, got {name_or_data!r}")
    if isinstance(name_or_data, torch.utils.data.TensorDataset):
        name_or_data = name_or_data.tensors[0]
    if isinstance(name_or_data, torch.Tensor):
        if not name_or_data.is_floating_point() or name_or_data.dim() < 2 or name_or_data.shape[0] < 2:
            raise ValueError("dataset: expected a floating tensor of shape (N, ...) with N >= 2")
        return Sampler("tensor", name_or_data.detach().float().cpu())
    raise ValueError(f"dataset: expected a name, a tensor or a TensorDataset, got {type(name_or_data).__name__}")
