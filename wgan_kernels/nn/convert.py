"""``from_torch``: a ``torch.nn`` critic as wgan_kernels.nn blocks that share its Parameters."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from .explicit_ops import OPS
from .layers import InputGradModule, Residual, Sequential, block_for
from .spectral import from_torch_spectral

# Exact types only (the keys of explicit_ops.OPS): a subclass of a torch layer may change its
# forward, and a parametrized layer has a generated subclass; both are refused, not converted
# silently (spectral norm excepted: it becomes an SN block).


def from_torch(module: nn.Module, _path: str = "module") -> InputGradModule:
    """Converts a ``torch.nn.Sequential`` (nested ones too) of supported torch layers into the
    wgan_kernels.nn equivalent. The result shares the same Parameter objects (an optimizer on
    either model trains both) and has the same state_dict keys.

    Supported: every torch layer that an op class of explicit_ops.py describes (``OPS``: Linear,
    Conv2d with zero padding, LeakyReLU, ReLU, Softplus, ELU, SiLU, Tanh, AvgPool2d, Flatten and
    more), Sequential; a Linear / Conv2d with spectral norm (torch's parametrization or
    ``wgan_kernels.spectral_norm``) becomes ``SNLinear`` / ``SNConv2d`` sharing its weight and its
    u, v buffers; wgan_kernels.nn blocks pass through (containers are rebuilt
    around converted children). Anything else raises ``ValueError`` naming the layer's position.
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"{_path}: expected a torch.nn.Module, got {type(module).__name__}")
    if module._forward_hooks or module._forward_pre_hooks:
        raise ValueError(
            f"{_path}: {type(module).__name__} has forward hooks, which the explicit path would skip"
        )
    if isinstance(module, Residual):
        shortcut = None if module.shortcut is None else from_torch(module.shortcut, f"{_path}.shortcut")
        return Residual(from_torch(module.body, f"{_path}.body"), shortcut).train(module.training)
    if type(module) in (nn.Sequential, Sequential):
        children = OrderedDict(
            (name, from_torch(child, f"{_path}[{name}]")) for name, child in module._modules.items()
        )
        return Sequential(children).train(module.training)
    spectral = from_torch_spectral(module, _path)
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
