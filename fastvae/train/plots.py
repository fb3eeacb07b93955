"""Pictures of a run: reconstructions, prior samples, learning curves, and for a 2-D
latent the test-set latent scatter and the decoded manifold grid.

matplotlib is imported inside the functions (with the file-only Agg backend), so
importing fastvae never pulls it in. No picture touches torch's default RNG: the
prior samples use a generator of their own, reconstructions decode the mean.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

RECON_IMAGES = 16  # one row of inputs above one row of reconstructions
SAMPLE_GRID = 8  # 8 x 8 prior samples
MANIFOLD_GRID = 20  # 20 x 20 decoded points over [-MANIFOLD_RANGE, MANIFOLD_RANGE]^2
MANIFOLD_RANGE = 3.0
SCATTER_POINTS = 5000
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def tile(images: Tensor, rows: int, cols: int) -> Tensor:
    """[rows*cols, C, H, W] in [0, 1] -> one [rows*H, cols*W] grey image (channel mean)."""
    _, _, height, width = images.shape
    grey = images.float().mean(dim=1).cpu()
    return grey.reshape(rows, cols, height, width).permute(0, 2, 1, 3).reshape(rows * height, cols * width)


def _save_image(plt, image: Tensor, path: Path, title: str) -> None:
    height, width = image.shape
    fig = plt.figure(figsize=(max(width / 40, 3), max(height / 40, 2) + 0.4), dpi=DPI)
    plt.imshow(image.numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    plt.axis("off")
    plt.title(title)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def reconstructions(model, images: Tensor, path: Path) -> None:
    """Inputs [n, C, H, W] in [0, 1] (top row) above their decoded posterior means (bottom row)."""
    device = next(model.parameters()).device
    images = images[:RECON_IMAGES]
    mu, _ = model.encode(images.to(device))
    decoded = torch.sigmoid(model.decode(mu).float()).cpu()
    _save_image(_pyplot(), tile(torch.cat([images.cpu(), decoded]), 2, len(images)), path,
                "test inputs (top) and reconstructions (bottom)")


def prior_samples(model, path: Path, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    probs = model.sample(SAMPLE_GRID * SAMPLE_GRID, generator=generator)
    _save_image(_pyplot(), tile(probs, SAMPLE_GRID, SAMPLE_GRID), path, "samples from the prior (pixel means)")


def learning_curves(history: list[dict], path: Path) -> None:
    """Train and validation -ELBO (nats per datapoint) against optimizer steps."""
    plt = _pyplot()
    steps = [row["step"] for row in history]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=DPI)
    ax.plot(steps, [row["train_neg_elbo"] for row in history], marker="o", label="train -ELBO")
    ax.plot(steps, [row["val_neg_elbo"] for row in history], marker="o", label="validation -ELBO")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per datapoint")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def latent_scatter(model, images: Tensor, labels: Tensor, path: Path) -> None:
    """Posterior means of test images in a 2-D latent, coloured by class label."""
    plt = _pyplot()
    device = next(model.parameters()).device
    mu, _ = model.encode(images[:SCATTER_POINTS].to(device))
    mu = mu.float().cpu()
    fig, ax = plt.subplots(figsize=(6, 5), dpi=DPI)
    points = ax.scatter(mu[:, 0], mu[:, 1], c=labels[:SCATTER_POINTS].numpy(), cmap="tab10", s=3)
    fig.colorbar(points, ax=ax, label="label")
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title("test set in latent space (posterior means)")
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


@torch.no_grad()
def manifold(model, path: Path) -> None:
    """Decoded pixel means on a grid over [-3, 3]^2 of a 2-D latent (top row: z[1] = +3)."""
    device = next(model.parameters()).device
    axis = torch.linspace(-MANIFOLD_RANGE, MANIFOLD_RANGE, MANIFOLD_GRID)
    z1, z0 = torch.meshgrid(axis.flip(0), axis, indexing="ij")
    z = torch.stack([z0.reshape(-1), z1.reshape(-1)], dim=1).to(device)
    probs = torch.sigmoid(model.decode(z).float())
    _save_image(_pyplot(), tile(probs, MANIFOLD_GRID, MANIFOLD_GRID), path,
                f"decoded latent grid over [-{MANIFOLD_RANGE:g}, {MANIFOLD_RANGE:g}]^2")


def draw_all(model, test_images: Tensor, test_labels: Tensor, history: list[dict], run_dir: Path,
             seed: int) -> list[Path]:
    """Every picture of a run into run_dir; returns the paths written."""
    was_training = model.training
    model.eval()
    paths = {name: Path(run_dir) / f"{name}.png" for name in ("reconstructions", "samples", "learning_curves")}
    reconstructions(model, test_images, paths["reconstructions"])
    prior_samples(model, paths["samples"], seed)
    learning_curves(history, paths["learning_curves"])
    if model.config.latent_dim == 2:
        paths["latent_scatter"] = Path(run_dir) / "latent_scatter.png"
        paths["manifold"] = Path(run_dir) / "manifold.png"
        latent_scatter(model, test_images, test_labels, paths["latent_scatter"])
        manifold(model, paths["manifold"])
    model.train(was_training)
    return list(paths.values())
