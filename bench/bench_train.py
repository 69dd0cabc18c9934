"""Whole training steps of the thin trainer, per loss: one generator step = n_critic (5) critic
steps on fresh batches + one generator step, eager PyTorch vs the fused ops (the trainer's
``backend="eager"`` / ``"fused"``: the same models, seeds and data).

Impls: ``eager`` (plain PyTorch: autograd double backward, torch's RMSprop + clamp loop, torch's
spectral_norm) and ``wgan_kernels`` (critic_loss on the explicit path, ClippedRMSprop,
spectral_norm_all on SN blocks). Cases: ``<loss>/<dataset>`` with the trainer's defaults (MLP 256
wide; batch 256 on the 2-D toy, 64 on digits). The two are also timed round-robin
(test_train_step_interleaved), whose medians the rows use.

Image GANs (``<loss>/<model>32-b64``): the trainer's DCGAN (width 64) and ResNet (128 channels)
on 3x32x32 images (random pixels in [-1, 1], CIFAR-10's shape), batch 64, WGAN-div and WGAN-GP:
round-robin medians, and the peak memory of one whole step per impl.
"""

import pytest
import torch
from conftest import DEVICE, QUICK, interleaved, peak_bytes, record

from wgan_kernels.train import LOSSES, TrainConfig, Trainer

DATASETS = ["8gaussians"] if QUICK else ["8gaussians", "digits"]


def make_trainer(loss, dataset, impl):
    backend = "eager" if impl == "eager" else "fused"
    return Trainer(TrainConfig(loss=loss, dataset=dataset, backend=backend, device=str(DEVICE), progress=False))


@pytest.mark.parametrize("impl", ["eager", "wgan_kernels"])
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("loss", LOSSES)
def test_train_step(benchmark, loss, dataset, impl):
    trainer = make_trainer(loss, dataset, impl)
    params = sum(p.numel() for p in list(trainer.G.parameters()) + list(trainer.D.parameters()))

    def fn():
        trainer.train_step()

    record(benchmark, suite="train-step", case=f"{loss}/{dataset}", impl=impl, fn=fn, numel=params,
           tensors=len(list(trainer.D.parameters())), bytes=0)
    assert torch.isfinite(trainer.train_step()[1])


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("loss", LOSSES)
def test_train_step_interleaved(benchmark, loss, dataset):
    trainers = {impl: make_trainer(loss, dataset, impl) for impl in ("eager", "wgan_kernels")}
    t = trainers["eager"]
    interleaved(benchmark, suite="train-step", case=f"{loss}/{dataset}",
                fns={k: v.train_step for k, v in trainers.items()}, rounds=10 if QUICK else 40,
                numel=sum(p.numel() for p in list(t.G.parameters()) + list(t.D.parameters())),
                tensors=len(list(t.D.parameters())), bytes=0)
    for v in trainers.values():
        assert torch.isfinite(v.train_step()[1])


IMAGE_MODELS = ["dcgan"] if QUICK else ["dcgan", "resnet"]
IMAGE_ROUNDS = {"dcgan": 4 if QUICK else 12, "resnet": 5}


def make_image_trainer(loss, model, impl):
    images = torch.rand(512, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return Trainer(TrainConfig(loss=loss, model=model, backend="eager" if impl == "eager" else "fused",
                               device=str(DEVICE), progress=False), data=images)


@pytest.mark.parametrize("model", IMAGE_MODELS)
@pytest.mark.parametrize("loss", ["wgan-div", "wgan-gp"])
def test_image_train_step(benchmark, loss, model):
    """Round-robin medians of whole generator steps, and one entry per impl with the peak
    memory of a step (its time is the one call's; the row takes the round-robin median)."""
    trainers = {impl: make_image_trainer(loss, model, impl) for impl in ("eager", "wgan_kernels")}
    t = trainers["eager"]
    info = dict(suite="train-step", case=f"{loss}/{model}32-b64",
                numel=sum(p.numel() for p in list(t.G.parameters()) + list(t.D.parameters())),
                tensors=len(list(t.D.parameters())), bytes=0)
    interleaved(benchmark, fns={k: v.train_step for k, v in trainers.items()}, rounds=IMAGE_ROUNDS[model], **info)
    for v in trainers.values():
        assert torch.isfinite(v.train_step()[1])


@pytest.mark.parametrize("impl", ["eager", "wgan_kernels"])
@pytest.mark.parametrize("model", IMAGE_MODELS)
@pytest.mark.parametrize("loss", ["wgan-div", "wgan-gp"])
def test_image_train_step_memory(benchmark, loss, model, impl):
    trainer = make_image_trainer(loss, model, impl)
    trainer.train_step()  # warm: optimizer state, traced program
    peak = peak_bytes(trainer.train_step)
    t = trainer
    benchmark.group = f"train-step/{loss}/{model}32-b64"
    benchmark.extra_info.update(suite="train-step", case=f"{loss}/{model}32-b64", impl=impl, device=str(DEVICE),
                                numel=sum(p.numel() for p in list(t.G.parameters()) + list(t.D.parameters())),
                                tensors=len(list(t.D.parameters())), bytes=0, peak_bytes=peak)
    benchmark.pedantic(trainer.train_step, rounds=1, iterations=1)
