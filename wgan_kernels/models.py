"""The benchmark models of the design card, with their exact shapes, so figures compare across
suites: plain ``torch.nn`` modules (no wgan_kernels layers), built on CPU in float32."""

from __future__ import annotations

import torch
from torch import nn


def _mlp(sizes: list[int], act) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return layers


def mlp_critic(hidden: int = 512, in_features: int = 2, in_shape: tuple[int, ...] | None = None) -> nn.Sequential:
    """MLP 4xH (the WGAN-GP toy critic): 4 Linear layers, LeakyReLU(0.2) between them. With
    ``in_shape`` (images), a Flatten first and ``in_features`` its size."""
    layers = _mlp([in_features, hidden, hidden, hidden, 1], lambda: nn.LeakyReLU(0.2))
    if in_shape is not None and len(in_shape) > 1:
        layers = [nn.Flatten()] + layers
    return nn.Sequential(*layers)


def mlp_generator(z_dim: int, hidden: int, out_shape: tuple[int, ...]) -> nn.Sequential:
    """The toy generator: 4 Linear layers, ReLU between them; for images (``out_shape`` of more
    than one dim) a tanh and an Unflatten to the shape."""
    size = 1
    for d in out_shape:
        size *= d
    layers = _mlp([z_dim, hidden, hidden, hidden, size], nn.ReLU)
    if len(out_shape) > 1:
        layers += [nn.Tanh(), nn.Unflatten(1, out_shape)]
    return nn.Sequential(*layers)


def mlp50() -> nn.Sequential:
    """50 small parameter tensors: 25 x Linear(64, 64)."""
    return nn.Sequential(*[nn.Linear(64, 64) for _ in range(25)])


def dcgan64_critic() -> nn.Sequential:
    """DCGAN-64 critic (10 tensors, 2.76M values), input 3x64x64, no normalisation layers."""
    chans = [3, 64, 128, 256, 512]
    layers: list[nn.Module] = []
    for c_in, c_out in zip(chans[:-1], chans[1:]):
        layers += [nn.Conv2d(c_in, c_out, 4, 2, 1), nn.LeakyReLU(0.2)]
    layers.append(nn.Conv2d(512, 1, 4, 1, 0))
    layers.append(nn.Flatten())
    return nn.Sequential(*layers)


def wide_critic_100m() -> nn.Sequential:
    """A ~100M-value critic (6 x Linear(4096, 4096): 12 tensors, 100.7M values), for
    bandwidth-bound optimizer and clipping benchmarks."""
    return nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(6)])


def num_values(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


BENCH_MODELS = {
    "mlp50": mlp50,
    "dcgan64": dcgan64_critic,
    "wide100m": wide_critic_100m,
}


def with_random_grads(module: nn.Module, seed: int = 0) -> nn.Module:
    """Gives every parameter a random gradient (for optimizer benchmarks)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype)
    return module


def _res_block(c_in: int, c_out: int, *, downsample: bool, first: bool = False):
    """WGAN-GP's CIFAR-10 critic block: [ReLU] conv3x3 ReLU conv3x3 [mean-pool 2x2] plus a
    shortcut (identity, or a 1x1 conv with the same pooling when the shape changes)."""
    from . import nn as wn

    body = ([] if first else [wn.ReLU()]) + [wn.Conv2d(c_in, c_out, 3, 1, 1), wn.ReLU(),
                                              wn.Conv2d(c_out, c_out, 3, 1, 1)]
    shortcut = None
    if downsample:
        body.append(wn.AvgPool2d(2))
        # the optimised first block pools before its 1x1 conv, the others after
        shortcut = (wn.Sequential(wn.AvgPool2d(2), wn.Conv2d(c_in, c_out, 1)) if first
                    else wn.Sequential(wn.Conv2d(c_in, c_out, 1), wn.AvgPool2d(2)))
    return wn.Residual(wn.Sequential(*body), shortcut)


def resnet32_critic(channels: int = 128) -> nn.Sequential:
    """ResNet-32 critic (WGAN-GP's CIFAR-10 critic): 128 channels, an optimised first block with
    downsampling, one more downsampling block, two plain blocks, ReLU, global mean pooling (an
    8x8 average pool), Linear(128, 1); input 3x32x32. Built from wgan_kernels.nn blocks, whose
    forward is plain torch, so it also serves the double-backward baseline."""
    from . import nn as wn

    return wn.Sequential(
        _res_block(3, channels, downsample=True, first=True),
        _res_block(channels, channels, downsample=True),
        _res_block(channels, channels, downsample=False),
        _res_block(channels, channels, downsample=False),
        wn.ReLU(), wn.AvgPool2d(8), wn.Flatten(), wn.Linear(channels, 1),
    )


# ----------------------------------------------------------------------------- as users write them
# The same two critics as custom modules, the way public GAN code writes them (a ``forward`` with
# ``view``, functional activations, residual ``+``, a spatial sum): what critic_loss meets in a
# user's code, on the explicit path through the traced graph (wgan_kernels/nn/trace.py).


class DCGAN64Critic(nn.Module):
    """``dcgan64_critic()`` as a custom module: the same layers and parameter shapes, LeakyReLU
    called functionally, the score read with ``view``."""

    def __init__(self, width: int = 64):
        super().__init__()
        chans = [3, width, 2 * width, 4 * width, 8 * width]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, 2, 1) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Conv2d(8 * width, 1, 4, 1, 0)

    def forward(self, img):
        h = img
        for conv in self.convs:
            h = nn.functional.leaky_relu(conv(h), 0.2)
        return self.out(h).view(img.shape[0], -1)


class _ResBlock(nn.Module):
    """WGAN-GP's CIFAR-10 block written as a module: [relu] conv relu conv [pool] + shortcut."""

    def __init__(self, c_in: int, c_out: int, downsample: bool, first: bool = False):
        super().__init__()
        self.first, self.downsample = first, downsample
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1) if downsample else None

    def forward(self, x):
        F = nn.functional
        h = x if self.first else F.relu(x)
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
            s = self.shortcut(F.avg_pool2d(x, 2)) if self.first else F.avg_pool2d(self.shortcut(x), 2)
        else:
            s = x
        return h + s


class ResNetCritic(nn.Module):
    """WGAN-GP's CIFAR-10 ResNet critic for (channels, resolution, resolution) images, written as
    public GAN code writes it (residual ``+``, ``F.relu``, a spatial reduction with ``torch.sum``):
    an optimised first block with downsampling, downsampling blocks to 8x8 (one at 32 px, two at
    64 px), two plain blocks, ReLU, a spatial mean (``pool="mean"``, WGAN-GP) or sum
    (``pool="sum"``, SN-GAN's variant), Linear(width, 1)."""

    def __init__(self, channels: int = 3, resolution: int = 32, width: int = 128, pool: str = "mean"):
        super().__init__()
        if pool not in ("mean", "sum"):
            raise ValueError(f"pool: expected 'mean' or 'sum', got {pool!r}")
        downs = _stages(resolution) - 2  # the first block and these halve the size down to 8x8
        blocks = [_ResBlock(channels, width, True, first=True)]
        blocks += [_ResBlock(width, width, True) for _ in range(downs)]
        blocks += [_ResBlock(width, width, False), _ResBlock(width, width, False)]
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(width, 1)
        self.mean = pool == "mean"

    def forward(self, x):
        h = nn.functional.relu(self.blocks(x))
        h = torch.sum(h, dim=(2, 3))  # over the final 8x8 map
        if self.mean:
            h = h / 64.0
        return self.fc(h)


class ResNet32Critic(ResNetCritic):
    """``resnet32_critic()`` as a custom module (3x32x32 input): the same parameter shapes, in the
    same order."""

    def __init__(self, channels: int = 128):
        super().__init__(3, 32, channels)


def _stages(resolution: int) -> int:
    """The generators' factor-2 upsamplings from their first 4x4 map to the image (3 at 32 px, 4
    at 64 px); the DCGAN critic's downsamplings to 4x4 as many, the ResNet critic's to 8x8 one
    fewer (its first block's included: 2 at 32 px, 3 at 64 px)."""
    if isinstance(resolution, bool) or resolution not in (32, 64):
        raise ValueError(f"resolution: expected 32 or 64, got {resolution!r}")
    return 3 if resolution == 32 else 4


class _UpBlock(nn.Module):
    """WGAN-GP's CIFAR-10 generator block: BN ReLU upsample(2) conv3x3 BN ReLU conv3x3, plus an
    upsampled 1x1-conv shortcut."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.shortcut = nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        F = nn.functional
        h = F.interpolate(F.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResNetGenerator(nn.Module):
    """WGAN-GP's CIFAR-10 ResNet generator: Linear(z, 4x4 width), upsampling blocks to the
    resolution (3 at 32 px, 4 at 64 px), BN ReLU conv3x3 to the image channels, tanh."""

    def __init__(self, z_dim: int, channels: int = 3, resolution: int = 32, width: int = 128):
        super().__init__()
        self.width = width
        self.fc = nn.Linear(z_dim, 4 * 4 * width)
        self.blocks = nn.Sequential(*(_UpBlock(width, width) for _ in range(_stages(resolution))))
        self.bn = nn.BatchNorm2d(width)
        self.out = nn.Conv2d(width, channels, 3, 1, 1)

    def forward(self, z):
        h = self.blocks(self.fc(z).view(-1, self.width, 4, 4))
        return torch.tanh(self.out(nn.functional.relu(self.bn(h))))


# ----------------------------------------------------------------------------- image GANs
# DCGAN at 32x32 or 64x64 (WGAN-GP's CIFAR-10 DCGAN, sized by the data): the critic has no
# normalisation layers (a per-sample gradient penalty needs none that couple the samples).


def dcgan_init_(module: nn.Module) -> nn.Module:
    """The DCGAN paper's initialisation, in place (torch's global generator): conv weights
    N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0. On digits32 it gave clean digits after 300
    steps where torch's default init left a checkerboard of dots (sliced W 0.044 vs 0.25)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                m.weight.normal_(0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.normal_(1.0, 0.02)
            else:
                continue
            if m.bias is not None:
                m.bias.zero_()
    return module


class DCGANCritic(nn.Module):
    """DCGAN critic for (channels, resolution, resolution) images: 4x4 stride-2 convolutions
    (width, 2 width, ...) with LeakyReLU(0.2), then a 4x4 convolution to one score per sample;
    the DCGAN initialisation (``dcgan_init_``)."""

    def __init__(self, channels: int = 3, resolution: int = 32, width: int = 64):
        super().__init__()
        stages = _stages(resolution)
        chans = [channels] + [width * 2**i for i in range(stages)]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 4, 2, 1) for a, b in zip(chans[:-1], chans[1:]))
        self.out = nn.Conv2d(chans[-1], 1, 4, 1, 0)
        dcgan_init_(self)

    def forward(self, img):
        h = img
        for conv in self.convs:
            h = nn.functional.leaky_relu(conv(h), 0.2)
        return self.out(h).view(img.shape[0], -1)


def dcgan_generator(z_dim: int, channels: int = 3, resolution: int = 32, width: int = 64) -> nn.Sequential:
    """DCGAN generator: z -> (width 2^(s-1), 4, 4) by a 4x4 transposed convolution, then 4x4
    stride-2 transposed convolutions halving the width, BatchNorm + ReLU between, tanh out; the
    DCGAN initialisation (``dcgan_init_``)."""
    stages = _stages(resolution)
    chans = [width * 2**i for i in reversed(range(stages))]
    layers: list[nn.Module] = [nn.Unflatten(1, (z_dim, 1, 1)), nn.ConvTranspose2d(z_dim, chans[0], 4, 1, 0),
                               nn.BatchNorm2d(chans[0]), nn.ReLU()]
    for a, b in zip(chans[:-1], chans[1:]):
        layers += [nn.ConvTranspose2d(a, b, 4, 2, 1), nn.BatchNorm2d(b), nn.ReLU()]
    layers += [nn.ConvTranspose2d(chans[-1], channels, 4, 2, 1), nn.Tanh()]
    return dcgan_init_(nn.Sequential(*layers))
