"""``runs.csv``: one row per finished run, appended (and flushed to disk) as each run ends; read
back with torn or malformed rows dropped, so a restarted sweep reruns exactly the runs missing."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

COLUMNS = ("grid", "dataset", "cell", "loss", "k", "p", "sampling", "seed", "status", "final_metric", "last_metric",
           "best_metric", "mean_metric", "metric", "curve", "steps", "wall_s", "steps_per_s", "backend", "device",
           "threads", "hidden", "lr", "batch_size", "eval_samples")


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


def append(path: Path, row: dict) -> None:
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            w.writeheader()
        w.writerow({k: row[k] for k in COLUMNS})
        f.flush()
        os.fsync(f.fileno())
