"""Critic layers that return their input gradient explicitly ("double backward made single").

Each block is the torch layer of the same name (same constructor, same ``weight``/``bias``, same
``forward``) whose explicit path is described by one op class of explicit_ops.py (its
``op_type``): the block builds that op from itself (``_op``, sharing its parameters) and

- ``_forward_saving(x) -> (y, saved)`` runs the op's forward, keeping what the backward needs;
- ``_input_grad(saved, grad_y) -> grad_x`` runs the op's vector-Jacobian product, built from
  plain differentiable ops.

``forward_with_input_grad(x)`` runs the first and then the second with ``grad_y = ones_like(out)``,
giving ``(out, d out.sum() / dx)``. Because ``grad_x`` is an ordinary function of the parameters,
a gradient penalty on it needs one first-order ``.backward()``: no ``create_graph=True``, so it
works under ``torch.compile``, CUDA graphs and DDP.

The leaf block classes are made from their op classes (``block_class``): a new op class in
explicit_ops.py gets its block, ``from_torch`` conversion and ``wgan_kernels.nn.<Name>`` with no
edit here. Imports run one way: layers -> _chain -> explicit_ops -> wgan_kernels.ops.
"""

from __future__ import annotations

import torch
from torch import nn

from .._backend import layer_activation
from ..ops import activation as _act
from . import _chain
from . import explicit_ops as _ops
from .explicit_ops import OPS, Mask, check_matches_weight

_check_matches_weight = check_matches_weight  # the name spectral.py and older code import


# modules whose training-mode forward draws random numbers per element, in memory order: on a
# channels_last input the same seed gives other values (per-channel draws, Dropout2d's, do not)
LAYOUT_MODULES = (nn.Dropout, nn.AlphaDropout, nn.RReLU)


class InputGradModule(nn.Module):
    """Base of the blocks: ``forward_with_input_grad`` on top of the block's op (``op_type``).

    Input-gradient hooks are to ``forward_with_input_grad`` what forward pre-hooks and forward
    hooks are to ``forward`` (which does not run through ``__call__``, so torch's hooks do not
    see it): objects with ``before(module, args)`` and ``after(module, args, output)``, added with
    ``register_input_grad_hook`` and kept in ``_input_grad_hooks`` (a list, in registration
    order). ``spectral_norm_all`` registers its batched power iteration there."""

    op_type: type[_ops.Op] | None = None
    _input_grad_hooks: tuple = ()  # no hooks; register_input_grad_hook gives the instance its own list

    def register_input_grad_hook(self, hook) -> None:
        """Runs ``hook.before(self, (x,))`` before and ``hook.after(self, (x,), None)`` after (also when
        it raises) each ``forward_with_input_grad(x)`` on this module, as forward pre-hooks / forward
        hooks (``always_call=True``) run around ``forward``. A module with hooks takes the
        layer-by-layer path (each block's own forward), never the one-node chain."""
        if not (callable(getattr(hook, "before", None)) and callable(getattr(hook, "after", None))):
            raise ValueError(f"hook: expected an object with before(module, args) and after(module, args, output) "
                             f"methods, got {type(hook).__name__}")
        self._input_grad_hooks = [*self._input_grad_hooks, hook]

    def channels_last_for(self, x: torch.Tensor) -> bool:
        """Whether ``forward_with_input_grad(x)`` runs its convolutions in channels_last (the
        one-node chain on CPU) and ``forward`` gives the same values on ``x`` in channels_last:
        then ``critic_loss`` hands its loss forward the samples in that layout (oneDNN's CPU
        convolutions are faster in it). False here; see ``Sequential``."""
        return False

    def _op(self) -> _ops.Op | None:
        """The op describing this block on the one-node chain (its parameters shared), or None
        where it has none: a subclass (an SN block, a user's) may have changed the forward."""
        op_type = type(self).__dict__.get("op_type")  # the block class itself, not a subclass
        return None if op_type is None else op_type.from_module(self)  # chain_dim refuses what it cannot run

    def _forward_saving(self, x: torch.Tensor):
        op = self.op_type.from_module(self)
        y, saved = op.forward_fused(op.params, x)
        return y, (op, saved)

    def _input_grad(self, saved, grad_y: torch.Tensor) -> torch.Tensor:
        op, s = saved
        return op.vjp(op.params, s, grad_y)

    def _unsupported(self, path: str) -> str | None:
        """Why this module has no explicit input-gradient path (None: it has one)."""
        return None if self.op_type is None else self.op_type.unsupported(self, path)

    @classmethod
    def _from_torch(cls, m: nn.Module) -> InputGradModule:
        """The block for torch module ``m`` (of the block's torch class): the same attributes,
        the same Parameter and buffer objects (shared, not copied)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        own = set(new.__dict__)
        for key, value in m.__dict__.items():
            if key not in own:
                new.__dict__[key] = value
        new._parameters.update(m._parameters)
        new._buffers.update(m._buffers)
        new._non_persistent_buffers_set.update(m._non_persistent_buffers_set)
        return new.train(m.training)

    def forward_with_input_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(out, grad_x)``: ``out == self(x)`` and ``grad_x`` (shape of ``x``) equal to
        ``torch.autograd.grad(out.sum(), x, create_graph=True)[0]``, computed without autograd:
        it is differentiable in the parameters (and in ``x``) through ordinary ops.

        Gradient order: this layer-by-layer chain is made of differentiable ops, so a loss on
        ``(out, grad_x)`` can be differentiated twice, as autograd's double backward would.
        A ``Sequential`` that takes the one-node path (nn/_chain.py) is first-order: asking for a
        second derivative through it raises ``RuntimeError`` (``_chain.SECOND_ORDER_ERROR``)."""
        check_input(x)
        reason = self._unsupported("module")
        if reason is not None:
            raise ValueError(reason)
        hooks = list(self._input_grad_hooks)  # e.g. spectral_norm_all's per-step iteration, as a forward runs it
        for hook in hooks:
            hook.before(self, (x,))
        try:
            out, saved = self._forward_saving(x)
            return out, self._input_grad(saved, torch.ones_like(out))
        finally:
            for hook in hooks:
                hook.after(self, (x,), None)


_BLOCKS: dict[type, type[InputGradModule]] = {}  # torch module type -> its block class


def block_class(op_type: type[_ops.Op]) -> type[InputGradModule]:
    """The block of an op class: a subclass of ``InputGradModule`` and of the op's torch class
    (so the torch constructor, parameters and ``forward``), made once and cached."""
    torch_type = op_type.torch_type
    cls = _BLOCKS.get(torch_type)
    if cls is None:
        name = torch_type.__name__
        doc = f"``torch.nn.{name}`` with an explicit input gradient: {op_type.__doc__}"
        cls = type(name, (InputGradModule, torch_type),
                   {"op_type": op_type, "__doc__": doc, "__module__": __name__, "__qualname__": name})
        _BLOCKS[torch_type] = cls
    return cls


def block_for(torch_type: type) -> type[InputGradModule] | None:
    """The block class for a torch module class (exact type), None when no op describes it."""
    op_type = OPS.get(torch_type)
    return None if op_type is None else block_class(op_type)


def __getattr__(name: str):  # blocks of op classes not named above (added to explicit_ops.py only)
    for torch_type, op_type in OPS.items():
        if torch_type.__name__ == name:
            return block_class(op_type)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def supports_input_grad(module: nn.Module) -> bool:
    """True when ``module.forward_with_input_grad`` works: a wgan_kernels.nn block whose
    sub-blocks (for ``Sequential`` and ``Residual``) all have the explicit path."""
    return isinstance(module, InputGradModule) and module._unsupported("module") is None


def check_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"x must have a floating-point dtype, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"x is empty (shape {tuple(x.shape)})")


def _not_a_block(path: str, module: nn.Module) -> str:
    return (
        f"{path}: {type(module).__name__} is not supported by wgan_kernels.nn (no explicit input "
        f"gradient); use its blocks or wgan_kernels.nn.from_torch"
    )


# The leaf blocks: each is its op class's block (see explicit_ops.py for what each computes)
Linear = block_class(_ops.LinearOp)
Conv2d = block_class(_ops.Conv2dOp)
LeakyReLU = block_class(_ops.LeakyReLUOp)
ReLU = block_class(_ops.ReLUOp)
Softplus = block_class(_ops.SoftplusOp)
ELU = block_class(_ops.ELUOp)
SiLU = block_class(_ops.SiLUOp)
Tanh = block_class(_ops.TanhOp)
AvgPool2d = block_class(_ops.AvgPool2dOp)
Flatten = block_class(_ops.FlattenOp)


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

    def _op(self):
        ops = []
        for layer in self._modules.values():
            op = layer._op() if isinstance(layer, InputGradModule) else None
            if op is None:
                return None
            ops.append(op)
        return _ops.SequentialOp(ops)

    def forward_with_input_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Piecewise-linear critics (MLP, DCGAN, ResNet): one autograd node for the whole chain (nn/_chain.py),
        # first-order only (a second derivative raises _chain.SECOND_ORDER_ERROR)
        check_input(x)
        if not self._input_grad_hooks:  # hooks run around the layer-by-layer path (the base class's)
            chain = _chain.plan(self, x)
            if chain is not None:
                return _chain.forward_with_input_grad(*chain, x)
        return super().forward_with_input_grad(x)

    def channels_last_for(self, x: torch.Tensor) -> bool:
        # (the blocks' forwards read no strides: Flatten flattens, it does not view)
        if self._input_grad_hooks or not _chain.nhwc_input(x):
            return False
        if any(isinstance(m, LAYOUT_MODULES) and m.training for m in self.modules()):
            return False  # (per-element random draws fill in memory order)
        chain = _chain.plan(self, x)
        return chain is not None and _chain.runs_nhwc(chain[0], x)

    def _forward_saving(self, x):
        layers, saved, i = list(self), [], 0
        while i < len(layers):
            layer, after = layers[i], layers[i + 1] if i + 1 < len(layers) else None
            if (type(layer) is Conv2d and layer.bias is not None and type(after) in (LeakyReLU, ReLU)
                    and layer_activation(x.device) == "triton"):
                # conv without bias, then bias + activation + mask in one pass
                conv, act = layer.op_type.from_module(layer), after.op_type.from_module(after)
                z, conv_saved = conv.forward_fused((layer.weight, None), x)
                x, mask = _act.leaky_relu_with_mask(z, act.slope, layer.bias, backend="triton")
                saved += [(conv, conv_saved), (act, Mask(mask))]
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

    def _op(self):
        branches = []
        for branch in (self.body, self.shortcut):
            op = branch._op() if isinstance(branch, InputGradModule) else None
            if op is None and branch is not None:
                return None
            branches.append(op)
        return _ops.ResidualOp(*branches)

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
