"""The committed quality run of the image trainer: WGAN-div, DCGAN-32 on the embedded digits32,
300 generator steps, both backends from the same seeds (0 and 1), the trainer's defaults.

    python bench/quality.py            # the four runs (about 20 minutes on 2 CPU cores), then --readme
    python bench/quality.py --readme   # only the README section, from the committed results

Writes ``bench/results/quality-digits32/<backend>-s<seed>/`` (metrics.json, curves.png, the final
grid and one grid per evaluation; the checkpoint is not kept), the summary
``bench/results/quality-digits32.json`` and ``quality-digits32.png`` (the four sliced-W curves), and
the README section between the ``quality`` markers.

How agreement is judged: the sliced Wasserstein distance (on pixels, to the same 1000 real digits)
at each evaluation; the backends differ by float rounding that training amplifies, so the same
seed on both backends gives two runs as different as two seeds. The two backends agree within
seed noise when their mean absolute difference over the evaluations (same seed) is no larger than
the mean absolute difference between the two seeds (same backend), taking the larger of the two
backends' seed differences.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "quality-digits32"
SUMMARY = HERE / "results" / "quality-digits32.json"
PLOT = HERE / "results" / "quality-digits32.png"
README = HERE.parent / "README.md"
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

RUNS = [("fused", 0), ("eager", 0), ("fused", 1), ("eager", 1)]
SETTINGS = dict(loss="wgan-div", model="dcgan", dataset="digits32", steps=300, eval_every=50, checkpoint_every=1000,
                progress=False)


def run_all() -> dict:
    import torch

    from report import device_label
    from wgan_kernels.train import TrainConfig, train

    runs = {}
    for backend, seed in RUNS:
        name = f"{backend}-s{seed}"
        out = OUT / name
        if out.exists():
            shutil.rmtree(out)
        result = train(TrainConfig(backend=backend, seed=seed, out=str(out), **SETTINGS))
        (out / "checkpoint.pt").unlink(missing_ok=True)  # 20 MB of weights: not committed
        (out / "run.lock").unlink(missing_ok=True)
        runs[name] = {"backend": backend, "seed": seed, "evals": result["evals"], "wall_s": result["wall_s"],
                      "steps_per_s": result["steps_per_s"]}
        print(f"{name}: final sliced_w {result['final_metric']:.4f}, {result['steps_per_s']:.2f} steps/s", flush=True)
    summary = {"device": device_label("cpu"), "torch": torch.__version__, "settings": SETTINGS, "runs": runs}
    summary["agreement"] = agreement(runs)
    SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")
    plot(summary)
    return summary


def _curve(run: dict) -> list[float]:
    return [e["sliced_w"] for e in run["evals"]]


def _mean_abs(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / len(a)


def agreement(runs: dict) -> dict:
    backends = [_mean_abs(_curve(runs[f"fused-s{s}"]), _curve(runs[f"eager-s{s}"])) for s in (0, 1)]
    seeds = [_mean_abs(_curve(runs[f"{b}-s0"]), _curve(runs[f"{b}-s1"])) for b in ("fused", "eager")]
    return {"backend_diff": backends, "seed_diff": seeds, "within_seed_noise": max(backends) <= max(seeds)}


def plot(summary: dict) -> None:
    from wgan_kernels.train.plots import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, run in summary["runs"].items():
        ax.plot([e["step"] for e in run["evals"]], _curve(run), marker="o", label=name,
                linestyle="-" if run["backend"] == "fused" else "--")
    ax.set_xlabel("generator step")
    ax.set_ylabel("sliced W (pixels)")
    ax.set_title("WGAN-div, DCGAN-32 on digits32: fused vs eager, seeds 0 and 1", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=100)
    plt.close(fig)


def readme_section(summary: dict) -> str:
    runs, agree = summary["runs"], summary["agreement"]
    rows = ["| run | sliced W at steps " + ", ".join(str(e["step"]) for e in runs["fused-s0"]["evals"]) +
            " | steps/s | wall s |", "|---|---|---|---|"]
    for name, run in runs.items():
        rows.append(f"| {name} | " + ", ".join(f"{v:.3f}" for v in _curve(run)) +
                    f" | {run['steps_per_s']:.2f} | {run['wall_s']:.0f} |")
    rel = "bench/results/quality-digits32"
    verdict = "agree within seed noise" if agree["within_seed_noise"] else "do NOT agree within seed noise"
    return (f"WGAN-div (k 2, p 6), DCGAN-32 (width 64, noise 128), embedded `digits32`, 300 generator steps x 5 "
            f"critic steps, batch 64, the trainer's defaults (Adam 2e-4, betas (0.5, 0.999)); {summary['device']}, "
            f"torch {summary['torch']}. Produced by `python bench/quality.py` (results in `{rel}/`).\n\n"
            + "\n".join(rows) + "\n\n"
            f"Mean |fused - eager| of the sliced-W curve, same seed: {agree['backend_diff'][0]:.3f} (seed 0), "
            f"{agree['backend_diff'][1]:.3f} (seed 1); mean |seed 0 - seed 1|, same backend: "
            f"{agree['seed_diff'][0]:.3f} (fused), {agree['seed_diff'][1]:.3f} (eager). The backends {verdict} "
            f"(the larger backend difference against the larger seed difference; float rounding that differs "
            f"between the backends grows over 1,500 critic steps into a different run, as a seed does).\n\n"
            f"![sliced W curves]({rel}.png)\n\n"
            f"| fused, seed 0, step 300 | eager, seed 0, step 300 |\n|---|---|\n"
            f"| ![fused]({rel}/fused-s0/samples.png) | ![eager]({rel}/eager-s0/samples.png) |\n")


def update_readme(summary: dict) -> None:
    start, end = "<!-- quality:start -->", "<!-- quality:end -->"
    text = README.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"README.md has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    README.write_text(f"{head}{start}\n<!-- generated by bench/quality.py from {SUMMARY.relative_to(HERE.parent)} "
                      f"-->\n\n{readme_section(summary)}\n{end}{tail}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--readme", action="store_true", help="only regenerate the README section")
    args = ap.parse_args()
    summary = json.loads(SUMMARY.read_text()) if args.readme else run_all()
    update_readme(summary)
    print(f"updated {README}")


if __name__ == "__main__":
    main()
