"""``from_torch``: a ``torch.nn`` critic as wgan_kernels.nn blocks that share its Parameters."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn
from torch.nn.utils import parametrize

from .explicit_ops import OPS
from .layers import InputGradModule, Residual, Sequential, block_for
from .spectral import from_torch_spectral, old_style_spectral_norm
from .trace import TracedCritic

# Exact types only (the keys of explicit_ops.OPS): a subclass of a torch layer may change its
# forward, and a parametrized layer has a generated subclass; both are refused, not converted
# silently (spectral norm excepted: it becomes an SN block).


def from_torch(module: nn.Module, output=None, *, _path: str = "module") -> InputGradModule:
    """The explicit input-gradient path for a torch critic, sharing its Parameter objects (an
    optimizer on either model trains both), with the same state_dict keys.

    Any other module (a custom ``nn.Module`` critic: ``view`` in ``forward``, functional
    activations, residual ``+``, label arguments, dict outputs) becomes a ``TracedCritic``
    (nn/trace.py), built from its ``torch.fx`` graph; ``output`` names the score of a dict (a
    key) or tuple (an index) output. A module fx cannot trace (data-dependent control flow)
    raises ``ValueError`` with the reason; what the graph holds is checked at the first
    ``forward_with_input_grad`` of each input signature (``trace.Unsupported``, a ValueError).

    A ``torch.nn.Sequential`` (nested ones too) of supported torch layers becomes the
    wgan_kernels.nn equivalent, as follows.

    Supported: every torch layer that an op class of explicit_ops.py describes (``OPS``: Linear,
    Conv2d with zero padding, LeakyReLU, ReLU, Softplus, ELU, SiLU, Tanh, AvgPool2d, Flatten and
    more), Sequential; a Linear / Conv2d with spectral norm (torch's parametrization or
    ``wgan_kernels.spectral_norm``) becomes ``SNLinear`` / ``SNConv2d`` sharing its weight and its
    u, v buffers; wgan_kernels.nn blocks pass through (containers are rebuilt
    around converted children). Anything else raises ``ValueError`` naming the layer's position.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"{_path}: expected a torch.nn.Module, got {type(module).__name__}")
    if output is not None or (_path == "module" and not _convertible(module)):
        traced = TracedCritic(module, output)
        reason = traced._unsupported(_path)
        if reason is not None:
            raise ValueError(reason)
        return traced
    old_sn = old_style_spectral_norm(module)
    if module._forward_hooks or (module._forward_pre_hooks and old_sn is None):
        raise ValueError(
            f"{_path}: {type(module).__name__} has forward hooks, which the explicit path would skip"
        )
    if isinstance(module, Residual):
        shortcut = None if module.shortcut is None else from_torch(module.shortcut, _path=f"{_path}.shortcut")
        return Residual(from_torch(module.body, _path=f"{_path}.body"), shortcut).train(module.training)
    if type(module) in (nn.Sequential, Sequential):
        children = OrderedDict(
            (name, from_torch(child, _path=f"{_path}[{name}]")) for name, child in module._modules.items()
        )
        return Sequential(children).train(module.training)
    spectral = from_torch_spectral(module, _path)
    if spectral is None and old_sn is not None:
        raise ValueError(f"{_path}: {type(module).__name__} with torch.nn.utils.spectral_norm: the SN blocks take "
                         "Linear and Conv2d layers with spectral norm on 'weight' only")
    if spectral is not None:
        block = spectral
    elif isinstance(module, InputGradModule):
        block = module
    elif block_for(type(module)) is not None:
        block = block_for(type(module))._from_torch(module)
    else:
        raise ValueError(
            f"{_path}: {type(module).__name__} is not supported by wgan_kernels.nn.from_torch "
            f"(supported: {', '.join(t.__name__ for t in OPS)}, Sequential)"
        )
    reason = block._unsupported(_path)
    if reason is not None:
        raise ValueError(reason)
    return block


def _convertible(module: nn.Module) -> bool:
    """Whether the block conversion applies: a Sequential / Residual / wgan_kernels.nn block, a
    layer an op class describes, a spectral-norm layer, and containers of those and of other
    torch.nn layers (which then raise, naming the layer). A module of the user's own class,
    or a container holding one, is traced instead."""
    if isinstance(module, InputGradModule) and not isinstance(module, Sequential):
        return True
    if type(module) in (nn.Sequential, Sequential):
        return all(_convertible(child) for child in module.children())
    return (block_for(type(module)) is not None or parametrize.is_parametrized(module)
            or type(module).__module__.startswith("torch."))
