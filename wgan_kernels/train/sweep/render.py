"""What a sweep writes besides ``runs.csv``: ``summary.csv``, ``table.md``, ``sweep.json``, the
heatmap or bar chart, and the README's sweep section."""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import asdict
from pathlib import Path

from .grid import RX_LOSSES, SweepConfig, num, cells
from .verdict import fmt_cell, summarize, verdict


def markdown(cfg: SweepConfig, summary: list[dict], verdict_: dict, metric: str, rows: list[dict]) -> str:
    seeds = max((s["runs"] for s in summary), default=0)
    r0 = rows[0] if rows else {}
    head = (f"{cfg.grid} sweep on {cfg.dataset}: {metric} (lower is better), mean ± std over {seeds} seed(s); "
            f"{r0.get('steps', '?')} generator steps x 5 critic steps, MLP {r0.get('hidden', '?')} wide, "
            f"batch {r0.get('batch_size', '?')}, Adam lr {r0.get('lr', '?')}, backend {r0.get('backend', '?')}, "
            f"device {r0.get('device', '?')}; metric on {r0.get('eval_samples', '?')} samples.")
    lines = [head, ""]
    if cfg.grid == "kp":
        ks = sorted({s["k"] for s in summary})
        ps = sorted({s["p"] for s in summary})
        lines.append("| k \\ p | " + " | ".join(num(p) for p in ps) + " |")
        lines.append("|---" * (len(ps) + 1) + "|")
        for k in ks:
            cellstr = []
            for p in ps:
                s = next(s for s in summary if s["k"] == k and s["p"] == p)
                cellstr.append(fmt_cell(s))
            lines.append(f"| {num(k)} | " + " | ".join(cellstr) + " |")
    else:
        losses = [x for x in RX_LOSSES if any(s["loss"] == x for s in summary)]
        lines.append("| r(x) | " + " | ".join(losses) + " |")
        lines.append("|---" * (len(losses) + 1) + "|")
        for strat in dict.fromkeys(s["sampling"] for s in summary):
            cellstr = [fmt_cell(next(s for s in summary if s["loss"] == x and s["sampling"] == strat)) for x in losses]
            lines.append(f"| {strat} | " + " | ".join(cellstr) + " |")
    lines += ["", verdict_["text"], ""]
    return "\n".join(lines)


def real_floor(dataset: str, samples: int) -> float:
    """The metric between two independent real samples of the evaluation size: what a perfect
    generator would score."""
    import torch

    from ..datasets import load
    from ..metrics import metric_for

    sampler = load(dataset)
    _, fn = metric_for(sampler.dim)
    a = sampler.sample(samples, torch.Generator().manual_seed(1))
    b = sampler.sample(samples, torch.Generator().manual_seed(2))
    return fn(a, b)


def write_report(cfg: SweepConfig, rows: list[dict], out: Path, grid: list[dict] | None = None) -> dict:
    grid = grid or cells(cfg)
    metric = rows[0]["metric"] if rows else "metric"
    summary = summarize(rows, grid)
    v = verdict(cfg.grid, summary, metric)
    floor = real_floor(cfg.dataset, cfg.eval_samples)
    v["text"] += f" (Two real samples of {cfg.eval_samples} score {floor:.4f}.)"
    v["real_floor"] = floor
    with (out / "summary.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    (out / "table.md").write_text(markdown(cfg, summary, v, metric, rows))
    meta = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)}, "metric": metric,
            "summary": summary, "verdict": v}
    (out / "sweep.json").write_text(json.dumps(meta, indent=1, default=list) + "\n")
    picture(cfg, summary, metric, out, floor)
    return {"rows": rows, "summary": summary, "verdict": v}


def picture(cfg: SweepConfig, summary: list[dict], metric: str, out: Path, floor: float) -> None:
    from ..plots import pyplot

    plt = pyplot()
    if cfg.grid == "kp":
        ks = sorted({s["k"] for s in summary})
        ps = sorted({s["p"] for s in summary})
        m = [[next(s["mean"] for s in summary if s["k"] == k and s["p"] == p) for p in ps] for k in ks]
        fig, ax = plt.subplots(figsize=(1.3 * len(ps) + 2, 1.0 * len(ks) + 1.5))
        im = ax.imshow(m, cmap="viridis_r")
        for i, row in enumerate(m):
            for j, val in enumerate(row):
                ax.text(j, i, "div." if not math.isfinite(val) else f"{val:.3f}", ha="center", va="center",
                        fontsize=8, color="white")
        ax.set_xticks(range(len(ps)), [num(p) for p in ps])
        ax.set_yticks(range(len(ks)), [num(k) for k in ks])
        ax.set_xlabel("p")
        ax.set_ylabel("k")
        fig.colorbar(im, ax=ax, label=f"{metric} (lower is better)")
        ax.set_title(f"WGAN-div k E||grad||^p on {cfg.dataset}", fontsize=9)
        name = "kp_heatmap.png"
    else:
        strategies = list(dict.fromkeys(s["sampling"] for s in summary))
        losses = [x for x in RX_LOSSES if any(s["loss"] == x for s in summary)]
        fig, ax = plt.subplots(figsize=(8, 3.8))
        width = 0.8 / len(losses)
        for i, loss in enumerate(losses):
            ss = [next(s for s in summary if s["loss"] == loss and s["sampling"] == st) for st in strategies]
            xs = [j + (i - (len(losses) - 1) / 2) * width for j in range(len(strategies))]
            ax.bar(xs, [s["mean"] if math.isfinite(s["mean"]) else 0 for s in ss], width,
                   yerr=[s["std"] if math.isfinite(s["std"]) else 0 for s in ss], capsize=3,
                   label=loss.removeprefix("wgan-").upper() if loss == "wgan-gp" else "div")
        ax.axhline(floor, color="gray", linestyle="--", linewidth=1, label="two real samples")
        ax.set_xticks(range(len(strategies)), strategies, fontsize=8)
        ax.set_ylabel(f"{metric} (lower is better)")
        ax.legend(fontsize=8)
        ax.set_title(f"r(x) under WGAN-div and WGAN-GP on {cfg.dataset}", fontsize=9)
        name = "rx_bars.png"
    fig.tight_layout()
    fig.savefig(out / name, dpi=100)
    plt.close(fig)


_DATASET_ORDER = {"8gaussians": 0, "25gaussians": 1, "swissroll": 2, "digits": 3}


def readme_block(out: Path, title: str, picture_prefix: str) -> str:
    """A README section for one committed sweep folder: its table, verdict and picture."""
    table = (out / "table.md").read_text().strip()
    pic = next((p.name for p in sorted(out.glob("*.png"))), None)
    lines = [f"#### {title}", "", table]
    if pic:
        lines += ["", f"![{title}]({picture_prefix}/{pic})"]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, folders: list[Path]) -> None:
    """Regenerates the README's sweep section (between ``<!-- sweep-tables:start -->`` and
    ``<!-- sweep-tables:end -->``) from sweep folders (each with its ``sweep.json``)."""
    root = readme.resolve().parent
    folders = sorted((f for f in folders if (f / "sweep.json").exists()),
                     key=lambda f: (_DATASET_ORDER.get(json.loads((f / "sweep.json").read_text())["config"]["dataset"], 9),
                                    json.loads((f / "sweep.json").read_text())["config"]["grid"]))
    text = readme.read_text()
    start, end = "<!-- sweep-tables:start -->", "<!-- sweep-tables:end -->"
    if start not in text or end not in text:
        raise ValueError(f"readme: {readme} has no {start} ... {end} markers")
    blocks = []
    for folder in folders:
        meta = json.loads((folder / "sweep.json").read_text())
        c = meta["config"]
        title = f"`sweep {c['grid']}` on {c['dataset']}"
        blocks.append(readme_block(folder, title, os.path.relpath(folder.resolve(), root)))
    body = "\n".join(blocks)
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{body}{end}{tail}")
