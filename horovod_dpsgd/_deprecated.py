"""Old import paths of modules that moved in 0.2, kept for one release.

``import horovod_dpsgd.noise`` (and the others below) still works and gives the module at its new place,
with a :class:`DeprecationWarning` naming it. Remove in 0.3.
"""

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: Old module name -> new module name.
MOVED = {
    "horovod_dpsgd.noise": "horovod_dpsgd.diagnostics.quantities",
    "horovod_dpsgd.exchange": "horovod_dpsgd.comm.exchange",
    "horovod_dpsgd.buffers": "horovod_dpsgd.comm.buffers",
    "horovod_dpsgd.data": "horovod_dpsgd.experiments.data",
    "horovod_dpsgd.models": "horovod_dpsgd.experiments.models",
    "horovod_dpsgd.recipes": "horovod_dpsgd.experiments.recipes",
    "horovod_dpsgd.landscape": "horovod_dpsgd.experiments.landscape",
    "horovod_dpsgd.training": "horovod_dpsgd.experiments.training",
    "horovod_dpsgd.launch": "horovod_dpsgd.experiments.launch",
    "horovod_dpsgd.compare": "horovod_dpsgd.experiments.reports",
    "horovod_dpsgd.cli": "horovod_dpsgd.experiments.cli",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old module name to the module at its new place (the same module object)."""

    @staticmethod
    def new_name(fullname: str):
        """The new name of ``fullname`` (a moved module or a module inside one), or None."""
        for old, new in MOVED.items():
            if fullname == old or fullname.startswith(old + "."):
                return new + fullname[len(old):]
        return None

    def find_spec(self, fullname, path=None, target=None):
        if self.new_name(fullname) is None:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = self.new_name(spec.name)
        warnings.warn(f"{spec.name} moved to {new}; import it from there ({spec.name} goes in 0.3)",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


def install() -> None:
    """Make the old names importable (idempotent)."""
    if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
