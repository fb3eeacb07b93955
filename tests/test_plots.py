"""Pictures: class names in the latent scatter, the latent evolution GIF, and no global matplotlib state."""

from __future__ import annotations

import sys

import PIL.Image
import torch

from fastvae.train import plots
from fastvae.train.data import CLASS_NAMES
from fastvae.train.models import VAEConfig, build_model


def _points(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 2, generator=g), torch.arange(n) % 10


def _legend_names(figure) -> list[str]:
    legend = figure.axes[0].get_legend()
    return [] if legend is None else [text.get_text() for text in legend.get_texts()]


def test_the_scatter_names_fashion_mnist_classes():
    points, labels = _points(40)
    figure = plots.scatter_figure(points, labels, CLASS_NAMES["fashion-mnist"], "t")
    assert _legend_names(figure) == [
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    ]
    assert len(figure.axes) == 1  # no colour bar beside the legend


def test_the_scatter_names_mnist_digits_and_only_the_classes_present():
    points, labels = _points(40)
    figure = plots.scatter_figure(points[labels < 3], labels[labels < 3], CLASS_NAMES["mnist"], "t")
    assert _legend_names(figure) == ["0", "1", "2"]


def test_unknown_classes_get_a_colour_bar():
    points, labels = _points(40)
    figure = plots.scatter_figure(points, labels, None, "t")
    assert _legend_names(figure) == [] and len(figure.axes) == 2  # the axes and the colour bar


def test_the_latent_evolution_has_one_frame_per_epoch(tmp_path):
    _, labels = _points(60)
    frames = [_points(60, seed)[0] * (1 + seed) for seed in range(3)]  # a blob that spreads out
    path = tmp_path / "latent_evolution.gif"
    plots.latent_evolution(frames, labels, path, CLASS_NAMES["fashion-mnist"])
    with PIL.Image.open(path) as gif:
        assert gif.n_frames == 3
        sizes = set()
        for index in range(gif.n_frames):
            gif.seek(index)
            sizes.add(gif.size)
        assert len(sizes) == 1  # fixed axes need a fixed canvas


def test_drawing_changes_no_global_matplotlib_state(tmp_path, monkeypatch):
    """No pyplot (its current figure and backend are global) and no matplotlib.use()."""
    import matplotlib

    def refuse_use(*args, **kwargs):
        raise AssertionError("plots called matplotlib.use(), which switches the backend for the whole process")

    monkeypatch.setattr(matplotlib, "use", refuse_use)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # importing pyplot now raises ImportError
    model = build_model(VAEConfig(image_shape=(1, 8, 8), latent_dim=2, hidden_dims=(8,)))
    images, labels = torch.rand(40, 1, 8, 8), torch.arange(40) % 10
    history = [{"step": 1, "train_neg_elbo": 2.0, "val_neg_elbo": 2.5}]
    frames = [torch.randn(40, 2), torch.randn(40, 2)]
    plots.draw_all(model, images, labels, history, tmp_path, 0, None, frames)
    assert {p.name for p in tmp_path.iterdir()} == set(plots.PICTURE_FILES)
