"""Shared pieces of the benchmark suites (pytest-benchmark).

Run: ``python -m pytest bench/bench_clip.py --benchmark-json=bench/results/raw-cpu.json`` and
then ``python bench/report.py bench/results/raw-cpu.json`` (writes ``bench/results/<device>.json``
and the README tables). ``WGAN_KERNELS_BENCH_DEVICE=cuda`` benchmarks on the GPU;
``WGAN_KERNELS_BENCH_QUICK=1`` skips the largest cases.
"""

import os

import pytest
import torch

DEVICE = torch.device(os.environ.get("WGAN_KERNELS_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu"))
QUICK = os.environ.get("WGAN_KERNELS_BENCH_QUICK", "0") == "1"


def timed(fn):
    """On CUDA, wait for the GPU inside the timed call so that wall time is kernel time."""
    if DEVICE.type != "cuda":
        return fn

    def synced():
        fn()
        torch.cuda.synchronize()

    return synced


def record(benchmark, *, suite: str, case: str, impl: str, fn, **extra):
    benchmark.group = f"{suite}/{case}"
    benchmark.extra_info.update(suite=suite, case=case, impl=impl, device=str(DEVICE), **extra)
    fn = timed(fn)
    for _ in range(3):  # warm-up outside the timed rounds
        fn()
    benchmark(fn)


@pytest.fixture(scope="session")
def device():
    return DEVICE
