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

# (suite, case) -> the eager baseline implementation, and the targets (TARGETS.md) per device type.
BASELINES = {"clip_": "loop", "ClippedRMSprop": "eager"}
OURS = "wgan_kernels"
TARGETS = {
    "cpu": {
        ("clip_", "50x64x64"): {"ratio": 8.0},
        ("clip_", "dcgan64"): {"ratio": 1.0},
        ("ClippedRMSprop", "mlp50"): {"ratio": 2.5},
        ("ClippedRMSprop", "dcgan64"): {"ratio": 2.0, "bandwidth": 0.6},
    },
    "cuda": {
        ("clip_", "dcgan64"): {"ratio": 10.0},
        ("clip_", "wide100m"): {"bandwidth": 0.8},
        ("ClippedRMSprop", "mlp50"): {"ratio": 2.0},
        ("ClippedRMSprop", "dcgan64"): {"ratio": 2.0},
        ("ClippedRMSprop", "wide100m"): {"ratio": 2.0},
    },
}


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
    for b in raw["benchmarks"]:
        x = b["extra_info"]
        device = x["device"]
        g = groups.setdefault((x["suite"], x["case"]), {"suite": x["suite"], "case": x["case"], "numel": x["numel"],
                                                          "tensors": x["tensors"], "median_s": {}, "bytes": {}})
        g["median_s"][x["impl"]] = b["stats"]["median"]
        g["bytes"][x["impl"]] = x["bytes"]
    device_type = device.split(":")[0]
    rows = []
    for (suite, case), g in groups.items():
        med = g["median_s"]
        base = BASELINES[suite]
        if OURS in med and base in med:
            g["ratio"] = med[base] / med[OURS]
        if OURS in med and "copy" in med:
            copy_bw = g["bytes"]["copy"] / med["copy"]
            g["bandwidth_GBs"] = g["bytes"][OURS] / med[OURS] / 1e9
            g["copy_GBs"] = copy_bw / 1e9
            g["bandwidth_fraction"] = g["bytes"][OURS] / med[OURS] / copy_bw
        target = TARGETS.get(device_type, {}).get((suite, case))
        if target:
            g["target"] = target
            g["met"] = all(g.get("ratio" if k == "ratio" else "bandwidth_fraction", 0) >= v for k, v in target.items())
        rows.append(g)
    return device, rows


def merge(raw_paths: list[Path]) -> Path:
    from wgan_kernels.info import collect

    new_rows: list[dict] = []
    device = None
    for p in raw_paths:
        device, rows = summarize(json.loads(p.read_text()))
        new_rows += rows
    label = device_label(device)
    out = RESULTS / f"{slug(device.split(':')[0], label)}.json"
    old = json.loads(out.read_text()) if out.exists() else {"rows": []}
    suites = {r["suite"] for r in new_rows}
    info = collect()
    doc = {
        "device": label,
        "device_type": device.split(":")[0],
        "versions": {k: info[k] for k in ("wgan_kernels", "python", "torch", "torch_cuda", "triton")},
        "rows": [r for r in old["rows"] if r["suite"] not in suites] + new_rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    return out


def _ms(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1e3:.3f}" if s < 1 else f"{s * 1e3:.0f}"


def tables() -> str:
    parts = []
    for path in sorted(RESULTS.glob("*.json")):
        if path.name.startswith("raw"):
            continue
        doc = json.loads(path.read_text())
        v = doc["versions"]
        parts.append(f"**{doc['device']}** (torch {v['torch']}, triton {v['triton']}; from "
                     f"`bench/results/{path.name}`). Times are medians in ms; ratio = eager / wgan_kernels.\n")
        by_suite: dict[str, list[dict]] = {}
        for r in doc["rows"]:
            by_suite.setdefault(r["suite"], []).append(r)
        for suite, rows in by_suite.items():
            impls = [i for i in ("loop", "eager", "foreach", OURS) if any(i in r["median_s"] for r in rows)]
            head = ["case", "values", *impls, "ratio", "GB/s (copy GB/s)", "target", "met"]
            lines = [f"| {' | '.join(head)} |", "|" + "---|" * len(head)]
            for r in rows:
                t = r.get("target", {})
                target = ", ".join(f">= {v:g}x" if k == "ratio" else f">= {v:.0%} of copy" for k, v in t.items())
                bw = f"{r['bandwidth_GBs']:.1f} ({r['copy_GBs']:.1f})" if "bandwidth_GBs" in r else "-"
                met = "" if not t else ("yes" if r["met"] else "**no**")
                cells = [f"{suite} {r['case']}", f"{r['numel']:,}", *[_ms(r["median_s"].get(i)) for i in impls],
                         f"{r['ratio']:.2f}x" if "ratio" in r else "-", bw, target or "-", met]
                lines.append(f"| {' | '.join(cells)} |")
            parts.append("\n".join(lines) + "\n")
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
    args = ap.parse_args(argv)
    if args.raw:
        print(f"wrote {merge(args.raw)}")
    update_readme()
    print(f"updated {README}")


if __name__ == "__main__":
    main()
