"""The ``wgan-kernels`` command line."""

from __future__ import annotations

import argparse
import sys


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _cmd_info(args) -> int:
    from .info import collect, format_info

    print(format_info(collect()))
    return 0


SUITES = {"clip": "bench_clip.py", "penalty": "bench_penalty.py"}


def _bench_dir():
    from pathlib import Path

    here = Path(__file__).resolve().parent.parent / "bench"
    if not (here / "report.py").exists():
        raise SystemExit("wgan-kernels bench: the bench/ suites ship with the source tree; run it from a "
                         "checkout installed with `pip install --no-build-isolation -e .`")
    return here


def _cmd_bench(args) -> int:
    import os
    import subprocess
    import tempfile

    bench = _bench_dir()
    suites = args.suite.split(",") if args.suite else list(SUITES)
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"--suite: unknown {unknown}; choose from {list(SUITES)}")
    env = dict(os.environ, WGAN_KERNELS_BENCH_DEVICE=args.device, WGAN_KERNELS_BENCH_QUICK="1" if args.quick else "0")
    with tempfile.TemporaryDirectory() as tmp:
        raws = []
        for suite in suites:
            raw = os.path.join(tmp, f"raw-{suite}.json")
            cmd = [sys.executable, "-m", "pytest", str(bench / SUITES[suite]), "-q", "-p", "no:cacheprovider",
                   f"--benchmark-json={raw}", "--benchmark-disable-gc"]
            if args.quick:
                cmd += ["--benchmark-max-time=0.2", "--benchmark-min-rounds=3"]
            print(" ".join(cmd), flush=True)
            rc = subprocess.run(cmd, cwd=bench.parent, env=env).returncode
            if rc != 0:
                return rc
            raws.append(raw)
        report = [sys.executable, str(bench / "report.py"), *raws, "--out", args.out, "--print"]
        return subprocess.run(report, cwd=bench.parent, env=env).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wgan-kernels", description="Fused kernels for Wasserstein GAN critics")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, the extension's build, and which backend each op uses here")
    info.set_defaults(func=_cmd_info)
    bench = sub.add_parser("bench", help="run the benchmark suites, print medians, ratios and targets, write JSON")
    bench.add_argument("--device", default="cuda" if _cuda_available() else "cpu", choices=["cpu", "cuda"])
    bench.add_argument("--quick", action="store_true", help="small cases and few rounds")
    bench.add_argument("--suite", default=None, help=f"comma-separated subset of {list(SUITES)}")
    bench.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    bench.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
