"""wgan_kernels.nn: critic layers that compute their input gradient explicitly.

A gradient penalty needs ``grad_x D(x)``; autograd gets it with ``create_graph=True`` and a
double backward. For critics built from these blocks, ``forward_with_input_grad(x)`` returns
``(D(x), grad_x D(x).sum())`` from a forward pass plus an explicit backward chain of ordinary
differentiable ops, so the penalty needs one first-order ``.backward()`` and works under
``torch.compile``, CUDA graphs and DDP::

    critic = wgan_kernels.nn.from_torch(torch_critic)   # shares torch_critic's Parameters
    out, grad_x = critic.forward_with_input_grad(x)
    penalty = ((grad_x.flatten(1).norm(dim=1) - 1) ** 2).mean()

Blocks have the torch layers' constructors, parameter names and forwards.

Layout (imports run downward, no cycles; nothing here imports losses, train or eager; tests/test_imports.py checks):
``explicit_ops.py`` one ``Op`` class per operation (forward, input-gradient VJP, tangent, weight
gradient, flags), the only place a layer's explicit path is written, and the registry ``OPS``;
``_chain.py`` the one-node autograd node and its tape, running a tree of those ops;
``layers.py`` the blocks (nn.Modules made from the op classes, plus ``Sequential`` / ``Residual``),
the layer-by-layer chain; ``graph.py`` ``GraphOp``, a graph of ops (values used twice, adds, concatenations);
``trace.py`` ``TracedCritic``: any torch critic module's ``torch.fx`` graph as a ``GraphOp``;
``spectral.py`` spectral norm's modules (the ``SpectralNorm``
parametrization and ``spectral_norm``, the SN blocks, ``spectral_norm_all``; the op
``power_iteration_`` is in ``wgan_kernels/ops/spectral_norm.py``); ``convert.py`` ``from_torch``.
Adding a layer type is one op class in explicit_ops.py (and its tests): its block
(``wgan_kernels.nn.<TorchName>``) and ``from_torch`` conversion follow from the registry.

Gradient order: the piecewise-linear critics' one-node path is first-order (a second derivative
through it, e.g. a Hessian-vector product, raises ``RuntimeError``; use the plain torch critic's
double backward for those); the layer-by-layer chain of the other critics is differentiable twice.
"""

from .convert import from_torch
from .layers import (
    ELU,
    AvgPool2d,
    Conv2d,
    Flatten,
    InputGradModule,
    LeakyReLU,
    Linear,
    ReLU,
    Residual,
    Sequential,
    SiLU,
    Softplus,
    Tanh,
    supports_input_grad,
)
from .spectral import SN_LAYERS, SNConv2d, SNLinear, SpectralNorm, spectral_norm, spectral_norm_all
from .trace import TracedCritic, Unsupported


def __getattr__(name: str):
    """The blocks of op classes that layers.py does not name (the newer activations): see
    ``explicit_ops.py``, where adding an op class is all a new layer type takes."""
    from . import layers  # noqa: PLC0415

    return getattr(layers, name)

__all__ = [
    "AvgPool2d",
    "Conv2d",
    "ELU",
    "Flatten",
    "InputGradModule",
    "LeakyReLU",
    "Linear",
    "ReLU",
    "Residual",
    "SNConv2d",
    "SNLinear",
    "SN_LAYERS",
    "Sequential",
    "SpectralNorm",
    "SiLU",
    "Softplus",
    "Tanh",
    "TracedCritic",
    "Unsupported",
    "from_torch",
    "spectral_norm",
    "spectral_norm_all",
    "supports_input_grad",
]
