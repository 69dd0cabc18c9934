"""Critic layers that return their input gradient explicitly ("double backward made single").

Each block is the torch layer of the same name (same constructor, same ``weight``/``bias``, same
``forward``) plus two methods, written side by side:

- ``_forward_saving(x) -> (y, saved)``: the forward, keeping what the backward needs;
- ``_input_grad(saved, grad_y) -> grad_x``: the layer's vector-Jacobian product, built from plain
  differentiable ops.

``forward_with_input_grad(x)`` runs the first and then the second with ``grad_y = ones_like(out)``,
giving ``(out, d out.sum() / dx)``. Because ``grad_x`` is an ordinary function of the parameters,
a gradient penalty on it needs one first-order ``.backward()``: no ``create_graph=True``, so it
works under ``torch.compile``, CUDA graphs and DDP.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..ops import activation as _act
from . import _chain

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class InputGradModule(nn.Module):
    """Base of the blocks: ``forward_with_input_grad`` on top of the two per-layer methods."""

    def _forward_saving(self, x: torch.Tensor):
        raise NotImplementedError

    def _input_grad(self, saved, grad_y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _unsupported(self, path: str) -> str | None:
        """Why this module has no explicit input-gradient path (None: it has one)."""
        return None

    def forward_with_input_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(out, grad_x)``: ``out == self(x)`` and ``grad_x`` (shape of ``x``) equal to
        ``torch.autograd.grad(out.sum(), x, create_graph=True)[0]``, computed without autograd:
        it is differentiable in the parameters (and in ``x``) through ordinary ops.

        Gradient order: this layer-by-layer chain is made of differentiable ops, so a loss on
        ``(out, grad_x)`` can be differentiated twice, as autograd's double backward would.
        A ``Sequential`` that takes the one-node path (nn/_chain.py) is first-order: asking for a
        second derivative through it raises ``RuntimeError`` (``_chain.SECOND_ORDER_ERROR``)."""
        _check_input(x)
        reason = self._unsupported("module")
        if reason is not None:
            raise ValueError(reason)
        batch = self.__dict__.get("_wk_sn_batch")  # spectral_norm_all's per-step iteration, as a forward would
        if batch is not None:
            batch.before(self, (x,))
        try:
            out, saved = self._forward_saving(x)
            return out, self._input_grad(saved, torch.ones_like(out))
        finally:
            if batch is not None:
                batch.after(self, (x,), None)


def supports_input_grad(module: nn.Module) -> bool:
    """True when ``module.forward_with_input_grad`` works: a wgan_kernels.nn block whose
    sub-blocks (for ``Sequential`` and ``Residual``) all have the explicit path."""
    return isinstance(module, InputGradModule) and module._unsupported("module") is None


def _check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating-point dtype, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")


def _check_matches_weight(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dtype != weight.dtype or x.device != weight.device:
        raise ValueError(
            f"x ({x.dtype}, {x.device}) must have the dtype and device of the layer's weight "
            f"({weight.dtype}, {weight.device})"
        )


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32 so an activation's derivative is rounded once, like torch's
    own kernels (which compute in float32 internally); other dtypes unchanged."""
    return t.float() if t.dtype in _LOW_PRECISION else t


class _Mask:
    """What a LeakyReLU/ReLU saves on the mask path: ``(x > 0)`` as a bool tensor."""

    __slots__ = ("mask",)

    def __init__(self, mask: torch.Tensor):
        self.mask = mask


def _not_a_block(path: str, module: nn.Module) -> str:
    return (
        f"{path}: {type(module).__name__} is not supported by wgan_kernels.nn (no explicit input "
        f"gradient); use its blocks or wgan_kernels.nn.from_torch"
    )


# ----------------------------------------------------------------------------------------------
# Layers with parameters
# ----------------------------------------------------------------------------------------------


class Linear(InputGradModule, nn.Linear):
    """``torch.nn.Linear`` with an explicit input gradient: y = x W^T + b, dx = dy W."""

    def _forward_saving(self, x):
        _check_matches_weight(x, self.weight)
        return F.linear(x, self.weight, self.bias), None

    def _input_grad(self, saved, grad_y):
        return grad_y @ self.weight

    @classmethod
    def _from_torch(cls, m: nn.Linear) -> "Linear":
        new = cls(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
        new.weight, new.bias = m.weight, m.bias
        return new


class Conv2d(InputGradModule, nn.Conv2d):
    """``torch.nn.Conv2d`` (zero padding) with an explicit input gradient: dx is the transposed
    convolution of dy with the same weight, stride, padding, dilation and groups; its
    ``output_padding`` restores the input size that the strided forward rounded away."""

    def _unsupported(self, path):
        if self.padding_mode != "zeros":
            return f"{path}: Conv2d with padding_mode={self.padding_mode!r} is not supported (only 'zeros')"
        if self.padding == "same" and any(d * (k - 1) % 2 for d, k in zip(self.dilation, self.kernel_size)):
            return (
                f"{path}: Conv2d with padding='same' and an even (dilated) kernel pads unevenly; "
                f"not supported"
            )
        return None

    def _numeric_padding(self) -> tuple[int, int]:
        if self.padding == "valid":
            return (0, 0)
        if self.padding == "same":
            return tuple(d * (k - 1) // 2 for d, k in zip(self.dilation, self.kernel_size))
        return self.padding

    def _forward_saving(self, x):
        _check_matches_weight(x, self.weight)
        return self._conv_forward(x, self.weight, self.bias), x.shape[-2:]

    def _forward_saving_without_bias(self, x):
        """The convolution without its bias, for ``Sequential`` to fuse the bias into the
        activation that follows (one pass over the output instead of two)."""
        _check_matches_weight(x, self.weight)
        return self._conv_forward(x, self.weight, None), x.shape[-2:]

    def _input_grad(self, in_size, grad_y):
        padding = self._numeric_padding()
        output_padding = [
            size_in - ((size_out - 1) * s - 2 * p + d * (k - 1) + 1)
            for size_in, size_out, s, p, d, k in zip(
                in_size, grad_y.shape[-2:], self.stride, padding, self.dilation, self.kernel_size
            )
        ]
        return F.conv_transpose2d(
            grad_y, self.weight, None, self.stride, padding, output_padding, self.groups, self.dilation
        )

    @classmethod
    def _from_torch(cls, m: nn.Conv2d) -> "Conv2d":
        new = cls(
            m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
            m.groups, bias=m.bias is not None, padding_mode=m.padding_mode, device="meta",
        )
        new.weight, new.bias = m.weight, m.bias
        return new


# ----------------------------------------------------------------------------------------------
# Activations. Piecewise-linear ones save a mask; smooth ones save x (or y) and multiply by the
# analytic derivative, itself differentiable so the penalty reaches earlier parameters.
# ``inplace=True`` is honoured by ``forward``; the saving path never works in place (it must keep x).
# ----------------------------------------------------------------------------------------------


class LeakyReLU(InputGradModule, nn.LeakyReLU):
    """y = x if x > 0 else slope * x; dx = dy where x > 0, slope * dy elsewhere."""

    def _forward_saving(self, x):
        if _act.fused(x.device):  # CUDA: Triton kernels, a 1-byte mask saved instead of x
            y, mask = _act.leaky_relu_with_mask(x, self.negative_slope, backend="triton")
            return y, _Mask(mask)
        return F.leaky_relu(x, self.negative_slope), x

    def _input_grad(self, x, grad_y):
        if isinstance(x, _Mask):
            return _act.masked_scale(grad_y, x.mask, self.negative_slope, backend="triton")
        # aten's own backward kernel: one vectorised pass (torch.where with a bool mask is several
        # times slower on CPU), and differentiable in grad_y (its derivative is itself).
        return torch.ops.aten.leaky_relu_backward(grad_y, x, self.negative_slope, False)

    @classmethod
    def _from_torch(cls, m):
        return cls(m.negative_slope, m.inplace)


class ReLU(InputGradModule, nn.ReLU):
    """y = max(x, 0); dx = dy where x > 0, 0 elsewhere."""

    negative_slope = 0.0  # for the mask path, shared with LeakyReLU

    def _forward_saving(self, x):
        if _act.fused(x.device):
            y, mask = _act.leaky_relu_with_mask(x, 0.0, backend="triton")
            return y, _Mask(mask)
        return F.relu(x), x

    def _input_grad(self, x, grad_y):
        if isinstance(x, _Mask):
            return _act.masked_scale(grad_y, x.mask, 0.0, backend="triton")
        return torch.ops.aten.threshold_backward(grad_y, x, 0)  # dy where x > 0, else 0

    @classmethod
    def _from_torch(cls, m):
        return cls(m.inplace)


class Softplus(InputGradModule, nn.Softplus):
    """y = log(1 + exp(beta x)) / beta (x where beta x > threshold); dy/dx = sigmoid(beta x)
    (1 above the threshold)."""

    def _forward_saving(self, x):
        return F.softplus(x, self.beta, self.threshold), x

    def _input_grad(self, x, grad_y):
        bx, g = self.beta * _upcast(x), _upcast(grad_y)
        return torch.where(bx > self.threshold, g, g * torch.sigmoid(bx)).to(grad_y.dtype)

    @classmethod
    def _from_torch(cls, m):
        return cls(m.beta, m.threshold)


class ELU(InputGradModule, nn.ELU):
    """y = x if x > 0 else alpha (exp(x) - 1); dy/dx = 1 if x > 0 else alpha exp(x)."""

    def _forward_saving(self, x):
        return F.elu(x, self.alpha), x

    def _input_grad(self, x, grad_y):
        x, g = _upcast(x), _upcast(grad_y)
        # exp of min(x, 0): the unused branch of where must stay finite, or its zero gradient
        # times inf becomes NaN in the penalty's backward.
        return torch.where(x > 0, g, g * self.alpha * torch.exp(x.clamp(max=0))).to(grad_y.dtype)

    @classmethod
    def _from_torch(cls, m):
        return cls(m.alpha, m.inplace)


class SiLU(InputGradModule, nn.SiLU):
    """y = x sigmoid(x); dy/dx = s (1 + x (1 - s)) with s = sigmoid(x)."""

    def _forward_saving(self, x):
        return F.silu(x), x

    def _input_grad(self, x, grad_y):
        x, g = _upcast(x), _upcast(grad_y)
        s = torch.sigmoid(x)
        return (g * s * (1 + x * (1 - s))).to(grad_y.dtype)

    @classmethod
    def _from_torch(cls, m):
        return cls(m.inplace)


class Tanh(InputGradModule, nn.Tanh):
    """y = tanh(x); dy/dx = 1 - y^2."""

    def _forward_saving(self, x):
        y = torch.tanh(x)
        return y, y

    def _input_grad(self, y, grad_y):
        y, g = _upcast(y), _upcast(grad_y)
        return (g * (1 - y * y)).to(grad_y.dtype)

    @classmethod
    def _from_torch(cls, m):
        return cls()


# ----------------------------------------------------------------------------------------------
# Shape and pooling layers (linear maps: the input gradient is their adjoint)
# ----------------------------------------------------------------------------------------------


class AvgPool2d(InputGradModule, nn.AvgPool2d):
    """``torch.nn.AvgPool2d`` with its adjoint as input gradient.

    The adjoint is aten's ``avg_pool2d_backward``: a plain op (linear in ``grad_y``, its own
    derivative defined, lowered by inductor) that is exact for every option (padding,
    ``ceil_mode``, ``count_include_pad``, ``divisor_override``), where a hand-built transposed
    convolution would need per-window divisors and edge cropping."""

    def _forward_saving(self, x):
        return self.forward(x), x

    def _input_grad(self, x, grad_y):
        return torch.ops.aten.avg_pool2d_backward(
            grad_y, x, _pair(self.kernel_size), _pair(self.stride), _pair(self.padding),
            self.ceil_mode, self.count_include_pad, self.divisor_override,
        )

    @classmethod
    def _from_torch(cls, m):
        return cls(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)


class Flatten(InputGradModule, nn.Flatten):
    """Reshape forward, reshape back."""

    def _forward_saving(self, x):
        return x.flatten(self.start_dim, self.end_dim), x.shape

    def _input_grad(self, shape, grad_y):
        return grad_y.reshape(shape)

    @classmethod
    def _from_torch(cls, m):
        return cls(m.start_dim, m.end_dim)


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------


class Sequential(InputGradModule, nn.Sequential):
    """``torch.nn.Sequential`` of blocks: forward through all, then the input gradients in
    reverse order (the chain rule)."""

    def _unsupported(self, path):
        for name, layer in self._modules.items():
            sub = f"{path}[{name}]"
            if not isinstance(layer, InputGradModule):
                return _not_a_block(sub, layer)
            reason = layer._unsupported(sub)
            if reason is not None:
                return reason
        return None

    def forward_with_input_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Piecewise-linear critics (MLP, DCGAN, ResNet): one autograd node for the whole chain (nn/_chain.py),
        # first-order only (a second derivative raises _chain.SECOND_ORDER_ERROR)
        _check_input(x)
        if "_wk_sn_batch" not in self.__dict__:
            chain = _chain.plan(self, x)
            if chain is not None:
                return _chain.forward_with_input_grad(*chain, x)
        return super().forward_with_input_grad(x)

    def _forward_saving(self, x):
        layers, saved, i = list(self), [], 0
        while i < len(layers):
            layer, after = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if (type(layer) is Conv2d and layer.bias is not None and type(after) in (LeakyReLU, ReLU)
                    and _act.fused(x.device)):
                # conv without bias, then bias + activation + mask in one pass
                z, in_size = layer._forward_saving_without_bias(x)
                x, mask = _act.leaky_relu_with_mask(z, after.negative_slope, layer.bias, backend="triton")
                saved += [in_size, _Mask(mask)]
                i += 2
                continue
            x, s = layer._forward_saving(x)
            saved.append(s)
            i += 1
        return x, saved

    def _input_grad(self, saved, grad_y):
        for layer, s in zip(reversed(list(self)), reversed(saved)):
            grad_y = layer._input_grad(s, grad_y)
        return grad_y


class Residual(InputGradModule):
    """y = body(x) + shortcut(x) (identity when ``shortcut`` is None); dx is the sum of the two
    branches' input gradients."""

    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.body = body
        self.register_module("shortcut", shortcut)  # registered even when None

    def forward(self, x):
        return self.body(x) + (x if self.shortcut is None else self.shortcut(x))

    def _unsupported(self, path):
        for name, branch in (("body", self.body), ("shortcut", self.shortcut)):
            if branch is None:
                continue
            sub = f"{path}.{name}"
            if not isinstance(branch, InputGradModule):
                return _not_a_block(sub, branch)
            reason = branch._unsupported(sub)
            if reason is not None:
                return reason
        return None

    def _forward_saving(self, x):
        y, saved_body = self.body._forward_saving(x)
        if self.shortcut is None:
            return y + x, (saved_body, None)
        s, saved_shortcut = self.shortcut._forward_saving(x)
        return y + s, (saved_body, saved_shortcut)

    def _input_grad(self, saved, grad_y):
        saved_body, saved_shortcut = saved
        grad_x = self.body._input_grad(saved_body, grad_y)
        if self.shortcut is None:
            return grad_x + grad_y
        return grad_x + self.shortcut._input_grad(saved_shortcut, grad_y)
