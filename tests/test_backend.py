"""The dispatch point, the extension's build, and `wgan-kernels info`."""

import os
import subprocess
import sys

import pytest
import torch

import wgan_kernels as wk
from wgan_kernels import _backend
from wgan_kernels.cli import main
from wgan_kernels.info import collect


def test_strict_means_the_extension_was_built():
    """CI sets WGAN_KERNELS_STRICT=1: there the extension must load, with its CUDA half when
    torch has CUDA (the CUDA sources are compiled in every CI run)."""
    if not _backend._strict():
        pytest.skip("WGAN_KERNELS_STRICT is not set")
    assert _backend.extension_error() is None
    assert _backend.extension() is not None
    if torch.version.cuda is not None and os.environ.get("WGAN_KERNELS_SKIP_CUDA", "0") != "1":
        assert _backend.extension().has_cuda, "torch has CUDA but the extension was built without its CUDA half"


def test_auto_prefers_the_extension():
    if _backend.extension() is None:
        pytest.skip("extension not built")
    assert wk.resolve_backend("clip_", "cpu") == "cpp"
    assert wk.resolve_backend("rmsprop_clip_", torch.device("cpu")) == "cpp"
    assert wk.resolve_backend("clip_", "cpu", "reference") == "reference"


def test_environment_forces_a_backend(monkeypatch):
    monkeypatch.setenv(_backend.BACKEND_ENV, "reference")
    assert wk.resolve_backend("clip_", "cpu") == "reference"
    assert wk.resolve_backend("clip_", "cpu", "auto") != "reference" or _backend.extension() is None
    monkeypatch.setenv(_backend.BACKEND_ENV, "fastest")
    with pytest.raises(ValueError, match=_backend.BACKEND_ENV):
        wk.resolve_backend("clip_", "cpu")


def test_bad_backend_names():
    with pytest.raises(ValueError, match="backend"):
        wk.resolve_backend("clip_", "cpu", "cuda")
    with pytest.raises(ValueError, match="backend.*triton"):
        wk.resolve_backend("clip_", "cpu", "triton")  # clip_ has no Triton kernel
    with pytest.raises(ValueError, match="backend"):
        wk.clip_([torch.randn(2)], backend="fast")


@pytest.fixture
def no_extension(monkeypatch):
    """Pretend the extension failed to load."""
    monkeypatch.setattr(_backend, "_ext", None)
    monkeypatch.setattr(_backend, "_ext_loaded", True)
    monkeypatch.setattr(_backend, "_ext_error", "ImportError: simulated")
    monkeypatch.setattr(_backend, "_warned", False)
    _backend._resolve.cache_clear()
    yield
    _backend._resolve.cache_clear()


def test_missing_extension_warns_once_and_falls_back(no_extension, monkeypatch):
    monkeypatch.delenv(_backend.STRICT_ENV, raising=False)
    t = torch.tensor([2.0, -3.0, 0.001])
    with pytest.warns(RuntimeWarning, match="simulated"):
        wk.clip_([t], 0.5)
    torch.testing.assert_close(t, torch.tensor([0.5, -0.5, 0.001]))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wk.clip_([t], 0.5)  # no second warning
        assert _backend.resolve("rmsprop_clip_", "cpu") == "reference"
    with pytest.raises(RuntimeError, match="not available"):
        wk.resolve_backend("clip_", "cpu", "cpp")  # forcing it is an error


def test_missing_extension_is_an_error_when_strict(no_extension, monkeypatch):
    monkeypatch.setenv(_backend.STRICT_ENV, "1")
    with pytest.raises(RuntimeError, match="WGAN_KERNELS_STRICT"):
        wk.clip_([torch.randn(3)])


def test_info_reports_versions_and_backends(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    info = collect()
    assert f"wgan_kernels {wk.__version__}" in out
    assert f"torch {torch.__version__}" in out
    assert "extension wgan_kernels._C:" in out
    for op, per_device in info["backends"].items():
        assert op in out
        assert per_device["cpu"] in ("cpp", "reference", "triton")
    if info["extension"] is not None:
        assert "built: CPU" in out


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "wgan_kernels", "info"], capture_output=True, text=True, check=True)
    assert "wgan_kernels" in out.stdout and "clip_" in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present: the GPU bench would run")
def test_cuda_bench_without_a_gpu_says_so_in_one_line(capsys):
    assert main(["bench", "--device", "cuda", "--out", "unused"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "nothing was run" in lines[0]


# ----------------------------------------------------------------------------- one dispatch point


class _NoCudaHalf:
    """The extension as a build with WGAN_KERNELS_SKIP_CUDA=1 loads it."""

    has_cuda = False


@pytest.fixture
def cpu_only_extension(monkeypatch):
    monkeypatch.setattr(_backend, "_ext", _NoCudaHalf())
    monkeypatch.setattr(_backend, "_ext_loaded", True)
    monkeypatch.setattr(_backend, "_ext_error", None)
    _backend._resolve.cache_clear()
    yield
    _backend._resolve.cache_clear()


def test_extension_without_cuda_half(cpu_only_extension):
    """CUDA tensors go to the reference under auto; forcing cpp names the missing half."""
    assert _backend.resolve("clip_", "cpu") == "cpp"
    assert _backend.resolve("clip_", "cuda") == "reference"
    with pytest.raises(RuntimeError, match="without its CUDA half"):
        _backend.resolve("clip_", "cuda", "cpp")
    assert _backend.resolve_tensors("clip_", [torch.randn(2), torch.randn(3)]) == "cpp"


def test_chain_path_and_layer_activation(monkeypatch):
    x = torch.randn(2, 3)
    monkeypatch.delenv(_backend.BACKEND_ENV, raising=False)
    assert _backend.chain_path(x) == "one-node"
    assert _backend.layer_activation(x.device) == "reference"  # CPU keeps aten's kernels
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _backend.chain_path(x) == "layer-by-layer"
    for name, path in (("reference", "layer-by-layer"), ("triton", "layer-by-layer"), ("cpp", "one-node"),
                       ("auto", "one-node")):
        monkeypatch.setenv(_backend.BACKEND_ENV, name)
        assert _backend.chain_path(x) == path, name
    monkeypatch.setenv(_backend.BACKEND_ENV, "cpp")
    assert _backend.layer_activation(x.device) == "reference"


def test_chain_path_under_compile(monkeypatch):
    monkeypatch.delenv(_backend.BACKEND_ENV, raising=False)
    seen = []

    def f(x):
        seen.append((_backend.compiling(), _backend.chain_path(x), _backend.layer_activation(x.device)))
        return x * 2

    torch.compile(f, backend="eager")(torch.randn(3))
    assert seen == [(True, "layer-by-layer", "reference")]


def test_no_dispatch_outside_backend():
    """Implementation choices live in _backend: no other module reads the backend variable (info
    only prints it) or asks torch.compiler whether it is compiling (they call resolve,
    resolve_tensors, chain_path, layer_activation or compiling)."""
    from pathlib import Path

    root = Path(wk.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.name == "_backend.py":
            continue
        text = path.read_text()
        for needle in ("is_compiling(", "getenv(BACKEND_ENV", 'getenv("WGAN_KERNELS_BACKEND"',
                       'environ.get("WGAN_KERNELS_BACKEND"', "requested_backend("):
            if needle in text:
                offenders.append(f"{path.relative_to(root)}: {needle}")
    assert offenders == [], offenders
