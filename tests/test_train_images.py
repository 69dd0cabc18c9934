"""The trainer on images: the DCGAN and ResNet pairs at 32 and 64 px, the image-file datasets end to
end, the per-evaluation grids, TensorBoard, FID/KID through torch-fidelity only with local
weights, and data parallelism of the image models (a BatchNorm generator)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image
from test_train import _first_step_grads

from wgan_kernels.cli import main
from wgan_kernels.models import ResNetCritic, ResNetGenerator
from wgan_kernels.train import TrainConfig, Trainer, train
from wgan_kernels.train.checkpoint import CheckpointError, load

IMG = dict(batch_size=8, steps=1, n_critic=1, eval_every=1, eval_samples=32, checkpoint_every=100, log_every=1,
           progress=False)


def _png_folder(root, n=10, seed=0):
    rng = np.random.default_rng(seed)
    (root / "sub").mkdir(parents=True)
    for i in range(n):
        h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        where = root / "sub" if i % 2 else root
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(where / f"im{i}.png")
    return root


def _cifar_folder(root, n=12, seed=0):
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": rng.integers(0, 10, n).tolist(),
             b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    with open(d / "data_batch_1", "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return root


def _no_fallback(recwarn):
    assert not [w for w in recwarn if "double backward" in str(w.message)], "the conv critic fell back"


# ---------------------------------------------------------------------------------------- models


@pytest.mark.parametrize("loss", ["wgan-div", "wgan-gp"])
def test_resnet_backends_take_the_same_first_step(loss, recwarn):
    """The ResNet critic (WGAN-GP's CIFAR-10 one, a custom module) on the fused backend runs the
    traced explicit path; its first gradients match eager double backward's."""
    cfg = dict(IMG, model="resnet", dataset="digits32", hidden=8)
    fused, eager = Trainer(TrainConfig(loss=loss, **cfg)), Trainer(TrainConfig(loss=loss, backend="eager", **cfg))
    assert isinstance(fused.D, ResNetCritic) and fused.D.mean and isinstance(fused.G, ResNetGenerator)
    for a, b in zip(fused.D.state_dict().values(), eager.D.state_dict().values()):
        torch.testing.assert_close(a, b)
    n_d = len(list(fused.D.parameters()))
    grads = [_first_step_grads(TrainConfig(loss=loss, backend=b, **cfg))[:n_d] for b in ("fused", "eager")]
    for i, (a, b) in enumerate(zip(*grads)):
        scale = b.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=2e-3, msg=lambda m: f"{loss} grad {i}: {m}")
    _no_fallback(recwarn)



@pytest.mark.parametrize("model", ["dcgan", "resnet"])
def test_fused_generator_step_runs_the_critic_in_channels_last(model):
    """On CPU the fused backend's generator step hands the critic its samples in channels_last
    (the layout its critic steps run the convolutions in: ResNet-32 WGAN-GP, batch 64, generator
    step 1547 -> 1460 ms, 2 CPU threads); the generator's gradients stay those of NCHW."""
    t = Trainer(TrainConfig(loss="wgan-gp", model=model, dataset="digits32", hidden=8, **IMG))
    t.train_step()  # (the critic's explicit program, and so its layout, is known after a penalty)
    t.opt_g.step = lambda *a, **k: None  # the same parameters for both generator steps
    first = next(m for m in t.D.modules() if isinstance(m, torch.nn.Conv2d)).weight
    layouts, conv2d = [], torch.nn.functional.conv2d

    def spy(inp, weight, *args, **kwargs):  # (a hook on the layer would change the critic's program)
        if weight is first:
            layouts.append(inp.stride(1) == 1 and inp.is_contiguous(memory_format=torch.channels_last))
        return conv2d(inp, weight, *args, **kwargs)

    state = t.gen.get_state()
    grads, losses = [], []
    for nhwc in (True, False):
        t.gen.set_state(state)
        t._nhwc_generator_step = nhwc
        with pytest.MonkeyPatch.context() as m:
            m.setattr(torch.nn.functional, "conv2d", spy)
            losses.append(t._generator_step())
        grads.append([p.grad.clone() for p in t.G.parameters()])
    assert layouts == [True, False]
    torch.testing.assert_close(losses[0], losses[1])
    for a, b in zip(*grads):
        scale = b.abs().max().clamp_min(1e-6)
        torch.testing.assert_close(a / scale, b / scale, rtol=0, atol=2e-3)  # (float32 sums, batch norm)
    eager = Trainer(TrainConfig(loss="wgan-gp", model=model, dataset="digits32", hidden=8, backend="eager", **IMG))
    assert not eager._nhwc_generator_step

def test_sngan_resnet_is_the_sum_pooled_variant_with_spectral_norm(recwarn):
    t = Trainer(TrainConfig(loss="sngan", model="resnet", dataset="digits32", hidden=8, **IMG))
    assert isinstance(t.D, ResNetCritic) and not t.D.mean  # SN-GAN's global sum pooling
    eager = Trainer(TrainConfig(loss="sngan", model="resnet", dataset="digits32", hidden=8, backend="eager", **IMG))
    assert sum("parametrizations" in k for k in eager.D.state_dict()) > 0
    x = t.sampler.sample(4, torch.Generator().manual_seed(0))
    torch.testing.assert_close(t.D(x), eager.D(x), rtol=1e-4, atol=1e-5)  # the same normalised critic at the start
    assert t.fit()["steps"] == 1
    _no_fallback(recwarn)


@pytest.mark.parametrize("model", ["dcgan", "resnet"])
def test_resolution_64(model, recwarn):
    t = Trainer(TrainConfig(model=model, dataset="digits32", resolution=64, hidden=4, **IMG))
    assert t.sampler.shape == (1, 64, 64) and t.settings()["resolution"] == 64
    assert t.samples(2).shape == (2, 1, 64, 64)
    assert t.fit()["steps"] == 1
    _no_fallback(recwarn)


def test_default_widths_follow_the_model():
    assert Trainer(TrainConfig(model="dcgan", dataset="digits32", **IMG)).settings()["hidden"] == 64
    t = Trainer(TrainConfig(model="resnet", dataset="digits32", **IMG))
    assert t.settings()["hidden"] == 128 and t.z_dim == 128 and t.D.fc.in_features == 128


@pytest.mark.parametrize("kw,match", [
    (dict(dataset="8gaussians", resolution=32), "resolution: dataset '8gaussians' is not an image dataset"),
    (dict(dataset="digits", resolution=32), "resolution: dataset 'digits' is not an image dataset"),
    (dict(dataset="digits32", resolution=48), r"resolution: expected one of \(32, 64\)"),
    (dict(dataset="digits32", resolution=True), "resolution: expected one of"),
    (dict(dataset="digits", model="resnet"), "model: 'resnet' needs images of 32x32 or 64x64"),
    (dict(dataset="digits32", hidden=0), "hidden: expected an int >= 1"),
    (dict(dataset="digits32", tensorboard=True), r"tensorboard: needs out="),
    (dict(dataset="digits32", tensorboard="yes"), "tensorboard: expected a bool"),
    (dict(dataset="8gaussians", model="mlp", fid_weights="w.pth"), "fid_weights: FID/KID are for images of 32 px"),
    (dict(dataset="digits", model="mlp", fid_weights="w.pth"), r"fid_weights: .* \(samples of shape \(1, 8, 8\)\)"),
    (dict(dataset="digits32", fid_weights=3), "fid_weights: expected a file path"),
    (dict(dataset="digits32", fid_weights="/nonexistent/w.pth"), "fid_weights: no file at"),
    (dict(dataset="folder:/nonexistent/images"), "dataset: "),
    (dict(dataset="imagenet:/data"), "dataset: expected one of"),
])
def test_bad_image_settings_are_refused_before_training(kw, match):
    with pytest.raises(ValueError, match=match):
        Trainer(TrainConfig(**{**IMG, "model": "dcgan", **kw}))


# ---------------------------------------------------------------------------------------- data files


@pytest.mark.parametrize("kind", ["folder", "cifar10", "tensor-npz", "tensor-pt"])
def test_each_image_file_dataset_trains_and_writes_grids(tmp_path, kind, recwarn):
    rng = np.random.default_rng(1)
    if kind == "folder":
        spec, channels = f"folder:{_png_folder(tmp_path / 'imgs')}", 3
    elif kind == "cifar10":
        spec, channels = f"cifar10:{_cifar_folder(tmp_path / 'cifar')}", 3
    else:
        x = rng.integers(0, 256, (10, 1, 32, 32), dtype=np.uint8)
        path = tmp_path / ("x.npz" if kind == "tensor-npz" else "x.pt")
        np.savez(path, images=x) if kind == "tensor-npz" else torch.save(torch.from_numpy(x), path)
        spec, channels = f"tensor:{path}", 1
    out = tmp_path / "run"
    result = train(TrainConfig(model="dcgan", dataset=spec, hidden=4, out=str(out), **dict(IMG, steps=2)))
    t = result["trainer"]
    assert t.sampler.shape == (channels, 32, 32)
    assert t.settings()["dataset"].startswith(spec + ":") and len(t.settings()["dataset"]) == len(spec) + 17
    for step in (1, 2):  # one grid per evaluation: 32 samples, 8 per row, 2 px padding, RGB
        grid = Image.open(out / "samples" / f"step_{step:06d}.png")
        assert grid.size == (8 * 34 + 2, 4 * 34 + 2) and grid.mode == "RGB"
    assert Image.open(out / "samples.png").size == grid.size
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["evals"]] == [1, 2] and metrics["metric"] == "sliced_w"
    _no_fallback(recwarn)


def test_resume_refuses_changed_image_files(tmp_path):
    folder = _png_folder(tmp_path / "imgs")
    cfg = dict(IMG, model="dcgan", dataset=f"folder:{folder}", hidden=4, out=str(tmp_path / "run"))
    train(TrainConfig(**cfg))
    Image.fromarray(np.full((30, 30, 3), 7, np.uint8)).save(folder / "im0.png")  # other content, other size
    with pytest.raises(CheckpointError, match="written with other settings: dataset 'folder:"):
        train(TrainConfig(**dict(cfg, steps=2)), resume=True)


def test_cli_names_a_bad_dataset_before_training(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for spec, words in ((f"folder:{empty}", "no images"), (f"cifar10:{empty}", "data_batch"),
                        (f"tensor:{tmp_path / 'nope.npz'}", "nope.npz")):
        rc = main(["train", "--model", "dcgan", "--dataset", spec, "--steps", "1", "--out", str(tmp_path / "run"),
                   "--quiet"])
        err = capsys.readouterr().err
        assert rc == 2 and err.startswith("wgan-kernels train: dataset: ") and words in err, err
        assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_cli_resnet_at_64_px(tmp_path, capsys):
    rc = main(["train", "--model", "resnet", "--dataset", "digits32", "--resolution", "64", "--hidden", "4",
               "--steps", "1", "--n-critic", "1", "--batch-size", "4", "--eval-every", "1", "--out",
               str(tmp_path), "--quiet"])
    assert rc == 0, capsys.readouterr().err
    settings = load(tmp_path / "checkpoint.pt")["settings"]
    assert settings["model"] == "resnet" and settings["resolution"] == 64
    assert Image.open(tmp_path / "samples" / "step_000001.png").size == (8 * 66 + 2, 8 * 66 + 2)  # 64 samples


# ---------------------------------------------------------------------------------------- TensorBoard


def test_tensorboard_gets_scalars_and_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(TrainConfig(model="dcgan", dataset="digits32", hidden=4, out=str(tmp_path), tensorboard=True,
                      **dict(IMG, steps=2)))
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss_d", "train/loss_g", "train/wasserstein", "eval/sliced_w"} <= set(tags["scalars"])
    assert [e.step for e in acc.Scalars("eval/sliced_w")] == [1, 2]
    assert tags["images"] == ["samples"] and acc.Images("samples")[-1].width == 8 * 34 + 2


# ---------------------------------------------------------------------------------------- FID / KID


def _random_inception_weights(path, monkeypatch):
    """A state dict in torch-fidelity's format (random values: the real file is a download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with monkeypatch.context() as m:
        m.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        m.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        torch.manual_seed(0)
        state = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    torch.save(state, path)


def test_without_weights_one_line_says_so_and_nothing_is_downloaded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    called = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: called.append(a))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: called.append(a))
    result = train(TrainConfig(model="dcgan", dataset="digits32", hidden=4, **IMG))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "FID/KID" in ln]
    assert len(lines) == 1 and "no Inception weights at" in lines[0] and str(tmp_path / "torch-home") in lines[0]
    assert set(result["evals"][-1]) == {"step", "sliced_w"} and not called


def test_fid_weights_that_are_not_tensors_are_refused_unread(tmp_path):
    """A weights file is unpickled with weights_only=True: a pickle that would run code is refused."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "evil.pth"
    with open(bad, "wb") as f:
        pickle.dump({"w": Evil()}, f)
    for path, match in ((bad, "is not a state dict of tensors"), (tmp_path, "no file at")):
        with pytest.raises(ValueError, match=f"fid_weights: .*{match}"):
            Trainer(TrainConfig(model="dcgan", dataset="digits32", hidden=4, fid_weights=str(path), **IMG))
    assert not marker.exists()


def test_weights_without_torch_fidelity(tmp_path, monkeypatch, capsys):
    """torch-fidelity absent: explicit weights are an error naming fid_weights; weights found in
    the cache give the one-line note and the run goes on."""
    import sys

    from wgan_kernels.train.fidelity import INCEPTION_FILE

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails as if not installed
    weights = tmp_path / "w.pth"
    torch.save({"fc.weight": torch.randn(3, 2)}, weights)
    with pytest.raises(ValueError, match="fid_weights: needs torch-fidelity"):
        Trainer(TrainConfig(model="dcgan", dataset="digits32", hidden=4, fid_weights=str(weights), **IMG))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "hub" / "checkpoints").mkdir(parents=True)
    os.replace(weights, tmp_path / "home" / "hub" / "checkpoints" / INCEPTION_FILE)
    result = train(TrainConfig(model="dcgan", dataset="digits32", hidden=4, **IMG))
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "FID/KID" in ln]
    assert len(lines) == 1 and "torch-fidelity is not installed" in lines[0] and "fid" not in result["evals"][-1]


def test_fid_and_kid_with_local_weights(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    weights = tmp_path / "inception.pth"
    _random_inception_weights(weights, monkeypatch)
    cfg = dict(IMG, model="dcgan", dataset="digits32", hidden=4, eval_samples=16)
    result = train(TrainConfig(fid_weights=str(weights), **cfg))
    row = result["evals"][-1]
    assert {"fid", "kid", "sliced_w"} <= set(row) and np.isfinite(row["fid"]) and np.isfinite(row["kid"])
    # the same weights found in torch's hub cache, where torch-fidelity's download would put them
    from wgan_kernels.train.fidelity import INCEPTION_FILE

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "hub" / "checkpoints").mkdir(parents=True)
    os.replace(weights, tmp_path / "home" / "hub" / "checkpoints" / INCEPTION_FILE)
    again = train(TrainConfig(**cfg))["evals"][-1]
    assert again["fid"] == pytest.approx(row["fid"], rel=1e-6) and again["kid"] == pytest.approx(row["kid"], abs=1e-9)


# ---------------------------------------------------------------------------------------- processes

DDP_IMG = dict(IMG, dataset="digits32", hidden=4)


def _ddp_worker(rank, world, init_file, loss, model, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        grads = _first_step_grads(TrainConfig(loss=loss, model=model, **DDP_IMG))
        if rank == 0:
            torch.save(grads, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("loss,model", [("wgan-div", "dcgan"), ("wgan-gp", "dcgan"), ("wgan-div", "resnet")])
def test_two_processes_match_one_for_the_image_models(tmp_path, loss, model):
    """2 gloo processes on halves of the global batch == 1 process on all of it, the BatchNorm
    generator's gradients included (it runs on the global noise batch in every process)."""
    import torch.multiprocessing as mp

    out = tmp_path / "grads.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), loss, model, str(out)), nprocs=2, join=True)
    single = _first_step_grads(TrainConfig(loss=loss, model=model, **DDP_IMG))
    for i, (a, b) in enumerate(zip(torch.load(out), single)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m: f"{loss} gradient {i}: {m}")


@pytest.mark.parametrize("resolution", [32, 64])
def test_resnet_critic_is_wgan_gps_cifar_resnet(resolution):
    """WGAN-GP's CIFAR-10 ResNet critic: an optimised first block and downsampling blocks down to an
    8x8 map (2 halvings at 32 px, 3 at 64 px), two plain blocks, the mean over that map; at 32 px
    the same parameter shapes, in order, as the Sequential ``resnet32_critic``."""
    from wgan_kernels.models import ResNet32Critic, resnet32_critic

    critic = ResNetCritic(3, resolution, 16)
    maps = []
    critic.blocks.register_forward_hook(lambda m, args, out: maps.append(out.shape))
    x = torch.randn(2, 3, resolution, resolution)
    out = critic(x)
    assert out.shape == (2, 1) and maps == [torch.Size([2, 16, 8, 8])]
    assert len(critic.blocks) == (4 if resolution == 32 else 5)
    h = torch.relu(critic.blocks(x)).mean(dim=(2, 3))  # the pooling is the spatial mean
    torch.testing.assert_close(out, critic.fc(h))
    if resolution == 32:
        ours = [p.shape for p in ResNet32Critic(16).parameters()]
        assert ours == [p.shape for p in resnet32_critic(16).parameters()]
