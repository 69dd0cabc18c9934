"""The thin trainer: every loss on every dataset with both backends, fused vs eager agreement,
exact resume, the non-finite stop, the CLI."""

import json

import pytest
import torch

from wgan_kernels.cli import main
from wgan_kernels.train import DATASETS, LOSSES, TrainConfig, Trainer, TrainingDiverged, train
from wgan_kernels.train.datasets import TOY
from wgan_kernels.train.metrics import exact_w1, sliced_w

TINY = dict(steps=3, n_critic=2, hidden=16, eval_every=3, eval_samples=128, batch_size=32, progress=False)


def params(trainer):
    return list(trainer.G.parameters()) + list(trainer.D.parameters())


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(params(a), params(b)))


@pytest.mark.parametrize("backend", ["fused", "eager"])
@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("loss", LOSSES)
def test_every_loss_trains_on_every_dataset(loss, dataset, backend):
    result = train(TrainConfig(loss=loss, dataset=dataset, backend=backend, **TINY))
    assert result["steps"] == 3 and result["evals"]
    assert result["metric"] == ("w1" if dataset in TOY else "sliced_w")
    assert torch.isfinite(torch.tensor(result["final_metric"]))
    assert all(torch.isfinite(torch.tensor(h["loss_d"])) for h in result["history"])


def test_user_tensor_and_tensor_dataset():
    data = torch.randn(300, 3) * 0.5 + 1.0
    r1 = train(TrainConfig(loss="wgan-div", **TINY), data=data)
    r2 = train(TrainConfig(loss="wgan-div", **TINY), data=torch.utils.data.TensorDataset(data))
    assert r1["metric"] == "sliced_w" and r1["final_metric"] == r2["final_metric"]
    with pytest.raises(ValueError, match="dataset"):
        train(TrainConfig(**TINY), data=torch.ones(5, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="dataset"):
        train(TrainConfig(dataset="mnist", **TINY))


@pytest.mark.parametrize("loss", ["wgan", "wgan-gp", "wgan-div"])
def test_fused_and_eager_agree(loss):
    """Same models, seeds and random draws: the backends differ by float rounding only."""
    cfg = dict(TINY, steps=10, n_critic=5, hidden=32)
    fused = train(TrainConfig(loss=loss, backend="fused", **cfg))["trainer"]
    eager = train(TrainConfig(loss=loss, backend="eager", **cfg))["trainer"]
    assert max_diff(fused, eager) < 1e-4


@pytest.mark.parametrize("loss,sampling", [("wgan-gp", "interpolate-within"), ("wgan-div", "interpolate")])
def test_fused_and_eager_agree_on_another_r_of_x(loss, sampling):
    """sampling= sets the penalty's r(x); both backends draw the same points."""
    cfg = dict(TINY, steps=4, n_critic=3, hidden=32, sampling=sampling)
    fused = train(TrainConfig(loss=loss, backend="fused", **cfg))["trainer"]
    eager = train(TrainConfig(loss=loss, backend="eager", **cfg))["trainer"]
    default = train(TrainConfig(loss=loss, backend="fused", **dict(cfg, sampling=None)))["trainer"]
    assert max_diff(fused, eager) < 1e-4
    assert max_diff(fused, default) > 1e-6  # the strategy did change the training


def test_resume_continues_exactly(tmp_path):
    cfg = dict(TINY, steps=6, checkpoint_every=3, eval_every=2, loss="wgan-gp")
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **cfg))
    half = dict(cfg, steps=3)
    train(TrainConfig(out=str(tmp_path / "split"), **half))
    resumed = train(TrainConfig(out=str(tmp_path / "split"), **cfg), resume=True)
    assert max_diff(whole["trainer"], resumed["trainer"]) == 0.0
    # the first half also logged and evaluated at its last step (3); the rest is identical
    assert [e for e in resumed["evals"] if e["step"] != 3] == whole["evals"]
    assert [h for h in resumed["history"] if h["step"] != 3] == [h for h in whole["history"] if h["step"] != 3]
    for name in ("checkpoint.pt", "metrics.json", "samples.png", "curves.png"):
        assert (tmp_path / "split" / name).exists()
    assert json.loads((tmp_path / "split" / "metrics.json").read_text())["steps"] == 6
    with pytest.raises(ValueError, match="resume: no checkpoint.pt"):
        train(TrainConfig(out=str(tmp_path / "nothing"), **cfg), resume=True)


def test_non_finite_loss_stops_and_keeps_the_checkpoint(tmp_path):
    data = torch.randn(200, 2)
    cfg = TrainConfig(out=str(tmp_path), checkpoint_every=2, **dict(TINY, steps=2))
    train(cfg, data=data)
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()
    cfg.steps = 6
    trainer = Trainer(cfg, data)
    trainer.load_checkpoint(ckpt)
    trainer.sampler.data[:] = float("nan")  # the data go bad after the resume
    with pytest.raises(TrainingDiverged, match="non-finite loss at generator step 2.*intact"):
        trainer.fit()
    assert ckpt.read_bytes() == before


def test_metrics():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 2, generator=g)
    assert exact_w1(a, a) == pytest.approx(0.0, abs=1e-9)
    assert exact_w1(a, a + torch.tensor([3.0, 4.0])) == pytest.approx(5.0, rel=1e-6)  # a pure shift
    x = torch.randn(300, 1, 4, 4, generator=g)
    assert sliced_w(x, x) == pytest.approx(0.0, abs=1e-12)
    assert sliced_w(x, x + 1.0) > sliced_w(x, x + 0.1) > 0


def test_bad_config():
    for field, value in [("loss", "lsgan"), ("backend", "cuda"), ("steps", 0), ("n_critic", -1),
                         ("sampling", "nope"), ("penalty_weight", -1.0), ("div_p", 1.0)]:
        with pytest.raises(ValueError, match=field):
            train(TrainConfig(**dict(TINY, **{field: value})))
    with pytest.raises(ValueError, match="sampling: only for wgan-gp and wgan-div"):
        train(TrainConfig(**dict(TINY, loss="wgan", sampling="real")))


def test_cli_train(tmp_path, capsys):
    rc = main(["train", "--loss", "wgan", "--dataset", "25gaussians", "--steps", "2", "--hidden", "8",
               "--eval-every", "2", "--out", str(tmp_path), "--quiet"])
    assert rc == 0
    assert "final w1" in capsys.readouterr().out
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "samples.png").exists()


def _first_step_grads(cfg):
    """Runs one critic step and one generator step; returns the gradients each optimizer saw
    (Adam's updates would turn float rounding of near-zero gradients into O(lr) differences)."""
    trainer = Trainer(cfg)
    seen = {}
    for name, opt, module in (("d", trainer.opt_d, trainer.D), ("g", trainer.opt_g, trainer.G)):
        step = opt.step

        def capture(*a, _name=name, _step=step, _module=module, **k):
            seen.setdefault(_name, [p.grad.detach().clone() for p in _module.parameters()])
            return _step(*a, **k)

        opt.step = capture
    trainer.fit()
    return seen["d"] + seen["g"]


DDP_CFG = dict(TINY, steps=1, n_critic=1)


def _ddp_worker(rank, world, init_file, loss, out_file, sampling=None):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        if sampling == "interpolate-mixed":  # pairs rows across the global batch: refused
            try:
                Trainer(TrainConfig(loss=loss, sampling=sampling, **DDP_CFG))
            except ValueError as e:
                torch.save(str(e), out_file + f".{rank}")
            return
        grads = _first_step_grads(TrainConfig(loss=loss, sampling=sampling, **DDP_CFG))
        if rank == 0:
            torch.save(grads, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss,sampling", [("wgan-div", None), ("wgan-gp", None), ("wgan-div", "interpolate")])
def test_two_processes_match_one_on_the_global_batch(tmp_path, loss, sampling):
    """2 CPU processes (gloo), each on half of the global batch, average to the same critic and
    generator gradients as one process on the whole batch, gradient penalty included."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), loss, str(out), sampling), nprocs=2, join=True)
    single = _first_step_grads(TrainConfig(loss=loss, sampling=sampling, **DDP_CFG))
    for i, (a, b) in enumerate(zip(torch.load(out), single)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=lambda m: f"{loss} gradient {i}: {m}")


def test_two_processes_refuse_an_r_of_x_that_pairs_rows_across_the_batch(tmp_path):
    import torch.multiprocessing as mp

    out = tmp_path / "err"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), "wgan-gp", str(out), "interpolate-mixed"), nprocs=2,
             join=True)
    for rank in (0, 1):
        assert "sampling: 'interpolate-mixed' pairs rows across the global batch" in torch.load(f"{out}.{rank}")


# ----------------------------------------------------------------------------------------------
# image models (DCGAN on digits32)
# ----------------------------------------------------------------------------------------------

DCGAN_CFG = dict(model="dcgan", dataset="digits32", hidden=8, batch_size=8, steps=1, n_critic=1, eval_every=1,
                 eval_samples=64, checkpoint_every=100, log_every=1, progress=False)


@pytest.mark.parametrize("loss", ["wgan-div", "wgan-gp", "sngan", "wgan"])
def test_dcgan_on_digits32_both_backends_agree(loss, recwarn):
    """The conv critic on 32x32 digits: the fused backend (the critic's traced explicit path) and
    eager start from the same models and take the same first step (sngan: spectral norm iterates
    once per weight update on the fused backend, per access on eager, so only the start agrees)."""
    fused = Trainer(TrainConfig(loss=loss, backend="fused", **DCGAN_CFG))
    eager = Trainer(TrainConfig(loss=loss, backend="eager", **DCGAN_CFG))
    assert fused.sampler.shape == (1, 32, 32)
    for a, b in zip(fused.D.state_dict().values(), eager.D.state_dict().values()):
        torch.testing.assert_close(a, b)
    # the critic's first gradients (the generator's come after an Adam step of the critic, which
    # turns the rounding of its near-zero gradients into O(lr) differences)
    n_d = len(list(fused.D.parameters()))
    grads = [_first_step_grads(TrainConfig(loss=loss, backend=b, **DCGAN_CFG))[:n_d] for b in ("fused", "eager")]
    for i, (a, b) in enumerate(zip(*grads) if loss != "sngan" else ()):
        scale = b.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=2e-3, msg=lambda m: f"{loss} grad {i}: {m}")
    assert not [w for w in recwarn if "double backward" in str(w.message)], "the fused conv critic fell back"
    fused.fit()
    assert fused.evals and fused.evals[-1]["sliced_w"] > 0


def test_dcgan_needs_square_images():
    with pytest.raises(ValueError, match="model: 'dcgan' needs images of 32x32 or 64x64"):
        Trainer(TrainConfig(model="dcgan", dataset="digits", progress=False))
    with pytest.raises(ValueError, match="model: expected one of"):
        Trainer(TrainConfig(model="resnet9"))
