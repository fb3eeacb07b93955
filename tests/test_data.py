"""fastvae.data: IDX files (generated here, tiny), lookup order, errors, splits, binarization, batches."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from fastvae.train import data
from fastvae.train.data import DataError

TRAIN_N, TEST_N, SIDE = 60, 20, 8


def make_images(n: int, side: int = SIDE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, side, side), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g, dtype=torch.uint8)
    return images, labels


def make_dataset(folder: Path, gzipped: bool = True, train_n: int = TRAIN_N, test_n: int = TEST_N) -> Path:
    return data.write_idx_dataset(folder, make_images(train_n, seed=1), make_images(test_n, seed=2), gzipped)


@pytest.fixture()
def no_system_copy(monkeypatch, tmp_path):
    """Point the system copy at an empty folder and make downloads fail, so lookups see only tmp data."""
    monkeypatch.setitem(data.KNOWN_DATASETS, "fashion-mnist", (tmp_path / "system-empty", "FashionMNIST"))
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)

    def offline(root, name):
        raise OSError("network unreachable (test)")

    monkeypatch.setattr(data, "_torchvision_download", offline)


# --------------------------------------------------------------------------- IDX files
@pytest.mark.parametrize("gzipped", [True, False], ids=["gz", "plain"])
def test_idx_round_trip(tmp_path, gzipped):
    images, _ = make_images(7)
    path = tmp_path / ("x-idx3-ubyte" + (".gz" if gzipped else ""))
    data.write_idx(path, images)
    assert path.read_bytes()[:2] == (b"\x1f\x8b" if gzipped else b"\x00\x00")
    assert torch.equal(data.read_idx(path), images)


def test_idx_header_is_the_documented_format(tmp_path):
    path = tmp_path / "labels"
    data.write_idx(path, torch.tensor([3, 1, 4], dtype=torch.uint8))
    assert path.read_bytes() == bytes([0, 0, 8, 1, 0, 0, 0, 3, 3, 1, 4])


def test_truncated_plain_idx_names_the_file(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    data.write_idx(path, make_images(5)[0])
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="train-images-idx3-ubyte.*truncated"):
        data.read_idx(path)


def test_truncated_gzip_idx_names_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data.write_idx(path, make_images(5)[0])
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        data.read_idx(path)


def test_corrupt_magic_and_type_are_errors(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(DataError, match="bad magic"):
        data.read_idx(path)
    path.write_bytes(gzip.compress(b"\x00\x00\x0d\x01\x00\x00\x00\x01\x05\x00\x00\x00"))
    with pytest.raises(DataError, match="0x0d"):
        data.read_idx(path)


def test_an_empty_idx_file_names_the_file(tmp_path):
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data.write_idx(path, torch.zeros(0, SIDE, SIDE, dtype=torch.uint8))
    with pytest.raises(DataError, match=f"{path}.* holds no data .*\\(0, {SIDE}, {SIDE}\\)"):
        data.read_idx(path)


def test_labels_that_do_not_match_images_are_an_error(tmp_path):
    folder = make_dataset(tmp_path / "d")
    data.write_idx(folder / "train-labels-idx1-ubyte.gz", torch.zeros(TRAIN_N - 1, dtype=torch.uint8))
    with pytest.raises(DataError, match="do not belong together"):
        data.load_split(folder, "train")


def test_plain_file_is_preferred_and_split_shapes(tmp_path):
    folder = make_dataset(tmp_path / "d", gzipped=False)
    images, labels = data.load_split(folder, "test")
    assert images.shape == (TEST_N, 1, SIDE, SIDE) and images.dtype == torch.uint8
    assert labels.shape == (TEST_N,) and labels.dtype == torch.int64


# --------------------------------------------------------------------------- lookup
def test_lookup_order_data_dir_then_env_then_system(tmp_path, monkeypatch, no_system_copy):
    flag_dir, env_dir, system_dir = (make_dataset(tmp_path / name) for name in ("flag", "env", "system"))
    monkeypatch.setitem(data.KNOWN_DATASETS, "fashion-mnist", (system_dir, "FashionMNIST"))
    monkeypatch.setenv(data.DATA_ENV_VAR, str(env_dir))
    assert data.locate_dataset("fashion-mnist", str(flag_dir)) == flag_dir
    assert data.locate_dataset("fashion-mnist", None) == env_dir
    monkeypatch.delenv(data.DATA_ENV_VAR)
    assert data.locate_dataset("fashion-mnist", None) == system_dir


def test_torchvision_layout_under_a_root_is_found(tmp_path, no_system_copy):
    raw = make_dataset(tmp_path / "root" / "MNIST" / "raw")
    assert data.locate_dataset("mnist", str(tmp_path / "root")) == raw


def test_nothing_found_names_every_place_and_the_fix(tmp_path, monkeypatch, no_system_copy):
    monkeypatch.setenv(data.DATA_ENV_VAR, str(tmp_path / "env"))
    with pytest.raises(DataError) as info:
        data.locate_dataset("fashion-mnist", str(tmp_path / "flag"))
    message = str(info.value)
    for place in (
        "flag",
        "env",
        "system-empty",
        "dataset-fashion-mnist",
        "torchvision download",
        "network unreachable",
    ):
        assert place in message
    assert "--data-dir" in message and "apt-get install dataset-fashion-mnist" in message


def test_download_is_tried_last_and_used(tmp_path, monkeypatch, no_system_copy):
    calls = []

    def fake_download(root, name):
        calls.append((root, name))
        return make_dataset(root / name / "raw")

    monkeypatch.setattr(data, "_torchvision_download", fake_download)
    folder = data.locate_dataset("mnist", str(tmp_path / "dl"))
    assert calls == [(tmp_path / "dl", "MNIST")] and folder == tmp_path / "dl" / "MNIST" / "raw"


def test_unknown_dataset_and_incomplete_folder(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'cifar'.*fashion-mnist or mnist"):
        data.locate_dataset("cifar")
    folder = make_dataset(tmp_path / "d")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="lacks t10k-labels-idx1-ubyte"):
        data.locate_dataset(str(folder))


# --------------------------------------------------------------------------- splits and batches
def test_validation_split_is_disjoint_and_seeded(tmp_path):
    folder = make_dataset(tmp_path / "d")
    a = data.load_datasets(str(folder), None, val_size=10, seed=3)
    b = data.load_datasets(str(folder), None, val_size=10, seed=3)
    assert (len(a.train), len(a.val), len(a.test)) == (TRAIN_N - 10, 10, TEST_N)
    assert a.image_shape == (1, SIDE, SIDE)
    assert torch.equal(a.val.images, b.val.images)
    train_rows = {bytes(img.numpy()) for img in a.train.images}
    assert not any(bytes(img.numpy()) in train_rows for img in a.val.images)
    with pytest.raises(ValueError, match=f"^val_size must be between 1 and {TRAIN_N - 1} .* got {TRAIN_N}"):
        data.load_datasets(str(folder), None, val_size=TRAIN_N, seed=3)


def test_static_and_none_binarization():
    split = data.Split(*make_images(30))
    split = data.Split(split.images.unsqueeze(1), split.labels.long())
    static = data.prepare_targets(split, "static", "test")
    assert set(static.images.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(static.images, data.prepare_targets(split, "static", "test").images)
    grey = data.prepare_targets(split, "none", "test").images
    assert torch.allclose(grey, split.images.float() / 255.0)
    with pytest.raises(ValueError, match="dynamic, static, none"):
        data.prepare_targets(split, "otsu", "test")


def _split(n: int = 50) -> data.Split:
    images, labels = make_images(n)
    return data.Split(images.unsqueeze(1), labels.long())


def test_dynamic_binarization_changes_each_epoch_and_is_reproducible():
    split = _split()
    epoch0 = torch.cat(list(data.EpochBatches(split, 16, 0, 7, "dynamic").batches()))
    again = torch.cat(list(data.EpochBatches(split, 16, 0, 7, "dynamic").batches()))
    epoch1 = torch.cat(list(data.EpochBatches(split, 16, 1, 7, "dynamic").batches()))
    assert torch.equal(epoch0, again) and not torch.equal(epoch0, epoch1)
    assert set(epoch0.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("mode", ["dynamic", "none"])
def test_batches_from_a_start_equal_the_tail(mode):
    split = _split()
    full = list(data.EpochBatches(split, 16, 2, 7, mode).batches())
    tail = list(data.EpochBatches(split, 16, 2, 7, mode).batches(start=2))
    assert len(tail) == len(full) - 2 and all(torch.equal(a, b) for a, b in zip(full[2:], tail))


def test_ranks_share_an_epoch_without_overlap():
    split = _split(50)
    shards = [data.EpochBatches(split, 8, 0, 7, "none", rank, 2).indices for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 25
    assert set(shards[0].tolist()) | set(shards[1].tolist()) == set(range(50))
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    eval_shards = [torch.cat([x for x, _ in data.eval_batches(split, 7, rank, 3)]) for rank in range(3)]
    assert torch.equal(torch.cat(eval_shards), split.images)
