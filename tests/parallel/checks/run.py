"""Run named multi-process checks on every rank: the rank side of tests/parallel.

    horovodrun -np N python tests/parallel/checks/run.py OUT.json MODULE [CHECK ...] [-- OUT.json MODULE [CHECK ...]] ...

For each group, in order: imports the check module tests/parallel/checks/MODULE.py, which initialises Horovod the
way its checks need (the first module's way: later ones share the process) and registers them with
``common.check``; then runs the named checks (all of them if none is named) in the order the module defines
them, the same on every rank. While a module is imported and its checks run, ``sys.argv`` is its group's
``run.py OUT.json MODULE [CHECK ...]``, as if it ran alone (checks that write files put them beside OUT.json).
Rank 0 rewrites the group's OUT.json after each check:

    {"module": MODULE, "size": N, "checks": {NAME: {"result": ..., "seconds": ...} | {"error": ...}}}

A check that raises on any rank is reported with every failing rank's traceback, printed at once to
stderr too (the other ranks may then hang in a collective; the launcher's timeout ends the job). The job
exits 0 when every named check ran, whatever their outcomes. tests/parallel/conftest.py is the pytest
side: it launches this once per world size with the checks of the selected tests, grouped by module (a module
that must initialise Horovod its own way gets a job of its own).
"""

import importlib
import json
import os
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(os.path.dirname(HERE)), "support")]  # common, reference


def outcome_of(check) -> dict:
    """Run one check on this rank: ``{"result": value}``, or ``{"error": traceback}`` if it raised."""
    start = time.monotonic()
    try:
        value = check()
        json.dumps(value)  # a check's result travels as JSON; fail here, as this check's error
        return {"result": value, "seconds": round(time.monotonic() - start, 3)}
    except Exception:
        return {"error": traceback.format_exc()}


def run_module(out: str, module: str, names: list) -> None:
    """Import check module ``module`` and run its checks ``names`` (all if empty), reporting to ``out``."""
    importlib.import_module(module)  # the first one initialises Horovod: nothing heavy is imported before it
    import horovod.torch as hvd
    from common import CHECKS

    checks = dict(CHECKS)
    CHECKS.clear()  # the next module registers its own, under names of its choosing
    rank = hvd.rank()
    wanted = set(names or checks)
    report = {"module": module, "size": hvd.size(), "checks": {
        name: {"error": f"{module}.py has no check named {name!r}; it has: {', '.join(checks)}"}
        for name in sorted(wanted - set(checks))}}

    def write():
        if rank == 0:
            with open(out + ".tmp", "w") as f:
                json.dump(report, f, indent=1)
            os.replace(out + ".tmp", out)

    write()
    for name, check in checks.items():
        if name not in wanted:
            continue
        if rank == 0:
            print(f"check {module}.{name} (np {hvd.size()})", flush=True)
        outcome = outcome_of(check)
        if "error" in outcome:
            print(f"rank {rank}: check {module}.{name} raised:\n{outcome['error']}", file=sys.stderr, flush=True)
        everyone = hvd.allgather_object(outcome, name=f"check.{module}.{name}")
        errors = [f"rank {r}: {o['error']}" for r, o in enumerate(everyone) if "error" in o]
        report["checks"][name] = {"error": "\n".join(errors)} if errors else everyone[0]
        write()


def groups(args: list) -> list:
    """``OUT.json MODULE [CHECK ...] [-- OUT.json MODULE [CHECK ...]] ...`` -> [(OUT.json, MODULE, [CHECK ...])]."""
    found, group = [], []
    for arg in args + ["--"]:
        if arg != "--":
            group.append(arg)
            continue
        if len(group) < 2:
            sys.exit(f"each group needs OUT.json and MODULE, got {group}\n\n{__doc__}")
        found.append((group[0], group[1], group[2:]))
        group = []
    return found


def main(args: list) -> None:
    for out, module, names in groups(args):
        sys.argv[1:] = [out, module, *names]
        run_module(out, module, names)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1:])
