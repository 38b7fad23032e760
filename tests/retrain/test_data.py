"""Datasets by name, IDX / npz readers, seeded disjoint splits and the resumable sampler."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from retrain.data import DEBIAN_FASHION_MNIST, SYNTHETIC_CLASSES, build_dataset, build_loader, read_idx, split_train


def test_synthetic_is_deterministic_and_sized() -> None:
    a, info = build_dataset("synthetic", None, "train", img_size=20, in_chans=2, seed=3, num_samples=64)
    b, _ = build_dataset("synthetic", None, "train", img_size=20, in_chans=2, seed=3, num_samples=64)
    val, _ = build_dataset("synthetic", None, "val", img_size=20, in_chans=2, seed=3, num_samples=64)
    assert (info.num_classes, info.in_chans, info.img_size) == (10, 2, 20) and len(a) == 64
    x, y = a[5]
    assert x.shape == (2, 20, 20) and x.dtype == torch.float32 and 0 <= y < 10
    assert torch.equal(a[5][0], b[5][0]) and a[5][1] == b[5][1]
    assert not torch.equal(a[5][0], val[5][0])  # val is drawn from another seed
    labels = [a[i][1] for i in range(64)]
    assert len(set(labels)) >= 6  # classes are roughly balanced


def test_synthetic_depends_on_token_order() -> None:
    """Each horizontal class is the transpose of its vertical twin: the label depends on the axis of the layout,
    so a model that scans only rows sees a class and its twin in different token orders."""
    ds, _ = build_dataset("synthetic", None, "train", img_size=16, in_chans=1, seed=0, num_samples=1)
    for i in range(0, len(SYNTHETIC_CLASSES), 2):
        horizontal = ds._pattern(i, np.random.default_rng(1))
        vertical = ds._pattern(i + 1, np.random.default_rng(1))
        assert np.array_equal(horizontal.T, vertical)
        # A row-major flattening of the twin is a different sequence (same pixels, different order).
        assert not np.array_equal(horizontal.reshape(-1), vertical.reshape(-1))


def test_split_disjoint_and_seeded() -> None:
    ds, _ = build_dataset("synthetic", None, "train", img_size=8, num_samples=101)
    a, b = split_train(ds, 0.5, seed=1)
    a2, b2 = split_train(ds, 0.5, seed=1)
    a3, _ = split_train(ds, 0.5, seed=2)
    assert not set(a.indices) & set(b.indices) and len(a) + len(b) == 101 and len(a) == 50
    assert a.indices == a2.indices and b.indices == b2.indices and a.indices != a3.indices
    with pytest.raises(ValueError, match="fraction"):
        split_train(ds, 1.0, seed=0)


def test_missing_path_is_one_line(tmp_path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=str(missing.resolve())) as exc:
        build_dataset("fashion_mnist", missing, "train", 28)
    assert "\n" not in str(exc.value) and "--data-dir" in str(exc.value)
    with pytest.raises(ValueError, match="did you mean 'cifar10'"):
        build_dataset("cifar01", tmp_path, "train", 32)


def _write_idx(path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_gz_and_npz_readers(tmp_path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.arange(6, dtype=np.uint8) % 10
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    assert np.array_equal(read_idx(tmp_path / "t10k-images-idx3-ubyte.gz"), images)
    ds, info = build_dataset("fashion_mnist", tmp_path, "val", img_size=28)
    assert len(ds) == 6 and info.in_chans == 1 and info.num_classes == 10
    x, y = ds[2]
    assert x.shape == (1, 28, 28) and y == 2
    mean, std = 0.2860, 0.3530
    assert torch.allclose(x[0], (torch.from_numpy(images[2]).float() / 255 - mean) / std, atol=1e-5)

    npz = tmp_path / "fm.npz"
    np.savez(npz, x_train=images, y_train=labels, x_test=images[:2], y_test=labels[:2])
    ds, info = build_dataset("fashion_mnist", npz, "train", img_size=32, in_chans=3)
    x, y = ds[1]
    assert len(ds) == 6 and x.shape == (3, 32, 32) and info.in_chans == 3 and y == 1
    ds_val, _ = build_dataset("mnist", npz, "val", img_size=28)
    assert len(ds_val) == 2

    (tmp_path / "bad-images-idx3-ubyte").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad-images-idx3-ubyte")


def test_loader_resumes_mid_epoch() -> None:
    ds, _ = build_dataset("synthetic", None, "train", img_size=8, num_samples=40)
    loader = build_loader(ds, batch_size=4, train=True, seed=0)
    loader.sampler.set_epoch(2)
    full = [y.tolist() for _, y in loader]
    loader.sampler.set_epoch(2, start=3 * 4)
    rest = [y.tolist() for _, y in loader]
    assert rest == full[3:]
    loader.sampler.set_epoch(3)
    assert [y.tolist() for _, y in loader] != full
    with pytest.raises(ValueError, match="batch_size"):
        build_loader(ds, batch_size=64, train=True, seed=0)


def test_fixed_dataset_info_matches_the_loaded_data(tmp_path):
    """Comparisons cost runs of fixed-shape datasets without their files; the shapes agree with the real loader."""
    import numpy as np

    from retrain.data import DatasetInfo, build_dataset, fixed_dataset_info

    rng = np.random.default_rng(0)
    arrays = {f"x_{s}": rng.integers(0, 255, (12, 28, 28), dtype=np.uint8) for s in ("train", "test")}
    arrays.update({f"y_{s}": rng.integers(0, 10, 12, dtype=np.uint8) for s in ("train", "test")})
    np.savez(tmp_path / "fm.npz", **arrays)
    for chans in (None, 3):
        _, info = build_dataset("fashion_mnist", tmp_path / "fm.npz", "val", 32, chans)
        assert fixed_dataset_info("fashion_mnist", 32, chans) == info
    assert fixed_dataset_info("cifar100", 40) == DatasetInfo(100, 3, 40)
    assert fixed_dataset_info("synthetic", 16) is None and fixed_dataset_info("imagefolder", 16) is None


@pytest.mark.parametrize(
    "images,labels,match",
    [
        (np.zeros((4, 784), np.uint8), np.arange(4), r"have shape \(4, 784\); expected \(N, H, W\).*reshape flat rows"),
        (
            np.zeros((4, 8, 8), np.uint8),
            np.array([0, 1, 16, 2]),
            r"labels .* must be integers in \[0, 10\).* in \[0, 16\]",
        ),
        (np.zeros((4, 8, 8), np.uint8), np.array([0, -1, 2, 3]), r"must be integers in \[0, 10\).* in \[-1, 3\]"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0.5, 1, 2, 3]), r"must be integers in \[0, 10\).*got float64"),
    ],
)
def test_npz_arrays_of_the_wrong_shape_or_labels_are_one_line(tmp_path, images, labels, match) -> None:
    """Caught when the data is built, before training: not an index error in the middle of an epoch."""
    npz = tmp_path / "d.npz"
    np.savez(npz, x_train=images, y_train=labels, x_test=images, y_test=labels)
    with pytest.raises(ValueError, match=match) as e:
        build_dataset("fashion_mnist", npz, "train", img_size=8)
    assert "\n" not in str(e.value)


def _png(path, colour: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 12), (colour, colour, colour)).save(path)


def test_imagefolder_val_with_other_classes_and_unreadable_images(tmp_path) -> None:
    for split, classes in (("train", "abc"), ("val", "ac")):
        for c in classes:
            _png(tmp_path / split / c / "0.png", 10 * ord(c) % 256)
    ds, info = build_dataset("imagefolder", tmp_path, "train", img_size=8)
    assert info.num_classes == 3 and ds[0][0].shape == (3, 8, 8)
    # ImageFolder would number val's 'c' as 1, which is 'b' in train/
    with pytest.raises(ValueError, match=r"other classes than train/ \(only in val/: none; only in train/: \['b'\]\)"):
        build_dataset("imagefolder", tmp_path, "val", img_size=8)
    _png(tmp_path / "val" / "b" / "0.png", 7)
    assert len(build_dataset("imagefolder", tmp_path, "val", img_size=8)[0]) == 3
    (tmp_path / "train" / "b" / "1.png").write_bytes(b"not a png")
    ds, _ = build_dataset("imagefolder", tmp_path, "train", img_size=8)
    bad = [i for i, (p, _) in enumerate(ds.samples) if p.endswith("1.png")][0]
    with pytest.raises(ValueError, match=r"imagefolder: cannot read image .*1.png \(.*\); remove or replace it"):
        ds[bad]


@pytest.mark.skipif(
    not (Path(DEBIAN_FASHION_MNIST) / "train-images-idx3-ubyte.gz").is_file(),
    reason="real Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
def test_real_fashion_mnist_from_debians_package() -> None:
    """The real data as Debian's dataset-fashion-mnist installs it, read from its folder: the published sizes
    (60,000 train and 10,000 test images of 28x28, ten classes of 6,000 and 1,000), normalized with the dataset's
    own mean and std, and a model of ours learns from one of its batches."""
    import timm

    import supernet  # noqa: F401  (registers the models)

    train, info = build_dataset("fashion_mnist", DEBIAN_FASHION_MNIST, "train", img_size=28, augment=False)
    val, _ = build_dataset("fashion_mnist", DEBIAN_FASHION_MNIST, "val", img_size=28)
    assert (len(train), len(val), info.num_classes, info.in_chans) == (60000, 10000, 10, 1)
    for ds, per_class in ((train, 6000), (val, 1000)):
        labels = np.asarray([int(ds[i][1]) for i in range(0, len(ds), 97)])
        assert set(labels.tolist()) == set(range(10))  # every class, in a spread sample
        full = np.bincount(
            read_idx(Path(DEBIAN_FASHION_MNIST) / f"{'train' if ds is train else 't10k'}-labels-idx1-ubyte.gz")
        )
        assert full.tolist() == [per_class] * 10
    batch = torch.stack([train[i][0] for i in range(256)])
    assert batch.shape == (256, 1, 28, 28) and abs(batch.mean().item()) < 0.15 and 0.8 < batch.std().item() < 1.2
    targets = torch.tensor([int(train[i][1]) for i in range(256)])
    torch.manual_seed(0)
    model = timm.create_model("test_vim", img_size=28, patch_size=4, in_chans=1, num_classes=10)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(12):  # the same batch: the loss must fall
        loss = torch.nn.functional.cross_entropy(model(batch), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
