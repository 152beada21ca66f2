"""The pytest side of the multi-process harness: one test per (named check, world size).

A check is a function registered with ``@check("name")`` in a check module, tests/parallel/checks/MODULE.py,
and run on every rank by tests/parallel/checks/run.py under horovodrun. A test module marks which check
module its tests assert on, and at which world sizes::

    pytestmark = pytest.mark.checks("optimizer", sizes=(2, 3, 4))

    @pytest.mark.parametrize("check", ["full_averaging"])
    def test_full_averaging_gives_global_mean_minus_own_update(result):
        assert result["max_abs_diff"] <= 1e-6

``size`` is parametrized here from the marker, so this is three tests, ``...[np2-full_averaging]`` to
``...[np4-full_averaging]``; ``result`` is the check's return value on rank 0 at that size.

Launches: starting a job costs seconds, so jobs are shared. The first test that asks for a result at
(MODULE, np) launches ONE job, ``horovodrun -np N python tests/parallel/checks/run.py OUT.json MODULE
CHECK...``, naming the check of every test of this session at that (MODULE, np): ``session.items``, the
tests left after -k, -m, --deselect and node ids. ``pytest tests/parallel -k ring`` therefore runs only
the ring checks, one job per world size, and a full run one job per (module, world size). A check that
raised fails its test with each failing rank's traceback; a job that crashed or ran past its timeout
(then the whole job is killed, tests/support/launch.py) fails every test of that launch with the job's
output. The launches are listed at the end of the session (their command lines with -v).

The patterns: as in PyTorch's MultiProcessTestCase, each test names the function its ranks run and fails
with their tracebacks; as in Horovod's test/parallel, one horovodrun job runs many tests.
"""

import json
import shlex
import time
from pathlib import Path
from typing import Dict, List, Tuple, Union

import pytest

from horovod_dpsgd.experiments.launch import horovodrun_command
from launch import run

RUNNER = Path(__file__).resolve().parent / "checks" / "run.py"
SIZES = (2, 3, 4)
#: Below pytest-timeout's 300 s (pyproject.toml), so a stuck job is reported here, with its output.
LAUNCH_TIMEOUT = 240
LAUNCHES = pytest.StashKey["Launches"]()
FAILURE = pytest.StashKey[str]()


def check_module(node) -> Tuple[str, Tuple[int, ...]]:
    marker = node.get_closest_marker("checks")
    if marker is None:
        raise pytest.UsageError(f"{node.nodeid}: a test using 'result' needs pytest.mark.checks(MODULE, sizes=...)")
    return marker.args[0], tuple(marker.kwargs.get("sizes", SIZES))


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", check_module(metafunc.definition)[1], ids=lambda n: f"np{n}")


class Launches:
    """The jobs of one session: one per (check module, world size), started on first use."""

    def __init__(self, session: pytest.Session, tmp_path_factory: pytest.TempPathFactory):
        self.session, self.tmp_path_factory = session, tmp_path_factory
        #: (module, size) -> the job's report, or the text every test of a failed launch fails with
        self.reports: Dict[Tuple[str, int], Union[dict, str]] = {}
        self.log: List[str] = []

    def selected(self, module: str, size: int) -> List[str]:
        """Checks of this session's tests at (module, size), in test order, each once."""
        names = []
        for item in self.session.items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "check" in params and params.get("size") == size and "result" in item.fixturenames:
                if check_module(item)[0] == module:
                    names.append(params["check"])
        return list(dict.fromkeys(names))

    def outcome(self, module: str, size: int, name: str) -> dict:
        """``{"result": ...}``, or ``{"failure": text}`` for a check that raised or a launch that failed."""
        key = (module, size)
        if key not in self.reports:
            names = self.selected(module, size)
            # stays if the launch is interrupted (pytest-timeout): the other tests fail without relaunching
            self.reports[key] = f"the {module} job at np {size} was interrupted; see the test that launched it"
            self.reports[key] = self.launch(module, size, names if name in names else names + [name])
        report = self.reports[key]
        if isinstance(report, str):
            return {"failure": report}
        if name not in report["checks"]:
            return {"failure": f"the {module} job at np {size} reported nothing for check {name!r}"}
        outcome = report["checks"][name]
        if "error" in outcome:
            return {"failure": f"check {name!r} failed at np {size}:\n{outcome['error']}"}
        return outcome

    def launch(self, module: str, size: int, names: List[str]) -> Union[dict, str]:
        out = self.tmp_path_factory.mktemp(f"{module}-np{size}") / "report.json"
        cmd = horovodrun_command(size, [str(RUNNER), str(out), module, *names])
        command = shlex.join(cmd)
        print(f"launching: {command}", flush=True)  # captured: shown with a failing test's output
        start = time.monotonic()
        try:
            proc = run(cmd, timeout=LAUNCH_TIMEOUT, np_=size)
        except AssertionError as exc:  # timed out: launch.run killed the job's process group
            report = str(exc)
        else:
            if proc.returncode != 0:
                report = f"{command}\nexited with status {proc.returncode}; output:\n{proc.stdout[-5000:]}"
            elif not out.exists():
                report = f"{command}\nwrote no report; output:\n{proc.stdout[-5000:]}"
            else:
                report = json.loads(out.read_text())
                if report["size"] != size:
                    report = f"{command}\nran with {report['size']} processes, not {size}"
        status = "failed" if isinstance(report, str) else f"{len(names)} check{'s' * (len(names) > 1)}"
        self.log.append(f"np {size} {module}: {status} in {time.monotonic() - start:.1f} s :: {command}")
        return report


@pytest.fixture(scope="session")
def launches(request, tmp_path_factory) -> Launches:
    launches = request.config.stash[LAUNCHES] = Launches(request.session, tmp_path_factory)
    return launches


@pytest.fixture
def check(request):
    raise pytest.UsageError(f"{request.node.nodeid}: parametrize 'check' with the names of the checks it asserts on")


@pytest.fixture
def result(request, launches, check, size):
    """The value check ``check`` returned on rank 0 of a job with ``size`` processes."""
    outcome = launches.outcome(check_module(request.node)[0], size, check)
    if "failure" in outcome:  # raised when the test is called (below): a test failure, not a fixture error
        request.node.stash[FAILURE] = outcome["failure"]
    return outcome.get("result")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem):
    if FAILURE in pyfuncitem.stash:
        pytest.fail(pyfuncitem.stash[FAILURE], pytrace=False)


def pytest_terminal_summary(terminalreporter, config):
    launches = config.stash.get(LAUNCHES, None)
    if launches and launches.log:
        terminalreporter.write_sep("-", f"tests/parallel: {len(launches.log)} horovodrun launches")
        for line in launches.log:
            terminalreporter.write_line(line if config.option.verbose > 0 else line.split(" :: ")[0])
