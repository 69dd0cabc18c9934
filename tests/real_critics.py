"""A zoo of WGAN critics written the way public GAN code writes them.

Each critic below is original code, but written in the style of a well-known kind of public GAN
repository (PyTorch-GAN, the WGAN-GP reference ports, StudioGAN, SNGAN/ResNet CIFAR critics, the
DCGAN tutorial and its WGAN ports, ProGAN): ``self.main = nn.Sequential(...)``, helper functions
that return layer lists, ``x.view(x.shape[0], -1)``, ``inplace=True`` activations, functional
activations, ``.squeeze()`` / ``.view(-1)`` at the end, dict outputs, class-label arguments, and so
on. They exist to test the torch.fx tracer that builds an explicit input-gradient chain from a user
critic, against code that was not written with the tracer in mind.

Every entry is a :class:`RealCritic`:

* ``build()`` constructs the critic in float32 (the caller seeds torch first and moves the module
  to the dtype it wants with ``.to(dtype)``). Widths are small so that a double backward of each
  runs in a fraction of a second on a CPU.
* ``inputs(batch, dtype)`` returns ``(args, kwargs)``; ``args[0]`` is the random sample ``x``,
  extra arguments are class labels (``LongTensor``). Batch sizes must be a multiple of 4 for the
  ProGAN minibatch-stddev critic (its group size).
* ``output_key`` names the score entry of a dict output, else ``None``. The score has one value
  per sample: shape ``(N,)`` or ``(N, 1)``.
* ``explicit`` says whether the tracer should build the explicit chain; when it is ``False``,
  ``reason`` is a lowercase keyword the fallback reason will contain ("batchnorm", "minibatch",
  "control flow").

Notes for comparisons: critics in training mode that hold Dropout draw a fresh mask per forward, so
an explicit chain must be compared with a reference run from the same RNG state. Spectral norm
(old-style hook and new-style parametrization) runs one power iteration per training-mode forward
and updates its ``u``/``v`` buffers, so comparisons should restore the state dict (or use
``.eval()``) between runs.

``dcgan64_critic(width=64)`` and ``resnet32_critic(width=128)`` are bench-sized factories; they are
also registered in :data:`CRITICS` at small widths.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import spectral_norm
from torch.nn.utils.parametrizations import spectral_norm as sn_param

__all__ = ["RealCritic", "CRITICS", "by_name", "dcgan64_critic", "resnet32_critic"]


@dataclass(frozen=True)
class RealCritic:
    """One registered critic: how to build it, feed it, read its score, and what the tracer does."""

    name: str
    style: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.dtype], tuple[tuple, dict]]
    output_key: str | None
    explicit: bool
    reason: str | None


# ---------------------------------------------------------------------------------------------
# WGAN-GP reference ports (toy 2-D MLP, MNIST conv critic)
# ---------------------------------------------------------------------------------------------


class ToyMLPCritic(nn.Module):
    """WGAN-GP reference toy critic: ReLU MLP on 2-D points, ``output.view(-1)``."""

    def __init__(self, DIM=32):
        super().__init__()
        main = nn.Sequential(
            nn.Linear(2, DIM),
            nn.ReLU(True),
            nn.Linear(DIM, DIM),
            nn.ReLU(True),
            nn.Linear(DIM, DIM),
            nn.ReLU(True),
            nn.Linear(DIM, 1),
        )
        self.main = main

    def forward(self, inputs):
        output = self.main(inputs)
        return output.view(-1)


class MnistConvCritic(nn.Module):
    """WGAN-GP reference MNIST critic: flat (N, 784) input reshaped inside forward, 5x5/s2 convs."""

    def __init__(self, DIM=8):
        super().__init__()
        self.DIM = DIM
        main = nn.Sequential(
            nn.Conv2d(1, DIM, 5, stride=2, padding=2),
            nn.ReLU(True),
            nn.Conv2d(DIM, 2 * DIM, 5, stride=2, padding=2),
            nn.ReLU(True),
            nn.Conv2d(2 * DIM, 4 * DIM, 5, stride=2, padding=2),
            nn.ReLU(True),
        )
        self.main = main
        self.output = nn.Linear(4 * 4 * 4 * DIM, 1)

    def forward(self, input):
        input = input.view(-1, 1, 28, 28)
        out = self.main(input)
        out = out.view(-1, 4 * 4 * 4 * self.DIM)
        out = self.output(out)
        return out.view(-1)


# ---------------------------------------------------------------------------------------------
# PyTorch-GAN style (wgan_gp MLP, wgan_div conv critic, cgan)
# ---------------------------------------------------------------------------------------------


class WganGpMLP(nn.Module):
    """PyTorch-GAN wgan_gp critic: flatten the image, LeakyReLU(0.2, inplace=True) MLP."""

    def __init__(self, img_shape=(1, 16, 16), hidden=32):
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(int(math.prod(img_shape)), hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, hidden // 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden // 2, 1),
        )

    def forward(self, img):
        img_flat = img.view(img.shape[0], -1)
        validity = self.model(img_flat)
        return validity


class WganDivCritic(nn.Module):
    """PyTorch-GAN wgan_div critic: ``discriminator_block`` helper (conv3/s2, LeakyReLU, Dropout2d,
    BatchNorm2d(out, 0.8)) and a linear adversarial head. ``bn=False`` drops every BatchNorm."""

    def __init__(self, channels=3, img_size=16, bn=True):
        super().__init__()

        def discriminator_block(in_filters, out_filters, bn=True):
            block = [
                nn.Conv2d(in_filters, out_filters, 3, 2, 1),
                nn.LeakyReLU(0.2, inplace=True),
                nn.Dropout2d(0.25),
            ]
            if bn:
                block.append(nn.BatchNorm2d(out_filters, 0.8))
            return block

        self.model = nn.Sequential(
            *discriminator_block(channels, 8, bn=False),
            *discriminator_block(8, 16, bn=bn),
            *discriminator_block(16, 16, bn=bn),
            *discriminator_block(16, 32, bn=bn),
        )

        # The height and width of downsampled image
        ds_size = img_size // 2**4
        self.adv_layer = nn.Sequential(nn.Linear(32 * ds_size**2, 1))

    def forward(self, img):
        out = self.model(img)
        out = out.view(out.shape[0], -1)
        validity = self.adv_layer(out)
        return validity


def _wgan_div_eval():
    """Build the wgan_div critic, let BatchNorm collect running statistics, switch to eval."""
    D = WganDivCritic(bn=True)
    with torch.no_grad():
        for _ in range(3):
            D(torch.randn(8, 3, 16, 16) * 1.5 + 0.3)
    return D.eval()


class CganMLPCritic(nn.Module):
    """PyTorch-GAN cgan critic: concatenate the flat image with a label embedding, Dropout MLP."""

    def __init__(self, n_classes=10, img_shape=(1, 16, 16), hidden=32):
        super().__init__()
        self.label_embedding = nn.Embedding(n_classes, n_classes)
        self.model = nn.Sequential(
            nn.Linear(n_classes + int(math.prod(img_shape)), hidden),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, hidden),
            nn.Dropout(0.4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, hidden),
            nn.Dropout(0.4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Linear(hidden, 1),
        )

    def forward(self, img, labels):
        # Concatenate label embedding and image to produce input
        d_in = torch.cat((img.view(img.size(0), -1), self.label_embedding(labels)), -1)
        validity = self.model(d_in)
        return validity


# ---------------------------------------------------------------------------------------------
# DCGAN tutorial / WGAN-GP DCGAN ports
# ---------------------------------------------------------------------------------------------


class DCGAN64Critic(nn.Module):
    """DCGAN tutorial discriminator as WGAN-GP ports rewrite it: conv4x4/s2/p1 + LeakyReLU(0.2,
    inplace=True), InstanceNorm2d(affine=True) instead of BatchNorm, no Sigmoid, ``.view(-1)``."""

    def __init__(self, nc=3, ndf=64):
        super().__init__()
        self.main = nn.Sequential(
            # input is (nc) x 64 x 64
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf) x 32 x 32
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.InstanceNorm2d(ndf * 2, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*2) x 16 x 16
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.InstanceNorm2d(ndf * 4, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*4) x 8 x 8
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.InstanceNorm2d(ndf * 8, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*8) x 4 x 4
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
        )

    def forward(self, input):
        return self.main(input).view(-1)


def dcgan64_critic(width=64):
    """Bench-sized DCGAN critic for (N, 3, 64, 64) input, per-sample InstanceNorm."""
    return DCGAN64Critic(nc=3, ndf=width)


class LayerNormDCGANCritic(nn.Module):
    """WGAN-GP DCGAN port: LayerNorm over [C, H, W] (the paper's advice), layers built in a loop."""

    def __init__(self, nc=3, ndf=8, img_size=32):
        super().__init__()
        layers = [nn.Conv2d(nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        ch, size = ndf, img_size // 2
        while size > 4:
            layers += [
                nn.Conv2d(ch, ch * 2, 4, 2, 1),
                nn.LayerNorm([ch * 2, size // 2, size // 2]),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            ch, size = ch * 2, size // 2
        layers.append(nn.Conv2d(ch, 1, 4, 1, 0))
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        out = self.main(x)
        return out.view(-1, 1)


class GroupNormCritic(nn.Module):
    """Hand-rolled critic with ModuleLists of convs and GroupNorms, functional ``F.leaky_relu``,
    ``.squeeze()`` at the end."""

    def __init__(self, nc=3, ndf=16, groups=4):
        super().__init__()
        chans = [nc, ndf, ndf * 2, ndf * 2]
        self.convs = nn.ModuleList(
            [nn.Conv2d(chans[i], chans[i + 1], 4, 2, 1) for i in range(len(chans) - 1)]
        )
        self.norms = nn.ModuleList([nn.GroupNorm(groups, c) for c in chans[2:]])
        self.final = nn.Conv2d(chans[-1], 1, 4, 1, 0)

    def forward(self, x):
        h = F.leaky_relu(self.convs[0](x), 0.2)
        for conv, norm in zip(self.convs[1:], self.norms):
            h = F.leaky_relu(norm(conv(h)), 0.2)
        return self.final(h).squeeze()


# ---------------------------------------------------------------------------------------------
# ResNet critics (SNGAN / WGAN-GP CIFAR, StudioGAN)
# ---------------------------------------------------------------------------------------------


class OptimizedDisBlock(nn.Module):
    """First block of the SNGAN/WGAN-GP CIFAR ResNet critic: no pre-activation, pooled shortcut."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.c1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1)
        self.c2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1)
        self.c_sc = nn.Conv2d(in_ch, out_ch, 1, 1, 0)

    def residual(self, x):
        h = self.c1(x)
        h = F.relu(h)
        h = self.c2(h)
        return F.avg_pool2d(h, 2)

    def shortcut(self, x):
        return self.c_sc(F.avg_pool2d(x, 2))

    def forward(self, x):
        return self.residual(x) + self.shortcut(x)


class DBlock(nn.Module):
    """Pre-activation residual block of the SNGAN/WGAN-GP CIFAR critic, 1x1 conv shortcut when the
    shape changes."""

    def __init__(self, in_ch, out_ch, hidden_ch=None, downsample=False):
        super().__init__()
        hidden_ch = in_ch if hidden_ch is None else hidden_ch
        self.downsample = downsample
        self.learnable_sc = (in_ch != out_ch) or downsample
        self.c1 = nn.Conv2d(in_ch, hidden_ch, 3, 1, 1)
        self.c2 = nn.Conv2d(hidden_ch, out_ch, 3, 1, 1)
        if self.learnable_sc:
            self.c_sc = nn.Conv2d(in_ch, out_ch, 1, 1, 0)

    def residual(self, x):
        h = F.relu(x)
        h = self.c1(h)
        h = F.relu(h)
        h = self.c2(h)
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return h

    def shortcut(self, x):
        if self.learnable_sc:
            x = self.c_sc(x)
            if self.downsample:
                return F.avg_pool2d(x, 2)
        return x

    def forward(self, x):
        return self.residual(x) + self.shortcut(x)


class ResNet32Critic(nn.Module):
    """SNGAN/WGAN-GP CIFAR ResNet critic (without spectral norm): optimized block, three DBlocks,
    ReLU, ``torch.sum(h, dim=(2, 3))``, Linear."""

    def __init__(self, ch=128):
        super().__init__()
        self.block1 = OptimizedDisBlock(3, ch)
        self.block2 = DBlock(ch, ch, downsample=True)
        self.block3 = DBlock(ch, ch, downsample=False)
        self.block4 = DBlock(ch, ch, downsample=False)
        self.l5 = nn.Linear(ch, 1)

    def forward(self, x):
        h = x
        h = self.block1(h)
        h = self.block2(h)
        h = self.block3(h)
        h = self.block4(h)
        h = F.relu(h)
        h = torch.sum(h, dim=(2, 3))  # global sum pooling
        output = self.l5(h)
        return output


def resnet32_critic(width=128):
    """Bench-sized SNGAN/WGAN-GP CIFAR ResNet critic for (N, 3, 32, 32) input."""
    return ResNet32Critic(ch=width)


def snconv2d(*args, **kwargs):
    """StudioGAN-style helper: a Conv2d wrapped with the old-style spectral_norm hook."""
    return spectral_norm(nn.Conv2d(*args, **kwargs))


def snlinear(*args, **kwargs):
    return spectral_norm(nn.Linear(*args, **kwargs))


def sn_embedding(*args, **kwargs):
    return spectral_norm(nn.Embedding(*args, **kwargs))


class SNDiscOptBlock(nn.Module):
    """StudioGAN-style first block: spectral-normed convs, module activation, AvgPool2d."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.conv2d0 = snconv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        self.conv2d1 = snconv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.conv2d2 = snconv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.activation = nn.ReLU()
        self.average_pooling = nn.AvgPool2d(2)

    def forward(self, x):
        x0 = x
        x = self.conv2d1(x)
        x = self.activation(x)
        x = self.conv2d2(x)
        x = self.average_pooling(x)

        x0 = self.average_pooling(x0)
        x0 = self.conv2d0(x0)
        return x + x0


class SNDiscBlock(nn.Module):
    """StudioGAN-style residual block with spectral-normed convs and optional downsampling."""

    def __init__(self, in_channels, out_channels, downsample=True):
        super().__init__()
        self.downsample = downsample
        self.ch_mismatch = in_channels != out_channels
        if self.downsample or self.ch_mismatch:
            self.conv2d0 = snconv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        self.conv2d1 = snconv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.conv2d2 = snconv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.activation = nn.ReLU()
        self.average_pooling = nn.AvgPool2d(2)

    def forward(self, x):
        x0 = x
        x = self.activation(x)
        x = self.conv2d1(x)
        x = self.activation(x)
        x = self.conv2d2(x)
        if self.downsample:
            x = self.average_pooling(x)

        if self.downsample or self.ch_mismatch:
            x0 = self.conv2d0(x0)
            if self.downsample:
                x0 = self.average_pooling(x0)
        return x + x0


class StudioGANProjCritic(nn.Module):
    """StudioGAN-style ResNet critic: old-style ``torch.nn.utils.spectral_norm`` helpers, projection
    discriminator on class labels, dict output ``{"h": h, "adv_output": adv_output}``."""

    def __init__(self, d_conv_dim=16, num_classes=10):
        super().__init__()
        self.in_dims = [3, d_conv_dim, d_conv_dim, d_conv_dim]
        self.out_dims = [d_conv_dim, d_conv_dim, d_conv_dim, d_conv_dim]
        self.down = [True, True, False, False]
        blocks = []
        for index in range(len(self.in_dims)):
            if index == 0:
                blocks.append(SNDiscOptBlock(self.in_dims[index], self.out_dims[index]))
            else:
                blocks.append(
                    SNDiscBlock(
                        self.in_dims[index], self.out_dims[index], downsample=self.down[index]
                    )
                )
        self.blocks = nn.ModuleList(blocks)
        self.activation = nn.ReLU(inplace=True)
        self.linear1 = snlinear(in_features=self.out_dims[-1], out_features=1, bias=True)
        self.embedding = sn_embedding(num_classes, self.out_dims[-1])

    def forward(self, x, label):
        h = x
        for block in self.blocks:
            h = block(h)
        h = self.activation(h)
        h = torch.sum(h, dim=[2, 3])

        adv_output = torch.squeeze(self.linear1(h))
        proj = torch.sum(self.embedding(label) * h, dim=1)
        adv_output += proj
        return {"h": h, "adv_output": adv_output}


class SNGANCNNCritic(nn.Module):
    """SNGAN "standard CNN" critic with the new-style ``parametrizations.spectral_norm``:
    conv3x3/s1 and conv4x4/s2 pairs, LeakyReLU(0.1), flatten, linear."""

    def __init__(self, nc=3, ndf=8, img_size=32):
        super().__init__()
        m_g = img_size // 8
        self.main = nn.Sequential(
            sn_param(nn.Conv2d(nc, ndf, 3, 1, 1)),
            nn.LeakyReLU(0.1, inplace=True),
            sn_param(nn.Conv2d(ndf, ndf, 4, 2, 1)),
            nn.LeakyReLU(0.1, inplace=True),
            sn_param(nn.Conv2d(ndf, ndf * 2, 3, 1, 1)),
            nn.LeakyReLU(0.1, inplace=True),
            sn_param(nn.Conv2d(ndf * 2, ndf * 2, 4, 2, 1)),
            nn.LeakyReLU(0.1, inplace=True),
            sn_param(nn.Conv2d(ndf * 2, ndf * 4, 3, 1, 1)),
            nn.LeakyReLU(0.1, inplace=True),
            sn_param(nn.Conv2d(ndf * 4, ndf * 4, 4, 2, 1)),
            nn.LeakyReLU(0.1, inplace=True),
            sn_param(nn.Conv2d(ndf * 4, ndf * 8, 3, 1, 1)),
            nn.LeakyReLU(0.1, inplace=True),
        )
        self.linear = sn_param(nn.Linear(m_g * m_g * ndf * 8, 1))

    def forward(self, x):
        x = self.main(x)
        x = torch.flatten(x, start_dim=1)
        return self.linear(x)


# ---------------------------------------------------------------------------------------------
# Conditional conv critic, other data shapes, unusual layers
# ---------------------------------------------------------------------------------------------


class CondDCGANCritic(nn.Module):
    """Conditional DCGAN critic: one-hot label map concatenated to the image along channels."""

    def __init__(self, nc=3, ndf=8, n_classes=5):
        super().__init__()
        self.n_classes = n_classes
        self.main = nn.Sequential(
            nn.Conv2d(nc + n_classes, ndf, 4, 2, 1),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1),
            nn.InstanceNorm2d(ndf * 2, affine=True),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, 1, 4, 1, 0),
        )

    def forward(self, img, labels):
        label_map = F.one_hot(labels, self.n_classes).type_as(img)
        label_map = label_map[:, :, None, None].expand(-1, -1, img.size(2), img.size(3))
        x = torch.cat([img, label_map], dim=1)
        return self.main(x).view(-1)


class TimeSeriesCritic(nn.Module):
    """Time-series GAN critic: Conv1d stack, LayerNorm over channels via transpose, GELU."""

    def __init__(self, n_features=4, hidden=16, seq_len=32):
        super().__init__()
        self.conv1 = nn.Conv1d(n_features, hidden, kernel_size=5, padding=2)
        self.norm1 = nn.LayerNorm(hidden)
        self.conv2 = nn.Conv1d(hidden, hidden * 2, kernel_size=4, stride=2, padding=1)
        self.norm2 = nn.LayerNorm(hidden * 2)
        self.conv3 = nn.Conv1d(hidden * 2, hidden * 2, kernel_size=4, stride=2, padding=1)
        self.act = nn.GELU()
        self.fc = nn.Linear(hidden * 2 * (seq_len // 4), 1)

    def forward(self, x):
        h = self.conv1(x)
        h = self.norm1(h.transpose(1, 2)).transpose(1, 2)
        h = self.act(h)
        h = self.conv2(h)
        h = self.norm2(h.transpose(1, 2)).transpose(1, 2)
        h = F.gelu(h, approximate="tanh")
        h = self.act(self.conv3(h))
        h = h.flatten(1)
        return self.fc(h).squeeze(-1)


class VideoConv3dCritic(nn.Module):
    """Small video GAN critic (TGAN/MoCoGAN style): Conv3d over (T, H, W), LeakyReLU, Linear."""

    def __init__(self, nc=3, ndf=8, frames=4, img_size=16):
        super().__init__()
        self.model = nn.Sequential(
            nn.Conv3d(nc, ndf, kernel_size=(3, 4, 4), stride=(1, 2, 2), padding=(1, 1, 1)),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv3d(ndf, ndf * 2, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        )
        self.feat_dim = ndf * 2 * (frames // 2) * (img_size // 4) ** 2
        self.fc = nn.Linear(self.feat_dim, 1)

    def forward(self, video):
        h = self.model(video)
        h = h.view(-1, self.feat_dim)
        return self.fc(h)


class DilatedGroupedCritic(nn.Module):
    """Critic with ``padding='same'`` convs, a dilated grouped conv and a depthwise conv."""

    def __init__(self, nc=3, ndf=16):
        super().__init__()
        self.stem = nn.Conv2d(nc, ndf, 3, padding="same")
        self.dilated = nn.Conv2d(ndf, ndf, 3, padding="same", dilation=2, groups=4)
        self.depthwise = nn.Conv2d(ndf, ndf, 5, padding="same", groups=ndf)
        self.down1 = nn.Conv2d(ndf, ndf * 2, 4, 2, 1)
        self.down2 = nn.Conv2d(ndf * 2, ndf * 2, 4, 2, 1)
        self.fc = nn.Linear(ndf * 2 * 4 * 4, 1)

    def forward(self, x):
        h = F.leaky_relu(self.stem(x), 0.2)
        h = F.leaky_relu(self.dilated(h), 0.2)
        h = h + self.depthwise(h)
        h = F.leaky_relu(self.down1(h), 0.2, inplace=True)
        h = F.leaky_relu(self.down2(h), 0.2)
        h = h.view(h.size(0), -1)
        return self.fc(h).view(-1)


class TokenMLPCritic(nn.Module):
    """MLP critic with nn.Flatten / nn.Unflatten, smooth and saturating activations (ELU, Tanh,
    Softplus, Hardtanh, Sigmoid gate), a scalar multiply and ``h.mean(dim=1)`` pooling."""

    def __init__(self, img_shape=(1, 16, 16), tokens=8, dim=16):
        super().__init__()
        self.embed = nn.Sequential(
            nn.Flatten(),
            nn.Linear(int(math.prod(img_shape)), tokens * dim),
            nn.ELU(),
            nn.Unflatten(1, (tokens, dim)),
        )
        self.mix = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim)
        self.head = nn.Sequential(
            nn.Linear(dim, dim),
            nn.Hardtanh(),
            nn.Linear(dim, 1),
        )

    def forward(self, x):
        h = self.embed(x)
        h = torch.tanh(h * 0.5)
        h = F.softplus(self.mix(h)) * torch.sigmoid(self.gate(h))
        h = h.mean(dim=1)
        return self.head(h)


# ---------------------------------------------------------------------------------------------
# ProGAN style (equalized learning rate, minibatch stddev)
# ---------------------------------------------------------------------------------------------


class EqualizedConv2d(nn.Module):
    """ProGAN equalized-learning-rate conv: N(0, 1) weights scaled at runtime by He's constant."""

    def __init__(self, in_ch, out_ch, kernel_size, padding=0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_ch, in_ch, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        self.scale = math.sqrt(2.0 / (in_ch * kernel_size * kernel_size))
        self.padding = padding

    def forward(self, x):
        return F.conv2d(x, self.weight * self.scale, self.bias, padding=self.padding)


class EqualizedLinear(nn.Module):
    """ProGAN equalized-learning-rate linear layer (runtime He scaling, functional F.linear)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = math.sqrt(2.0 / in_features)

    def forward(self, x):
        return F.linear(x, self.weight * self.scale, self.bias)


class MinibatchStdDev(nn.Module):
    """ProGAN minibatch standard deviation: the per-group std, averaged over features, appended as
    an extra channel. Couples the samples of a group; the batch must be a multiple of group_size."""

    def __init__(self, group_size=4):
        super().__init__()
        self.group_size = group_size

    def forward(self, x):
        N, C, H, W = x.shape
        y = x.view(self.group_size, -1, C, H, W)  # [G, M, C, H, W]
        y = y - y.mean(dim=0, keepdim=True)
        y = torch.sqrt(y.pow(2).mean(dim=0) + 1e-8)  # [M, C, H, W]
        y = y.mean(dim=[1, 2, 3], keepdim=True)  # [M, 1, 1, 1]
        y = y.repeat(self.group_size, 1, H, W)  # [N, 1, H, W]
        return torch.cat([x, y], dim=1)


class ProGANCritic(nn.Module):
    """ProGAN critic at 16x16: fromRGB 1x1, equalized 3x3 convs, avg-pool downsampling, optional
    minibatch-stddev before the final 3x3 and 4x4 convs, equalized linear head."""

    def __init__(self, nc=3, ch=16, mbstd=True, group_size=4):
        super().__init__()
        self.from_rgb = EqualizedConv2d(nc, ch, 1)
        self.block16 = nn.ModuleList([EqualizedConv2d(ch, ch, 3, 1), EqualizedConv2d(ch, ch, 3, 1)])
        self.block8 = nn.ModuleList([EqualizedConv2d(ch, ch, 3, 1), EqualizedConv2d(ch, ch, 3, 1)])
        self.mbstd = MinibatchStdDev(group_size) if mbstd else nn.Identity()
        self.conv_last = EqualizedConv2d(ch + (1 if mbstd else 0), ch, 3, 1)
        self.conv_4x4 = EqualizedConv2d(ch, ch, 4, 0)
        self.fc = EqualizedLinear(ch, 1)

    def forward(self, x):
        h = F.leaky_relu(self.from_rgb(x), 0.2)
        for block in (self.block16, self.block8):
            for conv in block:
                h = F.leaky_relu(conv(h), 0.2)
            h = F.avg_pool2d(h, 2)
        h = self.mbstd(h)
        h = F.leaky_relu(self.conv_last(h), 0.2)
        h = F.leaky_relu(self.conv_4x4(h), 0.2)
        return self.fc(h.view(h.size(0), -1))


# ---------------------------------------------------------------------------------------------
# Data-dependent control flow
# ---------------------------------------------------------------------------------------------


class RescalingCritic(nn.Module):
    """Hobby-project critic that rescales its features when they grow large: a Python ``if`` on a
    tensor value, which torch.fx cannot trace."""

    def __init__(self, nc=3, ndf=8):
        super().__init__()
        self.conv1 = nn.Conv2d(nc, ndf, 4, 2, 1)
        self.conv2 = nn.Conv2d(ndf, ndf * 2, 4, 2, 1)
        self.fc = nn.Linear(ndf * 2 * 4 * 4, 1)

    def forward(self, x):
        h = F.leaky_relu(self.conv1(x), 0.2)
        h = self.conv2(h)
        if h.abs().mean() > 1:
            h = h / 2
        h = F.leaky_relu(h, 0.2)
        return self.fc(h.view(h.shape[0], -1)).squeeze(1)


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------


def _sample(*shape):
    """Inputs for a critic taking one random sample of shape (batch, *shape)."""

    def inputs(batch, dtype):
        return (torch.randn(batch, *shape, dtype=dtype),), {}

    return inputs


def _labeled(*shape, n_classes, as_kwarg=None):
    """Inputs for a conditional critic: a random sample and random class labels (a LongTensor),
    positional, or as the keyword ``as_kwarg``."""

    def inputs(batch, dtype):
        x = torch.randn(batch, *shape, dtype=dtype)
        labels = torch.randint(0, n_classes, (batch,))
        if as_kwarg is None:
            return (x, labels), {}
        return (x,), {as_kwarg: labels}

    return inputs


CRITICS: list[RealCritic] = [
    RealCritic(
        name="wgan_gp_toy_mlp",
        style="WGAN-GP reference toy critic: ReLU(True) MLP on 2-D points, output.view(-1)",
        build=lambda: ToyMLPCritic(DIM=32),
        inputs=_sample(2),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="pytorch_gan_wgan_gp_mlp",
        style="PyTorch-GAN wgan_gp: img.view(img.shape[0], -1), LeakyReLU(0.2, inplace=True) MLP",
        build=lambda: WganGpMLP(img_shape=(1, 16, 16), hidden=32),
        inputs=_sample(1, 16, 16),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="pytorch_gan_wgan_div_bn_train",
        style=(
            "PyTorch-GAN wgan_div: discriminator_block helper with Dropout2d and BatchNorm2d(out,"
            " 0.8), training mode"
        ),
        build=lambda: WganDivCritic(bn=True),
        inputs=_sample(3, 16, 16),
        output_key=None,
        explicit=False,
        reason="batchnorm",
    ),
    RealCritic(
        name="pytorch_gan_wgan_div_bn_eval",
        style=(
            "PyTorch-GAN wgan_div in .eval() after BatchNorm collected running stats: per-channel"
            " affine BN, identity Dropout2d"
        ),
        build=_wgan_div_eval,
        inputs=_sample(3, 16, 16),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="pytorch_gan_dropout2d_train_no_bn",
        style=(
            "PyTorch-GAN discriminator_block with bn=False, Dropout2d in training mode (random "
            "mask: compare from the same RNG state)"
        ),
        build=lambda: WganDivCritic(bn=False),
        inputs=_sample(3, 16, 16),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="wgan_gp_mnist_conv",
        style=(
            "WGAN-GP reference MNIST critic: flat (N, 784) input, view(-1, 1, 28, 28), "
            "out.view(-1, 4*4*4*DIM), Linear"
        ),
        build=lambda: MnistConvCritic(DIM=8),
        inputs=_sample(784),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="dcgan64_instancenorm",
        style=(
            "DCGAN tutorial discriminator ported to WGAN-GP: self.main Sequential, "
            "InstanceNorm2d(affine=True), .view(-1)"
        ),
        build=lambda: dcgan64_critic(width=8),
        inputs=_sample(3, 64, 64),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="dcgan_layernorm",
        style=(
            "WGAN-GP DCGAN port with nn.LayerNorm([C, H, W]) between convs, layers built in a "
            "while loop"
        ),
        build=lambda: LayerNormDCGANCritic(ndf=8),
        inputs=_sample(3, 32, 32),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="dcgan_groupnorm_functional",
        style=(
            "hand-rolled DCGAN critic: ModuleList convs + GroupNorm, F.leaky_relu(h, 0.2), "
            ".squeeze()"
        ),
        build=lambda: GroupNormCritic(ndf=16),
        inputs=_sample(3, 32, 32),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="sngan_resnet32",
        style=(
            "SNGAN/WGAN-GP CIFAR ResNet critic: OptimizedDisBlock + DBlocks, residual +, "
            "F.avg_pool2d, torch.sum(h, dim=(2, 3))"
        ),
        build=lambda: resnet32_critic(width=16),
        inputs=_sample(3, 32, 32),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="studiogan_resnet_projection_sn",
        style=(
            "StudioGAN ResNet critic: old-style spectral_norm helpers, label projection, dict "
            "output"
        ),
        build=lambda: StudioGANProjCritic(d_conv_dim=16, num_classes=10),
        inputs=_labeled(3, 32, 32, n_classes=10),
        output_key="adv_output",
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="sngan_cnn_parametrized_sn",
        style=(
            "SNGAN standard CNN critic with torch.nn.utils.parametrizations.spectral_norm, "
            "LeakyReLU(0.1), torch.flatten"
        ),
        build=lambda: SNGANCNNCritic(ndf=8),
        inputs=_sample(3, 32, 32),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="pytorch_gan_cgan_mlp_embedding",
        style=(
            "PyTorch-GAN cgan: torch.cat of flat image and label embedding, Dropout(0.4) in "
            "training mode (compare from the same RNG state)"
        ),
        build=lambda: CganMLPCritic(n_classes=10, img_shape=(1, 16, 16), hidden=32),
        inputs=_labeled(1, 16, 16, n_classes=10),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="conditional_dcgan_label_map",
        style=(
            "conditional DCGAN: one-hot label map expanded and torch.cat([img, label_map], "
            "dim=1), labels passed as a keyword"
        ),
        build=lambda: CondDCGANCritic(ndf=8, n_classes=5),
        inputs=_labeled(3, 16, 16, n_classes=5, as_kwarg="labels"),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="timeseries_conv1d_gelu_layernorm",
        style=(
            "time-series GAN critic: Conv1d stack, LayerNorm over channels via transpose(1, 2), "
            "GELU (exact and tanh)"
        ),
        build=lambda: TimeSeriesCritic(n_features=4, hidden=16, seq_len=32),
        inputs=_sample(4, 32),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="video_conv3d",
        style=(
            "video GAN critic (TGAN/MoCoGAN style): small Conv3d stack on (N, C, T, H, W), view, "
            "Linear"
        ),
        build=lambda: VideoConv3dCritic(ndf=8, frames=4, img_size=16),
        inputs=_sample(3, 4, 16, 16),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="dilated_grouped_same_padding",
        style=(
            "critic with padding='same' convs, dilated grouped conv, depthwise conv residual, "
            "inplace F.leaky_relu"
        ),
        build=lambda: DilatedGroupedCritic(ndf=16),
        inputs=_sample(3, 16, 16),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="mlp_unflatten_mixed_activations",
        style=(
            "token-MLP critic: nn.Flatten/nn.Unflatten, ELU/Tanh/Softplus/Sigmoid/Hardtanh, h * "
            "0.5, h.mean(dim=1)"
        ),
        build=lambda: TokenMLPCritic(img_shape=(1, 16, 16), tokens=8, dim=16),
        inputs=_sample(1, 16, 16),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="progan_equalized_lr",
        style=(
            "ProGAN critic without minibatch-stddev: equalized-lr F.conv2d/F.linear with runtime "
            "weight scale, avg-pool"
        ),
        build=lambda: ProGANCritic(ch=16, mbstd=False),
        inputs=_sample(3, 16, 16),
        output_key=None,
        explicit=True,
        reason=None,
    ),
    RealCritic(
        name="progan_minibatch_stddev",
        style="ProGAN critic with a minibatch-stddev layer (group size 4) that couples the samples",
        build=lambda: ProGANCritic(ch=16, mbstd=True, group_size=4),
        inputs=_sample(3, 16, 16),
        output_key=None,
        explicit=False,
        reason="minibatch",
    ),
    RealCritic(
        name="data_dependent_rescale",
        style=(
            "hobby critic with a data-dependent Python if (h.abs().mean() > 1) that torch.fx "
            "cannot trace"
        ),
        build=lambda: RescalingCritic(ndf=8),
        inputs=_sample(3, 16, 16),
        output_key=None,
        explicit=False,
        reason="control flow",
    ),
]

_BY_NAME = {c.name: c for c in CRITICS}
assert len(_BY_NAME) == len(CRITICS), "critic names must be unique"


def by_name(name) -> RealCritic:
    """The registered critic called ``name``; KeyError lists the known names."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no critic {name!r}; known: {sorted(_BY_NAME)}") from None
