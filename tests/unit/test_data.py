"""Datasets: the bundled MNIST sample, torchvision formats read from disk, missing-data errors.

The torchvision loaders are tested on small files written here in the real on-disk formats: MNIST's idx
files under ``MNIST/raw/`` and CIFAR-10's pickled batches under ``cifar-10-batches-py/``. torchvision
0.29's CIFAR10 checks every batch file (``_check_integrity``) and ``batches.meta`` (``_load_meta``) against
the official md5 sums, which generated files cannot match; the test points the class's file lists at the
md5 sums of the generated files, so the real check still runs (and a mismatch is still caught).
"""

import hashlib
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from horovod_dpsgd.experiments.data import (MNIST_MEAN, MNIST_STD, DatasetNotFoundError, cifar10, get_dataset, mnist,
                                mnist_sample, shard, synthetic_sequences)


@pytest.fixture(scope="module")
def sample():
    return mnist_sample()


def test_mnist_sample_is_split_per_class_and_shuffled(sample):
    train, test = sample
    assert len(train) == 4000 and len(test) == 1000
    for ds, per_class in ((train, 400), (test, 100)):
        assert torch.bincount(ds.tensors[1], minlength=10).tolist() == [per_class] * 10
        assert ds.tensors[1].dtype == torch.long
        assert ds.tensors[1][:50].unique().numel() > 5  # shuffled, not sorted by class
    assert train.tensors[0].shape == (4000, 784) and train.tensors[0].dtype == torch.float32


def test_mnist_sample_is_scaled_and_normalised_with_mnist_statistics(sample):
    x = sample[0].tensors[0]
    # Pixels in [0, 1] map to [-mean/std, (1-mean)/std]; background pixels (0) sit exactly at the minimum.
    assert x.min().item() == pytest.approx(-MNIST_MEAN / MNIST_STD)
    assert x.max().item() <= (1 - MNIST_MEAN) / MNIST_STD + 1e-5
    assert abs(x.mean().item()) < 0.2 and 0.8 < x.std().item() < 1.2


def test_mnist_sample_splits_are_disjoint_and_seeded(sample):
    train, test = sample
    train_rows = {row.numpy().tobytes() for row in train.tensors[0]}
    assert not any(row.numpy().tobytes() in train_rows for row in test.tensors[0])
    other, _ = mnist_sample(seed=1)
    assert not torch.equal(other.tensors[1], train.tensors[1])


def test_mnist_sample_image_variant(sample):
    images, _ = mnist_sample(flatten=False)
    assert images.tensors[0].shape == (4000, 1, 28, 28)
    assert torch.equal(images.tensors[0].flatten(1), sample[0].tensors[0])


def _write_idx(path, array, magic):
    """Write ``array`` in the idx format of the MNIST distribution (big-endian header, uint8 data)."""
    with open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


def test_torchvision_mnist_is_read_from_data_dir(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        images[prefix] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images[prefix], 0x803)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n, dtype=np.uint8) % 10, 0x801)
    train, test = mnist(str(tmp_path))
    assert len(train) == 12 and len(test) == 5
    x, y = test[3]
    assert x.shape == (784,) and y == 3
    expected = (torch.from_numpy(images["t10k"][3]).float().flatten() / 255 - MNIST_MEAN) / MNIST_STD
    assert torch.allclose(x, expected, atol=1e-6)
    assert mnist(str(tmp_path), flatten=False)[0][0][0].shape == (1, 28, 28)


def _md5(path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write_cifar10(root, train_per_batch=4, test=3):
    """Pickled batches in the layout of the official cifar-10-python.tar.gz, with random images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", train_per_batch) for i in range(1, 6)] + [("test_batch", test)]:
        batch = {"batch_label": name, "labels": [int(v) for v in rng.integers(0, 10, n)],
                 "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(n)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": train_per_batch,
                     "num_vis": 3072}, f, protocol=2)
    return folder


def _trust_generated_md5s(monkeypatch, folder):
    from torchvision.datasets import CIFAR10
    monkeypatch.setattr(CIFAR10, "train_list", [[f"data_batch_{i}", _md5(folder / f"data_batch_{i}")]
                                                for i in range(1, 6)])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", _md5(folder / "test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                          "md5": _md5(folder / "batches.meta")})


def test_torchvision_cifar10_is_read_from_data_dir(tmp_path, monkeypatch):
    folder = _write_cifar10(tmp_path)
    _trust_generated_md5s(monkeypatch, folder)
    train, test = cifar10(str(tmp_path), augment=False)
    assert len(train) == 20 and len(test) == 3 and train.classes[3] == "class3"
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and 0 <= y < 10
    augmented, _ = cifar10(str(tmp_path))
    assert augmented[0][0].shape == (3, 32, 32)
    names = [type(t).__name__ for t in augmented.transform.transforms]
    assert names[:2] == ["RandomCrop", "RandomHorizontalFlip"] and augmented.transform.transforms[0].padding == 4
    assert "RandomCrop" not in [type(t).__name__ for t in test.transform.transforms]


def test_cifar10_files_that_fail_torchvisions_md5_check_are_reported(tmp_path, monkeypatch):
    folder = _write_cifar10(tmp_path)
    _trust_generated_md5s(monkeypatch, folder)
    with open(folder / "data_batch_2", "ab") as f:
        f.write(b"corrupt")
    with pytest.raises(DatasetNotFoundError, match="corrupted"):
        cifar10(str(tmp_path))


@pytest.mark.parametrize("loader, expected", [
    (mnist, ["MNIST/raw/", "train", "t10k", "images-idx3", "labels-idx1", "-ubyte"]),
    (cifar10, ["cifar-10-batches-py/", "data_batch_1", "test_batch", "batches.meta"]),
])
def test_missing_dataset_says_which_files_to_put_where(tmp_path, loader, expected):
    with pytest.raises(DatasetNotFoundError) as info:
        loader(str(tmp_path))
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert os.path.abspath(tmp_path) in message and "--download" in message
    assert all(part in message for part in expected), message


def test_get_dataset_dispatches(tmp_path, sample):
    train, _ = get_dataset("mnist")  # the bundled sample, same seed: identical
    assert torch.equal(train.tensors[0], sample[0].tensors[0]) and torch.equal(train.tensors[1], sample[0].tensors[1])
    with pytest.raises(DatasetNotFoundError, match="--data-dir"):
        get_dataset("cifar10")
    with pytest.raises(DatasetNotFoundError, match="MNIST"):
        get_dataset("mnist", data_dir=str(tmp_path))  # a data dir means torchvision MNIST, not the sample
    train, _ = get_dataset("synthetic_seq")
    assert train.tensors[0].dim() == 3
    with pytest.raises(ValueError, match="synthetic_seq"):
        get_dataset("imagenet")


def test_synthetic_sequences_are_labelled_shaped_and_seeded():
    train, test = synthetic_sequences(num_samples=100, seq_len=5, input_dim=3, num_classes=4, seed=7)
    assert train.tensors[0].shape == (80, 5, 3) and test.tensors[0].shape == (20, 5, 3)
    assert train.tensors[1].dtype == torch.long
    assert set(torch.cat([train.tensors[1], test.tensors[1]]).tolist()) == {0, 1, 2, 3}
    again, _ = synthetic_sequences(num_samples=100, seq_len=5, input_dim=3, num_classes=4, seed=7)
    assert torch.equal(again.tensors[0], train.tensors[0])
    assert "SYNTHETIC" in synthetic_sequences.__doc__ and "Switchboard" in synthetic_sequences.__doc__


def test_shard_gives_every_rank_the_same_number_of_disjoint_samples():
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    shards = [list(shard(dataset, rank, 4, seed=3)) for rank in range(4)]
    assert [len(s) for s in shards] == [2] * 4  # 10 // 4, the remainder dropped rather than padded
    assert len(set().union(*shards)) == 8
    sampler = shard(dataset, 1, 4, seed=3)
    sampler.set_epoch(1)
    assert len(list(sampler)) == 2


def test_the_bundled_sample_written_as_torchvision_raw_files_reads_back_as_the_same_split(tmp_path):
    from horovod_dpsgd.experiments.data import mnist_sample, write_mnist_sample
    write_mnist_sample(str(tmp_path))
    train, test = mnist(str(tmp_path))
    want_train, want_test = mnist_sample()
    assert (len(train), len(test)) == (4000, 1000)
    for got, want in ((train, want_train), (test, want_test)):
        for i in (0, 17, len(got) - 1):
            assert torch.allclose(got[i][0], want[i][0], atol=1e-6) and int(got[i][1]) == int(want[i][1])
