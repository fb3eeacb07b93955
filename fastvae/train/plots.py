"""Pictures of a run: reconstructions, prior samples, learning curves, and for a 2-D
latent the test-set latent scatter, the decoded manifold grid, and an animated GIF
of the test set's posterior means after each epoch.

Figures are built with matplotlib's object-oriented API (Figure + the Agg canvas),
never pyplot, so drawing changes no global matplotlib state (backend, current
figure); matplotlib is imported inside the functions, so importing fastvae never
pulls it in. No picture touches torch's default RNG: the prior samples use a
generator of their own, reconstructions decode the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

RECON_IMAGES = 16  # one row of inputs above one row of reconstructions
SAMPLE_GRID = 8  # 8 x 8 prior samples
MANIFOLD_GRID = 20  # 20 x 20 decoded points over [-MANIFOLD_RANGE, MANIFOLD_RANGE]^2
MANIFOLD_RANGE = 3.0
SCATTER_POINTS = 5000
FRAME_POINTS = 2000  # test images in each frame of the latent evolution GIF
FRAME_MS = 600  # how long the GIF shows each epoch
DPI = 100
PICTURE_FILES = (
    "reconstructions.png",
    "samples.png",
    "learning_curves.png",
    "latent_scatter.png",
    "manifold.png",
    "latent_evolution.gif",
)


def _figure(width: float, height: float):
    """A Figure on its own Agg canvas (what savefig and buffer_rgba draw with); its constrained layout
    keeps a legend beside the axes inside the picture, also where bbox_inches="tight" does not apply."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def tile(images: Tensor, rows: int, cols: int) -> Tensor:
    """[rows*cols, C, H, W] in [0, 1] -> one [rows*H, cols*W] grey image (channel mean)."""
    _, _, height, width = images.shape
    grey = images.float().mean(dim=1).cpu()
    return grey.reshape(rows, cols, height, width).permute(0, 2, 1, 3).reshape(rows * height, cols * width)


def _save_image(image: Tensor, path: Path, title: str) -> None:
    height, width = image.shape
    figure = _figure(max(width / 40, 3), max(height / 40, 2) + 0.4)
    ax = figure.add_subplot()
    ax.imshow(image.numpy(), cmap="gray", vmin=0.0, vmax=1.0)
    ax.axis("off")
    ax.set_title(title)
    figure.savefig(path, bbox_inches="tight")


def _pixels(means: Tensor) -> Tensor:
    """The likelihood's means (model.likelihood_mean) as grey levels on CPU: a Gaussian's mean can leave
    [0, 1], and a picture shows it clipped there."""
    return means.float().clamp(0.0, 1.0).cpu()


@torch.no_grad()
def reconstructions(model, images: Tensor, path: Path) -> None:
    """Inputs [n, C, H, W] in [0, 1] (top row) above the likelihood's mean at their posterior means (bottom row)."""
    device = next(model.parameters()).device
    images = images[:RECON_IMAGES]
    mu, _ = model.encode(images.to(device))
    decoded = _pixels(model.likelihood_mean(model.decode(mu)))
    _save_image(
        tile(torch.cat([images.cpu(), decoded]), 2, len(images)), path, "test inputs (top) and reconstructions (bottom)"
    )


def prior_samples(model, path: Path, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    means = _pixels(model.sample(SAMPLE_GRID * SAMPLE_GRID, generator=generator))
    _save_image(tile(means, SAMPLE_GRID, SAMPLE_GRID), path, "samples from the prior (pixel means)")


def learning_curves(history: list[dict], path: Path) -> None:
    """The training objective (-ELBO, or the -IW bound of rows trained with --objective iwae; a resumed run
    may have both) and validation -ELBO, in nats per datapoint, against optimizer steps."""
    figure = _figure(6, 4)
    ax = figure.add_subplot()
    for key, label in (("train_neg_elbo", "train -ELBO"), ("train_neg_iw_bound", "train -IW bound")):
        rows = [row for row in history if key in row]
        if rows:
            ax.plot([row["step"] for row in rows], [row[key] for row in rows], marker="o", label=label)
    ax.plot(
        [row["step"] for row in history], [row["val_neg_elbo"] for row in history], marker="o", label="validation -ELBO"
    )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("nats per datapoint")
    ax.legend()
    ax.grid(alpha=0.3)
    figure.savefig(path, bbox_inches="tight")


@torch.no_grad()
def posterior_means(model, images: Tensor) -> Tensor:
    """The posterior means [n, L] (float32, CPU) of images [n, C, H, W] in [0, 1]."""
    device = next(model.parameters()).device
    mu, _ = model.encode(images.to(device))
    return mu.float().cpu()


def scatter_figure(
    points: Tensor,
    labels: Tensor,
    class_names: Sequence[str] | None,
    title: str,
    limits: tuple[float, float, float, float] | None = None,
):
    """A Figure of 2-D points [n, 2] coloured by integer label [n].

    class_names: the name of each label, shown in a legend; None (a dataset of unknown
    classes) shows a colour bar of the label values instead. limits: fixed
    (x0, x1, y0, y1) axes, so that frames of an animation line up."""
    import matplotlib

    figure = _figure(7 if class_names else 6, 5)
    ax = figure.add_subplot()
    colours = matplotlib.colormaps["tab10"]
    if class_names:
        for label, name in enumerate(class_names):
            mine = labels == label
            if mine.any():
                ax.scatter(points[mine, 0], points[mine, 1], s=3, color=colours(label % 10), label=name)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), markerscale=4, frameon=False)
    else:
        drawn = ax.scatter(points[:, 0], points[:, 1], c=labels.numpy(), cmap="tab10", s=3)
        figure.colorbar(drawn, ax=ax, label="label")
    if limits is not None:
        ax.set_xlim(limits[0], limits[1])
        ax.set_ylim(limits[2], limits[3])
    ax.set_xlabel("z[0]")
    ax.set_ylabel("z[1]")
    ax.set_title(title)
    return figure


def latent_scatter(model, images: Tensor, labels: Tensor, path: Path, class_names: Sequence[str] | None = None) -> None:
    """Posterior means of test images in a 2-D latent, coloured by class (named when class_names is given)."""
    points = posterior_means(model, images[:SCATTER_POINTS])
    figure = scatter_figure(points, labels[:SCATTER_POINTS], class_names, "test set in latent space (posterior means)")
    figure.savefig(path, bbox_inches="tight")


def latent_evolution(
    frames: Sequence[Tensor], labels: Tensor, path: Path, class_names: Sequence[str] | None = None
) -> None:
    """An animated GIF, one frame per epoch: the posterior means [n, 2] of the first n test images
    after that epoch (labels: the class of each test image), on axes fixed over all frames."""
    import numpy
    from PIL import Image

    every = torch.cat(list(frames))
    # Quantiles, not min and max: a few far outliers would squeeze every frame into a corner.
    low, high = every.quantile(0.005, dim=0), every.quantile(0.995, dim=0)
    margin = (high - low).clamp_min(1e-3) * 0.08
    x0, y0 = (low - margin).tolist()
    x1, y1 = (high + margin).tolist()
    pictures = []
    for epoch, points in enumerate(frames, start=1):
        figure = scatter_figure(
            points,
            labels[: len(points)],
            class_names,
            f"posterior means of the test set after epoch {epoch}",
            (x0, x1, y0, y1),
        )
        figure.canvas.draw()
        pictures.append(Image.fromarray(numpy.asarray(figure.canvas.buffer_rgba())).convert("RGB"))
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=FRAME_MS, loop=0)


@torch.no_grad()
def manifold(model, path: Path) -> None:
    """Decoded pixel means (the likelihood's) on a grid over [-3, 3]^2 of a 2-D latent (top row: z[1] = +3)."""
    device = next(model.parameters()).device
    axis = torch.linspace(-MANIFOLD_RANGE, MANIFOLD_RANGE, MANIFOLD_GRID)
    z1, z0 = torch.meshgrid(axis.flip(0), axis, indexing="ij")
    z = torch.stack([z0.reshape(-1), z1.reshape(-1)], dim=1).to(device)
    means = _pixels(model.likelihood_mean(model.decode(z)))
    _save_image(
        tile(means, MANIFOLD_GRID, MANIFOLD_GRID),
        path,
        f"decoded latent grid over [-{MANIFOLD_RANGE:g}, {MANIFOLD_RANGE:g}]^2",
    )


def draw_all(
    model,
    test_images: Tensor,
    test_labels: Tensor,
    history: list[dict],
    run_dir: Path,
    seed: int,
    class_names: Sequence[str] | None = None,
    latent_frames: Sequence[Tensor] = (),
) -> list[Path]:
    """Every picture of a run into run_dir; returns the paths written.

    test_images [n, C, H, W] in [0, 1] and test_labels [n]; class_names: the name of each
    label, or None for a dataset of unknown classes; latent_frames: posterior means [m, 2]
    of the first m test images after each epoch (2-D latent), for latent_evolution.gif."""
    was_training = model.training
    model.eval()
    paths = {name: Path(run_dir) / f"{name}.png" for name in ("reconstructions", "samples", "learning_curves")}
    reconstructions(model, test_images, paths["reconstructions"])
    prior_samples(model, paths["samples"], seed)
    learning_curves(history, paths["learning_curves"])
    if model.config.latent_dim == 2:
        paths["latent_scatter"] = Path(run_dir) / "latent_scatter.png"
        paths["manifold"] = Path(run_dir) / "manifold.png"
        latent_scatter(model, test_images, test_labels, paths["latent_scatter"], class_names)
        manifold(model, paths["manifold"])
        if latent_frames:
            paths["latent_evolution"] = Path(run_dir) / "latent_evolution.gif"
            latent_evolution(latent_frames, test_labels, paths["latent_evolution"], class_names)
    model.train(was_training)
    return list(paths.values())
