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


def interleaved(benchmark, *, suite: str, case: str, fns: dict, rounds: int, warm_calls: int = 0,
                apart: tuple = (), **extra):
    """Times every implementation of one case round-robin (A B C, C B A, A B C, ...) for
    ``rounds`` rounds and records the per-impl medians in one pytest-benchmark entry
    (``impl="interleaved"``). The machine's slow drifts (noisy neighbours) then hit every impl
    alike, so the ratios are fairer than those of impls timed one after another; report.py uses
    these medians for the row where they exist. ``warm_calls``: untimed calls of an impl right
    before its timed one, so that every impl finds its data in cache whatever ran before it (for
    memory-bound ops on data that fits in cache, where a neighbour's copy would otherwise evict
    it for some impls only). ``apart``: impls (floors such as a copy of other buffers) timed in
    their own round-robin after the others, never right before a compared impl: on this CPU an
    11 MB copy slows the next two calls of whatever follows it, even after a warm call, so
    in one rotation the impl placed after the copy lost up to 1.6x (measured on clip_ DCGAN-64).
    Each impl's median count of minor page faults per timed call is recorded too
    (``interleaved_minor_faults``; getrusage, CPU): memory the allocator handed back to the OS and
    takes again costs a fault per 4 KiB page, in the impl that frees it or in the next one."""
    import resource
    import time

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    fns = {k: timed(f) for k, f in fns.items()}
    for f in fns.values():  # warm-up
        for _ in range(3):
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    fault_counts: dict[str, list[int]] = {k: [] for k in fns}
    for order in ([k for k in fns if k not in apart], [k for k in fns if k in apart]):
        for r in range(rounds if order else 0):
            for k in order if r % 2 == 0 else reversed(order):
                for _ in range(warm_calls):
                    fns[k]()
                f0 = faults()
                t = time.perf_counter()
                fns[k]()
                samples[k].append(time.perf_counter() - t)
                fault_counts[k].append(faults() - f0)
    medians = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
    benchmark.group = f"{suite}/{case} (interleaved)"
    benchmark.extra_info.update(suite=suite, case=case, impl="interleaved", device=str(DEVICE), rounds=rounds,
                                warm_calls=warm_calls, apart=list(apart),
                                interleaved_median_s=medians,
                                interleaved_minor_faults={k: sorted(v)[len(v) // 2] for k, v in fault_counts.items()},
                                **extra)
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)


def peak_bytes(fn) -> int:
    """Peak memory allocated during one call of fn, above what was allocated before it (CUDA:
    max_memory_allocated; CPU: the running sum of torch.profiler's allocation events)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.fixture(scope="session")
def device():
    return DEVICE
