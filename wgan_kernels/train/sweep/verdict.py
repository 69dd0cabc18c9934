"""Per-cell means over seeds, and the verdict: the best cell and whether the paper's claims hold
here, with the numbers."""

from __future__ import annotations

import math
import statistics

from .grid import PAPER_KP, RX_LOSSES, num


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


def finite(summary):
    return [s for s in summary if math.isfinite(s["mean"])]


def verdict(grid_name: str, summary: list[dict], metric: str) -> dict:
    """The best cell, and whether the paper's claims hold here, with the numbers."""
    live = finite(summary)
    if not live:
        return {"best": None, "text": "every run diverged: no verdict"}
    best = min(live, key=lambda s: s["mean"])
    lines = [f"Best cell: {best['cell']} ({metric} {fmt_cell(best)})."]
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
            lines.append(f"The paper's choice k=2, p=6 ranks {rank} of {len(ranked)} ({metric} {fmt_cell(paper)}): "
                         "the paper's claim (best) "
                         + ("holds." if holds else ("does not hold, though it is within one std of the best."
                                                    if within else "does not hold.")))
        by_p = {}
        for s in live:
            by_p.setdefault(s["p"], []).append(s["mean"])
        means = ", ".join(f"p={num(p)}: {statistics.fmean(v):.4f}" for p, v in sorted(by_p.items()))
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


def fmt_cell(s: dict) -> str:
    if not math.isfinite(s["mean"]):
        return f"diverged ({s['diverged']}/{s['runs']})"
    text = f"{s['mean']:.4f} ± {s['std']:.4f}" if s["seeds_ok"] > 1 else f"{s['mean']:.4f}"
    return text + (f" ({s['diverged']} diverged)" if s["diverged"] else "")
