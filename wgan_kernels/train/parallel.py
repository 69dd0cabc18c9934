"""Data parallelism without the DDP wrapper: every process draws the global batch with the same
generator and keeps its rows, so N processes make the same updates as one process on the global
batch; gradients are averaged with one all-reduce of all of them, flattened.

(``DistributedDataParallel``'s reducer expects one forward per backward; a GP critic step has two,
and the explicit path calls ``forward_with_input_grad``.)
"""

from __future__ import annotations

import os

import torch
from torch import nn

# r(x) strategies whose draws split by rows (random numbers per row), so N processes draw what one
# process would; the others pair rows across the whole batch (shuffles, batch std) and would need
# the global batch.
ROW_WISE_DRAWS = {"interpolate": 1, "real": 0, "fake": 0, "real+fake": 0}


def join(device: torch.device) -> tuple[int, int]:
    """(rank, world size): joins the process group when launched by torchrun (WORLD_SIZE > 1);
    gloo on CPU, nccl on CUDA."""
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return 0, 1
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


class DataParallel:
    """This process's share of a global batch of ``batch`` rows, and the gradient average."""

    def __init__(self, device: torch.device, batch: int, sampling: str | None):
        self.device = device
        self.rank, self.world = join(device)
        if batch % self.world:
            raise ValueError(f"batch_size: {batch} does not split evenly over {self.world} processes")
        self.local = batch // self.world  # this process's rows of the global batch
        if self.world > 1 and sampling is not None and sampling not in ROW_WISE_DRAWS:
            raise ValueError(f"sampling: {sampling!r} pairs rows across the global batch; with "
                             f"{self.world} processes use one of {tuple(ROW_WISE_DRAWS)}")
        # random numbers one process draws per critic step for its penalty points
        self.draws = ROW_WISE_DRAWS.get(sampling, 0) * self.local if self.world > 1 else 0

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global-batch tensor."""
        return t[self.rank * self.local:(self.rank + 1) * self.local] if self.world > 1 else t

    def skip_before(self, generator: torch.Generator) -> None:
        """Advances ``generator`` past the lower ranks' per-row draws of one critic step."""
        self._skip(generator, self.rank * self.draws)

    def skip_after(self, generator: torch.Generator) -> None:
        """... and past the higher ranks' draws."""
        self._skip(generator, (self.world - 1 - self.rank) * self.draws)

    def _skip(self, generator: torch.Generator, n: int) -> None:
        if n > 0:
            torch.rand(n, generator=generator, device=self.device)

    def all_reduce_grads(self, module: nn.Module) -> None:
        """Averages gradients over processes: one all-reduce of all of them, flattened."""
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in module.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
