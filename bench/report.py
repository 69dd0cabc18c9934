"""Turns pytest-benchmark JSON into the committed results file and the README's tables.

    python bench/report.py RAW.json [RAW2.json ...]     # merge into bench/results/<device>.json
    python bench/report.py --readme                     # regenerate README tables only

A results file holds one row per (suite, case): the median of every implementation, the ratio
to the eager baseline, the copy-bandwidth fraction where it applies, and the target from
../shared/TARGETS.md with whether it is met. Rows of suites not in the new raw files are kept.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE.parent / "README.md"
sys.path.insert(0, str(HERE.parent))

# suite -> the eager baseline implementation; the targets (TARGETS.md) per device type.
BASELINES = {"clip_": "loop", "ClippedRMSprop": "eager", "critic-step-div": "eager", "critic-step-gp": "eager",
             "SN power iteration": "torch", "SN critic forward": "torch", "SN critic step": "torch",
             "train-step": "eager"}
OURS = ("wgan_kernels", "explicit", "explicit+compile", "traced")  # the best of these is compared
# floor = factor x this impl: 2 x a plain forward + backward (penalty steps; the faster of
# "plain" and "plain-nhwc", the conv critics in channels_last), a forward without spectral norm
# (SN critic forward); floor43 = 4/3 x a plain step (the explicit path's 4 products per layer
# against its 3: the penalty-step target of TARGETS.md)
FLOOR_IMPL = {"plain": 2.0, "no-sn": 1.0}
FLOOR43_IMPL = {"plain": 4.0 / 3.0}
TARGETS = {
    "cpu": {
        ("clip_", "50x64x64"): {"ratio": 8.0},
        ("clip_", "dcgan64"): {"ratio": 1.0},
        ("ClippedRMSprop", "mlp50"): {"ratio": 2.5},
        ("ClippedRMSprop", "dcgan64"): {"ratio": 2.0, "bandwidth": 0.6},
        ("critic-step-div", "mlp512-b256"): {"ratio": 1.05, "floor43": 1.1, "memory": 1.0},
        ("critic-step-div", "mlp128-b64"): {"ratio": 1.3, "memory": 1.0},
        ("critic-step-div", "dcgan64-b64"): {"ratio": 1.05, "floor43": 1.1, "memory": 1.0},
        ("critic-step-div", "resnet32-b64"): {"floor43": 1.1},
        ("critic-step-div", "dcgan64-custom-b64"): {"ratio": 1.2, "floor43": 1.1},
        ("critic-step-div", "resnet32-custom-b64"): {"ratio": 1.2, "floor43": 1.1},
        ("SN power iteration", "dcgan64"): {"ratio": 2.0},
        ("SN critic forward", "dcgan64-b1"): {"ratio": 1.5, "floor": 1.15},
        ("SN critic forward", "resnet32-b1"): {"ratio": 1.5},
        ("SN critic step", "dcgan64-b64"): {"ratio": 1.1},
        ("SN critic step", "resnet32-b64"): {"ratio": 1.1},
        # whole generator steps of the image trainer (5 critic steps + 1 generator step)
        ("train-step", "wgan-div/dcgan32-b64"): {"ratio": 1.4, "memory": 1.0},
        ("train-step", "wgan-gp/dcgan32-b64"): {"ratio": 1.4, "memory": 1.0},
        ("train-step", "wgan-div/resnet32-b64"): {"ratio": 1.5, "memory": 1.0},
        ("train-step", "wgan-gp/resnet32-b64"): {"ratio": 1.5, "memory": 1.0},
    },
    "cuda": {
        ("clip_", "dcgan64"): {"ratio": 10.0},
        ("clip_", "wide100m"): {"bandwidth": 0.8},
        ("ClippedRMSprop", "mlp50"): {"ratio": 2.0},
        ("ClippedRMSprop", "dcgan64"): {"ratio": 2.0},
        ("ClippedRMSprop", "wide100m"): {"ratio": 2.0},
        ("critic-step-div", "mlp512-b256"): {"ratio": 10.0},
        ("critic-step-div", "dcgan64-b64"): {"ratio": 2.0},
        ("critic-step-gp", "dcgan64-b64"): {"ratio": 2.0},
        ("critic-step-div", "resnet32-b64"): {"ratio": 2.0},
        ("critic-step-gp", "resnet32-b64"): {"ratio": 2.0},
        ("SN power iteration", "dcgan64"): {"ratio": 5.0, "bandwidth": 0.7},
        ("SN power iteration", "resnet32"): {"ratio": 5.0, "bandwidth": 0.7},
    },
}


def _meets(row: dict, key: str, bound: float) -> bool:
    if key == "ratio":
        return row.get("ratio", 0) >= bound
    if key == "bandwidth":
        return row.get("bandwidth_fraction", 0) >= bound
    if key == "floor":
        return row.get("over_floor", float("inf")) <= bound
    if key == "floor43":
        return row.get("over_floor43", float("inf")) <= bound
    if key == "memory":
        return row.get("memory_ratio", float("inf")) <= bound
    raise KeyError(key)


def _target_text(t: dict) -> str:
    words = {"ratio": ">= {:g}x", "bandwidth": ">= {:.0%} of copy", "floor": "<= {:g}x floor",
             "floor43": "<= {:g}x 4/3 floor",
             "memory": "peak mem <= {:g}x eager"}
    return ", ".join(words[k].format(v) for k, v in t.items())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def device_label(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()}, {torch.get_num_threads()} threads"


def slug(device_type: str, label: str) -> str:
    if device_type == "cpu":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")


def summarize(raw: dict) -> tuple[str, list[dict]]:
    """Rows of one raw pytest-benchmark file, grouped by (suite, case)."""
    groups: dict[tuple[str, str], dict] = {}
    device = None
    overrides = {}
    for b in raw["benchmarks"]:
        x = b["extra_info"]
        device = x["device"]
        g = groups.setdefault((x["suite"], x["case"]), {"suite": x["suite"], "case": x["case"], "numel": x["numel"],
                                                          "tensors": x["tensors"], "median_s": {}, "bytes": {},
                                                          "peak_bytes": {}})
        if x["impl"] == "interleaved":  # round-robin medians: they replace the one-after-another ones
            overrides[(x["suite"], x["case"])] = x["interleaved_median_s"]
            if x.get("warm_calls") and "interleaved_minor_faults" in x:  # (faults matter where they were looked at)
                g["minor_faults"] = x["interleaved_minor_faults"]
            continue
        g["median_s"][x["impl"]] = b["stats"]["median"]
        g["bytes"][x["impl"]] = x["bytes"]
        if "peak_bytes" in x:
            g["peak_bytes"][x["impl"]] = x["peak_bytes"]
    for key, medians in overrides.items():
        groups[key]["median_s"].update(medians)
        groups[key]["interleaved"] = True
    return device, list(groups.values())


def derive(g: dict, device_type: str) -> dict:
    """The figures computed from a row's per-impl medians: best variant, ratio, bandwidth,
    floor, memory, target and whether it is met."""
    g = {k: g[k] for k in ("suite", "case", "numel", "tensors", "median_s", "bytes", "peak_bytes")} | (
        {"interleaved": True} if g.get("interleaved") else {}) | (
        {"minor_faults": g["minor_faults"]} if "minor_faults" in g else {})
    suite, case, med = g["suite"], g["case"], g["median_s"]
    base = BASELINES[suite]
    ours = [i for i in OURS if i in med]
    if ours:
        best = min(ours, key=med.get)
        g["best"] = best
        if base in med:
            g["ratio"] = med[base] / med[best]
        if "copy" in med:
            copy_bw = g["bytes"]["copy"] / med["copy"]
            g["bandwidth_GBs"] = g["bytes"][best] / med[best] / 1e9
            g["copy_GBs"] = copy_bw / 1e9
            g["bandwidth_fraction"] = g["bytes"][best] / med[best] / copy_bw
        plain = {i: med[i] for i in ("plain", "plain-nhwc") if i in med}  # the faster layout's plain step
        floor_med = dict(med, plain=min(plain.values())) if plain else med
        for impl, factor in FLOOR_IMPL.items():
            if impl in floor_med:
                g["floor_s"] = factor * floor_med[impl]
                g["over_floor"] = med[best] / g["floor_s"]
        for impl, factor in FLOOR43_IMPL.items():
            if impl in floor_med and suite.startswith("critic-step"):
                g["floor43_s"] = factor * floor_med[impl]
                g["over_floor43"] = med[best] / g["floor43_s"]
        if best in g["peak_bytes"] and g["peak_bytes"].get(base):
            g["memory_ratio"] = g["peak_bytes"][best] / g["peak_bytes"][base]
    target = TARGETS.get(device_type, {}).get((suite, case))
    if target:
        g["target"] = target
        g["met"] = all(_meets(g, k, v) for k, v in target.items())
    return g


def merge(raw_paths: list[Path], out_dir: Path = RESULTS) -> Path:
    """Merges new measurements into the device's results file: per (suite, case), the new
    implementations' figures replace the old ones of the same implementation, others are kept
    (so a rerun of some cases updates just those)."""
    from wgan_kernels.info import collect

    new_rows: list[dict] = []
    device = None
    for p in raw_paths:
        device, rows = summarize(json.loads(p.read_text()))
        new_rows += rows
    device_type = device.split(":")[0]
    label = device_label(device)
    out = out_dir / f"{slug(device_type, label)}.json"
    old = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = {(r["suite"], r["case"]): r for r in old["rows"]}
    for r in new_rows:
        key = (r["suite"], r["case"])
        if key in rows:
            for field in ("median_s", "bytes", "peak_bytes"):
                rows[key][field] = {**rows[key].get(field, {}), **r[field]}
            rows[key]["interleaved"] = r.get("interleaved", False)
            if "minor_faults" in r:
                rows[key]["minor_faults"] = r["minor_faults"]
            else:
                rows[key].pop("minor_faults", None)
        else:
            rows[key] = r
    info = collect()
    doc = {
        "device": label,
        "device_type": device_type,
        "versions": {k: info[k] for k in ("wgan_kernels", "python", "torch", "torch_cuda", "triton")},
        "rows": [derive(r, device_type) for r in rows.values()],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    chart(doc, out.with_suffix(".png"))
    return out


def chart(doc: dict, path: Path) -> None:
    """Bar chart of every row's ratio (eager / best wgan_kernels variant, log scale), with its
    ratio target marked: green bars meet it, red ones miss it, grey ones have none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in doc["rows"] if "ratio" in r]
    if not rows:
        return
    labels = [f"{r['suite']} {r['case']}" for r in rows]
    ratios = [r["ratio"] for r in rows]
    colors = ["grey" if "target" not in r else ("tab:green" if r["met"] else "tab:red") for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.2))
    ys = range(len(rows))
    ax.barh(ys, ratios, color=colors)
    for y, r in zip(ys, rows):
        t = r.get("target", {}).get("ratio")
        if t:
            ax.plot([t, t], [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text(r["ratio"], y, f" {r['ratio']:.2f}x", va="center", fontsize=7)
    ax.axvline(1.0, color="black", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up over eager PyTorch (black tick: target; green met, red missed)")
    ax.set_title(f"wgan_kernels on {doc['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3f}" if s < 1 else f"{s * 1e3:.0f}"


def tables(paths=None) -> str:
    parts = []
    for path in paths if paths is not None else sorted(RESULTS.glob("*.json")):
        # kernels-sm*.json: wgan_kernels/kernel_report.py's tables; quality-*.json: bench/quality.py's runs
        if path.name.startswith(("raw", "kernels-", "quality-")):
            continue
        doc = json.loads(path.read_text())
        v = doc["versions"]
        where = f"bench/results/{path.name}" if path.resolve().parent == RESULTS.resolve() else str(path)
        parts.append(f"**{doc['device']}** (torch {v['torch']}, triton {v['triton']}; from "
                     f"`{where}`). Times are medians in ms; ratio = eager baseline / the "
                     "best wgan_kernels variant.\n")
        by_suite: dict[str, list[dict]] = {}
        for r in doc["rows"]:
            by_suite.setdefault(r["suite"], []).append(r)
        for suite, rows in by_suite.items():
            impls = [i for i in ("loop", "eager", "torch", "foreach", *OURS) if any(i in r["median_s"] for r in rows)]
            has_floor = any("floor_s" in r for r in rows)
            has_bw = any("bandwidth_GBs" in r for r in rows)
            has_mem = any("memory_ratio" in r for r in rows)
            faulted = [i for i in ("loop", "eager", "torch", *OURS, "no-sn") if any(i in r.get("minor_faults", {}) for r in rows)]
            head = ["case", *impls, "ratio (best)"]
            floor_name = "floor (no-SN forward)" if any("no-sn" in r["median_s"] for r in rows) else "floor (2x fwd+bwd)"
            head += [floor_name, "best / floor"] if has_floor else []
            has_floor43 = any("floor43_s" in r for r in rows)
            head += ["4/3 floor", "best / 4/3 floor"] if has_floor43 else []
            head += ["GB/s (copy GB/s)"] if has_bw else []
            head += ["peak MB eager -> best"] if has_mem else []
            head += [f"page faults / call ({' / '.join(faulted)})"] if faulted else []
            head += ["target", "met"]
            lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
            for r in rows:
                t = r.get("target", {})
                label = f"{suite} {r['case']}" + (" (interleaved)" if r.get("interleaved") else "")
                cells = [label, *[_ms(r["median_s"].get(i)) for i in impls],
                         f"{r['ratio']:.2f}x ({r['best']})" if "ratio" in r else "-"]
                if has_floor:
                    cells += [_ms(r.get("floor_s")), f"{r['over_floor']:.2f}" if "over_floor" in r else "-"]
                if has_floor43:
                    cells += [_ms(r.get("floor43_s")), f"{r['over_floor43']:.2f}" if "over_floor43" in r else "-"]
                if has_bw:
                    cells.append(f"{r['bandwidth_GBs']:.1f} ({r['copy_GBs']:.1f})" if "bandwidth_GBs" in r else "-")
                if has_mem:
                    pb = r["peak_bytes"]
                    cells.append(f"{pb[BASELINES[suite]] / 2**20:.1f} -> {pb[r['best']] / 2**20:.1f}"
                                 if "memory_ratio" in r else "-")
                if faulted:
                    mf = r.get("minor_faults", {})
                    cells.append(" / ".join(str(mf[i]) if i in mf else "-" for i in faulted) if mf else "-")
                cells += [_target_text(t) or "-", "" if not t else ("yes" if r["met"] else "**no**")]
                lines.append(f"| {' | '.join(cells)} |")
            parts.append("\n".join(lines) + "\n")
        png = path.with_suffix(".png")
        if png.exists():
            rel = f"bench/results/{png.name}" if png.resolve().parent == RESULTS.resolve() else str(png)
            parts.append(f"![speed-ups on {doc['device']}]({rel})\n")
    return "\n".join(parts)


def update_readme() -> None:
    text = README.read_text()
    start, end = "<!-- bench-tables:start -->", "<!-- bench-tables:end -->"
    if start not in text:
        raise SystemExit(f"README.md has no {start} marker")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    README.write_text(f"{head}{start}\n<!-- generated by bench/report.py from bench/results/*.json -->\n\n"
                      f"{tables()}\n{end}{tail}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("raw", nargs="*", type=Path, help="pytest-benchmark --benchmark-json files")
    ap.add_argument("--readme", action="store_true", help="only regenerate the README tables")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default bench/results)")
    ap.add_argument("--print", action="store_true", help="print the merged results as a table")
    args = ap.parse_args(argv)
    if args.raw:
        out = merge(args.raw, args.out)
        print(f"wrote {out}")
        if args.print:
            print(tables([out]))
    if args.out.resolve() == RESULTS.resolve():
        update_readme()
        print(f"updated {README}")


if __name__ == "__main__":
    main()
