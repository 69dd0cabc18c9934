"""Shared test settings: devices, dtypes and tolerances in one table.

Without a GPU, Triton kernels run on the CPU interpreter: TRITON_INTERPRET must be set before
Triton is imported, so it is set here, first.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# (rtol, atol) for comparing a kernel with its reference computed in the same dtype.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 1e-6),
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}


def tol(dtype):
    rtol, atol = TOLERANCES[dtype]
    return {"rtol": rtol, "atol": atol}


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


class BothOutputs(torch.nn.Module):
    """``critic.forward_with_input_grad`` as a module's forward: ``(out, grad_x)`` of an explicit
    critic, for torch.compile and functional_call in the tests."""

    def __init__(self, critic):
        super().__init__()
        self.critic = critic

    def forward(self, x):
        return self.critic.forward_with_input_grad(x)


class LaunchGrids:
    """Records the grids a Triton kernel is launched with, then launches it: set over the kernel's
    module attribute (``monkeypatch.setattr(module, name, LaunchGrids(kernel))``), since launchers
    look their kernels up at call time."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]
