"""Checkpoints that cannot lie: ``horovodrun -np 2 python tests/integration/jobs/checkpoints.py OUT.json [SCENARIO ...]``.

Each scenario saves a checkpoint, damages it the way a disk, a user or a crash would, then loads it on every
rank. Rank 0 writes, per scenario, what *every* rank saw (``{"ok": ...}`` or the exception's type and message)
to OUT.json; tests/integration/test_checkpoint.py asserts on it. Scenarios ``kill_during_save`` and ``resume_after_kill``
are two launches of one story: rank 0 dies in the middle of the second save, then the job is relaunched.
"""

import glob
import json
import os
import signal
import struct
import sys
import zipfile

import torch
import horovod.torch as hvd

import horovod_dpsgd as hd

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
OUT = os.path.dirname(os.path.abspath(sys.argv[1]))


def batch(rank: int, t: int, size: int = 16):
    g = torch.Generator().manual_seed(100_000 * t + rank)
    return torch.randn(size, 8, generator=g), torch.randint(0, 3, (size,), generator=g)


def report(results: dict) -> None:
    if RANK == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(results, f, indent=1)


def make():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 200), torch.nn.Tanh(), torch.nn.Linear(200, 3))
    return model, hd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                                          topology="ring", seed=1)


def train(model, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        x, y = batch(RANK, opt.step_count)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def barrier(name):
    hvd.allreduce(torch.zeros(1), name=f"barrier.{name}")


def learner_file(directory, rank):
    """Rank ``rank``'s newest file in ``directory``."""
    files = glob.glob(os.path.join(directory, f"learner-{rank:05d}-of-*.pt"))
    return max(files, key=os.path.getmtime)


def overwrite_tensor_bytes(path, count=1000):
    """Overwrite ``count`` float32 values of the largest tensor entry in place, leaving the zip structure
    (central directory, local headers, CRC fields) intact: what a bad disk block or a stray write does."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        f.seek(info.header_offset + 30 + name_len + extra_len + 64)
        f.write(struct.pack(f"<{count}f", *([7.0] * count)))


def outcome(fn):
    """What this rank saw, gathered from every rank."""
    try:
        seen = {"ok": fn()}
    except Exception as exc:  # recorded: the test asserts on every rank's error
        seen = {"type": type(exc).__name__, "message": str(exc)}
    return hvd.allgather_object(seen, name=f"outcome.{len(results)}")


def load_and_report():
    model, opt = make()
    extra = hd.checkpoint.load(DIRECTORY, model, opt)
    return {"step": opt.step_count, "extra": extra}


def damaged(scenario, damage):
    """Save at step 3, let rank 0 damage rank 1's file with ``damage(path)``, load on every rank."""
    global DIRECTORY
    DIRECTORY = os.path.join(OUT, scenario)
    model, opt = make()
    train(model, opt, 3)
    hd.checkpoint.save(DIRECTORY, model, opt, extra={"epoch": 1})
    if RANK == 0:
        damage(learner_file(DIRECTORY, 1))
    barrier(scenario)
    return outcome(load_and_report)


def truncate(path, fraction):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * fraction))


def two_saves():
    """Rank 1's file is from the save at step 3, rank 0's from the save at step 6 (as after a crash between the
    learners' saves of an in-place format, or files copied together by hand)."""
    global DIRECTORY
    DIRECTORY = os.path.join(OUT, "two_saves")
    model, opt = make()
    train(model, opt, 3)
    hd.checkpoint.save(DIRECTORY, model, opt, extra={"epoch": 1})
    old = open(learner_file(DIRECTORY, RANK), "rb").read()
    train(model, opt, 3)
    hd.checkpoint.save(DIRECTORY, model, opt, extra={"epoch": 2})
    if RANK == 1:
        with open(learner_file(DIRECTORY, 1), "wb") as f:
            f.write(old)
    barrier("two_saves")
    return outcome(load_and_report)


def save_fails_on_one_rank():
    """Rank 0's second save fails (a full disk): every rank must hear of it, and the first save stays loadable."""
    global DIRECTORY
    DIRECTORY = os.path.join(OUT, "save_fails")
    model, opt = make()
    train(model, opt, 3)
    hd.checkpoint.save(DIRECTORY, model, opt, extra={"epoch": 1})
    train(model, opt, 3)
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    if RANK == 0:
        torch.save = full_disk
    try:
        saved = outcome(lambda: hd.checkpoint.save(DIRECTORY, model, opt, extra={"epoch": 2}) and None)
    finally:
        torch.save = real_save
    return {"save": saved, "load": outcome(load_and_report),
            "leftovers": sorted(f for f in os.listdir(DIRECTORY) if "tmp" in f)}


def kill_during_save():
    """Two saves; rank 0 is killed inside the second one, before it writes its file (rank 1 writes its own)."""
    global DIRECTORY
    DIRECTORY = os.path.join(OUT, "killed")
    model, opt = make()
    train(model, opt, 3)
    hd.checkpoint.save(DIRECTORY, model, opt, extra={"epoch": 1})
    train(model, opt, 3)
    if RANK == 0:
        def killed(obj, f, *args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = killed
    else:
        # Rank 1 finishes writing its file before rank 0 dies.
        real_save = torch.save

        def then_signal(obj, f, *args, **kwargs):
            real_save(obj, f, *args, **kwargs)
            open(os.path.join(OUT, "rank1-wrote"), "w").close()
        torch.save = then_signal
    hd.checkpoint.save(DIRECTORY, model, opt, extra={"epoch": 2})


def resume_after_kill():
    global DIRECTORY
    DIRECTORY = os.path.join(OUT, "killed")
    return outcome(load_and_report)


SCENARIOS = {
    "altered_tensor_bytes": lambda: damaged("altered_tensor_bytes", overwrite_tensor_bytes),
    "empty_file": lambda: damaged("empty_file", lambda p: truncate(p, 0.0)),
    "truncated_file": lambda: damaged("truncated_file", lambda p: truncate(p, 0.5)),
    "not_a_checkpoint": lambda: damaged("not_a_checkpoint", lambda p: open(p, "w").write("hello\n")),
    "intact": lambda: damaged("intact", lambda p: None),
    "two_saves": two_saves,
    "save_fails_on_one_rank": save_fails_on_one_rank,
    "kill_during_save": kill_during_save,
    "resume_after_kill": resume_after_kill,
}
DEFAULT = ["intact", "altered_tensor_bytes", "empty_file", "truncated_file", "not_a_checkpoint", "two_saves",
           "save_fails_on_one_rank"]

results = {"size": SIZE}
for name in sys.argv[2:] or DEFAULT:
    results[name] = SCENARIOS[name]()
    report(results)  # after each scenario: a scenario that hangs still leaves the earlier ones on record
