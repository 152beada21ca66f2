"""Datasets: the bundled MNIST sample, torchvision formats read from disk, missing-data errors."""

import pickle
import struct

import numpy as np
import pytest
import torch

from horovod_dpsgd.data import DatasetNotFoundError, cifar10, get_dataset, mnist, mnist_sample, synthetic_sequences


def test_mnist_sample_is_split_per_class_and_normalised():
    train, test = mnist_sample()
    assert len(train) == 4000 and len(test) == 1000
    for ds, per_class in ((train, 400), (test, 100)):
        assert torch.bincount(ds.tensors[1], minlength=10).tolist() == [per_class] * 10
    assert train.tensors[0].shape == (4000, 784)
    assert abs(train.tensors[0].mean().item()) < 0.2 and 0.8 < train.tensors[0].std().item() < 1.2
    assert train.tensors[1][:50].unique().numel() > 5  # shuffled, not sorted by class
    images, _ = mnist_sample(flatten=False)
    assert images.tensors[0].shape == (4000, 1, 28, 28)


def _write_idx(path, array, magic):
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


def test_torchvision_mnist_is_read_from_data_dir(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 255, (n, 28, 28), dtype=np.uint8), 2051)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, n, dtype=np.uint8), 2049)
    train, test = mnist(str(tmp_path))
    assert len(train) == 12 and len(test) == 5 and train[0][0].shape == (784,)


def test_torchvision_cifar10_is_read_from_data_dir(tmp_path, monkeypatch):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 4) for i in range(1, 6)] + [("test_batch", 3)]:
        with open(root / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": [1] * n}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    # torchvision checks the official files' md5 sums; these generated files have others.
    import torchvision.datasets.cifar as tv_cifar
    monkeypatch.setattr(tv_cifar.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    train, test = cifar10(str(tmp_path))
    assert len(train) == 20 and len(test) == 3 and train[0][0].shape == (3, 32, 32)


@pytest.mark.parametrize("loader", [lambda d: mnist(d), lambda d: cifar10(d), lambda d: get_dataset("cifar10")])
def test_missing_dataset_says_where_to_put_it(tmp_path, loader):
    with pytest.raises(DatasetNotFoundError) as info:
        loader(str(tmp_path))
    assert "--data-dir" in str(info.value) or "put" in str(info.value)


def test_synthetic_sequences_are_labelled_and_shaped():
    train, test = synthetic_sequences(num_samples=100, seq_len=5, input_dim=3, num_classes=4)
    assert train.tensors[0].shape == (80, 5, 3) and len(test) == 20
    assert set(train.tensors[1].unique().tolist()) <= {0, 1, 2, 3}
    assert "SYNTHETIC" in synthetic_sequences.__doc__
