"""Weight clipping and RMSprop+clip: the eager loops users write vs wgan_kernels.

Cases (parameters of the design card's benchmark models, float32):
  clip_:          `p.clamp_` loop | torch._foreach_clamp_min_/max_ | wgan_kernels.clip_ | copy floor
  ClippedRMSprop: RMSprop(foreach=True) + foreach clamp | wgan_kernels.ClippedRMSprop | copy floor
The copy floor is one `dst.copy_(src)` between flat buffers, moving as many bytes as the op.
"""

import pytest
import torch
from conftest import DEVICE, QUICK, interleaved, record

import wgan_kernels as wk
from wgan_kernels.models import BENCH_MODELS, with_random_grads

C = 0.01


def tensors50():
    return torch.nn.ParameterList([torch.nn.Parameter(torch.randn(64, 64)) for _ in range(50)])


CASES = {"50x64x64": tensors50, **BENCH_MODELS}
if QUICK:
    CASES.pop("wide100m")


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    torch.manual_seed(0)
    module = with_random_grads(CASES[request.param]().to(DEVICE))
    params = list(module.parameters())
    yield request.param, params
    del module, params
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def numel(params):
    return sum(p.numel() for p in params)


def copy_fn(params, per_value: float = 1.0):
    """The copy floor: one copy_ between flat buffers that moves as many bytes as the op does:
    ``per_value`` copied values per parameter value (clip_ reads and writes each once: 1;
    RMSprop reads 3 and writes 2 tensors: 2.5). The same working set, so the same cache level."""
    n = int(numel(params) * per_value)
    src, dst = torch.randn(n, device=DEVICE), torch.empty(n, device=DEVICE)

    def fn():
        dst.copy_(src)
    return fn


CLIP_IMPLS = ["loop", "foreach", "wgan_kernels", "copy"]


def clip_fn(impl, params):
    if impl == "loop":
        def fn():
            for p in params:
                p.data.clamp_(-C, C)
    elif impl == "foreach":
        def fn():
            with torch.no_grad():
                torch._foreach_clamp_min_(params, -C)
                torch._foreach_clamp_max_(params, C)
    elif impl == "wgan_kernels":
        def fn():
            wk.clip_(params, C)
    else:
        fn = copy_fn(params)
    return fn


@pytest.mark.parametrize("impl", CLIP_IMPLS)
def test_clip(benchmark, case, impl):
    name, params = case
    record(benchmark, suite="clip_", case=name, impl=impl, fn=clip_fn(impl, params), numel=numel(params),
           tensors=len(params), bytes=2 * 4 * numel(params))


RMSPROP_IMPLS = ["eager", "wgan_kernels", "copy"]


def rmsprop_fn(impl, params):
    # Small lr: parameters stay in range, the work per step is the same every round.
    if impl == "eager":
        opt = torch.optim.RMSprop(params, lr=1e-9, foreach=True)

        def fn():
            opt.step()
            with torch.no_grad():
                torch._foreach_clamp_min_(params, -C)
                torch._foreach_clamp_max_(params, C)
    elif impl == "wgan_kernels":
        opt = wk.ClippedRMSprop(params, lr=1e-9, clip_value=C)
        fn = opt.step
    else:
        fn = copy_fn(params, per_value=2.5)
    return fn


@pytest.mark.parametrize("impl", RMSPROP_IMPLS)
def test_rmsprop_clip(benchmark, case, impl):
    name, params = case
    # bytes of the fused pass: read p, g, square_avg; write p, square_avg (the copy floor moves as many)
    record(benchmark, suite="ClippedRMSprop", case=name, impl=impl, fn=rmsprop_fn(impl, params),
           numel=numel(params), tensors=len(params), bytes=5 * 4 * numel(params))


# The cases with targets, also timed round-robin: their ratios (and the loop's sub-0.2 ms medians)
# are within this machine's drift between impls timed one after another. Each timed call follows
# an untimed one of the same impl: all find the parameters in cache, as in the one-after-another
# runs. The copy floor is timed in its own rounds after the others (``apart``): an impl timed
# right after its 2 x 11 MB stayed slow through the warm call (clip_ DCGAN-64: 0.2 against 0.13 ms).
INTERLEAVED = [("clip_", "50x64x64"), ("clip_", "dcgan64"), ("ClippedRMSprop", "mlp50"),
               ("ClippedRMSprop", "dcgan64")]


@pytest.mark.parametrize("suite,name", INTERLEAVED)
def test_interleaved(benchmark, suite, name):
    torch.manual_seed(0)
    params = list(with_random_grads(CASES[name]().to(DEVICE)).parameters())
    impls, make = (CLIP_IMPLS, clip_fn) if suite == "clip_" else (RMSPROP_IMPLS, rmsprop_fn)
    interleaved(benchmark, suite=suite, case=name, fns={impl: make(impl, params) for impl in impls},
                rounds=100 if QUICK else 400, warm_calls=1, apart=("copy",), numel=numel(params), tensors=len(params), bytes=0)
