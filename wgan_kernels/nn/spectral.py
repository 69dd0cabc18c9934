"""Spectral-norm blocks for the explicit input-gradient path: ``SNLinear`` and ``SNConv2d``.

A layer with torch's ``spectral_norm`` computes ``W / sigma`` (a new weight tensor every training
forward) and then the GEMM / convolution. These blocks fold ``1 / sigma`` into the output instead::

    y  = (x W^T) / sigma + b          (SNLinear)       y  = conv(x, W) / sigma + b   (SNConv2d)
    dx = (dy W) / sigma                                dx = conv_transpose(dy, W) / sigma

which is the same function (up to rounding) without materialising ``W / sigma``: on CPU the
convolution keeps its cached weight layout, and the power iteration reads W once.

sigma comes from ``wgan_kernels.power_iteration_`` (a kernel; differentiable w.r.t. W through
``u v^T`` as in torch). Behaviour matches ``torch.nn.utils.parametrizations.spectral_norm`` on the
same layer: u, v initialised with the same random draws and 15 warm-up iterations, one iteration per
training-mode forward (``n_power_iterations``), u and v frozen in eval mode. Under
``wgan_kernels.spectral_norm_all(critic)`` the iteration instead runs once per weight update for
all layers together. The state dict uses torch's keys (``parametrizations.weight.original``,
``parametrizations.weight.0._u`` / ``._v``; the old ``weight_orig`` / ``weight_u`` / ``weight_v`` load
too), so checkpoints move between these blocks and torch's spectral norm both ways.

``module.weight`` is the raw (un-normalised) W, the parameter the optimizer updates; ``sigma()``
gives the current sigma and ``normalized_weight()`` ``W / sigma`` when it is wanted.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..ops.spectral_norm import SpectralNorm, _check_eps, _check_iterations, _sigma, initial_vectors, power_iteration_
from .explicit_ops import Conv2dOp, LinearOp, check_matches_weight
from .layers import Conv2d, Linear

_KEYS = {  # our name -> torch parametrization's name
    "weight": "parametrizations.weight.original",
    "_u": "parametrizations.weight.0._u",
    "_v": "parametrizations.weight.0._v",
}
_LEGACY = {"weight": "weight_orig", "_u": "weight_u", "_v": "weight_v"}  # torch.nn.utils.spectral_norm


class _SpectralBlock:
    """What SNLinear and SNConv2d share: u, v, sigma, the torch-compatible state dict."""

    def _init_spectral(self, n_power_iterations: int, eps: float, vectors=None) -> None:
        self.n_power_iterations = _check_iterations(n_power_iterations)
        self.eps = _check_eps(eps)
        self.batched = False  # True under spectral_norm_all: the critic's hook sets _cached_sigma
        self._cached_sigma: torch.Tensor | None = None
        if vectors is None:  # as torch's spectral_norm(layer): its registration runs one training forward
            vectors = initial_vectors(self.to_matrix(self.weight), self.eps,
                                      self.n_power_iterations if self.training else 0)
        u, v = vectors
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)

    def sigma(self) -> torch.Tensor:
        """This forward's sigma (0-d, W's dtype, differentiable w.r.t. W): advances u, v by
        ``n_power_iterations`` in training mode (unless a batched critic hook already did)."""
        if self._cached_sigma is not None:
            return self._cached_sigma
        mat = self.to_matrix(self.weight)
        if self.training and not self.batched:
            return power_iteration_([mat], [self._u], [self._v], self.n_power_iterations, self.eps)[0]
        return _sigma(mat, self._u, self._v)

    def normalized_weight(self) -> torch.Tensor:
        """``W / sigma`` (what torch's parametrized ``module.weight`` returns)."""
        return self.weight / self.sigma()

    def _scaled(self, y: torch.Tensor, inv_sigma: torch.Tensor, bias_shape) -> torch.Tensor:
        if self.bias is None:
            return y * inv_sigma
        return torch.addcmul(self.bias.view(bias_shape), y, inv_sigma)

    # ---- torch's state-dict keys

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()
        for ours, theirs in _KEYS.items():
            t = getattr(self, ours)
            destination[prefix + theirs] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for names in (_KEYS, _LEGACY):
            for ours, theirs in names.items():
                if prefix + theirs in state_dict:
                    state_dict[prefix + ours] = state_dict.pop(prefix + theirs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for i, key in enumerate(missing_keys):  # report torch's names
            for ours, theirs in _KEYS.items():
                if key == prefix + ours:
                    missing_keys[i] = prefix + theirs

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, n_power_iterations={self.n_power_iterations}, eps={self.eps}, "
                f"batched={self.batched}")


class SNLinear(_SpectralBlock, Linear):
    """``spectral_norm(nn.Linear(...))`` with 1/sigma folded into the output and an explicit input
    gradient. Same constructor as ``nn.Linear`` plus ``n_power_iterations`` and ``eps``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, n_power_iterations: int = 1,
                 eps: float = 1e-12, device=None, dtype=None, _vectors=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self._init_spectral(n_power_iterations, eps, _vectors)

    def forward(self, x):
        return self._forward_saving(x)[0]

    def _forward_saving(self, x):
        check_matches_weight(x, self.weight)
        inv = 1 / self.sigma()
        y = self._scaled(torch.nn.functional.linear(x, self.weight), inv, (-1,))
        return y, (LinearOp.from_module(self), x, inv)

    def _input_grad(self, saved, grad_y):
        op, x, inv = saved  # the Linear's adjoint, scaled
        return op.vjp(op.params, x, grad_y) * inv


class SNConv2d(_SpectralBlock, Conv2d):
    """``spectral_norm(nn.Conv2d(...))`` with 1/sigma folded into the output and an explicit input
    gradient. Same constructor as ``nn.Conv2d`` plus ``n_power_iterations`` and ``eps``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", n_power_iterations: int = 1,
                 eps: float = 1e-12, device=None, dtype=None, _vectors=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_spectral(n_power_iterations, eps, _vectors)

    def forward(self, x):
        return self._forward_saving(x)[0]

    def _forward_saving(self, x):
        check_matches_weight(x, self.weight)
        inv = 1 / self.sigma()
        y = self._scaled(self._conv_forward(x, self.weight, None), inv, (1, -1, 1, 1))
        return y, (Conv2dOp.from_module(self), x, inv)

    def _input_grad(self, saved, grad_y):
        op, x, inv = saved  # the Conv2d's adjoint (a transposed convolution), scaled
        return op.vjp(op.params, x, grad_y) * inv


SN_BLOCKS = (SNLinear, SNConv2d)


def _sn_block_from(layer: nn.Module, n_power_iterations: int, eps: float, vectors=None) -> nn.Module:
    """An SN block sharing ``layer``'s weight and bias Parameters (and ``vectors`` = (u, v) when
    given, else new ones drawn as torch draws them)."""
    if isinstance(layer, nn.Linear):
        new = SNLinear(layer.in_features, layer.out_features, layer.bias is not None, device="meta",
                       _vectors=(torch.empty(0), torch.empty(0)))
    else:
        new = SNConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                       layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta",
                       _vectors=(torch.empty(0), torch.empty(0)))
    weight = layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight
    new.weight, new.bias = weight, layer.bias
    if vectors is None:
        vectors = initial_vectors(new.to_matrix(weight), eps, n_power_iterations if layer.training else 0)
    new.n_power_iterations, new.eps = _check_iterations(n_power_iterations), _check_eps(eps)
    new._u, new._v = vectors
    return new.train(layer.training)


def from_torch_spectral(layer: nn.Module, path: str) -> nn.Module | None:
    """The SN block for a torch ``Linear`` / ``Conv2d`` carrying exactly one spectral-norm
    parametrization (torch's or wgan_kernels'), sharing its Parameters and its u, v buffers
    (so both keep advancing the same vectors); None for any other module."""
    if not parametrize.is_parametrized(layer) or not parametrize.is_parametrized(layer, "weight"):
        return None
    base = type(layer).__bases__[0]
    if base not in (nn.Linear, nn.Conv2d, Linear, Conv2d) or set(layer.parametrizations.keys()) != {"weight"}:
        return None
    plist = layer.parametrizations.weight
    if len(plist) != 1:
        return None
    sn = plist[0]
    torch_sn = type(sn).__name__ == "_SpectralNorm" and type(sn).__module__.startswith("torch.")
    if not (torch_sn or isinstance(sn, SpectralNorm)) or not hasattr(sn, "_u"):
        return None
    if sn.dim != 0:
        raise ValueError(f"{path}: spectral norm with dim={sn.dim} is not supported by the SN blocks (dim 0 only)")
    return _sn_block_from(layer, sn.n_power_iterations, sn.eps, (sn._u, sn._v))
