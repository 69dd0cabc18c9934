"""Defects found by fuzzing the penalty API, one test (or more) each: float64 critic losses
(gradcheck), 1-D gradients, real/fake dtype mismatch, NaN propagation, and arguments that used
to end in a raw torch error, a TypeError/IndexError or a silent wrong answer."""

import math

import numpy as np
import pytest
import torch
from conftest import tol
from torch.func import functional_call

import wgan_kernels as wk
from wgan_kernels._backend import available
from wgan_kernels.losses import PRESETS, STRATEGIES, gradient_penalty_reference, penalty_config
from wgan_kernels.ops.activation import leaky_relu_with_mask, masked_scale
from wgan_kernels.ops.penalty import grad_norm_penalty, grad_norm_penalty_and_norms, grad_norm_penalty_reference

BACKENDS = [b for b in ("cpp", "triton", "reference") if available(b, "cpu")]
ACT_BACKENDS = [b for b in ("triton", "reference") if available(b, "cpu")]
SPECS = {
    "gp": dict(weight=10.0, center=1.0, p=2.0),
    "gp-one-sided": dict(weight=10.0, center=1.0, p=2.0, one_sided=True),
    "div": dict(weight=2.0, center=0.0, p=6.0),
    "odd": dict(weight=0.7, center=0.4, p=3.5),
}


def smooth_critic(d_in=3, dtype=torch.float64):
    """Smooth activations only: finite differences never straddle a kink."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(d_in, 6), torch.nn.Tanh(), torch.nn.Linear(6, 5), torch.nn.Softplus(),
                               torch.nn.Linear(5, 1)).to(dtype)


def pair(shape, gen, dtype=torch.float32):
    real = torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    fake = (torch.randn(*shape, generator=gen, dtype=torch.float64) * 1.3 + 0.2).to(dtype)
    return real, fake


class LossOf(torch.nn.Module):
    """critic_loss as a module of the critic's parameters, for functional_call + gradcheck; the
    same penalty points at every call (a fresh generator, same seed)."""

    def __init__(self, critic, penalty):
        super().__init__()
        self.critic = critic
        self.penalty = penalty

    def forward(self, real, fake):
        return wk.critic_loss(self.critic, real, fake, penalty=self.penalty,
                              generator=torch.Generator().manual_seed(0))[0]


def loss_of_parameters(module, real, fake):
    names = [n for n, _ in module.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for _, p in module.named_parameters())
    return (lambda *ps: functional_call(module, dict(zip(names, ps)), (real, fake))), params


# ----------------------------------------------------------------------------- (a) float64 critic_loss


@pytest.mark.parametrize("penalty", ["div", "gp", "r1", "r2", "dragan", "gp-one-sided", None])
def test_critic_loss_gradcheck_float64_double_backward(penalty, gen):
    """A float64 torch critic (autograd's double backward): the whole loss, Wasserstein term
    included, is computed in float64, so finite differences agree with the analytic gradient."""
    real, fake = pair((4, 3), gen, torch.float64)
    fn, params = loss_of_parameters(LossOf(smooth_critic(), penalty), real, fake)
    assert fn(*params).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, params)


@pytest.mark.parametrize("penalty", ["div", "gp", "r1"])
def test_critic_loss_gradcheck_float64_explicit_path(penalty, gen):
    """The explicit path (wgan_kernels.nn.from_torch): first-order gradcheck in float64."""
    from wgan_kernels.nn import from_torch

    real, fake = pair((4, 3), gen, torch.float64)
    fn, params = loss_of_parameters(LossOf(from_torch(smooth_critic()), penalty), real, fake)
    assert fn(*params).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, params)


@pytest.mark.parametrize("kind", ["div", "gp", "r1"])
def test_gradient_penalty_gradcheck_float64(kind, gen):
    critic = smooth_critic()
    real, fake = pair((4, 3), gen, torch.float64)
    names = [n for n, _ in critic.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in critic.parameters())

    def fn(*ps):
        def functional(x):
            return functional_call(critic, dict(zip(names, ps)), (x,))

        return wk.gradient_penalty(functional, real, fake, kind=kind, generator=torch.Generator().manual_seed(0))

    assert fn(*params).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, params)


def test_critic_loss_float64_is_exact_and_lower_precisions_accumulate_in_float32(gen):
    """float64: the loss equals a float64 reference to 1e-12 (it was rounded to float32);
    float32/float16: the loss stays float32."""
    critic = smooth_critic()
    real, fake = pair((6, 3), gen, torch.float64)
    loss, stats = wk.critic_loss(critic, real, fake, penalty="r1")
    pen = gradient_penalty_reference(critic, real, weight=5.0, center=0.0, p=2.0)
    ref = critic(fake).mean() - critic(real).mean() + pen
    assert loss.dtype == torch.float64 and all(v.dtype == torch.float64 for v in stats.values())
    torch.testing.assert_close(loss, ref, **tol(torch.float64), msg="critic_loss r1 float64")
    for dtype in (torch.float32, torch.float16):
        loss, stats = wk.critic_loss(critic.to(dtype), real.to(dtype), fake.to(dtype), penalty=None)
        assert loss.dtype == torch.float32 and stats["grad_norm"].dtype == torch.float32, dtype


# ----------------------------------------------------------------------------- (b) 1-D gradients


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", list(SPECS))
def test_one_dimensional_grads_are_per_sample_scalars(backend, spec, gen):
    """grads (B,): each sample's gradient is a scalar, its norm |g_i|: the same penalty, gradient
    and second derivative as grads (B, 1), on every backend."""
    kw = SPECS[spec]
    g = torch.randn(7, generator=gen, dtype=torch.float64).requires_grad_()
    g2 = g.detach().clone().unsqueeze(1).requires_grad_()
    out = grad_norm_penalty(g, backend=backend, **kw)
    ref = grad_norm_penalty_reference(g2, **kw)
    torch.testing.assert_close(out, ref.detach(), rtol=1e-12, atol=1e-12, msg=f"{backend} {spec} 1-D value")
    (d1,) = torch.autograd.grad(out, g, create_graph=True)
    (r1,) = torch.autograd.grad(ref, g2, create_graph=True)
    torch.testing.assert_close(d1, r1.squeeze(1), rtol=1e-10, atol=1e-12, msg=f"{backend} {spec} 1-D gradient")
    w = torch.randn(7, generator=gen, dtype=torch.float64)
    (dd,) = torch.autograd.grad((d1 * w).sum(), g)
    (rr,) = torch.autograd.grad((r1.squeeze(1) * w).sum(), g2)
    torch.testing.assert_close(dd, rr.squeeze(1), rtol=1e-8, atol=1e-10, msg=f"{backend} {spec} 1-D second derivative")
    _, norms = grad_norm_penalty_and_norms(g, backend=backend, **kw)
    torch.testing.assert_close(norms, g.detach().abs(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_grads_gradgradcheck(backend, gen):
    g = (torch.rand(5, generator=gen, dtype=torch.float64) + 0.2).requires_grad_()
    for kw in SPECS.values():
        def f(x):
            return grad_norm_penalty(x, backend=backend, **kw)

        assert torch.autograd.gradcheck(f, (g,), fast_mode=backend == "triton")
        assert torch.autograd.gradgradcheck(f, (g,), fast_mode=backend == "triton")


def test_gradient_penalty_of_one_dimensional_samples(gen):
    """A critic of scalar samples (B,): gradient_penalty, its reference and critic_loss agree."""
    def critic(x):
        return torch.sin(3 * x) + x * x

    real, fake = pair((6,), gen)
    out = wk.gradient_penalty(critic, real, fake, kind="gp", generator=torch.Generator().manual_seed(1))
    points = wk.sample_penalty_points(real, fake, "interpolate", torch.Generator().manual_seed(1))
    ref = gradient_penalty_reference(critic, points, weight=10.0, center=1.0, p=2.0)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=1e-6)
    loss, stats = wk.critic_loss(critic, real, fake, penalty="div")
    assert torch.isfinite(loss) and stats["penalty"] > 0


# ----------------------------------------------------------------------------- (c) real/fake dtype mismatch

MISMATCH = r"fake: expected the dtype of real \(torch\.float32\), got torch\.float64"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dtype_mismatch_sample_penalty_points(strategy, gen):
    real, fake = pair((4, 3), gen)
    with pytest.raises(ValueError, match=MISMATCH):
        wk.sample_penalty_points(real, fake.double(), strategy, generator=gen)


@pytest.mark.parametrize("kind", list(PRESETS))
def test_dtype_mismatch_gradient_penalty_and_critic_loss(kind, gen):
    critic = smooth_critic(dtype=torch.float32)
    real, fake = pair((4, 3), gen)
    with pytest.raises(ValueError, match=MISMATCH):
        wk.gradient_penalty(critic, real, fake.double(), kind=kind)
    with pytest.raises(ValueError, match=MISMATCH):
        wk.critic_loss(critic, real, fake.double(), penalty=kind)
    with pytest.raises(ValueError, match=MISMATCH):
        wk.critic_loss(critic, real, fake.double(), penalty=None)


# ----------------------------------------------------------------------------- (d) NaN propagation


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", ["gp", "div", "odd", "gp-one-sided"])
def test_nan_gradient_row_gives_nan_penalty(backend, spec, gen):
    """A NaN in a sample's gradient makes the penalty NaN, as in the reference; the Triton kernels
    turned it into 0 (``where(x > 0, ..., 0)``, and ``tl.maximum`` drops NaN on a GPU), and so did the
    CPU kernel's one-sided phi (``d > 0 ? d : 0``)."""
    g = torch.randn(3, 4, generator=gen)
    g[1, 2] = math.nan
    x = g.clone().requires_grad_()
    out = grad_norm_penalty(x, backend=backend, **SPECS[spec])
    (grad,) = torch.autograd.grad(out, x)
    assert torch.isnan(out), (backend, spec, out)
    assert torch.isnan(grad[1]).all(), (backend, spec, grad)
    assert torch.isfinite(grad[[0, 2]]).all(), (backend, spec, grad)


# ----------------------------------------------------------------------------- (d) hyper-parameters


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_scalars_are_numbers_and_bad_numbers_name_the_argument(backend, gen):
    g = torch.randn(3, 4, generator=gen)
    ref = grad_norm_penalty(g, weight=2.0, center=0.5, p=3.0, backend="reference")
    out = grad_norm_penalty(g, weight=np.float32(2.0), center=np.float64(0.5), p=np.int64(3), backend=backend)
    torch.testing.assert_close(out, ref, **tol(torch.float32))
    # beyond float32's range (3.4028235677973366e38 is one): the reference rounded such a weight to
    # inf and gave inf * 0 = NaN where the penalty is 0, while the extension, in double, gave 0
    bad = {"weight": ["10", True, np.bool_(True), 10 ** 400, -1.0, math.inf, None, [1.0], torch.tensor(1.0),
                      3.4028235677973366e38, 1e300],
           "center": [math.nan, "0", False, -math.inf, -1e39],
           "p": [1.0, 0.5, math.nan, "2", True, 10 ** 400, 1e39]}
    for name, values in bad.items():
        for value in values:
            kw = dict(weight=1.0, center=0.0, p=2.0)
            kw[name] = value
            with pytest.raises(ValueError, match=f"^{name}: "):
                grad_norm_penalty(g, backend=backend, **kw)
    for value in (1, "yes", np.bool_(True), None):
        with pytest.raises(ValueError, match="^one_sided: "):
            grad_norm_penalty(g, weight=1.0, center=0.0, p=2.0, one_sided=value, backend=backend)


@pytest.mark.parametrize("backend", ACT_BACKENDS)
def test_activation_slope_beyond_float32_is_refused(backend, gen):
    """A slope beyond float32's range: torch's leaky_relu raised a RuntimeError, the Triton kernel
    returned inf/NaN; now both refuse it, and numpy slopes are numbers."""
    x = torch.randn(3, 4, generator=gen)
    for slope in (1e39, -1e300, math.inf, True, "0.2"):
        with pytest.raises(ValueError, match="^negative_slope: "):
            leaky_relu_with_mask(x, slope, backend=backend)
        with pytest.raises(ValueError, match="^negative_slope: "):
            masked_scale(x, x > 0, slope, backend=backend)
    y, mask = leaky_relu_with_mask(x, np.float32(0.25), backend=backend)
    torch.testing.assert_close(y, torch.nn.functional.leaky_relu(x, 0.25), **tol(torch.float32))
    torch.testing.assert_close(masked_scale(x, mask, np.float64(0.5), backend=backend),
                               torch.where(mask, x, 0.5 * x), **tol(torch.float32))


_COMPILE_CHECK = r"""
import sys
try:
    from triton import compile as triton_compile
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import mangle_type
except ImportError as e:  # another Triton layout
    print("SKIP", e)
    sys.exit(3)
from wgan_kernels.ops import activation, penalty

def ttir(fn, signature, constexprs):
    # a float argument gets the type the launcher gives a Python float, unless the kernel annotates it
    annotations = {param.name: param.annotation for param in fn.params}
    signature = {name: (annotations[name] or mangle_type(0.5)) if ty == "float" else ty
                 for name, ty in signature.items()}
    source = ASTSource(fn, signature=signature, constexprs=constexprs)
    return triton_compile(source, target=GPUTarget("cuda", 90, 32)).asm["ttir"]

failures = []
for ptr, f64 in (("*fp32", False), ("*fp64", True)):
    kernels = {
        "penalty forward": (2, ttir(penalty._penalty_fwd_kernel, {
            "g_ptr": ptr, "norms_ptr": ptr, "phi_ptr": ptr, "cols": "i32", "center_arg": "float", "p_arg": "float",
            "ONE_SIDED": "constexpr", "ACC_F64": "constexpr", "BLOCK": "constexpr"},
            {"ONE_SIDED": False, "ACC_F64": f64, "BLOCK": 16})),
        "penalty backward": (4, ttir(penalty._penalty_bwd_kernel, {
            "g_ptr": ptr, "out_ptr": ptr, "norms_ptr": ptr, "grad_out_ptr": ptr, "cols": "i32",
            "weight_over_rows_arg": "float", "center_arg": "float", "p_arg": "float", "eps_arg": "float",
            "ONE_SIDED": "constexpr", "MODE": "constexpr", "BLOCK": "constexpr"},
            {"ONE_SIDED": True, "MODE": 2, "BLOCK": 16})),
        "masked_scale": (1, ttir(activation._masked_scale_kernel, {
            "g_ptr": ptr, "mask_ptr": "*u8", "out_ptr": ptr, "n": "i32", "slope_arg": "float",
            "INDEX64": "constexpr", "F64": "constexpr", "BLOCK": "constexpr"},
            {"INDEX64": False, "F64": f64, "BLOCK": 16})),
    }
    for name, (args, ir) in kernels.items():
        params = ir[ir.index("tt.func"):].split("{", 1)[0]
        if params.count(": f64") != args:
            failures.append(f"{name}: {args} float arguments expected as f64 in {params}")
        truncs = ir.count("arith.truncf")
        if truncs != (0 if f64 else args):
            failures.append(f"{name} (float64 input: {f64}): {truncs} truncf")
print("\n".join(failures) or "ok")
sys.exit(1 if failures else 0)
"""


def test_triton_float_arguments_are_float64_in_compiled_kernels():
    """On a GPU a bare Python float reaches a Triton kernel as float32, which rounds center, p,
    the weight and the slope of a float64 op (center 0.4 -> 0.4000000059604645). The kernels
    annotate them tl.float64. Compiled for sm_90 (no GPU needed; in a subprocess, since this one
    runs the interpreter): the float64 kernels never truncate to float32, and the float32 kernels
    convert each argument once."""
    import os
    import subprocess
    import sys

    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    if run.returncode == 3 and run.stdout.startswith("SKIP"):
        pytest.skip(f"this Triton cannot compile for sm_90 from Python: {run.stdout}")
    assert run.returncode == 0, run.stdout + run.stderr


# ----------------------------------------------------------------------------- (d) losses arguments


def test_losses_arguments_are_refused_by_name(gen):
    critic = smooth_critic(dtype=torch.float32)
    real, fake = pair((4, 3), gen)
    cases = [
        (lambda: wk.critic_loss(None, real, fake), "^critic: expected a callable"),
        (lambda: wk.gradient_penalty("critic", real, fake), "^critic: expected a callable"),
        (lambda: wk.critic_loss(lambda x: critic(x).mean(), real, fake),
         r"^critic: expected an output of shape \(8, ...\)"),
        (lambda: wk.critic_loss(lambda x: critic(x)[:3], real, fake, penalty=None), r"^critic: expected an output"),
        (lambda: wk.gradient_penalty(lambda x: (critic(x),), real, fake), "^critic: expected a tensor output"),
        (lambda: wk.gradient_penalty(lambda x: critic(x).detach(), real, fake), "^critic: its output does not depend"),
        (lambda: wk.critic_loss(critic, real, fake, penalty="gp", generator=3),
         "^generator: expected a torch.Generator"),
        (lambda: wk.sample_penalty_points(real.to("meta"), fake.to("meta"), generator=gen),
         r"^generator: expected a torch.Generator on the samples' device \(meta\)"),
        (lambda: wk.gradient_penalty(critic, real, fake, scaler=2.0), "^scaler: expected a torch.amp.GradScaler"),
        (lambda: wk.critic_loss(critic, real, fake, penalty=None, backend="cuda"), "^backend: expected one of"),
        (lambda: wk.critic_loss(critic, real, fake, backend=["cpp"]), "^backend: expected one of"),
        (lambda: wk.gradient_penalty(critic, real, fake, backend="fast"), "^backend: expected one of"),
        (lambda: wk.critic_loss(critic, real, fake, penalty=["gp"]), "^penalty: expected a preset kind"),
        (lambda: wk.critic_loss(critic, real, fake, penalty="wgan-lp"), "^penalty: expected a preset kind"),
        (lambda: penalty_config({"gp"}), "^kind: expected a preset kind"),
        (lambda: wk.critic_loss(critic, real, fake, every=True), "^every: expected an int >= 1"),
        (lambda: wk.critic_loss(critic, real, fake, every=2.0), "^every: expected an int >= 1"),
        (lambda: wk.critic_loss(critic, real, fake, weight="10", every=3), "^weight: .*got '10'$"),
        (lambda: wk.critic_loss(critic, real, fake, weight=True, every=3), "^weight: .*got True$"),
        (lambda: wk.critic_loss(critic, real, fake, penalty=None, weight=10.0),
         "^weight: has no effect with penalty=None"),
        (lambda: penalty_config("gp", p=[2.0]), "^p: "),
        (lambda: penalty_config("gp", sampling=["real"]), "^sampling: expected one of"),
        (lambda: penalty_config("gp", one_sided="no"), "^one_sided: expected a bool"),
        (lambda: wk.sample_penalty_points(real, fake, {"interpolate"}), "^strategy: expected one of"),
        (lambda: wk.sample_penalty_points(real[:1, :1], fake[:1, :1], "perturbed-real"), "^real: perturbed-real"),
        (lambda: wk.critic_loss(torch.nn.Linear(1, 1), real[:1, :1], fake[:1, :1], penalty="dragan"),
         "^real: perturbed-real"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()


def test_penalty_config_checks_and_normalises_overrides():
    cfg = penalty_config("div", weight=np.float32(3.0), p=4)
    assert cfg == PRESETS["div"].__class__(weight=3.0, center=0.0, p=4.0, one_sided=False, sampling="real+fake")
    assert type(cfg.weight) is float and type(cfg.p) is float
    assert penalty_config("div", weight=3.0, p=4) is penalty_config("div", weight=3.0, p=4)  # cached
    assert penalty_config("gp") is PRESETS["gp"]
    with pytest.raises(ValueError, match="^one_sided"):  # 1 == True as a cache key: not the same argument
        penalty_config("gp", one_sided=1)


def test_lazy_regularization_with_a_bound_method(gen):
    """every=N with ``critic.forward``: a bound method is a new object at each access, so the
    per-critic call count was lost and the penalty (times N) applied on every call."""
    critic = smooth_critic(dtype=torch.float32)
    real, fake = pair((4, 3), gen)
    applied = [wk.critic_loss(critic.forward, real, fake, penalty="div", every=3)[1]["penalty"].item() != 0
               for _ in range(6)]
    assert applied == [True, False, False, True, False, False]


def test_critic_ignoring_its_input_has_a_zero_input_gradient(gen):
    real, fake = pair((4, 3), gen)
    bias = torch.nn.Parameter(torch.tensor(0.5))

    def constant(x):
        return bias * torch.ones(x.shape[0], 1)

    loss, stats = wk.critic_loss(constant, real, fake, penalty="gp", generator=gen)
    torch.testing.assert_close(stats["penalty"], torch.tensor(10.0))  # ||0 - 1||^2 * 10
    torch.testing.assert_close(stats["grad_norm"], torch.tensor(0.0))
    loss.backward()


@pytest.mark.parametrize("penalty", ["div", "gp", None])
def test_critic_loss_under_no_grad_evaluates(penalty, gen):
    """Under torch.no_grad (an evaluation) the input gradient still comes from autograd: the same
    values as with grad enabled, and no graph; under inference_mode a clear error."""
    critic = smooth_critic(dtype=torch.float32)
    real, fake = pair((4, 3), gen)
    loss, stats = wk.critic_loss(critic, real, fake, penalty=penalty, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        loss_ng, stats_ng = wk.critic_loss(critic, real, fake, penalty=penalty,
                                           generator=torch.Generator().manual_seed(4))
    assert not loss_ng.requires_grad
    torch.testing.assert_close(loss_ng, loss.detach(), **tol(torch.float32))
    torch.testing.assert_close(stats_ng["penalty"], stats["penalty"], **tol(torch.float32))
    if penalty is not None:
        # a module takes the explicit path (traced), which needs no autograd: inference mode works
        with torch.inference_mode():
            loss_im, _ = wk.critic_loss(critic, real, fake, penalty=penalty,
                                        generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(loss_im, loss.detach(), **tol(torch.float32))
        # autograd's double backward (a critic given as a function) cannot run there: a clear error
        with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
            wk.critic_loss(lambda x: critic(x), real, fake, penalty=penalty)


def test_interpolate_strategies_permute_on_the_samples_device(gen):
    """The random pairing of interpolate-within/-mixed is drawn on the samples' device, with the
    caller's generator (a CUDA generator cannot draw a CPU randperm): reproducible per seed."""
    real, fake = pair((9, 2), gen)
    for strategy in ("interpolate-within", "interpolate-mixed"):
        a = wk.sample_penalty_points(real, fake, strategy, torch.Generator().manual_seed(3))
        b = wk.sample_penalty_points(real, fake, strategy, torch.Generator().manual_seed(3))
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    if torch.cuda.is_available():  # pragma: no cover - GPU runs
        g = torch.Generator("cuda").manual_seed(3)
        out = wk.sample_penalty_points(real.cuda(), fake.cuda(), "interpolate-within", g)
        assert out.shape == (18, 2) and out.is_cuda


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_overflow_then_weight_zero_is_nan_on_every_backend(backend):
    """phi beyond float32's range: the float32 mean is inf on every backend (the CPU kernel sums in
    double, and gave 0 for weight 0 where eager float32 gives 0 * inf = NaN)."""
    g = torch.full((1, 1), 0.01)
    assert torch.isnan(grad_norm_penalty(g, weight=0.0, center=2642246.0, p=6.0, backend=backend))
    assert torch.isinf(grad_norm_penalty(g, weight=1.0, center=2642246.0, p=6.0, backend=backend))
    # each row finite in float32 (1.9e38), their sum not
    assert torch.isinf(grad_norm_penalty(g.repeat(3, 1), weight=1.0, center=2.4e6, p=6.0, backend=backend))
