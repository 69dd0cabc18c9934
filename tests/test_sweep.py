"""`wgan-kernels sweep`: every cell runs and writes its row, resume runs only the missing cells,
diverged runs are recorded, the metric is computed alike for every cell, the verdict's logic."""

import csv
import math

import pytest
import torch

from wgan_kernels.cli import main
from wgan_kernels.train import DATASETS
from wgan_kernels.train.datasets import TOY
from wgan_kernels.train.sweep import RX_STRATEGIES, SweepConfig, cells, read_runs, sweep, train_config, verdict
from wgan_kernels.train.trainer import Trainer

TINY = dict(seeds=1, steps=2, workers=1, eval_every=1, eval_samples=64, hidden=16, progress=False)


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("grid", ["kp", "rx"])
def test_every_cell_runs_and_writes_its_row(tmp_path, grid, dataset):
    report = sweep(grid=grid, dataset=dataset, out=str(tmp_path), **TINY)
    expected = cells(SweepConfig(grid=grid, dataset=dataset))
    assert len(expected) == (12 if grid == "kp" else 2 * len(RX_STRATEGIES))
    rows = read_runs(tmp_path / "runs.csv")
    assert sorted(r["cell"] for r in rows) == sorted(c["cell"] for c in expected)
    assert report["ran"] == len(expected)
    for r in rows:
        assert r["status"] == "ok" and r["steps"] == 2 and math.isfinite(r["final_metric"]) and r["final_metric"] > 0
        assert r["metric"] == ("w1" if dataset in TOY else "sliced_w")
        assert len(r["curve"].split(";")) == 2  # one evaluation per step
    if grid == "rx":  # each row ran with its own r(x) and loss
        assert {(r["loss"], r["sampling"]) for r in rows} == {(lo, s) for lo in ("wgan-div", "wgan-gp")
                                                              for s in RX_STRATEGIES}
    else:
        assert {(r["k"], r["p"]) for r in rows} == {(k, p) for k in (0.5, 2.0, 10.0) for p in (2.0, 4.0, 6.0, 8.0)}
    for name in ("summary.csv", "table.md", "sweep.json", "kp_heatmap.png" if grid == "kp" else "rx_bars.png"):
        assert (tmp_path / name).stat().st_size > 0
    table = (tmp_path / "table.md").read_text()
    assert "Best cell:" in table and "Two real samples" in table


def test_resume_runs_only_the_missing_cells_in_worker_processes(tmp_path):
    kw = dict(TINY, grid="kp", dataset="8gaussians", k=(2.0,), out=str(tmp_path))
    first = sweep(**dict(kw, p=(2.0, 6.0)))
    assert first["ran"] == 2
    before = {(r["cell"], r["seed"]): r["curve"] for r in read_runs(tmp_path / "runs.csv")}
    second = sweep(**dict(kw, p=(2.0, 4.0, 6.0), seeds=2, workers=2))  # the pool path
    assert second["ran"] == 4  # (p=4, seed 0), and seed 1 of all three
    rows = read_runs(tmp_path / "runs.csv")
    assert len(rows) == 6 and len({(r["cell"], r["seed"]) for r in rows}) == 6
    for key, curve in before.items():  # the finished runs were kept as they were
        assert [r["curve"] for r in rows if (r["cell"], r["seed"]) == key] == [curve]
    again = sweep(**dict(kw, p=(2.0, 4.0, 6.0), seeds=2))
    assert again["ran"] == 0
    # a run is deterministic given its cell and seed: seed 0 of p=2 again in a fresh folder
    fresh = sweep(**dict(kw, p=(2.0,), out=str(tmp_path / "fresh")))
    assert fresh["rows"][0]["curve"] == before[("k=2,p=2", 0)]


def test_a_diverged_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    # lr 1e6 blows the critic up within the first steps; the other cell's lr is the same, so give
    # it the safe default through a second sweep into the same folder
    report = sweep(**dict(TINY, grid="kp", dataset="8gaussians", k=(2.0,), p=(2.0, 6.0), steps=20, lr=1e6,
                          out=str(tmp_path)))
    rows = read_runs(tmp_path / "runs.csv")
    assert len(rows) == 2 and all(r["status"] == "diverged" for r in rows)
    assert all(math.isnan(r["final_metric"]) for r in rows)
    assert report["summary"][0]["diverged"] == 1
    assert "diverged" in (tmp_path / "table.md").read_text()
    report = sweep(**dict(TINY, grid="kp", dataset="8gaussians", k=(2.0, 0.5), p=(2.0, 6.0), out=str(tmp_path)))
    assert report["ran"] == 2  # the k=0.5 cells; the diverged ones count as done
    statuses = {r["cell"]: r["status"] for r in read_runs(tmp_path / "runs.csv")}
    assert statuses == {"k=2,p=2": "diverged", "k=2,p=6": "diverged", "k=0.5,p=2": "ok", "k=0.5,p=6": "ok"}
    assert report["verdict"]["best"].startswith("k=0.5")


def test_every_cell_is_scored_on_the_same_evaluation_sample():
    cfg = SweepConfig(grid="rx", dataset="25gaussians", hidden=16, eval_samples=128)
    trainers = [Trainer(train_config(cfg, c, seed)) for c in cells(cfg)[::5] for seed in (0, 1)]
    for t in trainers[1:]:
        assert torch.equal(t.eval_real, trainers[0].eval_real)
        assert torch.equal(t.eval_z, trainers[0].eval_z)
        assert t.metric_fn is trainers[0].metric_fn


def _cell(loss, sampling, mean, k=None, p=None):
    return {"cell": f"{loss}/{sampling}", "loss": loss, "k": k, "p": p, "sampling": sampling, "runs": 3,
            "diverged": 0, "mean": mean, "std": 0.01, "seeds_ok": 3, "steps_per_s": 1.0}


def test_verdict_states_the_papers_claims_with_numbers():
    div = [_cell("wgan-div", s, 0.20 + 0.001 * i) for i, s in enumerate(RX_STRATEGIES)]
    gp = [_cell("wgan-gp", s, 0.25 + 0.02 * i) for i, s in enumerate(RX_STRATEGIES)]
    v = verdict("rx", div + gp, "w1")
    assert v["claim_spread"] and v["claim_gp_best_worse"] and v["best"] == "wgan-div/interpolate"
    assert "0.2050" in v["text"] and "does not hold" not in v["text"]
    gp_good = [_cell("wgan-gp", s, 0.19) for s in RX_STRATEGIES]
    v = verdict("rx", div + gp_good, "w1")
    assert not v["claim_spread"] and not v["claim_gp_best_worse"] and v["text"].count("does not hold") == 2
    kp = [_cell("wgan-div", "real+fake", m, k=k, p=p)
          for (k, p), m in {(2.0, 6.0): 0.3, (2.0, 2.0): 0.2, (0.5, 6.0): 0.25}.items()]
    v = verdict("kp", kp, "w1")
    assert v["best"] == kp[1]["cell"] and v["paper_rank"] == 3 and not v["paper_best"]


def test_bad_sweep_arguments_name_the_argument(tmp_path):
    for kw, name in ((dict(grid="xy"), "grid"), (dict(p=(1.0,)), "p"), (dict(k=(-1.0,)), "k"),
                     (dict(strategies=("perturbed-real",)), "strategies"), (dict(seeds=0), "seeds"),
                     (dict(dataset="mnist"), "dataset"), (dict(lr=0.0), "lr"), (dict(nope=1), "nope"),
                     (dict(extra={"nope": 1}), "extra")):
        with pytest.raises(ValueError, match=name):
            sweep(**dict(TINY, out=str(tmp_path), **kw))


def test_cli_sweep_writes_the_readme_section(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n<!-- sweep-tables:start -->\nold\n<!-- sweep-tables:end -->\ntail\n")
    out = tmp_path / "sweeps" / "kp-swissroll"
    rc = main(["sweep", "kp", "--dataset", "swissroll", "--k", "2", "--p", "2,6", "--steps", "2", "--hidden", "16",
               "--workers", "1", "--seeds", "1", "--out", str(out), "--readme", str(readme), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| k \\ p | 2 | 6 |" in printed and "2 run(s)" in printed
    text = readme.read_text()
    assert "\nold\n" not in text and text.endswith("<!-- sweep-tables:end -->\ntail\n")
    assert "`sweep kp` on swissroll" in text and "(sweeps/kp-swissroll/kp_heatmap.png)" in text
    with open(out / "runs.csv") as f:
        assert len(list(csv.DictReader(f))) == 2
    assert main(["sweep", "rx", "--seeds", "0", "--out", str(out), "--quiet"]) == 2
    assert "seeds" in capsys.readouterr().err
