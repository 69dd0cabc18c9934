"""Every Triton kernel compiled for sm_80 and sm_90 with Triton's own compiler and ptxas (no GPU,
no driver), as the launchers specialise it: ``wgan_kernels.kernel_report``.

The interpreter that runs the kernels in the other tests accepts code the compiler rejects, has
no bfloat16 and computes Python floats in float64; this file checks what only the compiler
shows. It runs the report once, in a subprocess without TRITON_INTERPRET (the kernels of this
process are built for the interpreter), and asserts on its findings. The README's kernel table
and the committed ``bench/results/kernels-sm*.json`` are checked against each other and, when the
Triton version matches, against the fresh compile.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from wgan_kernels import kernel_report

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report's findings: every launch the driver made and every compiled specialisation."""
    triton = pytest.importorskip("triton", reason="Triton is not installed (the CPU-only torch has none)")
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "wgan_kernels.kernel_report", "--json", str(out), "--quiet"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), f"kernel_report failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads(out.read_text())
    result["wall_seconds"] = time.time() - start
    result["triton_version"] = triton.__version__
    return result


def _problems(report, kind):
    return "\n".join(report["problems"][kind][:20])


def test_every_specialisation_compiles_for_sm80_and_sm90(report):
    assert not report["problems"]["compile"], _problems(report, "compile")
    archs = {(s["kernel"], s["arch"]) for s in report["specs"].values()}
    for name in {s["kernel"] for s in report["specs"].values()}:
        assert {(name, 80), (name, 90)} <= archs, name
    assert all(s.get("sass_instructions", 0) > 0 for s in report["specs"].values())


def test_every_jit_function_and_branch_is_reached(report):
    assert not report["problems"]["uncovered"], _problems(report, "uncovered")
    assert not report["problems"]["branches"], _problems(report, "branches")
    dtypes = {(s["kernel"], kernel_report.element_type(s)) for s in report["specs"].values()}
    for kernel in {k for k, _ in dtypes}:
        if kernel != "_penalty_finish_kernel":  # reads only the float32 / float64 partial sums
            assert {(kernel, t) for t in ("fp32", "fp16", "bf16", "fp64")} <= dtypes, kernel


def test_every_jit_function_lives_where_the_report_looks():
    """A kernel outside ``wgan_kernels/ops`` would escape the check."""
    package = ROOT / "wgan_kernels"
    outside = [str(p.relative_to(ROOT)) for p in package.rglob("*.py")
               if "triton.jit" in p.read_text() and p.parent != package / "ops" and p.name != "kernel_report.py"]
    assert not outside, f"@triton.jit outside wgan_kernels/ops: {outside}"


def test_float64_variants_take_float64_scalars(report):
    """No float32 -> float64 widening (TTIR arith.extf) in a float64 variant: scalar arguments
    (slope, center, p, weight / rows, EPS, eps) reach it as float64."""
    assert not report["problems"]["widening"], _problems(report, "widening")
    f64 = [s for s in report["specs"].values() if kernel_report.element_type(s) == "fp64"]
    assert f64
    for s in f64:
        scalars = {k: v for k, v in s["signature"].items() if not v.startswith("*") and v.startswith(("fp", "bf"))}
        assert all(v == "fp64" for v in scalars.values()), (s["kernel"], scalars)


def test_no_variant_spills(report):
    assert not report["problems"]["spill"], _problems(report, "spill")


def test_contiguous_float32_rows_of_the_power_iteration_load_16_bytes(report):
    """Contiguous, 16-byte aligned float32 weights: W is read with ld.global.v4.b32 by the fused
    kernel and by both split kernels; transposed or misaligned weights fall back to narrower loads."""
    seen = set()
    for s in report["specs"].values():
        if not s["kernel"].startswith("_power_iteration") or s["kernel"] == "_power_iteration_finish_kernel":
            continue
        c = s["constexprs"]
        if c["ELEM"] == "fp32" and c["ROW_CONTIG"] and c["ALIGN"] == 4:
            assert "16" in s["ld_global_bytes"], (s["kernel"], s["arch"], c, s["ld_global_bytes"])
            seen.add(s["kernel"])
        if not c["ROW_CONTIG"] or c["ALIGN"] == 1:
            assert "16" not in s["ld_global_bytes"], (s["kernel"], c)  # (a hint that is not true would be)
    assert seen == {"_power_iteration_kernel", "_power_iteration_rows_kernel", "_power_iteration_cols_kernel"}


def _launches(report, kernel, case_prefix):
    return [r for r in report["launches"] if r["kernel"] == kernel and r["case"].startswith(case_prefix)]


def test_large_weights_get_several_programs(report):
    """The DCGAN-64 critic's weights (largest 512 x 4096): split launches with many programs per
    weight, not one program per weight."""
    rows = _launches(report, "_power_iteration_rows_kernel", "power_iteration fp32 dcgan64 n=1")
    cols = _launches(report, "_power_iteration_cols_kernel", "power_iteration fp32 dcgan64 n=1")
    assert rows and cols and not _launches(report, "_power_iteration_kernel", "power_iteration fp32 dcgan64")
    assert rows[0]["grid"][0] >= 64 and cols[0]["grid"][0] >= 64, (rows[0]["grid"], cols[0]["grid"])
    assert len(_launches(report, "_power_iteration_finish_kernel", "power_iteration fp32 dcgan64 n=1")) == 1
    # an MLP's small weights: one launch of the fused kernel, one program per weight
    small = _launches(report, "_power_iteration_kernel", "power_iteration fp32 mlp128")
    assert [r["grid"] for r in small] == [[4]]


def test_long_penalty_rows_are_split(report):
    """Batch 64 of 3 x 64 x 64 gradients: more programs than rows in the forward."""
    partial = _launches(report, "_penalty_partial_kernel", "penalty fp32 (64, 12288) forward")
    assert partial and partial[0]["grid"][0] == 64 and partial[0]["grid"][1] >= 2, partial[:1]
    assert not _launches(report, "_penalty_fwd_kernel", "penalty fp32 (64, 12288)")
    assert _launches(report, "_penalty_fwd_kernel", "penalty fp32 (64, 3072)")  # short rows: one pass


def test_biased_leaky_relu_divides_in_32_bits(report):
    """The channel of each value: no 64-bit integer division unless the tensor needs 64-bit
    offsets; planes of 256+ values take a channel-aware grid (one channel per program)."""
    for s in report["specs"].values():
        if s["kernel"] == "_leaky_relu_mask_kernel" and not s["constexprs"]["INDEX64"]:
            assert s["int64_divisions"] == 0, (s["constexprs"], s["cases"][0])
    planes = _launches(report, "_leaky_relu_mask_kernel", "activation fp32 (2, 8, 32, 32) leaky_relu bias=True")
    assert planes and planes[0]["grid"] == [16, 1]


def test_committed_tables_match_this_compile(report):
    """bench/results/kernels-sm*.json hold what the compiler makes of today's kernels (rerun
    ``wgan-kernels info --kernels --write bench/results --readme README.md`` after changing one)."""
    docs = kernel_report.load_documents()
    assert set(docs) == {80, 90}, "bench/results/kernels-sm80.json and kernels-sm90.json are missing"
    if docs[80]["versions"]["triton"] != report["triton_version"]:
        pytest.skip(f"committed tables are from Triton {docs[80]['versions']['triton']}, this is "
                    f"{report['triton_version']}")
    result = {**report, "archs": [80, 90]}
    for arch in (80, 90):
        fresh = kernel_report.families(result, arch)
        assert docs[arch]["triton"] == fresh, f"kernels-sm{arch}.json is stale"


def test_readme_kernel_table_matches_the_committed_json():
    docs = kernel_report.load_documents()
    block = kernel_report.readme_block(ROOT / "README.md")
    assert block is not None, "README.md has no kernel-tables markers"
    assert kernel_report.readme_section(docs) in block, \
        "README kernel tables are stale: run wgan-kernels info --kernels --write bench/results --readme README.md"


def test_ptx_and_cubin_readers():
    ptx = """
    @%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
    ld.global.L1::evict_last.b16 %rs1, [ %rd2 + 0 ];
    @!%p2 st.global.v2.b64 [ %rd3 + 0 ], { %rd4, %rd5 };
    st.global.b8 [ %rd6 + 0 ], %rs2;
    div.s64 %rd7, %rd8, %rd9;
    """
    assert kernel_report.ptx_access_bytes(ptx) == {"ld": {16: 1, 2: 1}, "st": {16: 1, 1: 1}}
    assert len(re.findall(kernel_report._DIV64, ptx)) == 1
    assert kernel_report.cubin_code_bytes(b"not an elf") == 0
    mangled = "_ZN2wk4cuda12_GLOBAL__N_114rmsprop_kernelI13__nv_bfloat16EEvNS1_5TableILi3EEE"
    assert kernel_report.demangle(mangled) == "wk::cuda::(anonymous)::rmsprop_kernel<bfloat16>"
    assert kernel_report.demangle("plain_name") == "plain_name"
