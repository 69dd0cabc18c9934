"""grad_norm_penalty: every backend against the plain-PyTorch reference, and its derivatives."""

import pytest
import torch
from conftest import DEVICES, tol

from wgan_kernels._backend import available
from wgan_kernels.ops.penalty import grad_norm_penalty, grad_norm_penalty_and_norms, grad_norm_penalty_reference


def backends_for(device: str):
    return [b for b in ("cpp", "triton", "reference") if available(b, device)]


def cases():
    """(device, backend, dtype) triples; the Triton interpreter has no bfloat16."""
    out = []
    for device in DEVICES:
        for backend in backends_for(device):
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                if backend == "triton" and device == "cpu" and dtype == torch.bfloat16:
                    continue
                out.append((device, backend, dtype))
    return out


SPECS = {
    "gp": dict(weight=10.0, center=1.0, p=2.0),
    "gp-one-sided": dict(weight=10.0, center=1.0, p=2.0, one_sided=True),
    "div": dict(weight=2.0, center=0.0, p=6.0),
    "r1": dict(weight=5.0, center=0.0, p=2.0),
    "odd": dict(weight=0.7, center=0.4, p=3.5),
    "odd-center0": dict(weight=1.5, center=0.0, p=1.5),
}


def shaped(shape, device, dtype, gen, scale=0.5):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


SHAPES = [(1, 1), (3, 7), (64, 2), (2, 5003)]


@pytest.mark.parametrize("device,backend,dtype", cases())
@pytest.mark.parametrize("spec", list(SPECS))
def test_penalty_matches_reference(device, backend, dtype, spec, gen):
    kw = SPECS[spec]
    for shape in SHAPES + ["permuted"]:
        if shape == "permuted":  # non-contiguous (B, C, H, W)
            g = shaped((4, 5, 3, 6), device, dtype, gen).permute(2, 0, 1, 3)
        else:
            g = shaped(shape, device, dtype, gen, scale=1.0 / max(1, shape[1]) ** 0.5 * 1.3)
        g.requires_grad_(True)
        out = grad_norm_penalty(g, backend=backend, **kw)
        # truth: the reference in float64 on the same (rounded) input
        g64 = g.detach().double().requires_grad_(True)
        ref = grad_norm_penalty_reference(g64, **kw)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert_matches_reference(out, ref, g, g64, dtype, f"grad_norm_penalty {backend} {spec} {shape} {dtype}")


def assert_matches_reference(out, ref, g, g64, dtype, msg):
    """The penalty and its gradient against the float64 reference on the same (rounded) input."""
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(out.double(), ref.detach(), rtol=rtol, atol=1e-7, msg=msg)
    (grad,) = torch.autograd.grad(out, g)
    (grad_ref,) = torch.autograd.grad(ref, g64)
    t = tol(dtype)
    torch.testing.assert_close(grad.double(), grad_ref.to(dtype).double(), rtol=max(t["rtol"], 1e-5),
                               atol=max(t["atol"], 1e-6) * max(1.0, grad_ref.abs().max().item()),
                               msg=lambda m: f"{msg} backward: {m}")


@pytest.mark.parametrize("backend", backends_for("cpu"))
@pytest.mark.parametrize("spec", list(SPECS))
def test_gradcheck_gradgradcheck(backend, spec, gen):
    kw = SPECS[spec]
    g = shaped((3, 4, 5), "cpu", torch.float64, gen, scale=0.3).requires_grad_(True)

    def f(x):
        return grad_norm_penalty(x, backend=backend, **kw)

    fast = backend == "triton"  # each interpreted launch is slow: check random projections
    assert torch.autograd.gradcheck(f, (g,), fast_mode=fast)
    assert torch.autograd.gradgradcheck(f, (g,), fast_mode=fast)


@pytest.mark.parametrize("backend", [b for b in backends_for("cpu") if b != "reference"])
def test_zero_gradient_row_is_defined(backend, gen):
    """The fused backends define the gradient at n_i = 0 (the plain reference, like eager
    autograd through a norm, gives NaN there)."""
    g = shaped((4, 9), "cpu", torch.float32, gen)
    g[2] = 0.0
    for spec in ("gp", "div", "r1", "odd", "odd-center0"):
        x = g.clone().requires_grad_(True)
        out = grad_norm_penalty(x, backend=backend, **SPECS[spec])
        (grad,) = torch.autograd.grad(out, x)
        assert torch.isfinite(out) and torch.isfinite(grad).all(), (backend, spec)
        assert torch.equal(grad[2], torch.zeros(9)), (backend, spec)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_float16_input_does_not_overflow_at_p6(backend, gen):
    g = (shaped((8, 50), "cpu", torch.float32, gen, scale=2.0)).half()  # norms ~ 14: n^6 ~ 7e6 > fp16 max
    out, norms = grad_norm_penalty_and_norms(g, weight=2.0, center=0.0, p=6.0, backend=backend)
    ref = grad_norm_penalty_reference(g.double(), weight=2.0, center=0.0, p=6.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(norms.double(), g.double().norm(dim=1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", backends_for("cpu"))
def test_bad_input(backend):
    g = torch.randn(3, 4)
    kw = dict(weight=1.0, center=1.0, p=2.0)
    with pytest.raises(ValueError, match="grads"):
        grad_norm_penalty(torch.ones(3, 4, dtype=torch.int32), backend=backend, **kw)
    with pytest.raises(ValueError, match="grads.*empty"):
        grad_norm_penalty(torch.randn(0, 4), backend=backend, **kw)
    with pytest.raises(ValueError, match="grads"):
        grad_norm_penalty([1.0, 2.0], backend=backend, **kw)
    for p in (1.0, 0.5, -2.0, float("nan")):
        with pytest.raises(ValueError, match="p"):
            grad_norm_penalty(g, weight=1.0, center=0.0, p=p, backend=backend)
    for w in (-1.0, float("inf")):
        with pytest.raises(ValueError, match="weight"):
            grad_norm_penalty(g, weight=w, center=0.0, p=2.0, backend=backend)
    with pytest.raises(ValueError, match="center"):
        grad_norm_penalty(g, weight=1.0, center=float("nan"), p=2.0, backend=backend)
    with pytest.raises(ValueError, match="one_sided"):
        grad_norm_penalty(g, one_sided="yes", backend=backend, **kw)


@pytest.mark.skipif(not available("cpp", "cpu"), reason="extension not built")
def test_custom_ops_opcheck(gen):
    """The extension's kernels are torch.library custom ops: schemas and fake kernels check out."""
    from wgan_kernels.ops.penalty import EPS, _penalty_backward_cpu, _penalty_forward_cpu

    g = shaped((5, 7), "cpu", torch.float32, gen)
    torch.library.opcheck(_penalty_forward_cpu, (g, 2.0, 0.0, 6.0, False, EPS))
    _, norms = _penalty_forward_cpu(g, 2.0, 0.0, 6.0, False, EPS)
    torch.library.opcheck(_penalty_backward_cpu, (g, norms, torch.tensor(1.5), 2.0, 0.0, 6.0, False, EPS))


@pytest.mark.skipif(not available("triton", "cpu"), reason="Triton cannot run on CPU tensors here (no TRITON_INTERPRET)")
@pytest.mark.parametrize("split_cols", [None, 64], ids=["rows-of-9000", "chunks-of-64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("spec", ["gp", "gp-one-sided", "div", "odd"])
def test_long_rows_split_across_programs(monkeypatch, split_cols, dtype, spec, gen):
    """Rows longer than _SPLIT_COLS: partial sums by several programs per row, then the norms and
    phi in a second launch; the same numbers as the reference (and the one-pass kernel)."""
    from conftest import LaunchGrids

    from wgan_kernels.ops import penalty

    shape = (2, 9000) if split_cols is None else (5, 3, 67)  # 9000 > 8192; 201 values in 4 chunks of 64
    if split_cols is not None:
        monkeypatch.setattr(penalty, "_SPLIT_COLS", split_cols)
    partial = LaunchGrids(penalty._penalty_partial_kernel)
    monkeypatch.setattr(penalty, "_penalty_partial_kernel", partial)
    kw = SPECS[spec]
    g = shaped(shape, "cpu", dtype, gen, scale=1.3 / (shape[1] * shape[-1]) ** 0.5).requires_grad_(True)
    out, norms = grad_norm_penalty_and_norms(g, backend="triton", **kw)
    g64 = g.detach().double().requires_grad_(True)
    ref = grad_norm_penalty_reference(g64, **kw)
    assert partial.grids == [(shape[0], 2 if split_cols is None else 4)]
    msg = f"grad_norm_penalty triton split rows {spec} {shape} {dtype}"
    rtol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(norms.double(), g64.detach().flatten(1).norm(dim=1), rtol=rtol, atol=1e-7, msg=msg)
    assert_matches_reference(out, ref, g, g64, dtype, msg)
