"""The trainer's data; nothing is downloaded. Embedded: 2-D toys as in the WGAN-GP toy
experiments, and scikit-learn's bundled 8x8 digits (``digits32``: the same upscaled for the conv
models). From files (``images.py``): ``folder:PATH``, ``cifar10:PATH``, ``tensor:PATH``."""

from __future__ import annotations

import math

import torch

TOY = ("8gaussians", "25gaussians", "swissroll")
DATASETS = TOY + ("digits", "digits32")
FILE_KINDS = ("folder:PATH", "cifar10:PATH", "tensor:PATH")  # image files (see images.py)


class Sampler:
    """Draws batches of a dataset with an explicit torch.Generator (reproducible, resumable)."""

    def __init__(self, name: str, data=None):
        self.name = name
        # finite datasets (digits, user tensors, images.ImageData): indexed by a tensor of rows
        self.data = data
        # a sample's shape (images.ImageData's shape is already one sample's)
        self.shape = (2,) if data is None else tuple(data.shape[1:] if isinstance(data, torch.Tensor) else data.shape)
        self.dim = math.prod(self.shape)

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        if self.data is not None:
            idx = torch.randint(0, len(self.data), (n,), generator=generator)
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


def load(name_or_data, resolution: int | None = None) -> Sampler:
    """A Sampler for an embedded dataset name, an image-file spec (``FILE_KINDS``), a tensor (rows
    are samples) or a TensorDataset. ``resolution``: the image side for image data (default: the
    data's own; 32 for image folders); refused for the 2-D toys and the 8x8 ``digits``."""
    if isinstance(name_or_data, str):
        if resolution is not None and (name_or_data in TOY or name_or_data == "digits"):
            raise ValueError(f"resolution: dataset {name_or_data!r} is not an image dataset (for 32 or 64 px "
                             f"digits use digits32)")
        if name_or_data in TOY:
            return Sampler(name_or_data)
        if name_or_data in ("digits", "digits32"):
            from sklearn.datasets import load_digits  # bundled with scikit-learn, no download

            x = torch.tensor(load_digits().data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0 * 2 - 1  # [-1, 1]
            if name_or_data == "digits32":  # upscaled (bilinear) for the conv models
                side = resolution or 32
                x = torch.nn.functional.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
            return Sampler(name_or_data, x.clamp(-1, 1))
        if name_or_data.split(":", 1)[0] in ("folder", "cifar10", "tensor"):
            from .images import load_images

            return Sampler(name_or_data, load_images(name_or_data, resolution or _native(name_or_data)))
        raise ValueError(f"dataset: expected one of {DATASETS} or {FILE_KINDS}, a tensor or a TensorDataset, got "
                         f"{name_or_data!r}")
    if isinstance(name_or_data, torch.utils.data.TensorDataset):
        name_or_data = name_or_data.tensors[0]
    if isinstance(name_or_data, torch.Tensor):
        if not name_or_data.is_floating_point() or name_or_data.dim() < 2 or name_or_data.shape[0] < 2:
            raise ValueError("dataset: expected a floating tensor of shape (N, ...) with N >= 2")
        x = name_or_data.detach().float().cpu()
        if resolution is not None:
            if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
                raise ValueError(f"resolution: resizes square images (N, C, H, H), not a tensor of shape "
                                 f"{tuple(x.shape)}")
            if x.shape[-1] != resolution:
                x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                                    antialias=True, align_corners=False)
        return Sampler("tensor", x)
    raise ValueError(f"dataset: expected a name, a tensor or a TensorDataset, got {type(name_or_data).__name__}")


def _native(spec: str) -> int | None:
    """The resolution an image-file dataset keeps when none is asked: its own (CIFAR-10 32, a
    tensor its H), 32 for folders of images of any size."""
    return 32 if spec.startswith("folder:") else None
