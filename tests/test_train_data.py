"""Loading CIFAR from the real python-pickle format, its failure messages, and the augmentation."""

import hashlib
import os
import pickle
import subprocess
import sys
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from train.cifar10 import main
from train.data import (
    CIFAR_SOURCES, DatasetUnavailable, cutout, load_cifar, make_epoch_plan, make_synthetic, random_crop, random_flip,
)

REPO = Path(__file__).resolve().parents[1]


def write_batch(path: Path, rows: np.ndarray, labels: list, label_key: bytes = b"labels") -> None:
    """A batch as the CIFAR python version stores it (numpy uint8 rows, a list of ints)."""
    entry = {b"batch_label": b"test batch", label_key: labels, b"data": rows,
             b"filenames": [b"img%d.png" % i for i in range(len(labels))]}
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def write_cifar10(root: Path, per_batch: int = 6, seed: int = 0) -> dict:
    """The six files of cifar-10-batches-py with random content; returns what was written."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    written = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        write_batch(folder / name, rows, labels)
        written[name] = (rows, labels)
    return written


def test_cifar10_batches_are_read_as_rgb_planes(tmp_path):
    written = write_cifar10(tmp_path)
    dataset = load_cifar("cifar10", tmp_path, download=False)
    assert dataset.num_classes == 10
    assert dataset.train.images.shape == (30, 3, 32, 32) and dataset.train.images.dtype == torch.uint8
    assert dataset.test.images.shape == (6, 3, 32, 32)
    # Independent of reshape: row i holds 1024 red, then 1024 green, then 1024 blue values, row-major.
    rows, labels = written["data_batch_2"]
    image = dataset.train.images[6 + 1]
    for c, y, x in [(0, 0, 0), (1, 5, 7), (2, 31, 30)]:
        assert image[c, y, x] == rows[1, c * 1024 + y * 32 + x]
    assert dataset.train.labels[6:12].tolist() == labels
    assert dataset.test.labels.tolist() == written["test_batch"][1]


def test_cifar100_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rows = np.zeros((4, 3072), dtype=np.uint8)
    write_batch(folder / "train", rows, [0, 99, 50, 7], label_key=b"fine_labels")
    write_batch(folder / "test", rows[:2], [3, 98], label_key=b"fine_labels")
    dataset = load_cifar("cifar100", tmp_path, download=False)
    assert dataset.num_classes == 100
    assert dataset.train.labels.tolist() == [0, 99, 50, 7]


def make_archive(root: Path) -> Path:
    source = root / "src"
    write_cifar10(source)
    archive = root / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return archive


def test_archive_with_matching_checksum_is_extracted(tmp_path, monkeypatch):
    archive = make_archive(tmp_path)
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    os.replace(archive, data_dir / archive.name)
    md5 = hashlib.md5((data_dir / archive.name).read_bytes()).hexdigest()
    monkeypatch.setitem(CIFAR_SOURCES, "cifar10", CIFAR_SOURCES["cifar10"]._replace(md5=md5))
    dataset = load_cifar("cifar10", data_dir, download=False)
    assert dataset.train.images.shape == (30, 3, 32, 32)
    assert (data_dir / "cifar-10-batches-py" / "test_batch").exists()


def test_archive_with_wrong_checksum_is_refused(tmp_path):
    archive = make_archive(tmp_path)  # its md5 is not the official one
    with pytest.raises(DatasetUnavailable) as err:
        load_cifar("cifar10", tmp_path)
    message = str(err.value)
    assert "md5 mismatch" in message and str(archive) in message and "--dataset synthetic" in message
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_failed_download_says_where_to_put_the_files(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    with pytest.raises(DatasetUnavailable) as err:
        load_cifar("cifar10", tmp_path)
    message = str(err.value)
    assert CIFAR_SOURCES["cifar10"].url in message
    assert str(tmp_path / "cifar-10-python.tar.gz") in message and "--dataset synthetic" in message


def fail_after_a_partial_archive(monkeypatch, error: BaseException) -> None:
    """The download writes part of the archive, as torchvision's does when the connection drops."""
    import torchvision.datasets.utils as tv_utils

    def partial(url, download_root, filename, md5):
        (Path(download_root) / filename).write_bytes(b"the first bytes")
        raise error

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", partial)


@pytest.mark.parametrize("error", [urllib.error.URLError("no network"), KeyboardInterrupt()])
def test_failed_download_leaves_no_folder_and_no_partial_archive(tmp_path, monkeypatch, error):
    fail_after_a_partial_archive(monkeypatch, error)
    with pytest.raises(DatasetUnavailable if isinstance(error, Exception) else KeyboardInterrupt):
        load_cifar("cifar10", tmp_path / "new" / "data")
    assert list(tmp_path.iterdir()) == []  # both folders it created are gone


def test_failed_download_keeps_the_users_folder_and_what_it_holds(tmp_path, monkeypatch):
    data_dir = tmp_path / "mine"
    data_dir.mkdir()
    (data_dir / "notes.txt").write_text("mine")
    fail_after_a_partial_archive(monkeypatch, urllib.error.URLError("no network"))
    with pytest.raises(DatasetUnavailable):
        load_cifar("cifar10", data_dir)
    assert [p.name for p in data_dir.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("damage", ["truncated", "bad_shape", "bad_labels", "missing"])
def test_damaged_batch_is_named_in_the_message(tmp_path, damage):
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "bad_shape":
        write_batch(path, np.zeros((6, 3000), dtype=np.uint8), [0] * 6)
    elif damage == "bad_labels":
        write_batch(path, np.zeros((6, 3072), dtype=np.uint8), [0, 1, 2, 3, 4, 10])
    else:
        path.unlink()
    with pytest.raises(DatasetUnavailable) as err:
        load_cifar("cifar10", tmp_path, download=False)
    assert str(path) in str(err.value) and "--dataset synthetic" in str(err.value)


def test_cli_offline_exits_2_with_a_short_message(tmp_path):
    # A proxy that refuses connections: the real download path fails at once, as offline.
    env = {**os.environ, "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
           "no_proxy": "", "NO_PROXY": ""}
    result = subprocess.run(
        [sys.executable, "-m", "train.cifar10", "--data-dir", str(tmp_path / "data"),
         "--out", str(tmp_path / "runs" / "offline"), "--epochs", "1", "--warmup-epochs", "0", "--device", "cpu"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "--dataset synthetic" in result.stderr and "cifar-10-python.tar.gz" in result.stderr
    assert list(tmp_path.iterdir()) == []  # neither the data folder nor the run folder (nor runs/) is left


def test_cli_corrupt_data_exits_2(tmp_path, capsys):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    code = main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--warmup-epochs", "0", "--model", "tiny", "--device", "cpu"])
    assert code == 2
    assert "test_batch" in capsys.readouterr().err


# --- augmentation, against per-image reference loops ------------------------------------------


def test_random_crop_matches_padding_and_slicing():
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    offsets = torch.tensor([[0, 0], [8, 8], [3, 5], [8, 0], [4, 4]])
    cropped = random_crop(images, offsets)
    for i, (dy, dx) in enumerate(offsets.tolist()):
        padded = F.pad(images[i], (4, 4, 4, 4))
        assert torch.equal(cropped[i], padded[:, dy:dy + 32, dx:dx + 32])


def test_random_flip_mirrors_only_the_chosen_images():
    images = torch.randn(4, 3, 8, 8)
    flips = torch.tensor([True, False, True, False])
    flipped = random_flip(images, flips)
    for i in range(4):
        expected = images[i].flip(-1) if flips[i] else images[i]
        assert torch.equal(flipped[i], expected)


def test_cutout_zeroes_the_clipped_16x16_square():
    images = torch.ones(3, 3, 32, 32)
    centres = torch.tensor([[16, 16], [0, 0], [31, 20]])
    out = cutout(images, centres)
    for i, (cy, cx) in enumerate(centres.tolist()):
        mask = np.ones((32, 32), dtype=np.float32)  # DeVries & Taylor's reference
        y1, y2 = np.clip(cy - 8, 0, 32), np.clip(cy + 8, 0, 32)
        x1, x2 = np.clip(cx - 8, 0, 32), np.clip(cx + 8, 0, 32)
        mask[y1:y2, x1:x2] = 0.0
        assert torch.equal(out[i], torch.from_numpy(mask).expand(3, 32, 32))


def test_epoch_plan_is_a_function_of_seed_and_epoch():
    cpu = torch.device("cpu")
    a, b = make_epoch_plan(100, 3, 7, cpu), make_epoch_plan(100, 3, 7, cpu)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.order, make_epoch_plan(100, 3, 8, cpu).order)
    assert not torch.equal(a.order, make_epoch_plan(100, 4, 7, cpu).order)
    assert sorted(a.order.tolist()) == list(range(100))
    assert a.crop_offsets.min() >= 0 and a.crop_offsets.max() <= 8


def test_synthetic_set_is_deterministic_and_cifar_shaped():
    a, b = make_synthetic(5, 200, 40), make_synthetic(5, 200, 40)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert a.train.images.shape == (200, 3, 32, 32) and a.train.images.dtype == torch.uint8
    assert set(a.train.labels.tolist()) <= set(range(10))
    assert not torch.equal(a.train.images, make_synthetic(6, 200, 40).train.images)
