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
    if not args.kernels:
        return 0
    from . import kernel_report

    print("\nTriton kernels compiled for " + ", ".join(f"sm_{a}" for a in args.arch.split(",")) + " (no GPU needed):",
          flush=True)
    forwarded = ["--arch", args.arch] + (["--jobs", str(args.jobs)] if args.jobs else [])
    for flag in ("json", "write", "readme"):
        if getattr(args, flag) is not None:
            forwarded += [f"--{flag}", str(getattr(args, flag))]
    forwarded += ["--check"] * args.check + ["--quiet"] * args.quiet
    return kernel_report.main(forwarded)


SUITES = {"clip": "bench_clip.py", "penalty": "bench_penalty.py", "spectral_norm": "bench_spectral_norm.py",
          "train": "bench_train.py"}


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
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("wgan-kernels bench: --device cuda, but torch sees no CUDA device here "
                  f"(torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}); nothing was run", file=sys.stderr)
            return 2
    env = dict(os.environ, WGAN_KERNELS_BENCH_DEVICE=args.device, WGAN_KERNELS_BENCH_QUICK="1" if args.quick else "0")
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        raws = []
        for suite in suites:
            raw = os.path.join(tmp, f"raw-{suite}.json")
            cmd = [sys.executable, "-m", "pytest", str(bench / SUITES[suite]), "-q", "-p", "no:cacheprovider",
                   f"--benchmark-json={raw}", "--benchmark-disable-gc"]
            if args.quick:
                cmd += ["--benchmark-max-time=0.2", "--benchmark-min-rounds=3"]
            print(" ".join(cmd), flush=True)
            rc = subprocess.run(cmd + ["-rf"], cwd=bench.parent, env=env).returncode
            failed = failed or rc != 0
            if os.path.exists(raw) and os.path.getsize(raw) > 0:  # what did run, failures or not
                raws.append(raw)
        if not raws:
            return 1
        report = [sys.executable, str(bench / "report.py"), *raws, "--out", args.out, "--print"]
        rc = subprocess.run(report, cwd=bench.parent, env=env).returncode
        if failed:
            print("wgan-kernels bench: some cases failed (see above); the results hold the others", file=sys.stderr)
        return rc or int(failed)


_TRAIN_FIELDS = ("loss", "dataset", "backend", "steps", "n_critic", "batch_size", "lr", "hidden", "model", "resolution",
                 "seed", "eval_every", "checkpoint_every", "device", "out", "fid_weights")


def _train_config(args):
    """The TrainConfig of the command line: the fields given; on --resume, the others from the
    checkpoint's run (so a resume restates only what it changes, and anything that differs from
    the checkpoint's run is refused by the trainer with the field named)."""
    from dataclasses import fields

    from .train import TrainConfig
    from .train.trainer import checkpoint_config

    cfg = TrainConfig()
    if args.resume and args.out is not None:
        known = {f.name for f in fields(TrainConfig)}
        for key, value in checkpoint_config(args.out).items():
            if key in known and key != "progress":
                setattr(cfg, key, value)
    for key in _TRAIN_FIELDS:
        value = getattr(args, key, None)
        if value is not None:
            setattr(cfg, key, value)
    cfg.progress = not args.quiet
    if args.tensorboard:
        cfg.tensorboard = True
    return cfg


def _cmd_train(args) -> int:
    from .train import TrainingDiverged, train

    if args.resume and args.out is None:
        print("wgan-kernels train: resume: --resume needs the --out folder of the run to continue", file=sys.stderr)
        return 2
    try:
        cfg = _train_config(args)
        result = train(cfg, resume=args.resume)
    except TrainingDiverged as e:
        print(f"wgan-kernels train: stopped: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad settings, checkpoints and run folders: one line naming the culprit
        print(f"wgan-kernels train: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a write after the start's checks (metrics.json, pictures)
        print(f"wgan-kernels train: out: {e}", file=sys.stderr)
        return 2
    if result["trainer"].rank != 0:  # under torchrun, one report
        return 0
    print(f"{cfg.loss}/{cfg.backend} on {cfg.dataset}: final {result['metric']} {result['final_metric']:.4f}, "
          f"{result['steps_per_s']:.1f} generator steps/s, {result['steps']} steps"
          + (f"; outputs in {cfg.out}" if cfg.out else ""))
    return 0


def _cmd_demo(args) -> int:
    """WGAN-div on 8gaussians with both backends, side by side."""
    import torch

    from .train import TrainConfig, train
    from .train.datasets import load
    from .train.metrics import exact_w1

    results = {}
    for backend in ("fused", "eager"):
        cfg = TrainConfig(loss="wgan-div", dataset="8gaussians", backend=backend, steps=args.steps,
                          eval_every=max(1, args.steps // 5), checkpoint_every=args.steps,
                          out=f"{args.out}/{backend}", progress=not args.quiet)
        results[backend] = train(cfg)
    fused, eager = results["fused"]["trainer"], results["eager"]["trainer"]
    diff = max((a - b).abs().max().item() for a, b in
               zip(list(fused.G.parameters()) + list(fused.D.parameters()),
                   list(eager.G.parameters()) + list(eager.D.parameters())))
    sampler = load("8gaussians")
    floor = exact_w1(sampler.sample(1000, torch.Generator().manual_seed(1)),
                     sampler.sample(1000, torch.Generator().manual_seed(2)))
    print()
    print(f"WGAN-div (k 2, p 6) on 8gaussians, {args.steps} generator steps x 5 critic steps, batch 256, CPU")
    print(f"{'backend':<8} {'steps/s':>8} {'final W1':>9} {'wall s':>7}")
    for backend, r in results.items():
        print(f"{backend:<8} {r['steps_per_s']:>8.2f} {r['final_metric']:>9.4f} {r['wall_s']:>7.1f}")
    speedup = results["fused"]["steps_per_s"] / results["eager"]["steps_per_s"]
    print(f"fused / eager speed: {speedup:.2f}x; max |parameter difference| fused vs eager: {diff:.2e}")
    print(f"(W1 between two real samples of 1000 points: {floor:.4f}; pictures in {args.out}/fused, "
          f"{args.out}/eager)")
    return 0


def _floats(text: str) -> tuple:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _cmd_sweep(args) -> int:
    from pathlib import Path

    from .train.sweep import SweepConfig, sweep, update_readme

    cfg = SweepConfig(grid=args.grid, dataset=args.dataset, quick=args.quick, progress=not args.quiet)
    for key in ("seeds", "steps", "workers", "hidden", "lr", "backend", "device", "out", "k", "p"):
        value = getattr(args, key)
        if value is not None:
            setattr(cfg, key, value)
    try:
        report = sweep(cfg)
    except ValueError as e:
        print(f"wgan-kernels sweep: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out or f"out/sweep-{cfg.grid}-{cfg.dataset}")
    print((out / "table.md").read_text())
    print(f"{report['ran']} run(s) in {report['elapsed_s']:.0f} s; runs.csv, summary.csv, table.md and the "
          f"picture are in {out}")
    if args.readme:
        update_readme(Path(args.readme), [p for p in out.resolve().parent.iterdir() if p.is_dir()])
        print(f"updated the sweep section of {args.readme}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wgan-kernels", description="Fused kernels for Wasserstein GAN critics")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, the extension's build, and which backend each op uses here")
    info.add_argument("--kernels", action="store_true",
                      help="also compile every Triton kernel for sm_80/sm_90 (no GPU needed; about a minute the first "
                           "time, cached after) and print registers, spills, shared memory and the widest loads per "
                           "kernel, and the same for the CUDA extension's kernels")
    from .kernel_report import add_arguments

    add_arguments(info.add_argument_group("with --kernels"))
    info.set_defaults(func=_cmd_info)
    from .train import DATASETS, LOSSES
    from .train.config import LOSS_ALIASES

    train = sub.add_parser("train", help="train a WGAN on an embedded dataset, fused or eager")
    train.add_argument("--loss", choices=LOSSES + tuple(LOSS_ALIASES), help="default wgan-div (gp, div: the same as "
                       "wgan-gp, wgan-div)")
    train.add_argument("--dataset", metavar="DATASET", help=f"one of {', '.join(DATASETS)} (embedded), or image "
                       "files: folder:PATH (PNG/JPEG tree), cifar10:PATH (the python batches), tensor:PATH (.npz/.pt, "
                       "N x C x H x W); default 8gaussians")
    train.add_argument("--backend", choices=["fused", "eager"], help="default fused")
    train.add_argument("--steps", type=int, help="generator steps (default 1000)")
    train.add_argument("--n-critic", type=int, help="critic steps per generator step (default 5)")
    train.add_argument("--batch-size", type=int)
    train.add_argument("--lr", type=float)
    train.add_argument("--hidden", type=int, help="model width (default: MLP 256 units, DCGAN 64, ResNet 128 "
                       "channels)")
    train.add_argument("--model", choices=["mlp", "dcgan", "resnet"], help="default mlp; dcgan, resnet: 32x32 or "
                       "64x64 images (e.g. --dataset digits32)")
    train.add_argument("--resolution", type=int, choices=[32, 64], help="image side (default: the data's own; "
                       "32 for folders)")
    train.add_argument("--tensorboard", action="store_true", help="scalars and sample grids in OUT/tensorboard")
    train.add_argument("--fid-weights", metavar="PATH", help="torch-fidelity's Inception weights (.pth) for FID and "
                       "KID at each evaluation (default: torch's hub cache; absent: sliced W only, nothing downloaded)")
    train.add_argument("--seed", type=int)
    train.add_argument("--eval-every", type=int)
    train.add_argument("--checkpoint-every", type=int)
    train.add_argument("--device", default=None)
    train.add_argument("--out", default=None, help="folder for pictures, metrics.json and checkpoints")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT/checkpoint.pt; settings not given are the checkpoint's, and only "
                            "--steps, --eval-every, --checkpoint-every may differ from them")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)
    demo = sub.add_parser("demo", help="WGAN-div on 8gaussians, fused and eager side by side (about 2 min on CPU)")
    demo.add_argument("--steps", type=int, default=500)
    demo.add_argument("--out", default="out/demo")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_cmd_demo)
    bench = sub.add_parser("bench", help="run the benchmark suites, print medians, ratios and targets, write JSON")
    bench.add_argument("--device", default="cuda" if _cuda_available() else "cpu", choices=["cpu", "cuda"])
    bench.add_argument("--quick", action="store_true", help="small cases and few rounds")
    bench.add_argument("--suite", default=None, help=f"comma-separated subset of {list(SUITES)}")
    bench.add_argument("--out", default="bench/results", help="results folder (default bench/results)")
    bench.set_defaults(func=_cmd_bench)
    sw = sub.add_parser("sweep", help="the WGAN-div paper's ablations: (k, p) grid or r(x) x {div, GP}")
    sw.add_argument("grid", choices=["kp", "rx"], help="kp: k E||grad||^p over k x p; rx: six r(x) x {div, GP}")
    sw.add_argument("--dataset", default="8gaussians", choices=DATASETS)
    sw.add_argument("--seeds", type=int, help="seeds per cell (default 3; --quick 1)")
    sw.add_argument("--steps", type=int, help="generator steps per run (default 600 on 2-D data, 800 on digits)")
    sw.add_argument("--workers", type=int, help="parallel runs (default: the CPU cores, at most 4)")
    sw.add_argument("--hidden", type=int, help="MLP width (default 128)")
    sw.add_argument("--lr", type=float, help="Adam learning rate (default 5e-4)")
    sw.add_argument("--k", type=_floats, help="kp: comma-separated k values (default 0.5,2,10)")
    sw.add_argument("--p", type=_floats, help="kp: comma-separated p values (default 2,4,6,8)")
    sw.add_argument("--backend", choices=["fused", "eager"])
    sw.add_argument("--device")
    sw.add_argument("--out", help="results folder (default out/sweep-GRID-DATASET); finished runs are kept")
    sw.add_argument("--quick", action="store_true", help="1 seed, 150 steps: about 2 minutes on 2 cores")
    sw.add_argument("--readme", help="regenerate this README's sweep section from the sweep folders beside --out")
    sw.add_argument("--quiet", action="store_true")
    sw.set_defaults(func=_cmd_sweep)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
