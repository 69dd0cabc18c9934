"""Spectral norm's modules: the torch-compatible parametrization (``SpectralNorm``,
``spectral_norm``), the SN blocks of the explicit input-gradient path (``SNLinear``,
``SNConv2d``) and the whole-critic version (``spectral_norm_all``), over the op
``wgan_kernels.power_iteration_`` (``wgan_kernels/ops/spectral_norm.py``).

Layers of this file:
  - ``_SpectralState``: what every spectral-norm module keeps and how it gets this forward's sigma
    (settings, ``_u`` / ``_v`` buffers, the ``batched`` flag and ``_cached_sigma``), written once and
    shared by ``SpectralNorm`` (``weight -> weight / sigma``) and the SN blocks (``1 / sigma`` on the
    output).
  - ``SpectralNorm`` / ``spectral_norm``: a drop-in for ``torch.nn.utils.parametrizations.spectral_norm``.
  - ``SNLinear`` / ``SNConv2d``: the SN blocks (below).
  - ``_OneIterationPerStep`` / ``spectral_norm_all``: spectral norm on a whole critic, u and v of all
    layers advanced in one batched call per weight update. The batching object is registered as a
    forward pre-hook / forward hook on the critic, and, on a ``wgan_kernels.nn`` critic, as an
    input-gradient hook (``InputGradModule.register_input_grad_hook``) so that
    ``forward_with_input_grad`` iterates as a forward does.

The SN blocks. A layer with torch's ``spectral_norm`` computes ``W / sigma`` (a new weight tensor
every training forward) and then the GEMM / convolution. These blocks fold ``1 / sigma`` into the
output instead::

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

Imports run downward: this module imports ``wgan_kernels.ops`` and ``layers`` / ``explicit_ops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .._checks import FLOAT_DTYPES
from .._backend import compiling
from ..ops.spectral_norm import (attach_sigmas, check_eps, check_eps_fits, check_iterations, initial_vectors,
                                 power_iteration_, power_iteration_values_, sigma_at)
from .explicit_ops import check_matches_weight
from .layers import Conv2d, InputGradModule, Linear

__all__ = [
    "SN_BLOCKS",
    "SN_LAYERS",
    "SNConv2d",
    "SNLinear",
    "SpectralNorm",
    "spectral_norm",
    "spectral_norm_all",
]

# The torch layers spectral_norm_all normalises (ConvTranspose ones over dim 1, as torch does)
SN_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)

_KEYS = {  # our name -> torch parametrization's name
    "weight": "parametrizations.weight.original",
    "_u": "parametrizations.weight.0._u",
    "_v": "parametrizations.weight.0._v",
}
_LEGACY = {"weight": "weight_orig", "_u": "weight_u", "_v": "weight_v"}  # torch.nn.utils.spectral_norm


def _bias_in_kernel(dtype: torch.dtype) -> bool:
    """Whether an SN block of this dtype passes ``b sigma`` to its layer's kernel (float32/64)
    rather than adding ``b`` after the scale (16-bit types; see ``_SpectralBlock._scaled``)."""
    return dtype not in (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- shared state


class _SpectralState:
    """The state and the sigma of one spectral-norm module (mixed into an ``nn.Module``):
    ``n_power_iterations``, ``eps``, the ``_u`` / ``_v`` buffers, ``batched`` (True under
    ``spectral_norm_all``: the critic's hook advances u, v for all layers at once) and
    ``_cached_sigma`` (the sigma that hook leaves for the current forward)."""

    _cached_sigma: torch.Tensor | None = None
    _cached_scales: tuple | None = None  # SN blocks under spectral_norm_all: (1/sigma, b sigma or None)

    def _init_spectral_state(self, n_power_iterations: int, eps: float) -> None:
        self.n_power_iterations = check_iterations(n_power_iterations)
        self.eps = check_eps(eps)
        self.batched = False
        self._cached_sigma = None
        self._cached_scales = None

    def _register_vectors(self, u: torch.Tensor, v: torch.Tensor) -> None:
        self.register_buffer("_u", u)
        self.register_buffer("_v", v)

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The 2-D matrix whose spectral norm is taken (dim 0 first, the rest flattened)."""
        return weight.flatten(1)

    def _sigma_of(self, weight: torch.Tensor) -> torch.Tensor:
        """This forward's sigma of ``weight`` (0-d, its dtype, differentiable w.r.t. it): the
        batched hook's cached sigma when there is one; else, in training mode and not batched,
        ``n_power_iterations`` of ``power_iteration_`` (u, v advanced); else (eval mode, or a
        batched layer used outside its critic's forward) ``u . (W v)`` with u, v frozen."""
        if self._cached_sigma is not None:
            return self._cached_sigma
        if self.training and not self.batched:
            return power_iteration_([self.to_matrix(weight)], [self._u], [self._v], self.n_power_iterations,
                                    self.eps)[0]
        return self._frozen_sigma(weight)

    def _frozen_sigma(self, weight: torch.Tensor) -> torch.Tensor:
        """``u . (W v)`` with the current u, v (not advanced), differentiable w.r.t. ``weight``."""
        return sigma_at(self.to_matrix(weight), self._u, self._v)


# ----------------------------------------------------------------------------- parametrization


class SpectralNorm(_SpectralState, nn.Module):
    """The parametrization ``spectral_norm`` registers: ``weight -> weight / sigma``.

    Same buffers (``_u``, ``_v``), initialisation (same RNG draws, 15 warm-up iterations), weight
    flattening (``dim``) and train/eval behaviour as torch's ``_SpectralNorm``; the iteration goes
    through ``power_iteration_``. 1-D weights are normalised (``weight / ||weight||``) as torch does.
    When ``spectral_norm_all`` batches a critic, ``batched`` is True: the critic's forward pre-hook
    advances u, v for all layers at once and leaves this layer's sigma in ``_cached_sigma``.
    """

    def __init__(self, weight: torch.Tensor, n_power_iterations: int = 1, dim: int = 0, eps: float = 1e-12):
        super().__init__()
        self._init_spectral_state(n_power_iterations, eps)
        ndim = weight.dim()
        if isinstance(dim, bool) or not isinstance(dim, int) or not (-max(ndim, 1) <= dim < max(ndim, 1)):
            raise ValueError(f"dim: expected an int in [-{max(ndim, 1)}, {max(ndim, 1) - 1}], got {dim!r}")
        self.dim = dim % ndim if ndim else 0
        check_eps_fits(self.eps, weight.dtype, "the weight")
        if ndim > 1:
            self._register_vectors(*initial_vectors(self.to_matrix(weight), self.eps))

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The 2-D matrix whose spectral norm is taken: ``dim`` first, the rest flattened."""
        if self.dim != 0:
            weight = weight.movedim(self.dim, 0)
        return weight.flatten(1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if weight.dim() == 1:
            return F.normalize(weight, dim=0, eps=self.eps)
        return weight / self._sigma_of(weight)

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_power_iterations={self.n_power_iterations}, eps={self.eps}, batched={self.batched}"


def spectral_norm(module: nn.Module, name: str = "weight", n_power_iterations: int = 1, eps: float = 1e-12,
                  dim: int | None = None) -> nn.Module:
    """Drop-in for ``torch.nn.utils.parametrizations.spectral_norm``; returns ``module``.

    Registers ``SpectralNorm`` with ``torch.nn.utils.parametrize``, so the state dict keys are
    torch's (``parametrizations.<name>.original``, ``parametrizations.<name>.0._u`` / ``._v``) and
    checkpoints load both ways. ``dim`` defaults to 1 for ConvTranspose layers, else 0. In training
    mode every access to ``module.<name>`` runs ``n_power_iterations`` of ``power_iteration_``
    (dispatched to a kernel); in eval mode u and v are frozen.
    """
    check_iterations(n_power_iterations)
    check_eps(eps)
    if not isinstance(module, nn.Module):
        raise ValueError(f"module: expected an nn.Module, got {type(module).__name__}")
    if not isinstance(name, str):
        raise ValueError(f"name: expected a str, got {name!r}")
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"name: module {type(module).__name__} has no parameter or buffer {name!r}")
    if weight.dim() == 0 or weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"name: {type(module).__name__}.{name} must be a floating tensor with at least 1 dim, got "
                         f"shape {tuple(weight.shape)} and {weight.dtype}")
    if dim is None:
        dim = 1 if isinstance(module, _TRANSPOSED) else 0
    parametrize.register_parametrization(module, name, SpectralNorm(weight, n_power_iterations, dim, eps))
    return module


# ----------------------------------------------------------------------------- SN blocks


class _SpectralBlock(_SpectralState):
    """What SNLinear and SNConv2d share: the spectral state, ``sigma()``, the torch-compatible
    state dict."""

    def _init_spectral(self, n_power_iterations: int, eps: float, vectors=None) -> None:
        self._init_spectral_state(n_power_iterations, eps)
        if vectors is None:  # as torch's spectral_norm(layer): its registration runs one training forward
            vectors = initial_vectors(self.to_matrix(self.weight), self.eps,
                                      self.n_power_iterations if self.training else 0)
        self._register_vectors(*vectors)

    def sigma(self) -> torch.Tensor:
        """This forward's sigma (0-d, W's dtype, differentiable w.r.t. W): advances u, v by
        ``n_power_iterations`` in training mode (unless a batched critic hook already did)."""
        if self._cached_scales is not None:
            return self._cached_scales[0].reciprocal()
        return self._sigma_of(self.weight)

    def normalized_weight(self) -> torch.Tensor:
        """``W / sigma`` (what torch's parametrized ``module.weight`` returns)."""
        if self._cached_scales is not None:
            return self.weight * self._cached_scales[0]
        return self.weight / self.sigma()

    def _scales(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1 / sigma, b sigma) of this forward: the ones ``spectral_norm_all``'s hook made for
        all its blocks in one autograd node, else computed here. ``b sigma`` is None without a
        bias, and in 16-bit types (see ``_scaled``)."""
        if self._cached_scales is not None:
            return self._cached_scales
        inv = 1 / self.sigma()
        if self.bias is None or not _bias_in_kernel(self.weight.dtype):
            return inv, None
        return inv, self.bias / inv

    def forward(self, x):
        check_matches_weight(x, self.weight)
        return self._scaled(x, *self._scales())

    def _scaled(self, x, inv, bias_sigma):
        """``layer(x, W) / sigma + b``. In float32/64 as ``layer(x, W, b sigma) * (1 / sigma)``:
        the bias rides in the layer's own kernel (scaled by sigma, a vector op), leaving one
        elementwise pass over the output (on a batch-1 DCGAN-64 forward, 0.3 of 4.1 ms less
        than an addcmul with the broadcast bias). In 16-bit types the bias is added after the
        scale, as torch's W / sigma layer does: b sigma / sigma would round the bias and its
        gradient twice."""
        if bias_sigma is not None:
            return self._unscaled(x, bias_sigma) * inv
        if self.bias is None:
            return self._unscaled(x, None) * inv
        return torch.addcmul(self.bias.view(self.bias_shape), self._unscaled(x, None), inv)

    def _forward_saving(self, x):
        """The forward and what the input gradient needs: the layer's op, x and 1 / sigma."""
        check_matches_weight(x, self.weight)
        inv, bias_sigma = self._scales()
        return self._scaled(x, inv, bias_sigma), (self.op_type.from_module(self), x, inv)

    def _input_grad(self, saved, grad_y):
        op, x, inv = saved  # the layer's adjoint (Linear: dy W; Conv2d: a transposed convolution), scaled
        return op.vjp(op.params, x, grad_y) * inv

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

    bias_shape = (-1,)

    def _unscaled(self, x, bias):
        return F.linear(x, self.weight, bias)


class SNConv2d(_SpectralBlock, Conv2d):
    """``spectral_norm(nn.Conv2d(...))`` with 1/sigma folded into the output and an explicit input
    gradient. Same constructor as ``nn.Conv2d`` plus ``n_power_iterations`` and ``eps``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", n_power_iterations: int = 1,
                 eps: float = 1e-12, device=None, dtype=None, _vectors=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         padding_mode, device, dtype)
        self._init_spectral(n_power_iterations, eps, _vectors)

    bias_shape = (1, -1, 1, 1)

    def _unscaled(self, x, bias):
        return self._conv_forward(x, self.weight, bias)


SN_BLOCKS = (SNLinear, SNConv2d)


def _sn_block_from(layer: nn.Module, n_power_iterations: int, eps: float, vectors=None, weight=None) -> nn.Module:
    """An SN block sharing ``layer``'s weight (``weight`` when given: an old-style layer's
    ``weight_orig``) and bias Parameters (and ``vectors`` = (u, v) when given, else new ones
    drawn as torch draws them)."""
    if isinstance(layer, nn.Linear):
        new = SNLinear(layer.in_features, layer.out_features, layer.bias is not None, device="meta",
                       _vectors=(torch.empty(0), torch.empty(0)))
    else:
        new = SNConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                       layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode, device="meta",
                       _vectors=(torch.empty(0), torch.empty(0)))
    if weight is None:
        weight = layer.parametrizations.weight.original if parametrize.is_parametrized(layer, "weight") else layer.weight
    # torch's spectral norm (either API) leaves the layer's parameters in the order bias, weight: so
    # does the block, so that an optimizer's state (kept by position) moves between the two
    new._parameters = dict([("bias", layer.bias)] if layer.bias is not None else []) | {"weight": weight}
    if layer.bias is None:
        new.bias = None
    if vectors is None:
        vectors = initial_vectors(new.to_matrix(weight), eps, n_power_iterations if layer.training else 0)
    new.n_power_iterations, new.eps = check_iterations(n_power_iterations), check_eps(eps)
    new._u, new._v = vectors
    return new.train(layer.training)


def old_style_spectral_norm(layer: nn.Module):
    """The ``torch.nn.utils.spectral_norm`` hook of ``layer`` (weight_orig, weight_u, weight_v),
    or None."""
    from torch.nn.utils.spectral_norm import SpectralNorm as TorchSpectralNorm  # noqa: PLC0415

    hooks = [h for h in layer._forward_pre_hooks.values() if isinstance(h, TorchSpectralNorm)]
    return hooks[0] if hooks else None


def from_torch_spectral(layer: nn.Module, path: str) -> nn.Module | None:
    """The SN block for a torch ``Linear`` / ``Conv2d`` carrying exactly one spectral norm:
    torch's parametrization or wgan_kernels', sharing its Parameters and its u, v buffers (so
    both keep advancing the same vectors), or the old ``torch.nn.utils.spectral_norm`` hook
    (sharing ``weight_orig``, ``weight_u``, ``weight_v``). The old API iterates ``v`` first
    (``v = normalize(W^T u); u = normalize(W v)``), the parametrization and the SN blocks ``u``
    first: the blocks continue an old-style layer in the new order (the same sigma at
    convergence, not the same digits). None for any other module."""
    old = old_style_spectral_norm(layer)
    if old is not None:
        if type(layer) not in (nn.Linear, nn.Conv2d) or old.name != "weight" or len(layer._forward_pre_hooks) != 1:
            return None
        if old.dim != 0:
            raise ValueError(f"{path}: spectral norm with dim={old.dim} is not supported by the SN blocks (dim 0 only)")
        return _sn_block_from(layer, old.n_power_iterations, old.eps, (layer.weight_u, layer.weight_v),
                              weight=layer.weight_orig)
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


# ----------------------------------------------------------------------------- whole critic


class _Scales(torch.autograd.Function):
    """The per-forward scales of a group of SN blocks (one dtype) in ONE autograd node: from the
    power iteration's sigmas (detached, one per block) and the u, v they came with, ``1 / sigma_k``
    for every block, then ``b_k sigma_k`` for the blocks whose bias rides in the layer's kernel
    (``biased``). Inputs ``(raws, snaps, biased, *weights, *those biases)``. One node instead of
    two small autograd ops per layer (the reciprocal and the bias scale), whose cost shows on a
    batch-1 forward (with the leaner hook, a batch-1 ResNet-32 SN forward went from 1.36x to
    1.25-1.30x its no-SN floor on the 2-thread CPU).

    Backward: ``d sigma_k / d W_k = u_k v_k^T`` (u, v constants, as torch's), so with
    ``g_k = -g_inv_k / sigma_k^2 + <g_bsigma_k, b_k>``, ``dW_k = g_k u_k v_k^T`` and
    ``db_k = g_bsigma_k sigma_k``; written with torch ops on the saved outputs (1 / sigma), so
    that a double backward differentiates them again."""

    @staticmethod
    def forward(ctx, raws, snaps, biased, *tensors):
        n = len(raws)
        weights, biases = tensors[:n], tensors[n:]
        sigma = torch.cat(raws).to(weights[0].dtype)
        inv = sigma.reciprocal()
        invs = [inv[k].clone() for k in range(n)]
        bias_sigmas = [b * sigma[k] for k, b in zip([k for k in range(n) if biased[k]], biases)]
        ctx.snaps, ctx.biased, ctx.shapes = snaps, biased, [w.shape for w in weights]
        ctx.save_for_backward(*invs, *biases)
        return (*invs, *bias_sigmas)

    @staticmethod
    def backward(ctx, *grads):
        n = len(ctx.shapes)
        saved = ctx.saved_tensors
        invs, biases = saved[:n], saved[n:]
        d_weights, d_biases = [], []
        j = 0
        for k in range(n):
            g_inv = grads[k]
            g = None if g_inv is None else -g_inv * invs[k] * invs[k]
            if ctx.biased[k]:
                g_bs = grads[n + j]
                if g_bs is None:
                    d_biases.append(None)
                else:
                    term = (g_bs * biases[j]).sum()
                    g = term if g is None else g + term
                    d_biases.append(g_bs / invs[k] if ctx.needs_input_grad[3 + n + j] else None)
                j += 1
            if g is None or not ctx.needs_input_grad[3 + k]:
                d_weights.append(None)
            else:
                u, v = ctx.snaps[k]
                d_weights.append((g * torch.outer(u, v)).view(ctx.shapes[k]))
        return (None, None, None, *d_weights, *d_biases)


def _by_settings(stale) -> dict[tuple, list[int]]:
    """Layers ``(k, spectral state)`` by their ``(n_power_iterations, eps)``: one batched call each."""
    groups: dict[tuple, list[int]] = {}
    for k, sn in stale:
        groups.setdefault((sn.n_power_iterations, sn.eps), []).append(k)
    return groups


class _OneIterationPerStep:
    """The critic hooks of ``spectral_norm_all``: before each forward in training mode, one batched
    power iteration over every layer whose weight changed since the last one (all of them after an
    optimizer step); then this forward's sigma of every layer: for the SN blocks, their scales
    (``1 / sigma``, ``b sigma``) in one autograd node (``_Scales``), for parametrized layers their
    sigma; after the forward, these are cleared. Registered as the critic's forward pre-hook
    (``before``) and forward hook (``after``), and on a ``wgan_kernels.nn`` critic as its
    input-gradient hook (the same two methods, run by ``forward_with_input_grad``). A plain object
    (not a closure) so that ``copy.deepcopy(critic)`` copies it along with the layers it points at.

    A layer is iterated when its W's version or address changed since its last iteration; the
    other forwards on the same weights (D(fake), D(interpolates) after D(real); eval mode) take
    ``u . W v`` with the current u, v, not advanced (computed on each forward: a W written
    through ``.data``, as WGAN code's ``p.data.clamp_`` does, bumps no version). The arguments of
    the batched call are checked as ``power_iteration_`` checks them whenever a tensor, shape or
    address differs from the last checked call.

    ``runs_around_input_grad``: the explicit path of a traced torch critic (nn/trace.py) runs
    these two methods around its input-gradient computation instead of refusing the hooks."""

    runs_around_input_grad = True

    def __init__(self, layers: list[nn.Module], name: str):
        self.layers = layers
        self.name = name
        self.seen_versions: list = [None] * len(layers)  # W's (version, address) at its last iteration
        self.checked: list | None = None

    def _parts(self, layer) -> tuple[torch.Tensor, _SpectralState]:
        """(W, its spectral state): the layer itself for an SN block, else its SpectralNorm
        parametrization."""
        if isinstance(layer, _SpectralBlock):
            return layer.weight, layer
        original = getattr(layer.parametrizations, self.name).original
        return original, getattr(layer.parametrizations, self.name)[0]

    def _tensors(self) -> list[tuple]:
        """(W, u, v, spectral state) of every layer, read from the modules' dicts (this runs on
        every forward: Module.__getattr__ per read would cost more than the work on a batch-1
        forward)."""
        out = []
        for layer in self.layers:
            w, sn = self._parts(layer)
            buffers = sn._buffers
            out.append((w, buffers["_u"], buffers["_v"], sn))
        return out

    def before(self, critic, args):
        if compiling():
            return self._before_traced(critic)
        parts = self._tensors()
        sigmas: list[tuple | None] = [None] * len(parts)  # this forward's (raw sigma, (u, v) snapshot)
        if critic.training:  # W changed (version or address): iterate
            stale = [(k, sn) for k, (w, _, _, sn) in enumerate(parts)
                     if self.seen_versions[k] != (w._version, w.data_ptr())]
            for (n, eps), ks in _by_settings(stale).items():
                self._iterate(parts, ks, n, eps, sigmas)
        blocks: dict[tuple, list[int]] = {}
        for k, (w, u, v, sn) in enumerate(parts):
            if sigmas[k] is None:  # frozen: u . W v with the current u, v
                with torch.no_grad():
                    sigmas[k] = (sigma_at(sn.to_matrix(w), u, v).view(1), (u.clone(), v.clone()))
            if sn is self.layers[k]:
                blocks.setdefault((w.device, w.dtype), []).append(k)
            else:
                raw, (u, v) = sigmas[k]
                sn._cached_sigma = attach_sigmas(raw, torch.cat((u, v)), [sn.to_matrix(w)])[0]
        for ks in blocks.values():
            self._block_scales(parts, ks, sigmas)

    def _iterate(self, parts, ks: list[int], n: int, eps: float, sigmas: list) -> None:
        """One batched power iteration over layers ``ks``; their sigmas and u, v into ``sigmas``.
        Its arguments go through ``power_iteration_``'s checks unless they are the tensors (same
        objects, addresses, shapes, dtypes and requires_grad flags) of the last checked call."""
        mats, us, vs, checked = [], [], [], [n, eps]
        for k in ks:
            w, u, v, sn = parts[k]
            mats.append(sn.to_matrix(w))
            us.append(u)
            vs.append(v)
            checked += [k, id(w), w.data_ptr(), w.shape, w.dtype, id(u), u.data_ptr(), u.requires_grad, id(v),
                        v.data_ptr(), v.requires_grad]
        raws = power_iteration_values_(mats, us, vs, n, eps, checked=checked == self.checked)
        self.checked = checked
        snapshot = torch.cat(us + vs)
        pieces = snapshot.split([u.shape[0] for u in us] + [v.shape[0] for v in vs])
        for i, k in enumerate(ks):
            w = parts[k][0]
            self.seen_versions[k] = (w._version, w.data_ptr())
            sigmas[k] = (raws[i], (pieces[i], pieces[len(ks) + i]))

    def _block_scales(self, parts, ks: list[int], sigmas: list) -> None:
        """The scales of SN blocks ``ks`` (one device and dtype) for this forward, one node;
        written to the blocks' ``__dict__`` (plain attributes, without Module.__setattr__)."""
        weights = [parts[k][0] for k in ks]
        bias_of = [parts[k][3]._parameters.get("bias") for k in ks]
        wide = _bias_in_kernel(weights[0].dtype)
        biased = tuple(wide and b is not None for b in bias_of)
        held = [sigmas[k] for k in ks]
        outs = _Scales.apply([h[0] for h in held], [h[1] for h in held], biased, *weights,
                             *(b for b, on in zip(bias_of, biased) if on))
        j = len(ks)
        for i, k in enumerate(ks):
            if biased[i]:
                parts[k][3].__dict__["_cached_scales"] = (outs[i], outs[j])
                j += 1
            else:
                parts[k][3].__dict__["_cached_scales"] = (outs[i], None)

    def _before_traced(self, critic) -> None:
        """Under torch.compile: the iteration as an op with tensor sigmas, each layer's sigma
        through ``power_iteration_`` (one graph, no Python-side caches of values)."""
        parts = [self._parts(layer) for layer in self.layers]
        if critic.training:
            stale = [(k, sn) for k, (w, sn) in enumerate(parts) if w._version != self.seen_versions[k]]
            for (n, eps), ks in _by_settings(stale).items():
                mats = [parts[k][1].to_matrix(parts[k][0]) for k in ks]
                sigmas = power_iteration_(mats, [parts[k][1]._u for k in ks], [parts[k][1]._v for k in ks], n, eps)
                for k, sigma in zip(ks, sigmas):
                    parts[k][1]._cached_sigma = sigma
                    self.seen_versions[k] = parts[k][0]._version  # (a traced tensor has no address)
        for w, sn in parts:
            if sn._cached_sigma is None:
                sn._cached_sigma = sn._frozen_sigma(w)

    def after(self, critic, args, output):
        for layer in self.layers:
            state = self._parts(layer)[1].__dict__
            state["_cached_sigma"] = None
            state["_cached_scales"] = None


def spectral_norm_all(critic: nn.Module, n_power_iterations: int = 1, eps: float = 1e-12,
                      per_access: bool = False) -> nn.Module:
    """Spectral norm on every Linear / Conv1d-3d / ConvTranspose1d-3d layer of ``critic``; returns it.

    Each layer gets ``spectral_norm(layer)`` (torch-compatible state dict). Then:

    - ``per_access=False`` (default): u and v advance ONCE PER WEIGHT UPDATE, in one batched
      ``power_iteration_`` over all layers (one kernel launch per device/dtype), run by a forward
      pre-hook on ``critic``. The first training-mode forward after the weights change (an
      optimizer step, a state-dict load) iterates; further forwards on the same weights (D(real),
      D(fake), D(interpolates) in one critic step) reuse u and v. Every forward computes fresh
      sigmas (one ``u . W v`` per layer) so each forward has its own autograd graph. A layer's
      weight read outside ``critic``'s forward uses the current u, v without iterating.
    - ``per_access=True``: torch's behaviour: every access to a layer's weight in training mode
      iterates (three forwards in a critic step = three iterations), one call per layer.

    Eval mode freezes u and v in both. A critic whose layer already has a parametrization on
    ``weight`` is refused; a layer with the old ``torch.nn.utils.spectral_norm`` (weight_orig,
    weight_u, weight_v) continues as an SN block with its weight and vectors (the old API
    iterates v first, the SN blocks u first: the same sigma at convergence, not the same digits).

    Every ``Linear`` / ``Conv2d`` below the critic (torch's, or the ``wgan_kernels.nn`` blocks) is
    replaced by ``SNLinear`` / ``SNConv2d`` (subclasses of torch's, sharing their Parameters,
    1/sigma folded into the output instead of a new ``W / sigma`` each forward, which keeps
    oneDNN's weight reuse; state dict keys as torch's parametrization; ``layer.weight`` is then the
    raw W, ``layer.normalized_weight()`` W / sigma); SN blocks already there join the batched
    iteration; the other layers (Conv1d/3d, ConvTranspose) get the parametrization. A
    ``wgan_kernels.nn`` critic keeps its explicit input-gradient path, and the batching is
    registered as its input-gradient hook too, so ``forward_with_input_grad`` iterates as a
    forward does; a torch critic traced by critic_loss runs the hooks through its SN blocks. u, v
    are drawn layer by layer in module order, as torch would draw them.
    """
    check_iterations(n_power_iterations)
    check_eps(eps)
    if not isinstance(critic, nn.Module):
        raise ValueError(f"critic: expected an nn.Module, got {type(critic).__name__}")
    if isinstance(critic, InputGradModule) and any(isinstance(h, _OneIterationPerStep)
                                                   for h in critic._input_grad_hooks):
        raise ValueError("critic: spectral_norm_all was already applied to it")
    named = list(critic.named_modules())
    for name, m in named:
        if isinstance(m, SN_LAYERS) and not isinstance(m, SN_BLOCKS) and parametrize.is_parametrized(m, "weight"):
            raise ValueError(f"critic: layer {name or 'critic'} ({type(m).__name__}) already has a parametrization "
                             "on 'weight' (spectral norm applied twice?)")
        old = old_style_spectral_norm(m) if isinstance(m, SN_LAYERS) else None
        if old is not None and (not name or type(m) not in (nn.Linear, nn.Conv2d) or old.name != "weight"
                                or len(m._forward_pre_hooks) != 1 or old.dim != 0):
            raise ValueError(f"critic: layer {name or 'critic'} ({type(m).__name__}) has torch.nn.utils.spectral_norm "
                             "in a form the SN blocks do not take (they take a Linear / Conv2d child, on 'weight', "
                             "dim 0); remove it first (torch.nn.utils.remove_spectral_norm)")
    layers = []
    for name, m in named:
        if isinstance(m, SN_BLOCKS):
            layers.append(m)
        elif isinstance(m, SN_LAYERS) and old_style_spectral_norm(m) is not None:
            # torch.nn.utils.spectral_norm: its layer continues as an SN block (its weight_orig, u and v;
            # the old API's v-first iteration becomes the parametrization's u-first one)
            parent_name, _, child = name.rpartition(".")
            old = old_style_spectral_norm(m)
            block = _sn_block_from(m, n_power_iterations, old.eps, (m.weight_u, m.weight_v), weight=m.weight_orig)
            setattr(critic.get_submodule(parent_name), child, block)
            layers.append(block)
        elif name and type(m) in (Linear, Conv2d, nn.Linear, nn.Conv2d):  # swap in the SN block, in its parent
            parent_name, _, child = name.rpartition(".")
            block = _sn_block_from(m, n_power_iterations, eps)
            setattr(critic.get_submodule(parent_name), child, block)
            layers.append(block)
        elif isinstance(m, SN_LAYERS):
            layers.append(spectral_norm(m, n_power_iterations=n_power_iterations, eps=eps))
    if not per_access and layers:
        hooks = _OneIterationPerStep(layers, "weight")
        for m in layers:
            hooks._parts(m)[1].batched = True
        critic.register_forward_pre_hook(hooks.before)
        critic.register_forward_hook(hooks.after, always_call=True)
        if isinstance(critic, InputGradModule):  # forward_with_input_grad runs the hooks too
            critic.register_input_grad_hook(hooks)
    return critic
