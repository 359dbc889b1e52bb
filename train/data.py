"""CIFAR data on the device: loading, a synthetic stand-in, and batched augmentation.

The whole training set lives on the device as one uint8 tensor (50000 x 3 x 32 x 32 is 150 MB),
so there are no DataLoader workers: each step gathers a batch by index and augments it with a
few vectorized tensor ops (after KellerJordan/cifar10-airbench's ``batch_crop``/``batch_flip_lr``).

All randomness of an epoch (order, crop offsets, flips, cutout centres) is drawn up front by
``make_epoch_plan`` from a CPU generator seeded with (seed, epoch): the data an epoch sees is a pure
function of those two numbers, which is what lets a run killed mid-epoch resume bit-for-bit, and
makes CPU and CUDA runs see the same batches.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import urllib.error
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from train.folders import make_folders, remove_empty_folders


class DatasetUnavailable(Exception):
    """The data set is missing or unreadable; the message tells the user what to do."""


class Split(NamedTuple):
    images: torch.Tensor  # uint8 (N, 3, 32, 32)
    labels: torch.Tensor  # int64 (N,), values in [0, num_classes)


class Dataset(NamedTuple):
    train: Split
    test: Split
    num_classes: int
    mean: tuple[float, float, float]  # per-channel mean of the training images, in [0, 1]
    std: tuple[float, float, float]


class CifarSource(NamedTuple):
    url: str
    archive: str  # file name of the downloaded archive
    md5: str  # of the archive, as published by torchvision
    folder: str  # what the archive extracts to
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes
    num_classes: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR_SOURCES = {
    "cifar10": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        archive="cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
        num_classes=10,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarSource(
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        archive="cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
        num_classes=100,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}


# --- loading the real data ------------------------------------------------------------------


def file_md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def where_to_put(source: CifarSource, data_dir: Path) -> str:
    return (
        f"Download {source.url} (md5 {source.md5}) and put it at {data_dir / source.archive} "
        f"(or its extracted folder at {data_dir / source.folder}), or pass --data-dir to where it "
        "is. To try the trainer offline, use --dataset synthetic."
    )


def read_cifar_batch(path: Path, label_key: bytes, num_classes: int) -> Split:
    """One pickled batch of the CIFAR python format: a dict with b'data' (uint8, N x 3072, each
    row the R, G, B planes of a 32 x 32 image) and ``label_key`` (N ints)."""
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
        data, labels = entry[b"data"], entry[label_key]
        images = torch.as_tensor(data)
        labels = torch.as_tensor(labels, dtype=torch.int64)
    except FileNotFoundError:
        raise
    except Exception as err:  # any unpickling or structure error means a damaged file
        raise DatasetUnavailable(f"{path} is not a readable CIFAR batch ({type(err).__name__}: {err})")
    if images.dtype != torch.uint8 or images.ndim != 2 or images.shape[1] != 3072:
        raise DatasetUnavailable(
            f"{path}: expected uint8 data of shape (N, 3072), got {images.dtype} {tuple(images.shape)}"
        )
    if labels.shape != (images.shape[0],) or labels.min() < 0 or labels.max() >= num_classes:
        raise DatasetUnavailable(
            f"{path}: expected {images.shape[0]} labels in [0, {num_classes}), "
            f"got shape {tuple(labels.shape)}"
        )
    return Split(images.reshape(-1, 3, 32, 32), labels)


def read_split(folder: Path, files: tuple[str, ...], source: CifarSource) -> Split:
    parts = [read_cifar_batch(folder / name, source.label_key, source.num_classes) for name in files]
    return Split(torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]))


def fetch_archive(source: CifarSource, data_dir: Path, download: bool) -> None:
    """Make ``data_dir / source.folder`` exist: extract a checksum-verified archive, downloading
    it first if it is absent (torchvision checks the md5 of what it downloads)."""
    from torchvision.datasets.utils import download_and_extract_archive, extract_archive

    archive = data_dir / source.archive
    if archive.exists():
        if file_md5(archive) != source.md5:
            raise DatasetUnavailable(
                f"{archive} is corrupt or incomplete (md5 mismatch). Delete it and run again. "
                + where_to_put(source, data_dir)
            )
        extract_archive(str(archive), str(data_dir))
        return
    if not download:
        raise DatasetUnavailable(f"{source.folder} not found under {data_dir}. " + where_to_put(source, data_dir))
    extracted = data_dir / source.folder
    try:
        download_and_extract_archive(source.url, str(data_dir), filename=source.archive, md5=source.md5)
    except BaseException as err:
        # Neither existed before: a partial archive would be refused as corrupt by the next run,
        # a partial folder read as a data set with missing files.
        archive.unlink(missing_ok=True)
        shutil.rmtree(extracted, ignore_errors=True)
        if not isinstance(err, (urllib.error.URLError, OSError, RuntimeError)):
            raise  # an interruption (Ctrl-C, a stop signal) is not a download failure
        raise DatasetUnavailable(
            f"Could not download {source.url} ({type(err).__name__}: {err}). " + where_to_put(source, data_dir)
        ) from None


def load_cifar(name: str, data_dir: str | os.PathLike, download: bool = True) -> Dataset:
    """CIFAR-10 or CIFAR-100 from ``data_dir``, fetched if needed, as uint8 CPU tensors.

    Raises DatasetUnavailable (with what to do) when the files are missing and cannot be
    downloaded, or are corrupt."""
    source = CIFAR_SOURCES[name]
    data_dir = Path(data_dir)
    folder = data_dir / source.folder
    if not folder.is_dir():
        created = make_folders(data_dir)
        try:
            fetch_archive(source, data_dir, download)
        except BaseException:
            remove_empty_folders(created)  # a failed fetch leaves no empty --data-dir behind
            raise
    try:
        train = read_split(folder, source.train_files, source)
        test = read_split(folder, source.test_files, source)
    except FileNotFoundError as err:
        raise DatasetUnavailable(f"{err.filename} is missing. " + where_to_put(source, data_dir)) from None
    except DatasetUnavailable as err:
        raise DatasetUnavailable(f"{err} Replace the damaged files. " + where_to_put(source, data_dir)) from None
    return Dataset(train, test, source.num_classes, source.mean, source.std)


# --- synthetic stand-in -----------------------------------------------------------------------


def make_synthetic(seed: int, train_size: int, test_size: int, num_classes: int = 10) -> Dataset:
    """CIFAR-shaped uint8 images whose class is a smooth colour pattern, for offline runs.

    Each class owns a random 3 x 4 x 4 pattern, upsampled to 32 x 32 (coarse, so padding-crop
    keeps it recognisable). An image is its class pattern at a random contrast, plus a random
    smooth distractor and pixel noise, so a small network learns it well above chance in a few
    hundred steps without it being trivial. Train and test share the patterns, not the noise."""
    g = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.rand(num_classes, 3, 4, 4, generator=g) * 2 - 1, size=32, mode="bilinear")

    def split(n: int) -> Split:
        labels = torch.randint(0, num_classes, (n,), generator=g)
        contrast = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g)
        distractor = F.interpolate(torch.rand(n, 3, 8, 8, generator=g) * 2 - 1, size=32, mode="bilinear")
        noise = torch.randn(n, 3, 32, 32, generator=g)
        x = contrast * patterns[labels] + 0.8 * distractor + 0.3 * noise
        images = ((x * 0.25 + 0.5) * 255).round().clamp(0, 255).to(torch.uint8)
        return Split(images, labels)

    train, test = split(train_size), split(test_size)
    mean = tuple((train.images.float() / 255).mean(dim=(0, 2, 3)).tolist())
    std = tuple((train.images.float() / 255).std(dim=(0, 2, 3)).tolist())
    return Dataset(train, test, num_classes, mean, std)


# --- augmentation -----------------------------------------------------------------------------


class EpochPlan(NamedTuple):
    """Everything random about one training epoch, drawn once; row i describes the i-th sample
    the epoch visits."""

    order: torch.Tensor  # int64 (N,): index into the training set
    crop_offsets: torch.Tensor  # int64 (N, 2): top-left corner of the crop in the padded image
    flips: torch.Tensor  # bool (N,): mirror left-right
    cutout_centres: torch.Tensor  # int64 (N, 2): centre (row, col) of the cutout square


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    # A fixed mixing of (seed, epoch), so neighbouring seeds do not share epochs' streams.
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch) % (2**63))


def make_epoch_plan(num_samples: int, seed: int, epoch: int, device: torch.device, pad: int = 4) -> EpochPlan:
    """The epoch's shuffled order and augmentation draws, a pure function of (seed, epoch)."""
    g = epoch_generator(seed, epoch)
    plan = EpochPlan(
        order=torch.randperm(num_samples, generator=g),
        crop_offsets=torch.randint(0, 2 * pad + 1, (num_samples, 2), generator=g),
        flips=torch.rand(num_samples, generator=g) < 0.5,
        cutout_centres=torch.randint(0, 32, (num_samples, 2), generator=g),
    )
    return EpochPlan(*(t.to(device) for t in plan))


def random_crop(images: torch.Tensor, offsets: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """Zero-pad (B, C, H, W) by ``pad`` and cut an H x W window at ``offsets`` (B, 2) per image,
    as torchvision's RandomCrop(32, padding=4), with two gathers instead of a loop."""
    b, c, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = offsets[:, 0, None] + torch.arange(h, device=images.device)  # (B, H)
    cols = offsets[:, 1, None] + torch.arange(w, device=images.device)  # (B, W)
    padded = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
    return padded.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def random_flip(images: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    return torch.where(flips[:, None, None, None], images.flip(-1), images)


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (x / 255 - mean) / std with per-channel mean, std of shape (3,)."""
    return (images.float() / 255 - mean[:, None, None]) / std[:, None, None]


def cutout(images: torch.Tensor, centres: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Zero a size x size square (clipped at the border) around ``centres`` (B, 2) of normalized
    images, as DeVries & Taylor 2017: zero there means the mean colour."""
    h, w = images.shape[-2:]
    # Rows centre-size/2 .. centre+size/2-1, as the reference Cutout's mask[y1:y2] slice.
    row_d = torch.arange(h, device=images.device) - centres[:, 0, None]  # (B, H)
    col_d = torch.arange(w, device=images.device) - centres[:, 1, None]  # (B, W)
    in_rows = (row_d >= -(size // 2)) & (row_d < size - size // 2)
    in_cols = (col_d >= -(size // 2)) & (col_d < size - size // 2)
    inside = in_rows[:, :, None] & in_cols[:, None, :]  # (B, H, W)
    return images * (~inside)[:, None].to(images.dtype)


def augment(
    images: torch.Tensor,
    crop_offsets: torch.Tensor,
    flips: torch.Tensor,
    cutout_centres: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    use_cutout: bool,
) -> torch.Tensor:
    """The training transform of the original recipe on a uint8 batch: pad-4 random crop,
    horizontal flip, normalize, then optional 16 x 16 cutout. Returns float32 (B, 3, 32, 32)."""
    x = normalize(random_flip(random_crop(images, crop_offsets), flips), mean, std)
    return cutout(x, cutout_centres) if use_cutout else x
