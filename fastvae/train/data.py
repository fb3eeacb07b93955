"""Datasets for fastvae-train: IDX files (MNIST, Fashion-MNIST), binarization, batches.

The four IDX files of a dataset are read into memory as uint8 tensors
`[N, 1, H, W]` (images) and `[N]` (labels); both datasets are small enough that a
DataLoader with workers would only add overhead. Batches are cut from index lists
that a `DistributedSampler` produces, so one code path serves one process and
`torchrun` alike.

Where the files come from, in order (first hit wins):
  1. `--data-dir`
  2. `$FASTVAE_DATA`
  3. the system copy (Debian package `dataset-fashion-mnist`: /usr/share/datasets/fashion-mnist)
  4. a torchvision download into the first writable root above (or ~/.cache/fastvae)
A folder passed as `--dataset` is used as is, with no lookup.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DistributedSampler

SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# name -> (system folder or None, torchvision class name)
KNOWN_DATASETS = {
    "fashion-mnist": (Path("/usr/share/datasets/fashion-mnist"), "FashionMNIST"),
    "mnist": (None, "MNIST"),
}
# Class names by label, for the datasets whose labels mean something fixed.
CLASS_NAMES = {
    "fashion-mnist": (
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
    ),
    "mnist": tuple(str(digit) for digit in range(10)),
}
DATA_ENV_VAR = "FASTVAE_DATA"
DEFAULT_DOWNLOAD_ROOT = Path.home() / ".cache" / "fastvae"
BINARIZE_CHOICES = ("dynamic", "static", "none")
IDX_UBYTE = 0x08  # the IDX type code for unsigned bytes, the only one MNIST-style files use
GZIP_MAGIC = b"\x1f\x8b"
PIXEL_MAX = 255.0


class DataError(RuntimeError):
    """The data cannot be found or read; the message names the files and the fix."""


# ---------------------------------------------------------------------------
# IDX files
# ---------------------------------------------------------------------------
def _read_bytes(path: Path) -> bytes:
    """The decompressed content of `path` (gzip detected by its magic bytes)."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        if raw[:2] == GZIP_MAGIC:
            return gzip.decompress(raw)
        return raw
    except (EOFError, gzip.BadGzipFile, OSError) as error:
        raise DataError(
            f"cannot read IDX file {path}: {error}. The file is truncated or corrupt; delete it and fetch it again"
        ) from error


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read an IDX file of unsigned bytes (optionally gzipped) into a uint8 tensor of its dims.

    Layout: two zero bytes, a type byte (0x08 = ubyte), a dim count n, then n
    big-endian uint32 sizes, then prod(sizes) bytes of data."""
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number); it is corrupt or not MNIST-style data")
    if raw[2] != IDX_UBYTE:
        raise DataError(f"{path} holds IDX type 0x{raw[2]:02x}; fastvae reads unsigned-byte (0x08) files only")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header; delete it and fetch it again")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)
    if len(raw) != expected:
        raise DataError(
            f"{path} has {len(raw)} bytes but its header {dims} needs {expected}: the file is "
            f"truncated or corrupt; delete it and fetch it again"
        )
    if math.prod(dims) == 0:
        raise DataError(
            f"{path} holds no data (its header says {dims}); a dataset needs at least one image "
            f"per split: write the file again with the images in it"
        )
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(dims)


def write_idx(path: str | os.PathLike, array: Tensor) -> None:
    """Write a uint8 tensor of any dims as an IDX file (gzipped when the name ends in .gz);
    `read_idx` reads it back. Handy for custom datasets and for tests."""
    if array.dtype != torch.uint8:
        raise ValueError(f"IDX files hold uint8 here; convert {array.dtype} data to uint8 first")
    header = bytes([0, 0, IDX_UBYTE, array.dim()]) + b"".join(n.to_bytes(4, "big") for n in array.shape)
    raw = header + array.contiguous().numpy().tobytes()
    Path(path).write_bytes(gzip.compress(raw) if str(path).endswith(".gz") else raw)


def write_idx_dataset(
    folder: str | os.PathLike, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor], gzipped: bool = True
) -> Path:
    """Write (images uint8 [N, H, W], labels uint8 [N]) train and test pairs as the four IDX files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gzipped else ""
    for split, (images, labels) in (("train", train), ("test", test)):
        image_stem, label_stem = SPLIT_FILES[split]
        write_idx(folder / (image_stem + suffix), images)
        write_idx(folder / (label_stem + suffix), labels)
    return folder


def find_idx_file(folder: Path, stem: str) -> Path | None:
    """`folder/stem` or `folder/stem.gz`, whichever exists (plain first)."""
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def missing_files(folder: Path, splits: tuple[str, ...] = tuple(SPLIT_FILES)) -> list[str]:
    """The IDX file names of `splits` that `folder` lacks (empty when it holds them all)."""
    stems = [stem for split in splits for stem in SPLIT_FILES[split]]
    return [stem for stem in stems if find_idx_file(folder, stem) is None]


def load_split(folder: Path, split: str) -> tuple[Tensor, Tensor]:
    """Images uint8 [N, 1, H, W] and labels int64 [N] of `split` (train or test) in `folder`."""
    image_stem, label_stem = SPLIT_FILES[split]
    image_path, label_path = find_idx_file(folder, image_stem), find_idx_file(folder, label_stem)
    if image_path is None or label_path is None:
        raise DataError(f"{folder} lacks {image_stem}[.gz] or {label_stem}[.gz]")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.dim() != 3:
        raise DataError(f"{image_path} holds an array of shape {tuple(images.shape)}; expected [N, H, W] images")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(
            f"{label_path} holds {tuple(labels.shape)} labels for {images.shape[0]} images in "
            f"{image_path}; the two files do not belong together"
        )
    return images.unsqueeze(1), labels.long()


# ---------------------------------------------------------------------------
# Finding the dataset
# ---------------------------------------------------------------------------
def _candidate_folders(root: Path, torchvision_name: str) -> list[Path]:
    """Where the IDX files may sit under a data root: flat, per dataset, or torchvision's layout."""
    return [root, root / torchvision_name.lower(), root / torchvision_name / "raw"]


def _torchvision_download(root: Path, torchvision_name: str) -> Path:
    """Download with torchvision into `root`; returns the folder holding the raw IDX files."""
    try:  # imported here: torchvision is slow to import and needed only to download
        import torchvision.datasets as tv_datasets
    except ImportError as error:
        raise DataError(f"torchvision is not installed ({error})") from error
    dataset_class = getattr(tv_datasets, torchvision_name)
    for train in (True, False):
        dataset_class(str(root), train=train, download=True)
    return root / torchvision_name / "raw"


def _how_to_get(name: str, torchvision_name: str, splits: tuple[str, ...]) -> str:
    files = [f"{stem}[.gz]" for split in splits for stem in SPLIT_FILES[split]]
    hints = [
        f"pass data_dir (fastvae-train/fastvae-eval: --data-dir FOLDER, or set ${DATA_ENV_VAR}) to a "
        f"folder holding {', '.join(files)}"
    ]
    system_dir = KNOWN_DATASETS[name][0]
    if system_dir is not None:
        hints.append(f"or install the Debian package: sudo apt-get install dataset-{name}")
    hints.append(f"or run once with internet access so torchvision can download {torchvision_name}")
    return "; ".join(hints)


def locate_dataset(
    dataset: str, data_dir: str | None = None, download: bool = True, splits: tuple[str, ...] = tuple(SPLIT_FILES)
) -> Path:
    """The folder holding the IDX files of `splits` (train and test) of `dataset`, a known name or a folder
    path; `data_dir` is the first place to look for a known name.

    Raises DataError naming every place looked at and how to get the data."""
    if dataset not in KNOWN_DATASETS:
        folder = Path(dataset).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"unknown dataset {dataset!r}: choose {' or '.join(KNOWN_DATASETS)}, or pass a "
                f"folder that holds the IDX files"
            )
        missing = missing_files(folder, splits)
        if missing:
            raise DataError(f"dataset folder {folder} lacks {', '.join(m + '[.gz]' for m in missing)}")
        return folder
    system_dir, torchvision_name = KNOWN_DATASETS[dataset]
    roots = [Path(p).expanduser() for p in (data_dir, os.environ.get(DATA_ENV_VAR)) if p]
    looked: list[str] = []
    for root in roots:
        for folder in _candidate_folders(root, torchvision_name):
            if folder.is_dir() and not missing_files(folder, splits):
                return folder
            looked.append(str(folder))
    if system_dir is not None:
        if system_dir.is_dir() and not missing_files(system_dir, splits):
            return system_dir
        looked.append(f"{system_dir} (Debian package dataset-{dataset})")
    if download:
        root = roots[0] if roots else DEFAULT_DOWNLOAD_ROOT
        try:
            return _torchvision_download(root, torchvision_name)
        except Exception as error:  # noqa: BLE001 - any download failure is reported with the rest
            looked.append(f"torchvision download into {root} failed: {type(error).__name__}: {error}")
    raise DataError(
        f"cannot find the {dataset} IDX files. Looked in:\n  "
        + "\n  ".join(looked)
        + f"\nTo fix: {_how_to_get(dataset, torchvision_name, splits)}."
    )


# ---------------------------------------------------------------------------
# Splits, binarization and batches
# ---------------------------------------------------------------------------
def derive_seed(*keys: int | str) -> int:
    """A 62-bit seed that depends on every key, so (seed, epoch, rank) streams never collide."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def generator_for(*keys: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


@dataclass
class Split:
    """One split in memory: images uint8 [N, C, H, W], labels int64 [N]."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Datasets:
    train: Split
    val: Split
    test: Split
    folder: Path

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])


def load_datasets(dataset: str, data_dir: str | None, val_size: int, seed: int, download: bool = True) -> Datasets:
    """Train/validation/test splits; the validation set is `val_size` images held out of train
    by a permutation that depends on `seed` only.

    Raises DataError when the data cannot be found or read, and ValueError (only) when
    `val_size` does not leave at least one training image."""
    folder = locate_dataset(dataset, data_dir, download)
    train_images, train_labels = load_split(folder, "train")
    test_images, test_labels = load_split(folder, "test")
    if train_images.shape[1:] != test_images.shape[1:]:
        raise DataError(
            f"train images are {tuple(train_images.shape[2:])} but test images are "
            f"{tuple(test_images.shape[2:])} in {folder}"
        )
    if not 0 < val_size < len(train_images):
        raise ValueError(
            f"val_size must be between 1 and {len(train_images) - 1} for the {len(train_images)} "
            f"training images in {folder}, got {val_size}"
        )
    order = torch.randperm(len(train_images), generator=generator_for("val-split", seed))
    val_idx, train_idx = order[:val_size], order[val_size:]
    return Datasets(
        train=Split(train_images[train_idx], train_labels[train_idx]),
        val=Split(train_images[val_idx], train_labels[val_idx]),
        test=Split(test_images, test_labels),
        folder=folder,
    )


def load_test_split(dataset: str, data_dir: str | None, download: bool = True) -> tuple[Split, Path]:
    """The test split of `dataset` (see `locate_dataset`) and its folder; the training files may be absent."""
    folder = locate_dataset(dataset, data_dir, download, splits=("test",))
    return Split(*load_split(folder, "test")), folder


def to_unit(images: Tensor) -> Tensor:
    """uint8 [B, C, H, W] -> float32 intensities in [0, 1]."""
    return images.float() / PIXEL_MAX


def binarize(images: Tensor, generator: torch.Generator) -> Tensor:
    """uint8 [B, C, H, W] -> float32 {0, 1}, each pixel on with probability intensity/255."""
    return torch.bernoulli(to_unit(images), generator=generator)


def prepare_targets(split: Split, mode: str, name: str) -> Split:
    """Fix the binarization of a split once (static, and every evaluation split).

    The draw depends on the split's name only, so every run, whatever its seed,
    is scored on the same binary test set. Returns float32 images in [0, 1]
    ({0, 1} unless mode is none)."""
    if mode not in BINARIZE_CHOICES:
        raise ValueError(f"unknown binarization {mode!r}; choose one of {', '.join(BINARIZE_CHOICES)}")
    if mode == "none":
        return Split(to_unit(split.images), split.labels)
    return Split(binarize(split.images, generator_for("static-binarize", name)), split.labels)


class EpochBatches:
    """The batches of one rank for one epoch, in an order fixed by (seed, epoch).

    Indices come from a DistributedSampler (shuffled, padded so every rank gets
    the same count); dynamic binarization draws from a generator keyed by
    (seed, epoch, rank), whose state a checkpoint can save mid-epoch."""

    def __init__(
        self,
        split: Split,
        batch_size: int,
        epoch: int,
        seed: int,
        binarize_mode: str,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        sampler = DistributedSampler(
            range(len(split)), num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=False
        )
        sampler.set_epoch(epoch)
        self.indices = torch.tensor(list(sampler), dtype=torch.int64)
        self.split, self.batch_size, self.mode = split, batch_size, binarize_mode
        self.generator = generator_for("dynamic-binarize", seed, epoch, rank)

    def __len__(self) -> int:
        return math.ceil(len(self.indices) / self.batch_size)

    def batches(self, start: int = 0) -> Iterator[Tensor]:
        """Float32 batches [b, C, H, W] from batch number `start` on.

        Skipped batches are still binarized and dropped, so a resumed epoch
        draws exactly the noise the uninterrupted one did."""
        for number in range(len(self)):
            index = self.indices[number * self.batch_size : (number + 1) * self.batch_size]
            images = self.split.images[index]
            if self.mode == "dynamic":
                binary = binarize(images, self.generator)
                if number >= start:
                    yield binary
            elif number < start:
                continue
            elif images.dtype == torch.uint8:
                yield to_unit(images)
            else:
                yield images


def eval_batches(split: Split, batch_size: int, rank: int = 0, world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """(images [b, C, H, W], labels [b]) of this rank's contiguous shard, in order, no padding."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    per_rank = math.ceil(len(split) / world_size)
    lo, hi = rank * per_rank, min(len(split), (rank + 1) * per_rank)
    for start in range(lo, hi, batch_size):
        stop = min(hi, start + batch_size)
        yield split.images[start:stop], split.labels[start:stop]
