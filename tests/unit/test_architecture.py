"""The package's architecture: the plugin core never needs the research toolkit.

* No core module imports ``horovod_dpsgd.experiments`` (data flows one way: the toolkit imports the plugin).
* The core imports only the standard library and the plugin's own dependencies.
* The installed distribution requires only those; the toolkit's come with the ``experiments`` extra.
* The plugin imports and wraps an optimizer in a process where the toolkit's dependencies cannot be imported.
"""

import ast
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

from packaging.requirements import Requirement

PACKAGE = Path(__file__).resolve().parents[2] / "horovod_dpsgd"
TOOLKIT = PACKAGE / "experiments"
#: Third-party top-level modules the core may import: the plugin's install requirements.
CORE_DEPENDENCIES = {"torch", "horovod", "mpi4py", "numpy", "tensorboard"}
TOOLKIT_ONLY = ("click", "matplotlib", "mlxtend", "torchvision")


def core_modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if TOOLKIT not in p.parents)


def imported_modules(path: Path):
    """Absolute module names imported anywhere in ``path`` (function bodies included)."""
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_module_does_not_import_the_toolkit(path):
    upward = [m for m in imported_modules(path) if m.startswith("horovod_dpsgd.experiments")]
    assert not upward, f"{path.name} imports the research toolkit: {upward}"


@pytest.mark.parametrize("path", core_modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_core_module_imports_only_the_plugins_dependencies(path):
    third_party = {m.split(".")[0] for m in imported_modules(path)} - set(sys.stdlib_module_names) - {"horovod_dpsgd"}
    assert third_party <= CORE_DEPENDENCIES, f"{path.name} imports {sorted(third_party - CORE_DEPENDENCIES)}"


def test_the_distribution_requires_only_the_core_and_puts_the_toolkit_in_an_extra():
    requirements = [Requirement(r) for r in importlib.metadata.requires("horovod-dpsgd")]
    core = {r.name for r in requirements if r.marker is None}
    extras = {r.name for r in requirements if r.marker is not None and r.marker.evaluate({"extra": "experiments"})}
    assert core == CORE_DEPENDENCIES
    assert set(TOOLKIT_ONLY) <= extras


BLOCKED_IMPORTS = f"""
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {TOOLKIT_ONLY!r}:
            raise ImportError(f"{{name}} is not installed (blocked by the test)")

sys.meta_path.insert(0, Blocker())
import torch, horovod.torch as hvd
import horovod_dpsgd
from horovod_dpsgd import checkpoint, topology, callbacks, diagnostics, errors
from horovod_dpsgd.diagnostics import quantities
from horovod_dpsgd.comm import buffers, exchange
hvd.init()
model = torch.nn.Linear(3, 2)
opt = horovod_dpsgd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), algorithm="ssgd",
                                         named_parameters=model.named_parameters())
model(torch.ones(4, 3)).sum().backward()
opt.step()
print("ok", opt.step_count, sorted(m for m in sys.modules if m.split(".")[0] in {TOOLKIT_ONLY!r}))
"""


def test_the_plugin_works_without_the_toolkits_dependencies():
    proc = subprocess.run([sys.executable, "-c", BLOCKED_IMPORTS], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-2:] == ["1", "[]"]


def test_the_command_without_the_toolkit_says_which_extra_to_install():
    script = ("import importlib.util, sys; real = importlib.util.find_spec\n"
              "importlib.util.find_spec = lambda name, *a: None if name == 'mlxtend' else real(name, *a)\n"
              "from horovod_dpsgd.experiments import main; main()")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "needs mlxtend: pip install 'horovod-dpsgd[experiments]'" in proc.stderr
