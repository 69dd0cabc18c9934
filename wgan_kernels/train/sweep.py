"""The WGAN-div paper's two ablations at toy scale (Wu et al., "Wasserstein Divergence for GANs",
2018), on the fused ops:

- ``kp``: WGAN-div's penalty ``k E||grad T||^p`` over a grid of k and p (the paper: k 2, p 6 best);
- ``rx``: the six sampling strategies r(x) of the penalty points, each under WGAN-div and WGAN-GP
  (the paper: under div they all do about equally well; under GP they differ more, and GP's best
  is worse than div's worst).

Every run trains the trainer's MLP GAN with the same settings (only the cell's parameters differ)
and is scored with the same metric on the same evaluation sample (the trainer's fixed evaluation
draw): exact W1 on the 2-D toys, sliced Wasserstein on digits; lower is better. Runs go to worker
processes; each finished run is appended to ``runs.csv`` at once, so a sweep started again runs
only the missing (cell, seed) pairs. A run whose loss becomes non-finite is recorded as diverged.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GRIDS = ("kp", "rx")
# The six r(x) of the paper's section 5 (DRAGAN's perturbed-real is not one of them).
RX_STRATEGIES = ("interpolate", "interpolate-within", "interpolate-mixed", "real+fake", "fake", "real")
RX_LOSSES = ("wgan-div", "wgan-gp")
KP_K = (0.5, 2.0, 10.0)
KP_P = (2.0, 4.0, 6.0, 8.0)
PAPER_KP = (2.0, 6.0)
COLUMNS = ("grid", "dataset", "cell", "loss", "k", "p", "sampling", "seed", "status", "final_metric", "last_metric",
           "best_metric", "mean_metric", "metric", "curve", "steps", "wall_s", "steps_per_s", "backend", "device",
           "threads", "hidden", "lr", "batch_size", "eval_samples")


@dataclass
class SweepConfig:
    grid: str = "rx"
    dataset: str = "8gaussians"
    seeds: int | None = None        # 3 (quick: 1)
    steps: int | None = None        # generator steps per run: 600 on the 2-D toys, 800 on digits (quick: 150)
    hidden: int = 128
    lr: float = 5e-4                # Adam for both losses; higher than the papers' 1e-4 so short runs converge
    batch_size: int | None = None   # the trainer's: 256 on 2-D data, 64 on digits
    eval_every: int | None = None   # steps // 10
    eval_samples: int = 1000
    k: tuple = KP_K
    p: tuple = KP_P
    strategies: tuple = RX_STRATEGIES
    losses: tuple = RX_LOSSES
    gp_weight: float | None = None  # the trainer's default (0.1 on 2-D data, 10 on digits)
    workers: int | None = None      # parallel runs; default: the CPU cores, at most 4
    backend: str = "fused"
    device: str = "cpu"
    out: str | None = None
    quick: bool = False
    progress: bool = True
    extra: dict = field(default_factory=dict)  # more TrainConfig fields for every run


def _check(cfg: SweepConfig) -> None:
    from .datasets import DATASETS
    from .trainer import BACKENDS

    if cfg.grid not in GRIDS:
        raise ValueError(f"grid: expected one of {GRIDS}, got {cfg.grid!r}")
    if cfg.dataset not in DATASETS:
        raise ValueError(f"dataset: expected one of {DATASETS}, got {cfg.dataset!r}")
    if cfg.backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {cfg.backend!r}")
    for name in ("seeds", "steps", "eval_every", "workers", "hidden", "eval_samples", "batch_size"):
        v = getattr(cfg, name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name}: expected an int >= 1, got {v!r}")
    if not cfg.k or any(not (math.isfinite(k) and k >= 0) for k in cfg.k):
        raise ValueError(f"k: expected finite numbers >= 0, got {cfg.k!r}")
    if not cfg.p or any(not (math.isfinite(p) and p > 1) for p in cfg.p):
        raise ValueError(f"p: expected finite numbers > 1, got {cfg.p!r}")
    bad = [s for s in cfg.strategies if s not in RX_STRATEGIES]
    if not cfg.strategies or bad:
        raise ValueError(f"strategies: expected some of {RX_STRATEGIES}, got {cfg.strategies!r}")
    bad = [x for x in cfg.losses if x not in RX_LOSSES]
    if not cfg.losses or bad:
        raise ValueError(f"losses: expected some of {RX_LOSSES}, got {cfg.losses!r}")
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr: expected a finite number > 0, got {cfg.lr!r}")


def _num(x: float) -> str:
    return f"{x:g}"


def cells(cfg: SweepConfig) -> list[dict]:
    """The grid's cells, in table order: dicts of the TrainConfig fields each one sets."""
    if cfg.grid == "kp":
        return [{"cell": f"k={_num(k)},p={_num(p)}", "loss": "wgan-div", "k": float(k), "p": float(p),
                 "sampling": "real+fake"} for k in cfg.k for p in cfg.p]
    out = []
    for loss in cfg.losses:
        for s in cfg.strategies:
            if loss == "wgan-div":
                k, p = PAPER_KP
            else:
                k, p = cfg.gp_weight, 2.0
            out.append({"cell": f"{loss.removeprefix('wgan-')}/{s}", "loss": loss, "k": k, "p": p, "sampling": s})
    return out


def _steps(cfg: SweepConfig) -> int:
    if cfg.steps is not None:
        return cfg.steps
    if cfg.quick:
        return 150
    return 800 if cfg.dataset == "digits" else 600


def _train_config(cfg: SweepConfig, cell: dict, seed: int):
    from .trainer import TrainConfig

    steps = _steps(cfg)
    tc = TrainConfig(loss=cell["loss"], dataset=cfg.dataset, backend=cfg.backend, steps=steps, hidden=cfg.hidden,
                     lr=cfg.lr, batch_size=cfg.batch_size, seed=seed,
                     eval_every=cfg.eval_every or max(1, steps // 10), eval_samples=cfg.eval_samples,
                     checkpoint_every=steps, device=cfg.device, out=None, progress=False,
                     penalty_weight=cell["k"], sampling=cell["sampling"])
    if cell["loss"] == "wgan-div":
        tc.div_p = cell["p"]
    for key, value in cfg.extra.items():
        if not hasattr(tc, key):
            raise ValueError(f"extra: {key!r} is not a TrainConfig field")
        setattr(tc, key, value)
    return tc


def _run_one(job: tuple) -> dict:
    """One training run (in a worker process): the row of runs.csv."""
    cfg, cell, seed, threads = job
    import torch

    from .trainer import Trainer, TrainingDiverged

    torch.set_num_threads(threads)
    tc = _train_config(cfg, cell, seed)
    trainer = Trainer(tc)
    status = "ok"
    start = time.perf_counter()
    try:
        trainer.fit()
    except TrainingDiverged:
        status = "diverged"
    wall = time.perf_counter() - start
    name = trainer.metric_name
    curve = [(e["step"], e[name]) for e in trainer.evals]
    values = [v for _, v in curve]
    nan = math.nan
    ok = status == "ok" and values
    return {
        "grid": cfg.grid, "dataset": cfg.dataset, "cell": cell["cell"], "loss": cell["loss"],
        "k": trainer.penalty_weight, "p": cell["p"], "sampling": cell["sampling"], "seed": seed, "status": status,
        # the final metric: mean of the last 3 evaluations (one evaluation is noisy)
        "final_metric": statistics.fmean(values[-3:]) if ok else nan,
        "last_metric": values[-1] if ok else nan,
        "best_metric": min(values) if values else nan,
        "mean_metric": statistics.fmean(values) if values else nan,
        "metric": name, "curve": ";".join(f"{s}:{v:.5f}" for s, v in curve),
        "steps": trainer.step, "wall_s": round(wall, 3),
        "steps_per_s": round(trainer.step / wall, 3) if wall > 0 else nan,
        "backend": tc.backend, "device": tc.device, "threads": threads, "hidden": tc.hidden, "lr": tc.lr,
        "batch_size": trainer.batch, "eval_samples": tc.eval_samples,
    }


_FLOATS = ("k", "p", "final_metric", "last_metric", "best_metric", "mean_metric", "wall_s", "steps_per_s", "lr")
_INTS = ("seed", "steps", "threads", "hidden", "batch_size", "eval_samples")


def _parse(raw: dict) -> dict:
    """A runs.csv row with its numbers; ValueError when a field is missing, extra or malformed."""
    if None in raw or any(raw.get(k) is None for k in COLUMNS):
        raise ValueError("wrong number of fields")
    row = dict(raw)
    for key in _FLOATS:
        row[key] = float(row[key]) if row[key] not in ("", "None") else math.nan
    for key in _INTS:
        row[key] = int(row[key])
    if row["status"] not in ("ok", "diverged"):
        raise ValueError(f"status {row['status']!r}")
    return row


def read_runs(path: Path, *, repair: bool = False) -> list[dict]:
    """The rows of ``runs.csv``. A torn last row (a run killed while appending: no final newline)
    or a malformed row is dropped with a warning, so its run counts as not done and runs again;
    ``repair=True`` also rewrites the file without them (atomically), before rows are appended."""
    if not path.exists():
        return []
    with path.open(newline="") as f:
        text = f.read()
    lines = text.splitlines(keepends=True)
    torn = bool(lines) and not lines[-1].endswith(("\n", "\r"))
    if torn:
        lines = lines[:-1]
    rows, kept, dropped = [], lines[:1], []
    header = next(csv.reader(lines[:1]), None)
    if header is not None and tuple(header) != COLUMNS:
        raise ValueError(f"out: {path} is not a runs.csv of this version (its columns differ); use another --out")
    for number, line in enumerate(lines[1:], start=2):
        try:
            raw = next(csv.DictReader(lines[:1] + [line]))
            rows.append(_parse(raw))
            kept.append(line)
        except (ValueError, StopIteration, csv.Error) as e:
            dropped.append(f"line {number} ({e})")
    if torn:
        dropped.append(f"line {len(lines) + 1} (torn: no end of line)")
    if dropped:
        import warnings

        warnings.warn(f"{path}: dropped {len(dropped)} malformed row(s), their runs will run again: "
                      f"{'; '.join(dropped)}", RuntimeWarning, stacklevel=2)
        if repair:
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text("".join(kept), newline="")
            os.replace(tmp, path)
    return rows


def _append(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: row[k] for k in COLUMNS})
        f.flush()
        os.fsync(f.fileno())


def sweep(cfg: SweepConfig | None = None, **overrides) -> dict:
    """Runs the grid (the missing runs only, when ``out`` already holds some), then writes the
    summary: ``runs.csv``, ``summary.csv``, ``table.md`` (means ± std and the verdict),
    ``sweep.json`` and the picture. Returns ``{"rows", "summary", "verdict", "ran"}``."""
    cfg = cfg or SweepConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"{k}: not a SweepConfig field")
        setattr(cfg, k, v)
    if cfg.seeds is None:
        cfg.seeds = 1 if cfg.quick else 3
    _check(cfg)
    out = Path(cfg.out or f"out/sweep-{cfg.grid}-{cfg.dataset}")
    out.mkdir(parents=True, exist_ok=True)
    runs_csv = out / "runs.csv"
    done = {(r["cell"], r["seed"]) for r in read_runs(runs_csv, repair=True)
            if r["grid"] == cfg.grid and r["dataset"] == cfg.dataset}
    grid = cells(cfg)
    todo = [(c, s) for c in grid for s in range(cfg.seeds) if (c["cell"], s) not in done]
    cores = os.cpu_count() or 1
    workers = min(cfg.workers or min(cores, 4), max(1, len(todo)))
    threads = max(1, cores // workers)
    jobs = [(cfg, c, s, threads) for c, s in todo]
    bar = None
    if cfg.progress and jobs:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), desc=f"sweep {cfg.grid} {cfg.dataset}", unit="run", dynamic_ncols=True)
    start = time.perf_counter()
    if workers == 1:
        results = map(_run_one, jobs)
        pool = None
    else:
        import multiprocessing as mp

        pool = mp.get_context("spawn").Pool(workers)
        results = pool.imap_unordered(_run_one, jobs)
    try:
        for row in results:
            _append(runs_csv, row)
            if bar:
                bar.set_postfix(last=f"{row['cell']} s{row['seed']}: {row['final_metric']:.3f}", refresh=False)
                bar.update(1)
    finally:
        if pool is not None:
            pool.terminate()
        if bar:
            bar.close()
    elapsed = time.perf_counter() - start
    rows = [r for r in read_runs(runs_csv) if r["grid"] == cfg.grid and r["dataset"] == cfg.dataset]
    report = write_report(cfg, rows, out, grid)
    report["ran"] = len(jobs)
    report["elapsed_s"] = elapsed
    return report


# ----------------------------------------------------------------------------- summary


def summarize(rows: list[dict], grid: list[dict]) -> list[dict]:
    """Per cell: mean ± std of the final metric over the seeds that finished, and the count of
    diverged runs (in grid order)."""
    out = []
    for c in grid:
        mine = [r for r in rows if r["cell"] == c["cell"]]
        ok = [r["final_metric"] for r in mine if r["status"] == "ok" and math.isfinite(r["final_metric"])]
        out.append({
            **{k: c[k] for k in ("cell", "loss", "k", "p", "sampling")},
            "runs": len(mine), "diverged": sum(r["status"] == "diverged" for r in mine),
            "mean": statistics.fmean(ok) if ok else math.nan,
            "std": statistics.stdev(ok) if len(ok) > 1 else math.nan,  # undefined for one seed
            "seeds_ok": len(ok),
            "steps_per_s": statistics.fmean([r["steps_per_s"] for r in mine]) if mine else math.nan,
        })
    return out


def _finite(summary):
    return [s for s in summary if math.isfinite(s["mean"])]


def verdict(grid_name: str, summary: list[dict], metric: str) -> dict:
    """The best cell, and whether the paper's claims hold here, with the numbers."""
    live = _finite(summary)
    if not live:
        return {"best": None, "text": "every run diverged: no verdict"}
    best = min(live, key=lambda s: s["mean"])
    lines = [f"Best cell: {best['cell']} ({metric} {_fmt(best)})."]
    result = {"best": best["cell"]}
    if grid_name == "kp":
        ranked = sorted(live, key=lambda s: s["mean"])
        paper = next((s for s in live if (s["k"], s["p"]) == PAPER_KP), None)
        if paper is None:
            lines.append("The paper's k=2, p=6 is not in this grid.")
        else:
            rank = ranked.index(paper) + 1
            holds = rank == 1
            within = paper["mean"] - best["mean"] <= max(paper["std"], best["std"])  # False for one seed
            result.update(paper_rank=rank, paper_best=holds, paper_within_one_std=within)
            lines.append(f"The paper's choice k=2, p=6 ranks {rank} of {len(ranked)} ({metric} {_fmt(paper)}): "
                         "the paper's claim (best) "
                         + ("holds." if holds else ("does not hold, though it is within one std of the best."
                                                    if within else "does not hold.")))
        by_p = {}
        for s in live:
            by_p.setdefault(s["p"], []).append(s["mean"])
        means = ", ".join(f"p={_num(p)}: {statistics.fmean(v):.4f}" for p, v in sorted(by_p.items()))
        lines.append(f"Mean over k per p: {means}.")
    else:
        per = {}
        for loss in RX_LOSSES:
            ms = [s for s in live if s["loss"] == loss]
            if ms:
                lo, hi = min(ms, key=lambda s: s["mean"]), max(ms, key=lambda s: s["mean"])
                per[loss] = {"best": lo, "worst": hi, "spread": hi["mean"] - lo["mean"],
                             "rel_spread": (hi["mean"] - lo["mean"]) / lo["mean"]}
                lines.append(f"{loss}: best {lo['sampling']} {lo['mean']:.4f}, worst {hi['sampling']} "
                             f"{hi['mean']:.4f}, spread {hi['mean'] - lo['mean']:.4f} "
                             f"({100 * per[loss]['rel_spread']:.0f}% of the best).")
        if len(per) == 2:
            div, gp = per["wgan-div"], per["wgan-gp"]
            c1 = div["spread"] < gp["spread"]
            c2 = gp["best"]["mean"] > div["worst"]["mean"]
            result.update(div_spread=div["spread"], gp_spread=gp["spread"], claim_spread=c1, claim_gp_best_worse=c2)
            noise = statistics.fmean([s["std"] for s in live if math.isfinite(s["std"])] or [math.nan])
            lines.append("Claim 1 (r(x) matters less under div than under GP): "
                         + ("holds" if c1 else "does not hold")
                         + f" (spread {div['spread']:.4f} under div vs {gp['spread']:.4f} under GP; "
                         f"the seeds' std per cell is {noise:.4f} on average).")
            lines.append("Claim 2 (GP's best is worse than div's worst): "
                         + ("holds" if c2 else "does not hold")
                         + f" (GP best {gp['best']['mean']:.4f} vs div worst {div['worst']['mean']:.4f}).")
    diverged = sum(s["diverged"] for s in summary)
    if diverged:
        lines.append(f"{diverged} run(s) diverged (non-finite loss); they are in runs.csv and left out of the means.")
    result["text"] = " ".join(lines)
    return result


def _markdown(cfg: SweepConfig, summary: list[dict], verdict_: dict, metric: str, rows: list[dict]) -> str:
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
        lines.append("| k \\ p | " + " | ".join(_num(p) for p in ps) + " |")
        lines.append("|---" * (len(ps) + 1) + "|")
        for k in ks:
            cellstr = []
            for p in ps:
                s = next(s for s in summary if s["k"] == k and s["p"] == p)
                cellstr.append(_fmt(s))
            lines.append(f"| {_num(k)} | " + " | ".join(cellstr) + " |")
    else:
        losses = [x for x in RX_LOSSES if any(s["loss"] == x for s in summary)]
        lines.append("| r(x) | " + " | ".join(losses) + " |")
        lines.append("|---" * (len(losses) + 1) + "|")
        for strat in dict.fromkeys(s["sampling"] for s in summary):
            cellstr = [_fmt(next(s for s in summary if s["loss"] == x and s["sampling"] == strat)) for x in losses]
            lines.append(f"| {strat} | " + " | ".join(cellstr) + " |")
    lines += ["", verdict_["text"], ""]
    return "\n".join(lines)


def _fmt(s: dict) -> str:
    if not math.isfinite(s["mean"]):
        return f"diverged ({s['diverged']}/{s['runs']})"
    text = f"{s['mean']:.4f} ± {s['std']:.4f}" if s["seeds_ok"] > 1 else f"{s['mean']:.4f}"
    return text + (f" ({s['diverged']} diverged)" if s["diverged"] else "")


def real_floor(dataset: str, samples: int) -> float:
    """The metric between two independent real samples of the evaluation size: what a perfect
    generator would score."""
    import torch

    from .datasets import load
    from .metrics import metric_for

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
    (out / "table.md").write_text(_markdown(cfg, summary, v, metric, rows))
    meta = {"config": {k: v for k, v in asdict(cfg).items() if k not in ("progress",)}, "metric": metric,
            "summary": summary, "verdict": v}
    (out / "sweep.json").write_text(json.dumps(meta, indent=1, default=list) + "\n")
    _picture(cfg, summary, metric, out, floor)
    return {"rows": rows, "summary": summary, "verdict": v}


def _picture(cfg: SweepConfig, summary: list[dict], metric: str, out: Path, floor: float) -> None:
    from .plots import _plt

    plt = _plt()
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
        ax.set_xticks(range(len(ps)), [_num(p) for p in ps])
        ax.set_yticks(range(len(ks)), [_num(k) for k in ks])
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
