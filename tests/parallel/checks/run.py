"""Run named multi-process checks on every rank: the rank side of tests/parallel.

    horovodrun -np N python tests/parallel/checks/run.py OUT.json MODULE [CHECK ...]

imports the check module tests/parallel/checks/MODULE.py, which initialises Horovod the way its checks need
and registers them with ``common.check``; then runs the named checks (all of them if none is named) in
the order the module defines them, the same on every rank. Rank 0 rewrites OUT.json after each check:

    {"module": MODULE, "size": N, "checks": {NAME: {"result": ..., "seconds": ...} | {"error": ...}}}

A check that raises on any rank is reported with every failing rank's traceback, printed at once to
stderr too (the other ranks may then hang in a collective; the launcher's timeout ends the job). The job
exits 0 when every named check ran, whatever their outcomes. tests/parallel/conftest.py is the pytest
side: it launches this once per (module, world size) with the checks of the selected tests.
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


def main(out: str, module: str, names: list) -> None:
    importlib.import_module(module)  # initialises Horovod: nothing heavy is imported before it
    import horovod.torch as hvd
    from common import CHECKS

    rank = hvd.rank()
    wanted = set(names or CHECKS)
    report = {"module": module, "size": hvd.size(), "checks": {
        name: {"error": f"{module}.py has no check named {name!r}; it has: {', '.join(CHECKS)}"}
        for name in sorted(wanted - set(CHECKS))}}

    def write():
        if rank == 0:
            with open(out + ".tmp", "w") as f:
                json.dump(report, f, indent=1)
            os.replace(out + ".tmp", out)

    write()
    for name, check in CHECKS.items():
        if name not in wanted:
            continue
        if rank == 0:
            print(f"check {name} (np {hvd.size()})", flush=True)
        outcome = outcome_of(check)
        if "error" in outcome:
            print(f"rank {rank}: check {name} raised:\n{outcome['error']}", file=sys.stderr, flush=True)
        everyone = hvd.allgather_object(outcome, name=f"check.{name}")
        errors = [f"rank {r}: {o['error']}" for r, o in enumerate(everyone) if "error" in o]
        report["checks"][name] = {"error": "\n".join(errors)} if errors else everyone[0]
        write()


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
