"""Spectral norm: one power-iteration update for every layer of a critic, and a whole
training-mode SN-critic forward; torch's parametrization vs wgan_kernels.

Impls:
  torch        torch.nn.utils.parametrizations.spectral_norm's own power method, layer by layer
               (power iteration only: its _power_method + sigma, under no_grad)
  wgan_kernels power_iteration_ over all layers in one call (the same u, v)
  copy         a copy_ of as many values as all weights: the bytes floor of one pass over W
For the forward cases: `torch` = a plain torch critic with torch's spectral_norm on every layer,
`wgan_kernels` = spectral_norm_all on the same plain torch critic (its Linear / Conv2d become
SNLinear / SNConv2d blocks with 1/sigma folded into the output; one batched iteration per weight
update), `no-sn` = the same critic without spectral norm (the floor), batch 1, each after a weight
update; also timed round-robin (test_sn_critic_forward_interleaved), whose medians the rows use.
The step cases ("SN critic step"): a WGAN-GP critic step at batch 64 on the same two critics,
`torch` = torch's spectral_norm and the double-backward code users write, `wgan_kernels` =
spectral_norm_all and critic_loss; round-robin.
"""

import pytest
import torch
from conftest import DEVICE, QUICK, interleaved, record

import wgan_kernels as wk
from wgan_kernels.eager import critic_loss_eager
from wgan_kernels.models import ResNet32Critic, dcgan64_critic
from wgan_kernels.nn.spectral import spectral_norm_all
from wgan_kernels.ops.spectral_norm import power_iteration_

# plain torch critics (a Sequential, and a custom module as users write the ResNet)
MODELS = {"dcgan64": (dcgan64_critic, (1, 3, 64, 64)), "resnet32": (ResNet32Critic, (1, 3, 32, 32))}
if QUICK:
    MODELS.pop("resnet32")
SN_TYPES = (torch.nn.Linear, torch.nn.Conv2d)


def torch_sn_critic(make):
    torch.manual_seed(0)
    critic = make().to(DEVICE)
    for m in critic.modules():
        if isinstance(m, SN_TYPES):
            torch.nn.utils.parametrizations.spectral_norm(m)
    return critic


def build_iteration(model, impl):
    """(function, values, tensors) of one power-iteration update of every layer of the critic."""
    critic = torch_sn_critic(MODELS[model][0])
    layers = [m for m in critic.modules() if isinstance(m, SN_TYPES)]
    sns = [m.parametrizations.weight[0] for m in layers]
    mats = [sn._reshape_weight_to_matrix(m.parametrizations.weight.original).detach() for sn, m in zip(sns, layers)]
    us = [sn._u.clone() for sn in sns]
    vs = [sn._v.clone() for sn in sns]
    n = sum(w.numel() for w in mats)
    if impl == "torch":
        def fn():
            with torch.no_grad():
                for sn, w in zip(sns, mats):
                    sn._power_method(w, 1)
                    torch.vdot(sn._u, torch.mv(w, sn._v))
    elif impl == "wgan_kernels":
        def fn():
            power_iteration_(mats, us, vs, 1)
    else:
        src, dst = torch.randn(n, device=DEVICE), torch.empty(n, device=DEVICE)

        def fn():
            dst.copy_(src)
    return fn, n, len(mats)


@pytest.mark.parametrize("impl", ["torch", "wgan_kernels", "copy"])
@pytest.mark.parametrize("model", list(MODELS))
def test_power_iteration_all_layers(benchmark, model, impl):
    fn, n, tensors = build_iteration(model, impl)
    # bytes floor: each weight read once per iteration (copy: read + write)
    record(benchmark, suite="SN power iteration", case=model, impl=impl, fn=fn, numel=n, tensors=tensors,
           bytes=(2 if impl == "copy" else 1) * 4 * n)


@pytest.mark.parametrize("model", list(MODELS))
def test_power_iteration_interleaved(benchmark, model):
    """The three timed round-robin (the copy floor in rounds of its own), so that the ratio is
    within the machine's drift."""
    built = {impl: build_iteration(model, impl) for impl in ("torch", "wgan_kernels", "copy")}
    _, n, tensors = built["torch"]
    interleaved(benchmark, suite="SN power iteration", case=model, fns={k: v[0] for k, v in built.items()},
                rounds=100 if QUICK else 400, apart=("copy",), numel=n, tensors=tensors, bytes=4 * n)


def build_forward(model, impl):
    """(step function, params) of a training-mode forward after a weight update, batch 1."""
    make, shape = MODELS[model]
    if impl == "torch":
        critic = torch_sn_critic(make)
    elif impl == "wgan_kernels":
        torch.manual_seed(0)
        critic = spectral_norm_all(make().to(DEVICE))  # SN blocks: 1/sigma folded into the output
    else:  # no-sn: the same critic without spectral norm, the floor of an SN forward
        torch.manual_seed(0)
        critic = make().to(DEVICE)
    critic.train()
    x = torch.randn(*shape, device=DEVICE)
    params = list(critic.parameters())

    def fn():
        with torch.no_grad():  # a weight update (as after an optimizer step): u, v must advance
            for p in params:
                p.add_(0.0)
        critic(x)

    return fn, params


FORWARD_IMPLS = ["torch", "wgan_kernels", "no-sn"]


@pytest.mark.parametrize("impl", FORWARD_IMPLS)
@pytest.mark.parametrize("model", list(MODELS))
def test_sn_critic_forward(benchmark, model, impl):
    fn, params = build_forward(model, impl)
    record(benchmark, suite="SN critic forward", case=f"{model}-b1", impl=impl, fn=fn,
           numel=sum(p.numel() for p in params), tensors=len(params), bytes=0)


@pytest.mark.parametrize("model", list(MODELS))
def test_sn_critic_forward_interleaved(benchmark, model):
    """The same three forwards timed round-robin (their ratio is within the machine's drift), each
    after one untimed call of itself: torch's forward allocates a new W / sigma per layer, and
    glibc can hand those pages back to the OS after each call, so that the next call of ANY impl
    page-faults (measured: 4064 minor faults per torch DCGAN-64 forward in that state, and 1440
    in a wgan_kernels forward timed right after it, 0 after itself); the minor faults per timed
    call are recorded with the medians."""
    built = {impl: build_forward(model, impl) for impl in FORWARD_IMPLS}
    params = built["torch"][1]
    interleaved(benchmark, suite="SN critic forward", case=f"{model}-b1", fns={k: v[0] for k, v in built.items()},
                rounds=40 if QUICK else 200, warm_calls=1, numel=sum(p.numel() for p in params),
                tensors=len(params), bytes=0)


def build_step(model, impl):
    """(step function, critic) of a WGAN-GP critic step at batch 64 on an SN critic."""
    make, shape = MODELS[model]
    torch.manual_seed(0)
    critic = torch_sn_critic(make) if impl == "torch" else spectral_norm_all(make().to(DEVICE))
    real = torch.randn(64, *shape[1:], device=DEVICE)
    fake = torch.randn(64, *shape[1:], device=DEVICE) * 1.2 + 0.1

    def fn():
        critic.zero_grad(set_to_none=True)
        if impl == "torch":
            loss, _, _ = critic_loss_eager(critic, real, fake, penalty="gp")
        else:
            loss, _ = wk.critic_loss(critic, real, fake, penalty="gp")
        loss.backward()
        with torch.no_grad():  # a weight update: the next step iterates u, v again
            for p in critic.parameters():
                p.add_(0.0)

    return fn, critic


@pytest.mark.parametrize("model", list(MODELS))
def test_sn_critic_step_interleaved(benchmark, model):
    built = {impl: build_step(model, impl) for impl in ("torch", "wgan_kernels")}
    params = list(built["torch"][1].parameters())
    interleaved(benchmark, suite="SN critic step", case=f"{model}-b64", fns={k: v[0] for k, v in built.items()},
                rounds=3 if QUICK else 6, numel=sum(p.numel() for p in params), tensors=len(params), bytes=0)
