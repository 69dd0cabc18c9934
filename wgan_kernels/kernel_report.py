"""Compile every Triton kernel ahead of time for sm_80 and sm_90, with no GPU and no driver, and
report what the real compiler made of it.

The interpreter (``TRITON_INTERPRET=1``), which runs the kernels in the tests, is lenient: it
accepts code the compiler rejects, has no bfloat16 and keeps Python floats in float64. So this
module drives the package's real launchers on CPU tensors (every dtype, block size, mode, bias
and one-sided branch, odd and 16-aligned sizes, a misaligned view), intercepts each launch to bind
the specialisation the JIT would bind (with the JIT's own binder: argument types, ``== 1``
constexprs and divisibility hints exactly as on a GPU), and compiles each distinct one for every
arch with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` down to a cubin
(Triton's bundled ptxas). From each compile it keeps registers, stack and spill bytes (``ptxas
-v``), shared memory, the widest global load and store (PTX ``ld.global.v4`` ...), the SASS
instruction count (the cubin's code size), and any float32 -> float64 widening in a float64
variant (TTIR ``arith.extf ... f32 to f64``).

``check()`` lists the problems: a compile error, a ``@triton.jit`` function that no launcher
reaches, a branch (constexpr value) never driven, a widening float64 variant, a spill.
``tests/test_triton_compile.py`` runs it (in a subprocess without ``TRITON_INTERPRET``);
``wgan-kernels info --kernels`` prints the resource table; ``--write bench/results`` refreshes
``kernels-sm80.json`` / ``kernels-sm90.json`` and ``--readme README.md`` the table generated from
them. The same files hold the CUDA extension's kernels (``csrc/cuda``), read from the built
``wgan_kernels._C`` by ``cuobjdump --dump-resource-usage``.

Each compile's findings are cached beside Triton's own cache entry (same key: source, options,
target, Triton version), so a second run takes seconds; a first run makes some 380 compiles
(about a minute on 2 cores), split over the CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import io
import json
import os
import pkgutil
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

ARCHS = (80, 90)
KERNEL_PACKAGE = "wgan_kernels.ops"  # every @triton.jit function of the package lives here
RESULTS = Path(__file__).resolve().parent.parent / "bench" / "results"
README_MARKERS = ("<!-- kernel-tables:start -->", "<!-- kernel-tables:end -->")
# the findings cached beside Triton's cache entry; a new name (version) whenever analyse() changes
_RECORD_FILE = "wgan_kernels_report-v2.json"

# The branches each kernel must be driven through: constexpr parameter -> values. A kernel
# missing here only needs to be reached.
BOTH = frozenset({False, True})
BRANCHES: dict[str, dict[str, set]] = {
    "_penalty_fwd_kernel": {"ONE_SIDED": BOTH, "ACC_F64": BOTH, "BLOCK": {128, 1024, 4096}},
    "_penalty_partial_kernel": {"ACC_F64": BOTH},
    "_penalty_finish_kernel": {"ONE_SIDED": BOTH},
    "_penalty_bwd_kernel": {"ONE_SIDED": BOTH, "MODE": {0, 1, 2}, "BLOCK": {128, 1024}},
    "_leaky_relu_mask_kernel": {"HAS_BIAS": BOTH, "PLANES": BOTH, "INDEX64": BOTH, "F64": BOTH,
                                "BLOCK": {256, 512, 1024}},
    "_masked_scale_kernel": {"INDEX64": BOTH, "F64": BOTH},
    "_power_iteration_kernel": {"ROW_CONTIG": BOTH, "INDEX64": BOTH, "BLOCK_M": {8, 32}, "BLOCK_N": {32, 128}},
    "_power_iteration_rows_kernel": {"FIRST": BOTH, "ROW_CONTIG": BOTH, "INDEX64": BOTH},
    "_power_iteration_cols_kernel": {"ROW_CONTIG": BOTH, "INDEX64": BOTH},
    "_power_iteration_finish_kernel": {"INDEX64": BOTH},
}


# ----------------------------------------------------------------------------- the kernels


def kernel_modules() -> list:
    """The modules of ``KERNEL_PACKAGE`` (imported)."""
    pkg = importlib.import_module(KERNEL_PACKAGE)
    return [importlib.import_module(f"{KERNEL_PACKAGE}.{m.name}") for m in pkgutil.iter_modules(pkg.__path__)]


@functools.lru_cache(maxsize=None)
def jit_functions() -> dict:
    """Every ``@triton.jit`` function of the package, launchable kernels and the helpers they
    call, by name (names are unique across the op modules)."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    found = {}
    for module in kernel_modules():
        for name, obj in vars(module).items():
            if isinstance(obj, InterpretedFunction):
                raise RuntimeError("kernel_report: Triton kernels are interpreted here (TRITON_INTERPRET=1); "
                                   "run without it (main() re-runs itself in a subprocess)")
            if isinstance(obj, JITFunction) and getattr(obj.fn, "__module__", None) == module.__name__:
                if name in found:
                    raise RuntimeError(f"kernel_report: two @triton.jit functions named {name}")
                found[name] = obj
    return found


def _calls(fn, functions: dict) -> set[str]:
    """Names of the @triton.jit functions that ``fn``'s body refers to (its global names)."""
    return {name for name in fn.fn.__code__.co_names if name in functions}


def reached_functions(launched: set[str], functions: dict) -> set[str]:
    """The launched kernels and, transitively, every @triton.jit helper they call."""
    seen, todo = set(), list(launched)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _calls(functions[name], functions)
    return seen


# ----------------------------------------------------------------------------- recording launches


def _value(v):
    """A constexpr value as plain JSON data (dtypes by name)."""
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    return str(v)


class Launch:
    """One intercepted launch: kernel, grid, the driver case that made it, and per arch the
    specialisation the JIT binds: ``(signature, constexprs, attrs, options)``."""

    def __init__(self, kernel: str, case: str, grid: tuple, specs: dict):
        self.kernel, self.case, self.grid, self.specs = kernel, case, grid, specs


@contextlib.contextmanager
def recording(archs=ARCHS):
    """Within the block, launching a package kernel binds and records instead of running: yields
    the list the ``Launch`` objects are appended to (``launches.case`` names the current case)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backends = {arch: make_backend(GPUTarget("cuda", arch, 32)) for arch in archs}
    launches = _Launches()
    functions = jit_functions()
    patched = []
    for name, fn in functions.items():
        binders = {arch: create_function_from_signature(fn.signature, fn.params, b) for arch, b in backends.items()}

        def run(*args, grid, warmup, _fn=fn, _name=name, _binders=binders, **kwargs):
            if callable(grid):
                raise NotImplementedError(f"kernel_report: {_name} is launched with a grid function")
            specs = {}
            for arch, binder in _binders.items():
                bound, specialization, options = binder(*args, **kwargs)
                options, signature, constexprs, attrs = _fn._pack_args(backends[arch], kwargs, bound, specialization,
                                                                      options)
                specs[arch] = (signature, constexprs, attrs, options)
            launches.append(Launch(_name, launches.case, tuple(int(g) for g in grid), specs))
            return None

        fn.run = run  # JITFunction.__getitem__ calls self.run(grid=..., warmup=False, ...)
        patched.append(fn)
    try:
        yield launches
    finally:
        for fn in patched:
            del fn.run


class _Launches(list):
    case = ""


# ----------------------------------------------------------------------------- the driver


def _driver_cases():
    """(label, thunk) pairs: each thunk calls a real launcher on CPU tensors. Sizes: 1 element,
    odd, 16-aligned, a block and more, rows long enough to be split; a view whose data pointer is
    not 16-byte aligned; and on the meta device (no memory), tensors of 2^31 values or more for
    the 64-bit index variants."""
    import torch

    from .ops import activation as act
    from .ops import penalty as pen
    from .ops import spectral_norm as sn

    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}

    def misaligned(shape, dtype):
        n = 1
        for s in shape:
            n *= s
        return torch.empty(n + 1, dtype=dtype)[1:].view(shape)  # contiguous, data pointer off by one element

    def tensor(shape, dtype):
        return misaligned(shape[1:], dtype) if shape[0] == "misaligned" else torch.empty(shape, dtype=dtype)

    cases = []
    # Every dtype takes a set of shapes that reaches every branch and block size; float32 takes
    # more (size 1, 16-aligned sizes of each block, the largest rows), since alignment changes the
    # code less than the dtype does and each compile costs time.
    # penalty: (rows, cols) with cols from 1 to several blocks and past _SPLIT_COLS (split rows),
    # in the general mode; every mode and one-sided branch on an odd, an aligned and a split shape
    penalty_shapes = [(3, 7), (8, 1000), (64, 3 * 32 * 32), (64, 3 * 64 * 64), ("misaligned", 4, 33)]
    penalty_fp32 = [(1, 1), (4, 16), (16, 512), (2, 3 * 128 * 128 + 3)]
    all_branches = {(3, 7), (64, 3 * 32 * 32), (64, 3 * 64 * 64)}
    specs = [(0.4, 3.5), (1.0, 2.0), (0.0, 2.0), (0.0, 6.0)]  # MODE 2, 2, 0, 1
    for dname, dtype in dtypes.items():
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        for shape in penalty_shapes + penalty_fp32 * (dname == "fp32"):
            g2 = tensor(shape, dtype)
            label = f"penalty {dname} {shape}"
            for one_sided in (False, True) if shape in all_branches else (False,):
                cases.append((f"{label} forward one_sided={one_sided}",
                              lambda g2=g2, o=one_sided: pen._triton_forward(g2, 0.4, 3.5, o)))
                for center, p in specs if shape in all_branches else specs[:1]:
                    norms = torch.empty(g2.shape[0], dtype=acc)
                    cases.append((f"{label} backward center={center} p={p} one_sided={one_sided}",
                                  lambda g2=g2, n=norms, c=center, p=p, o=one_sided, a=acc:
                                  pen._triton_backward(g2, n, torch.ones((), dtype=a), 10.0, c, p, o)))
    huge = torch.empty(2, 2**31 + 7, device="meta")
    cases.append(("penalty fp32 (2, 2**31 + 7) meta forward", lambda: pen._triton_forward(huge, 1.0, 2.0, False)))
    cases.append(("penalty fp32 (2, 2**31 + 7) meta backward",
                  lambda: pen._triton_backward(huge, torch.empty(2, device="meta"), torch.ones((), device="meta"),
                                               10.0, 1.0, 2.0, False)))
    # activation: 1-D, (B, F), (N, C, H, W) odd and aligned, planes of 32 x 32 and 64 x 64, a
    # misaligned view
    act_shapes = [(5, 33), (2, 3, 5, 7), (2, 8, 32, 32), ("misaligned", 3, 5, 7)]
    act_fp32 = [(7,), (64, 512), (4, 16, 8, 8), (2, 4, 16, 16), (2, 3, 20, 20), (2, 4, 48, 48)]
    for dname, dtype in dtypes.items():
        for shape in act_shapes + act_fp32 * (dname == "fp32") + [("meta", 2, 4, 2**28)] * (dname == "fp16"):
            x = torch.empty(shape[1:], dtype=dtype, device="meta") if shape[0] == "meta" else tensor(shape, dtype)
            label = f"activation {dname} {shape}"
            biases = [None] + ([torch.empty(x.shape[1], dtype=dtype, device=x.device)] if x.dim() >= 2 else [])
            for bias in biases:
                cases.append((f"{label} leaky_relu bias={bias is not None}",
                              lambda x=x, b=bias: act._triton_leaky_relu_mask(x, b, 0.2)))
            mask = torch.empty(x.shape, dtype=torch.bool, device=x.device)
            cases.append((f"{label} masked_scale", lambda x=x, m=mask: act._triton_masked_scale(x, m, 0.2)))
    # power iteration: small groups (the fused kernel's four tiles) and groups with a large weight
    # (split), with contiguous rows of every alignment, transposed weights and a misaligned one; 1
    # and 3 iterations; on the meta device, weights whose offsets need 64 bits
    sn_problems = {
        "small 7x5": [(7, 5)],
        "8x100": [(8, 100), (3, 3)],
        "100x24": [(100, 24)],
        "mlp128": [(128, 2), (128, 128), (128, 128), (1, 128)],
        "mlp512": [(512, 2), (512, 512), (512, 512), (1, 512)],
        "dcgan64": [(64, 48), (128, 1024), (256, 2048), (512, 4096), (1, 8192)],
        "transposed": [(40, 19, "t"), (64, 64)],
        "transposed large": [(1024, 512, "t"), (64, 64)],
        "misaligned": [("misaligned", 9, 12), (32, 32)],
    }
    for dname, dtype in dtypes.items():
        for label, shapes in sn_problems.items():
            if label in ("mlp512", "transposed large") and dname in ("fp16", "bf16"):
                continue
            weights = [torch.empty(s[:2], dtype=dtype).t() if s[-1] == "t" else tensor(s, dtype) for s in shapes]
            us = [torch.empty(w.shape[0], dtype=dtype) for w in weights]
            vs = [torch.empty(w.shape[1], dtype=dtype) for w in weights]
            for n in (1, 3) if label in ("small 7x5", "dcgan64") else (1,):
                cases.append((f"power_iteration {dname} {label} n={n}",
                              lambda w=weights, u=us, v=vs, n=n: sn._triton_power_iteration(w, u, v, n, 1e-12)))
    for label, w in (("strided", torch.empty_strided((2, 64), (2**31, 1), device="meta")),
                     ("2**31 values", torch.empty(2**16, 2**15, device="meta"))):
        u, v = torch.empty(w.shape[0], device="meta"), torch.empty(w.shape[1], device="meta")
        cases.append((f"power_iteration fp32 {label} (meta) n=1",
                      lambda w=w, u=u, v=v: sn._triton_power_iteration([w], [u], [v], 1, 1e-12)))
    return cases


def record_launches(archs=ARCHS) -> list[Launch]:
    """Every launch of every driver case, bound for each arch."""
    with recording(archs) as launches:
        for label, thunk in _driver_cases():
            launches.case = label
            thunk()
    return launches


# ----------------------------------------------------------------------------- compiling


def _job_key(launch: Launch, arch: int) -> str:
    signature, constexprs, attrs, options = launch.specs[arch]
    text = repr((launch.kernel, arch, sorted(signature.items()), sorted((k, _value(v)) for k, v in constexprs.items()),
                 sorted(attrs.items()), options.hash()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _compile_job(job: dict) -> dict:
    """Compiles one specialisation (in a worker process) and returns its findings."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile, make_backend
    from triton.runtime.cache import get_cache_key, get_cache_manager

    from triton._C.libtriton import get_cache_invalidating_env_vars

    fn = jit_functions()[job["kernel"]]
    arch = job["arch"]
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    src = ASTSource(fn, job["signature"], job["constexprs"], job["attrs"])
    options = backend.parse_options(job["options"])
    key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    cache = get_cache_manager(hashlib.sha256(key.encode()).hexdigest())
    cached = cache.get_file(_RECORD_FILE)
    if cached is not None:
        try:
            return json.loads(Path(cached).read_text())
        except (OSError, ValueError):
            pass
    saved = knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile
    knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = True, True  # ptxas must run to log
    log = io.StringIO()
    start = time.time()
    try:
        with contextlib.redirect_stdout(log):
            kernel = compile(src, target=target, options=job["options"])
    except Exception as e:  # noqa: BLE001 - every failure is a finding
        return {"error": f"{type(e).__name__}: {e}".strip()[:4000]}
    finally:
        knobs.nvidia.dump_ptxas_log, knobs.compilation.always_compile = saved
    record = analyse(kernel.asm, log.getvalue(), kernel.metadata.shared, kernel.metadata.num_warps)
    record["compile_seconds"] = round(time.time() - start, 3)
    cache.put(json.dumps(record), _RECORD_FILE, binary=False)
    return record


def _pool_compile(jobs: list[dict], workers: int) -> list[dict]:
    if workers <= 1 or len(jobs) <= 1:
        return [_compile_job(j) for j in jobs]
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    # fork: the workers inherit the imported package (no torch import per worker); the parent
    # has not touched CUDA (there is none) and only allocated CPU tensors
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(workers, mp_context=mp.get_context(method)) as pool:
        return list(pool.map(_compile_job, jobs, chunksize=2))


def compile_all(archs=ARCHS, workers: int | None = None) -> dict:
    """Records every launch, compiles each distinct specialisation once per arch, and returns
    ``{"launches": [...], "specs": {key: {...findings}}, "functions": [...], "seconds": s}``."""
    start = time.time()
    launches = record_launches(archs)
    functions = jit_functions()
    jobs, specs, rows = {}, {}, []
    for launch in launches:
        keys = {}
        for arch in archs:
            key = _job_key(launch, arch)
            keys[arch] = key
            if key not in jobs:
                signature, constexprs, attrs, options = launch.specs[arch]
                jobs[key] = {"kernel": launch.kernel, "arch": arch, "signature": signature, "constexprs": constexprs,
                             "attrs": attrs, "options": dict(options.__dict__)}
                declared = {p.name for p in functions[launch.kernel].params if p.is_constexpr}
                names = list(signature)
                specs[key] = {
                    "kernel": launch.kernel, "arch": arch,
                    "signature": {k: v for k, v in signature.items() if v != "constexpr"},
                    # declared constexprs (the kernel's branches) apart from those the JIT made
                    # constant (an int argument equal to 1)
                    "constexprs": {names[path[0]]: _value(v) for path, v in constexprs.items()
                                   if names[path[0]] in declared},
                    "specialised_to_1": sorted(names[path[0]] for path in constexprs if names[path[0]] not in declared),
                    "divisible_by_16": sorted(names[path[0]] for path, a in attrs.items()
                                              if any(x[0] == "tt.divisibility" for x in a)),
                    "num_warps": options.num_warps, "cases": [],
                }
            if launch.case not in specs[key]["cases"]:
                specs[key]["cases"].append(launch.case)
        rows.append({"kernel": launch.kernel, "case": launch.case, "grid": list(launch.grid), "specs": keys})
    keys = sorted(jobs, key=lambda k: not jobs[k]["kernel"].startswith("_power_iteration"))  # the slowest first
    workers = workers or min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(), 8)
    for key, found in zip(keys, _pool_compile([jobs[k] for k in keys], workers)):
        specs[key].update(found)
    return {"launches": rows, "specs": specs, "functions": sorted(functions), "archs": list(archs),
            "seconds": round(time.time() - start, 1)}


# ----------------------------------------------------------------------------- reading the output

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTX_MEM = re.compile(r"^\s*(?:@!?%p\d+\s+)?(ld|st)\.global((?:\.[\w:]+)*)", re.M)
_WIDENING = re.compile(r"arith\.extf (%[\w.]+)[^\n]*: f32 to f64")
_DIV64 = re.compile(r"^\s*(?:@!?%p\d+\s+)?(?:div|rem)\.[su]64\b", re.M)


def ptx_access_bytes(ptx: str) -> dict:
    """The global loads and stores of a PTX text by width in bytes: ``{"ld": {16: 3, 4: 1}, "st": {...}}``."""
    out = {"ld": {}, "st": {}}
    for op, suffix in _PTX_MEM.findall(ptx):
        parts = suffix.split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d+", p)), 1)
        bits = next((int(p[1:]) for p in reversed(parts) if re.fullmatch(r"[bfsu](8|16|32|64|128)", p)), 0)
        width = vec * bits // 8
        out[op][width] = out[op].get(width, 0) + 1
    return out


def cubin_code_bytes(cubin: bytes) -> int:
    """Size of the kernel code in an ELF64 cubin (the ``.text.*`` sections); SASS instructions are
    16 bytes each from sm_70 on."""
    if cubin[:4] != b"\x7fELF" or cubin[4] != 2:
        return 0
    shoff, = struct.unpack_from("<Q", cubin, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]

    def name(sec):
        start = names_off + sec[0]
        return cubin[start:cubin.index(b"\0", start)].decode()

    return sum(sec[5] for sec in sections if name(sec).startswith(".text."))


def analyse(asm: dict, ptxas_log: str, shared: int, num_warps: int) -> dict:
    """The findings of one compile from its IRs and ptxas' log."""
    regs = [int(x) for x in _PTXAS_REGS.findall(ptxas_log)]
    frames = [tuple(int(x) for x in m) for m in _PTXAS_FRAME.findall(ptxas_log)]
    access = ptx_access_bytes(asm["ptx"])
    return {
        "registers": max(regs) if regs else None,
        "stack_bytes": max((f[0] for f in frames), default=None),
        "spill_store_bytes": max((f[1] for f in frames), default=None),
        "spill_load_bytes": max((f[2] for f in frames), default=None),
        "shared_bytes": shared,
        "num_warps": num_warps,
        "sass_instructions": cubin_code_bytes(asm["cubin"]) // 16,
        "ld_global_bytes": {str(k): v for k, v in sorted(access["ld"].items())},
        "st_global_bytes": {str(k): v for k, v in sorted(access["st"].items())},
        "widenings": sorted(set(_WIDENING.findall(asm["ttir"]))),
        "int64_divisions": len(_DIV64.findall(asm["ptx"])),
        "ptxas_logged": bool(regs),
    }


def _is_f64(spec: dict) -> bool:
    return any(v == "*fp64" for v in spec["signature"].values()) or spec["constexprs"].get("ELEM") == "fp64"


def element_type(spec: dict) -> str:
    """The dtype a specialisation works on: ELEM, else its first floating pointer argument."""
    if "ELEM" in spec["constexprs"]:
        return spec["constexprs"]["ELEM"]
    return next((v[1:] for v in spec["signature"].values() if v.startswith("*") and v[1:3] in ("fp", "bf")), "-")


# ----------------------------------------------------------------------------- the check


def check(result: dict) -> dict[str, list[str]]:
    """The problems found, by kind (each list empty when all is well)."""
    specs = result["specs"].values()
    problems = {"compile": [], "uncovered": [], "branches": [], "widening": [], "spill": []}
    for s in specs:
        where = f"{s['kernel']} sm_{s['arch']} {s['signature']} {s['constexprs']} (from {s['cases'][0]})"
        if "error" in s:
            problems["compile"].append(f"{where}: {s['error']}")
            continue
        if not s.get("ptxas_logged"):
            problems["spill"].append(f"{where}: no ptxas -v log was captured")
        if s["widenings"] and _is_f64(s):
            problems["widening"].append(f"{where}: widens {', '.join(s['widenings'])} from float32 to float64")
        if s.get("spill_store_bytes") or s.get("spill_load_bytes") or s.get("stack_bytes"):
            problems["spill"].append(f"{where}: {s['spill_store_bytes']} B spill stores, {s['spill_load_bytes']} B "
                                     f"spill loads, {s['stack_bytes']} B stack")
    functions = jit_functions()
    launched = {s["kernel"] for s in specs}
    for name in sorted(set(functions) - reached_functions(launched, functions)):
        problems["uncovered"].append(f"{name}: no launcher reaches it (add a case to kernel_report._driver_cases)")
    for kernel, wanted in BRANCHES.items():
        for param, values in wanted.items():
            seen = {s["constexprs"].get(param) for s in specs if s["kernel"] == kernel}
            for v in sorted(values - seen, key=repr):
                problems["branches"].append(f"{kernel}: {param}={v!r} is never launched by the driver cases")
    return problems


# ----------------------------------------------------------------------------- the report


def _family_key(s: dict) -> tuple:
    return (s["kernel"], element_type(s), tuple(sorted(s["constexprs"].items())), s["num_warps"])


def _widest(counts: dict) -> int:
    return max((int(k) for k in counts), default=0)


def families(result: dict, arch: int) -> list[dict]:
    """One row per kernel family on ``arch`` (kernel, dtype, declared constexprs, warps), worst
    case over its specialisations (int widths, ``== 1`` constants, alignment)."""
    rows: dict[tuple, dict] = {}
    for s in result["specs"].values():
        if s["arch"] != arch or "error" in s:
            continue
        key = _family_key(s)
        r = rows.setdefault(key, {"kernel": s["kernel"], "dtype": element_type(s), "constexprs": s["constexprs"],
                                  "num_warps": s["num_warps"], "specialisations": 0, "registers": 0,
                                  "spill_bytes": 0, "stack_bytes": 0, "shared_bytes": 0, "ld_global_bytes": 0,
                                  "st_global_bytes": 0, "sass_instructions": 0})
        r["specialisations"] += 1
        r["registers"] = max(r["registers"], s["registers"] or 0)
        r["spill_bytes"] = max(r["spill_bytes"], (s["spill_store_bytes"] or 0) + (s["spill_load_bytes"] or 0))
        r["stack_bytes"] = max(r["stack_bytes"], s["stack_bytes"] or 0)
        r["shared_bytes"] = max(r["shared_bytes"], s["shared_bytes"] or 0)
        r["ld_global_bytes"] = max(r["ld_global_bytes"], _widest(s["ld_global_bytes"]))
        r["st_global_bytes"] = max(r["st_global_bytes"], _widest(s["st_global_bytes"]))
        r["sass_instructions"] = max(r["sass_instructions"], s["sass_instructions"])
    return sorted(rows.values(), key=lambda r: (r["kernel"], r["dtype"], sorted(r["constexprs"].items(), key=repr)))


# ----------------------------------------------------------------------------- the CUDA extension

_SASS_INSTR = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.M)
_BUILTIN_TYPES = {"v": "void", "b": "bool", "c": "char", "h": "uint8", "i": "int", "j": "uint", "l": "long",
                  "m": "ulong", "f": "float", "d": "double"}
_NAMED_TYPES = {"__half": "half", "__nv_bfloat16": "bfloat16"}


def demangle(name: str) -> str:
    """``ns::kernel<args>`` of an Itanium-mangled kernel name (nested names with template args of
    builtin or named types and int literals, what csrc/cuda uses); the name itself otherwise."""
    pos = 0

    def source_name():
        nonlocal pos
        m = re.match(r"\d+", name[pos:])
        if not m:
            raise ValueError(name)
        n = int(m.group())
        pos += len(m.group())
        ident = name[pos:pos + n]
        pos += n
        return "(anonymous)" if ident.startswith("_GLOBAL__N") else ident

    def template_args():
        nonlocal pos
        args = []
        pos += 1  # I
        while name[pos] != "E":
            c = name[pos]
            if c == "L":  # literal: L <type> <value> E
                end = name.index("E", pos)
                args.append(name[pos + 2:end])
                pos = end + 1
            elif c.isdigit():
                ident = source_name()
                args.append(_NAMED_TYPES.get(ident, ident))
            elif c in _BUILTIN_TYPES:
                args.append(_BUILTIN_TYPES[c])
                pos += 1
            else:
                raise ValueError(name)
        pos += 1
        return "<" + ", ".join(args) + ">"

    try:
        if not name.startswith("_ZN"):
            raise ValueError(name)
        pos, parts = 3, []
        while name[pos] != "E":
            if name[pos] == "I":
                parts[-1] += template_args()
            else:
                parts.append(source_name())
        return "::".join(parts)
    except (ValueError, IndexError):
        return name


def find_cuobjdump() -> str | None:
    """cuobjdump from CUDA_HOME, PATH, or the copy bundled with Triton."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    for candidate in (os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except Exception:  # noqa: BLE001 - no Triton, or no bundled binary
        return None


def extension_path() -> Path | None:
    """The built extension beside the package (``wgan_kernels/_C*.so``), without importing it."""
    found = sorted(Path(__file__).resolve().parent.glob("_C*.so")) + sorted(
        Path(__file__).resolve().parent.glob("_C*.pyd"))
    return found[0] if found else None


def _by_arch(text: str, body: re.Pattern) -> dict[int, list[tuple[str, str]]]:
    """Splits cuobjdump output into ``{arch: [(function, its text), ...]}``."""
    out: dict[int, list] = {}
    for block in re.split(r"\n(?=Fatbin (?:elf|ptx) code:)", text):
        if not block.startswith("Fatbin elf code:"):
            continue
        m = re.search(r"arch = sm_(\d+)", block)
        if m:
            out.setdefault(int(m.group(1)), []).extend(body.findall(block))
    return out


def extension_resources() -> dict:
    """Per arch, per kernel of the CUDA extension: registers, stack, local memory (spills or
    arrays), shared memory, constant banks (bank 0 holds the parameter table), the instruction
    count and the widest global load and store of its SASS, spill instructions (STL/LDL). Or
    ``{"skipped": reason}``."""
    so = extension_path()
    if so is None:
        return {"skipped": "wgan_kernels._C is not built (no _C*.so beside the package)"}
    tool = find_cuobjdump()
    if tool is None:
        return {"skipped": "no cuobjdump (CUDA_HOME/bin, PATH, or Triton's bundled copy)"}
    try:
        listing = subprocess.run([tool, "--list-elf", str(so)], capture_output=True, text=True, timeout=120)
        if "sm_" not in listing.stdout:
            return {"skipped": f"{so.name} holds no CUDA device code (the extension was built without its CUDA half)"}
        usage = subprocess.run([tool, "--dump-resource-usage", str(so)], capture_output=True, text=True,
                               timeout=300, check=True).stdout
        sass = subprocess.run([tool, "-sass", str(so)], capture_output=True, text=True, timeout=300,
                              check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return {"skipped": f"cuobjdump failed on {so.name}: {e}"}
    resources = _by_arch(usage, re.compile(r"Function ([^\s:]+):\s*\n([^\n]*)"))
    code = _by_arch(sass, re.compile(r"Function : (\S+)\n(.*?)(?=\n\s*\.{6,}|\n\s*Function :|\Z)", re.S))
    rows: dict[int, list[dict]] = {}
    for arch, functions in resources.items():
        listing_of = dict(code.get(arch, []))
        for mangled, line in functions:
            fields = dict(re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line))
            ops = [op for op in _SASS_INSTR.findall(listing_of.get(mangled, "")) if op != "NOP"]
            rows.setdefault(arch, []).append({
                "function": demangle(mangled),
                "registers": int(fields.get("REG", 0)),
                "stack_bytes": int(fields.get("STACK", 0)),
                "local_bytes": int(fields.get("LOCAL", 0)),
                "shared_bytes": int(fields.get("SHARED", 0)),
                "constant_bytes": {k[9:-1]: int(v) for k, v in sorted(fields.items()) if k.startswith("CONSTANT")},
                "spill_instructions": sum(op.startswith(("STL", "LDL")) for op in ops),
                "sass_instructions": len(ops),
                "ld_global_bytes": max((_sass_width(op) for op in ops if op.startswith("LDG")), default=0),
                "st_global_bytes": max((_sass_width(op) for op in ops if op.startswith("STG")), default=0),
            })
    return {"source": f"wgan_kernels/{so.name}", "tool": f"cuobjdump {_tool_version(tool)}",
            "archs": {str(arch): sorted(r, key=lambda x: x["function"]) for arch, r in sorted(rows.items())}}


def _sass_width(op: str) -> int:
    """Bytes moved by a SASS LDG/STG opcode: .128 16, .64 8, .U16/.S16 2, .U8/.S8 1, else 4."""
    for suffix, width in ((".128", 16), (".64", 8), ("16", 2), ("8", 1)):
        if any(part.endswith(suffix.lstrip(".")) and (suffix.startswith(".") or part[:1] in "US")
               for part in op.split(".")[1:]):
            return width
    return 4


def _tool_version(tool: str) -> str:
    try:
        out = subprocess.run([tool, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else "?"


# ----------------------------------------------------------------------------- the documents


def documents(result: dict, extension: dict | None = None) -> dict[int, dict]:
    """The committed report of each arch (``bench/results/kernels-sm<arch>.json``): Triton kernel
    families and the extension's kernels. Nothing machine-dependent (no timings), so a rerun
    with the same Triton gives the same file."""
    import triton

    from . import __version__

    extension = extension_resources() if extension is None else extension
    docs = {}
    for arch in result["archs"]:
        ext = dict(extension)
        if "archs" in ext:
            rows = ext.pop("archs").get(str(arch))
            ext = ext | ({"kernels": rows} if rows else {"skipped": f"no sm_{arch} code in the extension"})
        docs[arch] = {
            "arch": f"sm_{arch}",
            "generated_by": "wgan-kernels info --kernels --write bench/results --readme README.md",
            "versions": {"wgan_kernels": __version__, "triton": triton.__version__, "ptxas": _ptxas_version(arch)},
            "triton": families(result, arch),
            "cuda_extension": ext,
        }
    return docs


def _ptxas_version(arch: int) -> str:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).version
    except Exception:  # noqa: BLE001
        return "?"


def write_documents(docs: dict[int, dict], out_dir: Path = RESULTS) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for arch, doc in docs.items():
        path = out_dir / f"kernels-sm{arch}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        paths.append(path)
    return paths


def load_documents(out_dir: Path = RESULTS) -> dict[int, dict]:
    docs = {}
    for path in sorted(out_dir.glob("kernels-sm*.json")):
        doc = json.loads(path.read_text())
        docs[int(doc["arch"][3:])] = doc
    return docs


def _span(values) -> str:
    values = list(values)
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def triton_table(docs: dict[int, dict]) -> str:
    """Markdown: one row per (kernel, dtype), each arch's worst case over its families."""
    archs = sorted(docs)
    groups: dict[tuple, dict[int, list]] = {}
    for arch in archs:
        for row in docs[arch]["triton"]:
            groups.setdefault((row["kernel"], row["dtype"]), {}).setdefault(arch, []).append(row)
    dtype_order = {"fp32": 0, "fp16": 1, "bf16": 2, "fp64": 3}
    head = ["kernel", "dtype", "variants"] + [f"registers sm_{a}" for a in archs] + [
        "spill / stack B", "shared B", "widest ld.global B", "widest st.global B"] + [
        f"SASS instr. sm_{a}" for a in archs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (kernel, dtype), per_arch in sorted(groups.items(), key=lambda kv: (kv[0][0], dtype_order.get(kv[0][1], 9))):
        every = [r for rows in per_arch.values() for r in rows]
        cells = [f"`{kernel}`", dtype, str(max(len(rows) for rows in per_arch.values()))]
        cells += [_span(r["registers"] for r in per_arch.get(a, [])) if a in per_arch else "-" for a in archs]
        cells += [f"{max(r['spill_bytes'] for r in every)} / {max(r['stack_bytes'] for r in every)}",
                  _span(r["shared_bytes"] for r in every), _span(r["ld_global_bytes"] for r in every),
                  _span(r["st_global_bytes"] for r in every)]
        cells += [_span(r["sass_instructions"] for r in per_arch.get(a, [])) if a in per_arch else "-" for a in archs]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def extension_table(docs: dict[int, dict]) -> str:
    """Markdown: the CUDA extension's kernels per arch, or why there are none."""
    lines, skipped = [], []
    head = ["kernel", "arch", "registers", "stack B", "local B", "spill instr.", "shared B", "cmem[0] B (params)",
            "widest LDG B", "widest STG B", "SASS instr."]
    for arch in sorted(docs):
        ext = docs[arch]["cuda_extension"]
        if "kernels" not in ext:
            skipped.append(f"sm_{arch}: {ext.get('skipped', 'no data')}")
            continue
        for r in ext["kernels"]:
            cells = [f"`{r['function']}`", f"sm_{arch}"] + [str(r[k]) for k in (
                "registers", "stack_bytes", "local_bytes", "spill_instructions", "shared_bytes")]
            cells += [str(r["constant_bytes"].get("0", 0))] + [str(r[k]) for k in (
                "ld_global_bytes", "st_global_bytes", "sass_instructions")]
            lines.append("| " + " | ".join(cells) + " |")
    out = []
    if lines:
        out.append("\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + lines))
    if skipped:
        out.append("No CUDA extension kernels listed: " + "; ".join(skipped) + ".")
    return "\n\n".join(out)


def readme_section(docs: dict[int, dict]) -> str:
    """The README text between the kernel-tables markers."""
    if not docs:
        return "(no bench/results/kernels-sm*.json yet: run `wgan-kernels info --kernels --write bench/results`)"
    v = next(iter(docs.values()))["versions"]
    ext = next(iter(docs.values()))["cuda_extension"]
    where = ", ".join(f"`bench/results/kernels-sm{a}.json`" for a in sorted(docs))
    counts = ", ".join(f"{sum(r['specialisations'] for r in docs[a]['triton'])} for sm_{a}" for a in sorted(docs))
    parts = [
        f"Triton {v['triton']} (ptxas {v['ptxas']}), wgan_kernels {v['wgan_kernels']}; from {where}; specialisations "
        f"compiled: {counts}. Per kernel and dtype, the worst case over its variants (`variants`: distinct "
        "block sizes, modes and branches; each covers the specialisations of alignment and integer width): "
        "registers per thread, spilled and stack bytes, shared memory, the widest global load and store "
        "of the PTX in bytes (16 = `ld.global.v4.b32`), SASS instructions.",
        triton_table(docs),
        f"The CUDA extension (`csrc/cuda`), read from `{ext.get('source', 'wgan_kernels/_C')}` by "
        f"`cuobjdump --dump-resource-usage` and `-sass`{' (' + ext['tool'] + ')' if 'tool' in ext else ''}: "
        "local memory and STL/LDL instructions would be spills; constant bank 0 holds the kernel "
        "parameters (the multi-tensor tables).",
        extension_table(docs),
    ]
    return "\n\n".join(parts)


def update_readme(readme: Path, docs: dict[int, dict]) -> None:
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n<!-- generated by wgan_kernels/kernel_report.py from "
                      f"bench/results/kernels-sm*.json -->\n\n{readme_section(docs)}\n\n{end}{tail}")


def readme_block(readme: Path) -> str | None:
    """The README's current text between the markers (None without markers), as update_readme writes it."""
    text = readme.read_text()
    start, end = README_MARKERS
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0]


# ----------------------------------------------------------------------------- command line


def _interpreted() -> bool:
    from . import _triton

    return _triton.interpreting()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wgan_kernels.kernel_report", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    return run(args, argv if argv is not None else sys.argv[1:])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", default=",".join(map(str, ARCHS)), help="comma-separated CUDA archs (default 80,90)")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: the CPU cores, at most 8)")
    parser.add_argument("--json", type=Path, default=None, help="write every specialisation's findings and the "
                        "problems found to this file")
    parser.add_argument("--write", type=Path, default=None, metavar="DIR",
                        help="write DIR/kernels-sm<arch>.json (the committed tables: bench/results)")
    parser.add_argument("--readme", type=Path, default=None, help="regenerate this README's kernel tables from the "
                        "kernels-sm*.json of --write (default bench/results)")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a problem is found")
    parser.add_argument("--quiet", action="store_true", help="print the problems only, not the tables")


def run(args, argv: list[str]) -> int:
    """Runs the report for parsed ``args``; under TRITON_INTERPRET=1 (kernels built for the
    interpreter) it re-runs itself in a subprocess without it."""
    if _interpreted():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        return subprocess.run([sys.executable, "-m", "wgan_kernels.kernel_report", *argv], env=env).returncode
    archs = tuple(int(a) for a in args.arch.split(",") if a.strip())
    result = compile_all(archs, args.jobs)
    problems = check(result)
    docs = documents(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**result, "problems": problems}, indent=1, default=str) + "\n")
    if args.write:
        for path in write_documents(docs, args.write):
            print(f"wrote {path}")
    if args.readme:
        update_readme(args.readme, load_documents(args.write or RESULTS))
        print(f"updated the kernel tables of {args.readme}")
    if not args.quiet:
        print(readme_section(docs))
    count = sum(len(v) for v in problems.values())
    specs = len(result["specs"])
    print(f"\n{specs} compiles ({len({(s['kernel'], s['arch']) for s in result['specs'].values()})} kernel x arch "
          f"pairs, {len(result['launches'])} launches driven) in {result['seconds']:.0f} s; "
          f"{count} problem(s)" + (":" if count else ""))
    for kind, found in problems.items():
        for line in found:
            print(f"  [{kind}] {line}")
    return 1 if (args.check and count) else 0


if __name__ == "__main__":
    sys.exit(main())
