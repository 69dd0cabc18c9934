"""Pictures of a run: samples (2-D scatter over the critic's contours, or the image grid of
``images.save_grid``) and the loss and metric curves. matplotlib, headless."""

from __future__ import annotations

from pathlib import Path

import torch


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@torch.no_grad()
def save_pictures(trainer, out: Path) -> None:
    plt = pyplot()
    device = trainer.device
    fake = trainer.samples()
    real = trainer.eval_real
    title = f"{trainer.cfg.loss} / {trainer.cfg.backend}, step {trainer.step}"
    if trainer.sampler.dim == 2:
        fig, ax = plt.subplots(figsize=(5, 5))
        lo = torch.minimum(real.min(0).values, fake.min(0).values) - 0.3
        hi = torch.maximum(real.max(0).values, fake.max(0).values) + 0.3
        xs, ys = torch.linspace(lo[0], hi[0], 120), torch.linspace(lo[1], hi[1], 120)
        gx, gy = torch.meshgrid(xs, ys, indexing="xy")
        grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
        values = trainer.D(grid.to(device)).reshape(gx.shape).cpu()
        ax.contourf(gx, gy, values, levels=20, cmap="coolwarm", alpha=0.6)
        ax.scatter(real[:, 0], real[:, 1], s=3, c="black", label="real")
        ax.scatter(fake[:, 0], fake[:, 1], s=3, c="gold", label="generated")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title + " (critic contours)", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / "samples.png", dpi=100)
        plt.close(fig)
    else:  # images: the grid of the fixed noise's first 64 samples, as saved per evaluation
        from .images import save_grid

        save_grid(fake[:64].reshape(-1, *trainer.sampler.shape), out / "samples.png")

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    hist = trainer.history
    steps = [h["step"] for h in hist]
    for key in ("loss_d", "loss_g", "wasserstein"):
        a.plot(steps, [h[key] for h in hist], label=key)
    a.set_xlabel("generator step")
    a.legend(fontsize=8)
    a.set_title("losses", fontsize=9)
    name = trainer.metric_name
    b.plot([e["step"] for e in trainer.evals], [e[name] for e in trainer.evals], marker="o")
    b.set_xlabel("generator step")
    b.set_title(name, fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
