"""The research toolkit: what the paper's experiments need on top of the plugin.

The command line (:mod:`.cli`), the configuration of a run (:mod:`.config`), the training loop
(:mod:`.training`), datasets (:mod:`.data`), the paper's models (:mod:`.models`), learning-rate recipes
(:mod:`.recipes`), run reports (:mod:`.reports`), loss-landscape pictures (:mod:`.landscape`), job
launching (:mod:`.launch`) and emulated hosts on one machine (:mod:`.cluster`).

It imports the plugin (:mod:`horovod_dpsgd`), never the reverse, and needs the ``experiments`` extra:
``pip install 'horovod-dpsgd[experiments]'`` (click, matplotlib, mlxtend, torchvision).
"""

import importlib.util
import sys

__all__ = ["main"]

_EXTRA = ("click", "matplotlib", "mlxtend", "torchvision")


def main() -> None:
    """Entry point of the ``horovod-dpsgd`` command: the toolkit's CLI, or a clear error without the extra."""
    missing = [module for module in _EXTRA if importlib.util.find_spec(module) is None]
    if missing:
        sys.exit(f"horovod-dpsgd: the command line is part of the research toolkit, which needs "
                 f"{', '.join(missing)}: pip install 'horovod-dpsgd[experiments]'")
    from horovod_dpsgd.experiments.cli import main as cli
    cli()
