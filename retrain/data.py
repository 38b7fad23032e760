"""Datasets by name, seeded train splits and resumable loaders.

Names: ``synthetic`` (procedural, no files; the default for the demo and the tests), ``fashion_mnist`` and ``mnist``
(a torchvision root, a directory of gzipped or raw IDX files, or a compact ``.npz`` with ``x_train``/``y_train``/
``x_test``/``y_test`` uint8 arrays), ``cifar10`` / ``cifar100`` (torchvision format) and ``imagefolder`` (ImageNet
layout: ``train/`` and ``val/`` with one folder per class).

The synthetic task is built so that *token order matters*. Each image is drawn on a coarse G×G grid of cells (G = 8,
scaled up to the image size) over noise and faint distractor dots, and its class is one of five patterns laid out
along one of two axes (10 classes): a short bar, two bright dots far apart on one line, a dashed line, a 2×3 block and
an intensity ramp, each horizontal or vertical. Telling a vertical pair from a horizontal one needs relations between
tokens that are neighbours in a column-major scan but L/G steps apart in a row-major one (and the reverse), and the
bar/block/pair distinctions are local-versus-long-range, which windowed scans see differently from global ones.
"""

from __future__ import annotations

import gzip
import math
import os
import signal
import struct
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from retrain.config import one_line

__all__ = [
    "DATASETS",
    "DatasetInfo",
    "ResumableSampler",
    "SyntheticScanDataset",
    "build_dataset",
    "build_loader",
    "config_dataset_info",
    "fixed_dataset_info",
    "read_idx",
    "split_train",
]

DATASETS = ("synthetic", "fashion_mnist", "mnist", "cifar10", "cifar100", "imagefolder")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset."""

    num_classes: int
    in_chans: int
    img_size: int


# --------------------------------------------------------------------------------------------------------------------
# Synthetic, order-sensitive data
# --------------------------------------------------------------------------------------------------------------------

SYNTHETIC_CLASSES = (
    "bar_h",
    "bar_v",
    "pair_h",
    "pair_v",
    "dash_h",
    "dash_v",
    "block_h",
    "block_v",
    "ramp_h",
    "ramp_v",
)


class SyntheticScanDataset(Dataset):
    """Procedural 10-class images whose classes differ by layout along rows vs columns (see the module docstring).

    Every item is a pure function of ``(seed, index)``: no files, no state, identical on every worker and rank.

    Args:
        num_samples: dataset length.
        img_size: output height and width.
        in_chans: output channels (each image gets a random tint per channel).
        seed: generation seed; use different seeds for train and val.
        grid: coarse cells per side that the patterns are drawn on.
        noise: std of the Gaussian pixel noise.
        num_classes: use the first ``num_classes`` classes (2..10).
    """

    def __init__(
        self,
        num_samples: int = 4096,
        img_size: int = 32,
        in_chans: int = 3,
        seed: int = 0,
        grid: int = 8,
        noise: float = 0.25,
        num_classes: int = 10,
    ) -> None:
        if not 2 <= num_classes <= len(SYNTHETIC_CLASSES):
            raise ValueError(f"synthetic: num_classes={num_classes} is out of range; use 2..{len(SYNTHETIC_CLASSES)}")
        if img_size < 4 or num_samples < 1 or in_chans < 1:
            raise ValueError(
                f"synthetic: need img_size >= 4, num_samples >= 1, in_chans >= 1 (got {img_size}, {num_samples}, "
                f"{in_chans})"
            )
        self.num_samples = num_samples
        self.img_size = img_size
        self.in_chans = in_chans
        self.seed = seed
        self.grid = max(6, min(grid, img_size))
        self.noise = noise
        self.num_classes = num_classes
        self.classes = list(SYNTHETIC_CLASSES[:num_classes])

    def __len__(self) -> int:
        return self.num_samples

    def _pattern(self, label: int, rng: np.random.Generator) -> np.ndarray:
        """The class pattern on a G×G grid, drawn as horizontal; vertical classes are its transpose."""
        g = self.grid
        img = np.zeros((g, g), dtype=np.float32)
        kind = SYNTHETIC_CLASSES[label].split("_")[0]
        r = int(rng.integers(0, g))
        if kind == "bar":  # a short contiguous segment: local along the axis
            n = int(rng.integers(3, 5))
            c = int(rng.integers(0, g - n + 1))
            img[r, c : c + n] = 1.0
        elif kind == "pair":  # two dots on one line, far apart: long-range along the axis
            c1 = int(rng.integers(0, g // 2 - 1))
            c2 = int(rng.integers(c1 + g // 2, g))
            img[r, c1] = img[r, c2] = 1.0
        elif kind == "dash":  # every other cell along the whole line: periodic
            off = int(rng.integers(0, 2))
            img[r, off::2] = 1.0
        elif kind == "block":  # a 2-row × 3-column rectangle: local in 2-D, elongated along the axis
            r = int(rng.integers(0, g - 1))
            c = int(rng.integers(0, g - 2))
            img[r : r + 2, c : c + 3] = 1.0
        else:  # ramp: a global intensity gradient along the axis
            ramp = np.linspace(0.0, 0.8, g, dtype=np.float32)
            img += ramp[None, :] if rng.random() < 0.5 else ramp[None, ::-1]
        return img if SYNTHETIC_CLASSES[label].endswith("_h") else np.ascontiguousarray(img.T)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        label = int(rng.integers(0, self.num_classes))
        img = self._pattern(label, rng)
        g = self.grid
        # Faint distractor dots so that "two bright dots" is about their alignment, not their presence.
        for _ in range(int(rng.integers(1, 4))):
            img[rng.integers(0, g), rng.integers(0, g)] += 0.45
        tint = rng.uniform(0.6, 1.0, size=(self.in_chans, 1, 1)).astype(np.float32)
        x = torch.from_numpy(tint * img[None])
        x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="nearest")[0]
        x = x + self.noise * torch.from_numpy(
            rng.standard_normal((self.in_chans, self.img_size, self.img_size), dtype=np.float32)
        )
        return (x - 0.3) / 0.5, label


# --------------------------------------------------------------------------------------------------------------------
# Small real datasets held in memory (MNIST, Fashion-MNIST, CIFAR)
# --------------------------------------------------------------------------------------------------------------------

_STATS = {  # per-channel mean/std of the training images
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4")}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzipped when the name ends in ``.gz``).

    Header: two zero bytes, a dtype code, the number of dimensions, then one big-endian uint32 per dimension.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path.resolve()}: not an IDX file (bad magic number); replace it with the original MNIST-format file"
        )
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape)) if shape else 0
    body = data[4 + 4 * ndim :]
    if len(body) < count * dtype.itemsize:
        raise ValueError(
            f"{path.resolve()}: truncated IDX file ({len(body)} of {count * dtype.itemsize} bytes); download it again"
        )
    return np.frombuffer(body, dtype=dtype, count=count).reshape(shape).astype(dtype.newbyteorder("="))


class ArrayDataset(Dataset):
    """Images in memory as uint8 ``(N, H, W)`` or ``(N, H, W, C)`` with integer labels.

    Items are float tensors ``(in_chans, img_size, img_size)``: resized when the size differs, grey replicated to
    ``in_chans`` (or colour averaged to 1), normalized by the dataset statistics; in training, a random crop with
    padding (and a horizontal flip where it keeps the class meaning).
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        img_size: int,
        in_chans: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        train: bool,
        hflip: bool,
        num_classes: int,
    ) -> None:
        if images.ndim == 3:
            images = images[..., None]
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"dataset arrays are empty or mismatched: {len(images)} images, {len(labels)} labels")
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))  # N, C, H, W uint8
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.img_size, self.in_chans, self.train, self.hflip = img_size, in_chans, train, hflip
        self.num_classes = num_classes
        c = self.images.shape[1]
        mean_t, std_t = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
        if in_chans != c:
            mean_t, std_t = mean_t.mean().expand(in_chans, 1, 1), std_t.mean().expand(in_chans, 1, 1)
        self.mean, self.std = mean_t.contiguous(), std_t.contiguous()
        self.pad = max(1, img_size // 8)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float().div_(255.0)
        if x.shape[0] != self.in_chans:
            x = x.mean(0, keepdim=True).expand(self.in_chans, -1, -1) if self.in_chans != 1 else x.mean(0, True)
        if x.shape[-1] != self.img_size or x.shape[-2] != self.img_size:
            x = F.interpolate(x[None], size=(self.img_size, self.img_size), mode="bilinear", antialias=True)[0]
        x = (x - self.mean) / self.std
        if self.train:
            # Pad-and-crop and flips use the torch RNG, so they follow seed_everything and resume exactly.
            p = self.pad
            x = F.pad(x, (p, p, p, p))
            i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
            x = x[:, i : i + self.img_size, j : j + self.img_size]
            if self.hflip and torch.rand(()) < 0.5:
                x = x.flip(-1)
        return x.contiguous(), int(self.labels[index])


_IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_TV_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}


# Where Debian's dataset-fashion-mnist package puts the IDX files (a folder --data-dir takes as it is).
DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _get_it(name: str) -> str:
    """How to get a dataset, for the messages that say it is missing."""
    if name == "fashion_mnist":
        return f" (apt-get install dataset-fashion-mnist puts its IDX files in {DEBIAN_FASHION_MNIST})"
    return ""


def _missing(name: str, path: Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name}: {what} not found at {path.resolve()}; pass --data-dir pointing to it{_get_it(name)}"
    )


def _load_mnist_like(name: str, data_dir: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    """Find MNIST-format data as an ``.npz`` file, IDX files (``.gz`` or raw) or a torchvision root."""
    npz_candidates = [data_dir] if data_dir.suffix == ".npz" else [data_dir / f"{name}.npz", data_dir / "data.npz"]
    for npz in npz_candidates:
        if npz.is_file():
            keys = ("x_train", "y_train") if split == "train" else ("x_test", "y_test")
            try:
                if not zipfile.is_zipfile(npz):  # a truncated or foreign file; np.load would guess at pickles
                    raise ValueError("not a zip archive of named arrays")
                z = np.load(npz, allow_pickle=False)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
                reason = one_line(e, 120)
                raise ValueError(
                    f"{name}: {npz.resolve()} is not a readable .npz archive ({reason}); write one with "
                    f"numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...) or point --data-dir at "
                    f"the IDX files"
                ) from None
            with z:
                missing = [k for k in keys if k not in z.files]
                if missing:
                    raise ValueError(
                        f"{name}: {npz.resolve()} lacks arrays {missing}; expected x_train, y_train, x_test, y_test"
                    )
                try:
                    return z[keys[0]], z[keys[1]]
                except MemoryError:
                    raise
                except Exception as e:  # a damaged member: zip, zlib, npy-header or pickle-refusal errors alike
                    reason = one_line(e, 120)
                    raise ValueError(
                        f"{name}: {npz.resolve()} holds unreadable arrays {list(keys)} ({reason}); write the file "
                        f"again with numpy.savez"
                    ) from None
    if data_dir.suffix == ".npz":
        raise _missing(name, data_dir, "the .npz file")
    img_name, lbl_name = _IDX_NAMES[split]
    folders = [data_dir, data_dir / _TV_FOLDERS[name] / "raw", data_dir / name.replace("_", "-")]
    for folder in folders:
        for ext in (".gz", ""):
            img, lbl = folder / (img_name + ext), folder / (lbl_name + ext)
            if img.is_file() and lbl.is_file():
                return read_idx(img), read_idx(lbl)
    if download:
        import torchvision

        cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
        ds = cls(str(data_dir), train=split == "train", download=True)
        return ds.data.numpy(), ds.targets.numpy()
    raise _missing(name, data_dir, f"{img_name}[.gz] (IDX), {name}.npz or a torchvision root")


def _load_cifar(name: str, data_dir: Path, split: str, download: bool) -> tuple[np.ndarray, np.ndarray]:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        ds = cls(str(data_dir), train=split == "train", download=download)
    except RuntimeError:
        raise _missing(name, data_dir, "the torchvision CIFAR folder (pass download=True when online)") from None
    return np.asarray(ds.data), np.asarray(ds.targets)


def _build_imagefolder(data_dir: Path, split: str, img_size: int, in_chans: int | None, augment: bool, **kw: Any):
    from timm.data import create_transform
    from torchvision.datasets import ImageFolder

    folder = data_dir / split
    if not folder.is_dir():
        raise _missing("imagefolder", folder, f"the '{split}/' folder (ImageNet layout: train/ and val/)")
    chans = in_chans or 3
    if chans != 3:
        raise ValueError(f"imagefolder: in_chans={chans} is not supported; RGB images give 3 channels")
    transform = create_transform(
        input_size=(3, img_size, img_size),
        is_training=augment,
        auto_augment=kw.get("auto_augment"),
        interpolation="bicubic",
        re_prob=kw.get("reprob", 0.0),
    )
    hint = "put the images in one folder per class (train/<class>/*.jpg, val/<class>/*.jpg)"
    try:
        ds = ImageFolder(str(folder), transform=transform)
    except FileNotFoundError as e:  # torchvision: no class folder, or a class folder without images
        raise ValueError(f"imagefolder: no images under {folder.resolve()} ({e}); {hint}") from None
    if len(ds) == 0:
        raise ValueError(f"imagefolder: no images under {folder.resolve()}; {hint}")
    if split != "train" and (data_dir / "train").is_dir():
        # ImageFolder numbers the classes of each folder on its own: val/ with another class list would be labelled
        # against train/'s numbers wrongly, silently.
        train_classes = sorted(e.name for e in os.scandir(data_dir / "train") if e.is_dir())
        if ds.classes != train_classes:
            only_val = sorted(set(ds.classes) - set(train_classes))
            only_train = sorted(set(train_classes) - set(ds.classes))
            raise ValueError(
                f"imagefolder: {folder.resolve()} has other classes than train/ (only in {split}/: "
                f"{only_val[:5] or 'none'}; only in train/: {only_train[:5] or 'none'}); give both the same class "
                f"folders (an empty one is allowed in neither)"
            )
    ds.loader = _CheckedLoader(ds.loader)
    return ds, DatasetInfo(len(ds.classes), 3, img_size)


class _CheckedLoader:
    """An ImageFolder loader whose unreadable files are a one-line error naming the file (a class, not a closure:
    DataLoader workers may pickle it)."""

    def __init__(self, load) -> None:
        self.load = load

    def __call__(self, path: str):
        try:
            return self.load(path)
        except (OSError, SyntaxError, ValueError) as e:  # PIL: UnidentifiedImageError (an OSError), truncated files
            why = one_line(e, 120)
            raise ValueError(f"imagefolder: cannot read image {path} ({why}); remove or replace it") from None


_FIXED = {"mnist": (10, 1), "fashion_mnist": (10, 1), "cifar10": (10, 3), "cifar100": (100, 3)}


def fixed_dataset_info(name: str, img_size: int, in_chans: int | None = None) -> DatasetInfo | None:
    """What :func:`build_dataset` would report for a dataset of fixed shape, without its files (None otherwise).

    Lets a comparison size-check and cost runs whose data lives on another machine.
    """
    if name not in _FIXED:
        return None
    classes, native = _FIXED[name]
    return DatasetInfo(classes, in_chans or native, img_size)


def config_dataset_info(cfg: dict[str, Any], need_files: bool = True) -> DatasetInfo:
    """Classes, channels and size of a trainer config's data (``dataset``, ``data_dir``, ``img_size``, ``in_chans``,
    ``seed``): all a model needs, read from a few samples, so missing files or arrays fail here, in one line.

    With ``need_files`` False, datasets of fixed shape (MNIST, Fashion-MNIST, CIFAR) are described without their
    files (runs made on another machine can be costed where the data is not).
    """
    known = fixed_dataset_info(cfg["dataset"], cfg["img_size"], cfg["in_chans"] or None)
    if known is not None and not need_files:
        return known
    _, info = build_dataset(
        cfg["dataset"],
        cfg["data_dir"],
        "val",
        cfg["img_size"],
        cfg["in_chans"] or None,
        seed=cfg["seed"],
        num_samples=8,
    )
    return info


def build_dataset(
    name: str,
    data_dir: str | Path | None,
    split: str,
    img_size: int,
    in_chans: int | None = None,
    seed: int = 0,
    **kw: Any,
) -> tuple[Dataset, DatasetInfo]:
    """Build a dataset by name with transforms that fit ``img_size``.

    Args:
        name: one of :data:`DATASETS`.
        data_dir: root folder (or ``.npz`` file for mnist/fashion_mnist); unused by ``synthetic``.
        split: ``"train"`` (augmented) or ``"val"``.
        img_size: output height and width.
        in_chans: output channels; ``None`` keeps the data's own (1 for MNIST-like, 3 otherwise).
        seed: generation seed of ``synthetic`` (val uses ``seed + 1``, so the splits differ).
        **kw: ``augment`` (default: ``split == "train"``; the search evaluates its arch set without augmentation),
            ``num_samples`` (synthetic, default 4096 train / 1024 val), ``num_classes`` (synthetic),
            ``download`` (torchvision datasets), ``auto_augment`` / ``reprob`` (imagefolder).

    Returns:
        ``(dataset, DatasetInfo)``; items are ``(float tensor (C, H, W), int label)``.

    Raises:
        ValueError: unknown name or split, bad sizes or arrays.
        FileNotFoundError: the data is not where ``data_dir`` says; the message gives the absolute path.
    """
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if name not in DATASETS:
        import difflib

        near = difflib.get_close_matches(name, DATASETS, n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ValueError(f"unknown dataset '{name}'; {hint}choose one of {', '.join(DATASETS)}")
    if not isinstance(img_size, int) or img_size < 4:
        raise ValueError(f"img_size must be an integer >= 4, got {img_size!r}")
    augment = kw.pop("augment", None)
    augment = split == "train" if augment is None else bool(augment)
    if name == "synthetic":
        n = kw.get("num_samples") or (4096 if split == "train" else 1024)
        ds = SyntheticScanDataset(
            num_samples=int(n),
            img_size=img_size,
            in_chans=in_chans or 3,
            seed=seed if split == "train" else seed + 1,
            num_classes=int(kw.get("num_classes") or 10),
        )
        return ds, DatasetInfo(ds.num_classes, ds.in_chans, img_size)
    if not data_dir:
        raise ValueError(
            f"dataset '{name}' needs --data-dir (a folder{' or .npz file' if 'mnist' in name else ''}){_get_it(name)}"
        )
    data_dir = Path(data_dir).expanduser()
    download = bool(kw.get("download", False))
    if not data_dir.exists() and not download:
        raise _missing(name, data_dir, "the data file" if data_dir.suffix.lower() == ".npz" else "the data folder")
    if name == "imagefolder":
        return _build_imagefolder(data_dir, split, img_size, in_chans, augment, **kw)
    if name in ("mnist", "fashion_mnist"):
        images, labels = _load_mnist_like(name, data_dir, split, download)
        hflip, num_classes = name == "fashion_mnist", 10
    else:
        images, labels = _load_cifar(name, data_dir, split, download)
        hflip, num_classes = True, 10 if name == "cifar10" else 100
    if len(images) == 0 or len(images) != len(labels):
        raise ValueError(
            f"{name}: {len(images)} {split} images but {len(labels)} labels in {data_dir.resolve()}; check that "
            f"--data-dir holds the full dataset"
        )
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise ValueError(
            f"{name}: {split} images in {data_dir.resolve()} have shape {tuple(images.shape)}; expected (N, H, W) "
            f"or (N, H, W, 1 or 3) uint8 (reshape flat rows, e.g. x.reshape(-1, 28, 28))"
        )
    labels = np.asarray(labels)
    if (
        labels.ndim != 1
        or not np.issubdtype(labels.dtype, np.integer)
        or labels.min() < 0
        or labels.max() >= num_classes
    ):
        lo, hi = (labels.min(), labels.max()) if labels.size and labels.dtype.kind in "iuf" else (None, None)
        raise ValueError(
            f"{name}: {split} labels in {data_dir.resolve()} must be integers in [0, {num_classes}) (shape (N,)); "
            f"got {labels.dtype} of shape {labels.shape}" + (f" in [{lo}, {hi}]" if lo is not None else "")
        )
    native = 1 if images.ndim == 3 else images.shape[-1]
    mean, std = _STATS[name]
    chans = in_chans or native
    ds = ArrayDataset(images, labels, img_size, chans, mean, std, augment, hflip, num_classes)
    return ds, DatasetInfo(num_classes, chans, img_size)


def split_train(dataset: Dataset, frac: float, seed: int) -> tuple[Subset, Subset]:
    """Split a dataset into two disjoint, seeded subsets; the first holds ``round(frac * N)`` items.

    The search uses it to hold out the arch set from the weight set (DARTS' 50/50 split by default).
    """
    n = len(dataset)
    if not 0.0 < frac < 1.0:
        raise ValueError(f"split fraction must be in (0, 1), got {frac}")
    n_a = int(round(frac * n))
    if n_a == 0 or n_a == n:
        raise ValueError(f"cannot split {n} items with fraction {frac}: one side would be empty")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, sorted(perm[:n_a])), Subset(dataset, sorted(perm[n_a:]))


class ResumableSampler(Sampler[int]):
    """A seeded sampler whose order is a pure function of ``(seed, epoch)`` and that can start mid-epoch.

    Under DDP each rank takes every ``world_size``-th index. In training the index list is padded (by wrapping) to a
    multiple of ``world_size`` so that all ranks run the same number of steps; in evaluation nothing is padded, so a
    sum over ranks counts every sample exactly once.

    Args:
        size: dataset length.
        shuffle: permute each epoch (training) or keep dataset order (evaluation).
        seed: base seed of the permutations.
        rank, world_size: this process's share.
        pad: pad to equal shares across ranks.
    """

    def __init__(self, size: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1, pad: bool = True):
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0
        self.start = 0  # samples of this rank's share already consumed in the current epoch (resume)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and skip the first ``start`` samples of this rank's share (a resumed epoch)."""
        self.epoch, self.start = epoch, start

    def _indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        if self.world_size > 1:
            if self.pad:
                total = math.ceil(self.size / self.world_size) * self.world_size
                order = (order * math.ceil(total / max(1, self.size)))[:total]
            order = order[self.rank :: self.world_size]
        return order

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self._indices()) - self.start)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "start": self.start}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(int(state["epoch"]), int(state.get("start", 0)))


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _end_on_parents_sigterm(parent: int) -> None:
    """A loader worker's SIGTERM, received here (it stays blocked in every thread): from the training process
    (torch's and multiprocessing's ``terminate()`` when they end the workers) or once that process is gone, the
    worker ends as SIGTERM would end it; from anyone else (a signal to the whole process group) it is dropped."""
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent or os.getppid() != parent:
            os._exit(128 + signal.SIGTERM)


class _WorkerInit:
    """Seeds each loader worker from ``(seed, epoch, worker, rank)``, and keeps it alive through a stop signal sent
    to the whole process group; a class so that it pickles under spawn.

    A scheduler, ``timeout`` or a terminal's Ctrl-C signals the whole process group, workers included. The training
    process stops at the next step boundary and saves its checkpoint (``StopFlag``), which needs its workers until
    then: one that died of the signal failed the run with "DataLoader worker ... is killed by signal" and no
    checkpoint. So a worker ignores SIGINT, and takes SIGTERM only from the training process, whose loader ends its
    workers with it (:func:`_end_on_parents_sigterm`); it starts with both blocked (:class:`_Loader`), so one sent
    while it starts is dropped too. Where the platform cannot tell who sent a signal (no ``sigwaitinfo``), SIGTERM
    keeps its default."""

    def __init__(self, seed: int, rank: int, sampler: ResumableSampler) -> None:
        self.seed, self.rank, self.sampler = seed, rank, sampler

    def __call__(self, worker_id: int) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if hasattr(signal, "sigwaitinfo") and hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # (already, when _Loader started it)
            threading.Thread(target=_end_on_parents_sigterm, args=(os.getppid(),), daemon=True).start()
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        elif hasattr(signal, "pthread_sigmask"):
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        s = (self.seed * 1_000_003 + self.sampler.epoch * 1009 + worker_id * 17 + self.rank) % 2**31
        np.random.seed(s)
        torch.manual_seed(s)


class _Loader(DataLoader):
    """A DataLoader whose workers start with SIGINT and SIGTERM blocked (inherited from this thread, which blocks them
    only while the workers start; a signal to this process waits until then): see :class:`_WorkerInit`."""

    def _get_iterator(self):  # noqa: ANN202 (torch's hook that starts the workers)
        if self.num_workers == 0 or not hasattr(signal, "pthread_sigmask"):
            return super()._get_iterator()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            return super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    seed: int,
    num_workers: int = 0,
    distributed: bool = False,
    drop_last: bool | None = None,
) -> DataLoader:
    """A DataLoader with a :class:`ResumableSampler` (``loader.sampler``).

    Call ``loader.sampler.set_epoch(epoch, start=batches_done * batch_size)`` before iterating; worker seeds are
    derived from ``(seed, epoch)`` so that augmentation in workers is reproducible too.

    Args:
        dataset: any map-style dataset.
        batch_size: per-process batch size.
        train: shuffle, pad shares across ranks, and drop the last partial batch (unless ``drop_last`` says).
        seed: base seed of the order.
        num_workers: loader processes (0 keeps augmentation on the main RNG, which resumes exactly).
        distributed: split across ``torch.distributed`` ranks.
        drop_last: override the default (``train``).
    """
    rank, world = 0, 1
    if distributed and torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    drop_last = train if drop_last is None else drop_last
    sampler = ResumableSampler(len(dataset), shuffle=train, seed=seed, rank=rank, world_size=world, pad=train)
    if drop_last and len(sampler) < batch_size:
        raise ValueError(
            f"batch_size {batch_size} is larger than the {len(sampler)} samples per process; lower --batch-size"
        )
    generator = torch.Generator().manual_seed(seed)
    return _Loader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
        worker_init_fn=_WorkerInit(seed, rank, sampler) if num_workers > 0 else None,
        generator=generator,
    )
