"""The state file of a cluster (what was created, in order) and the machine-wide lock of cluster operations."""

import contextlib
import fcntl
import json
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator, List, Optional

from horovod_dpsgd.experiments.cluster.layout import Layout

STATE_ROOT = Path("/run/horovod-dpsgd")
#: Created when the first cluster created /run/netns (``ip netns add`` does, and mounts it): the last
#: teardown then removes it again.
NETNS_DIR_MARKER = STATE_ROOT / "netns-dir-created"


def cluster_dir(prefix: str) -> Path:
    return STATE_ROOT / prefix


def state_file(prefix: str) -> Path:
    return cluster_dir(prefix) / "state.json"


class State:
    """The state file: the layout, the link rates, and every created object in creation order."""

    def __init__(self, data: dict) -> None:
        self.data = data
        self.layout = Layout(**data["layout"])

    @classmethod
    def create(cls, layout: Layout, rate: Optional[int]) -> "State":
        cluster_dir(layout.prefix).mkdir(parents=True, exist_ok=True)
        state = cls({"layout": asdict(layout), "rate": rate, "rates": {h: None for h in layout.host_names},
                     "pid": os.getpid(), "created": time.strftime("%Y-%m-%d %H:%M:%S"), "resources": []})
        state.save()
        return state

    @classmethod
    def load(cls, prefix: str) -> Optional["State"]:
        try:
            return cls(json.loads(state_file(prefix).read_text()))
        except FileNotFoundError:
            return None

    @staticmethod
    def prefixes() -> List[str]:
        return sorted(p.parent.name for p in STATE_ROOT.glob("*/state.json"))

    @property
    def resources(self) -> List[dict]:
        return self.data["resources"]

    def save(self) -> None:
        path = state_file(self.layout.prefix)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, path)

    def record(self, resource: dict) -> None:
        if resource not in self.resources:
            self.resources.append(resource)
            self.save()

    def forget(self, resource: dict) -> None:
        if resource in self.resources:
            self.resources.remove(resource)
            self.save()


_lock = threading.RLock()
_lock_depth = [0]


@contextlib.contextmanager
def machine_lock() -> Iterator[None]:
    """One cluster operation at a time on this machine (flock on /run itself: it leaves no file)."""
    with _lock:
        fd = None
        if _lock_depth[0] == 0:
            fd = os.open(STATE_ROOT.parent, os.O_RDONLY)
            fcntl.flock(fd, fcntl.LOCK_EX)
        _lock_depth[0] += 1
        try:
            yield
        finally:
            _lock_depth[0] -= 1
            if fd is not None:
                os.close(fd)


def pid_alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()
