"""What ``wgan-kernels info`` prints: versions, the extension's build, and each op's backend."""

from __future__ import annotations

import os
import platform

import torch

from . import __version__, _backend, _triton


def _device_names() -> list[str]:
    if not torch.cuda.is_available():
        return []
    return [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]


def collect() -> dict:
    """The facts ``info`` prints, as a dict (also used by the benchmarks to label results)."""
    ext = _backend.extension()
    return {
        "wgan_kernels": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton.version(),
        "triton_error": _triton.import_error(),
        "extension": None if ext is None else {"cpu": True, "cuda": bool(ext.has_cuda)},
        "extension_error": _backend.extension_error(),
        "devices": ["cpu " + (platform.processor() or platform.machine())] + _device_names(),
        "cpu_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in (_backend.BACKEND_ENV, _backend.STRICT_ENV, "TRITON_INTERPRET")},
        "backends": {op: {dev: _safe_resolve(op, dev) for dev in ("cpu", "cuda")} for op in _backend.PREFERENCES},
    }


def _safe_resolve(op: str, device: str) -> str:
    try:
        return _backend.resolve(op, device)
    except (RuntimeError, ValueError) as e:
        return f"error: {e}"


def format_info(info: dict) -> str:
    ext = info["extension"]
    if ext is None:
        ext_line = f"not available ({info['extension_error']})"
    else:
        ext_line = "built: CPU" + (" + CUDA" if ext["cuda"] else " only (no CUDA half)")
    lines = [
        f"wgan_kernels {info['wgan_kernels']}",
        f"python {info['python']}  torch {info['torch']}  CUDA {info['torch_cuda'] or 'none (CPU build)'}  "
        f"triton {info['triton'] or 'not available'}",
        f"extension wgan_kernels._C: {ext_line}",
        f"devices: {'; '.join(info['devices'])}  (CPU threads: {info['cpu_threads']})",
        "environment: " + ", ".join(f"{k}={v if v is not None else 'unset'}" for k, v in info["env"].items()),
        "",
        f"{'op':<20}{'cpu':<12}{'cuda':<12}",
    ]
    for op, per_device in info["backends"].items():
        lines.append(f"{op:<20}{per_device['cpu']:<12}{per_device['cuda']:<12}")
    return "\n".join(lines)
