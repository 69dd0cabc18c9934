"""Running a sweep: the missing (cell, seed) runs in worker processes, each row appended to
``runs.csv`` as it finishes, then the report."""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path

from .grid import SweepConfig, check, train_config, cells
from .render import write_report
from .store import append, read_runs


def _run_one(job: tuple) -> dict:
    """One training run (in a worker process): the row of runs.csv."""
    cfg, cell, seed, threads = job
    import torch

    from ..trainer import Trainer, TrainingDiverged

    torch.set_num_threads(threads)
    tc = train_config(cfg, cell, seed)
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
    check(cfg)
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
            append(runs_csv, row)
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
