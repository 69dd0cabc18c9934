"""bench/report.py: round-robin medians replace one-after-another ones; floors per suite."""

import importlib.util
from pathlib import Path

import pytest

REPORT = Path(__file__).resolve().parent.parent / "bench" / "report.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("wk_bench_report", REPORT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def entry(impl, median, suite="SN critic forward", case="dcgan64-b1", **extra):
    info = dict(suite=suite, case=case, impl=impl, device="cpu", numel=10, tensors=2, bytes=0, **extra)
    return {"extra_info": info, "stats": {"median": median}}


def test_interleaved_medians_replace_the_sequential_ones(report):
    raw = {"benchmarks": [
        entry("interleaved", 0.0, interleaved_median_s={"torch": 0.020, "wgan_kernels": 0.010, "no-sn": 0.008}),
        entry("torch", 0.014), entry("wgan_kernels", 0.012), entry("no-sn", 0.007),
        entry("torch", 0.030, case="resnet32-b1"), entry("wgan_kernels", 0.010, case="resnet32-b1"),
    ]}
    device, groups = report.summarize(raw)
    rows = {g["case"]: report.derive(g, "cpu") for g in groups}
    dcgan, resnet = rows["dcgan64-b1"], rows["resnet32-b1"]
    assert device == "cpu"
    assert dcgan["interleaved"] and "interleaved" not in resnet
    assert dcgan["median_s"] == {"torch": 0.020, "wgan_kernels": 0.010, "no-sn": 0.008}
    assert dcgan["ratio"] == pytest.approx(2.0) and dcgan["best"] == "wgan_kernels"
    assert dcgan["floor_s"] == pytest.approx(0.008) and dcgan["over_floor"] == pytest.approx(1.25)
    assert dcgan["met"] is False  # target >= 2.5x
    assert resnet["ratio"] == pytest.approx(3.0) and "floor_s" not in resnet


def test_penalty_floor_is_twice_the_plain_step(report):
    raw = {"benchmarks": [entry(i, m, suite="critic-step-div", case="mlp128-b64")
                          for i, m in (("eager", 0.004), ("explicit", 0.003), ("plain", 0.0014))]}
    _, groups = report.summarize(raw)
    row = report.derive(groups[0], "cpu")
    assert row["floor_s"] == pytest.approx(0.0028) and row["ratio"] == pytest.approx(4 / 3)


def test_readme_tables_come_from_the_committed_results_only(report):
    """The tables read the device results (cpu.json, ...), not the other JSON files committed
    beside them (kernels-sm*.json, quality-digits32.json): a README regeneration must not fail
    on them, and their content does not leak into the speed tables."""
    names = {p.name for p in report.RESULTS.glob("*.json")}
    assert {"cpu.json", "quality-digits32.json"} <= names
    text = report.tables()
    assert "train-step wgan-div/dcgan32-b64" in text and "quality" not in text
