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

Launches: starting a job costs seconds (10-15 s at np 2-4 on 2 cores: horovodrun's own checks, then torch
imported in every process), so jobs are shared. The first test that asks for a result at np N launches ONE
job, ``horovodrun -np N python tests/parallel/checks/run.py OUT.json MODULE CHECK... -- OUT.json MODULE
CHECK... ...``, naming the check of every test of this session at np N, grouped by module:
``session.items``, the tests left after -k, -m, --deselect and node ids. A module marked
``checks(..., alone=True)`` (it initialises Horovod its own way) gets a job of its own at each size.
``pytest tests/parallel -k ring`` therefore runs only the ring checks, one job per world size, and a full
run one job per world size, plus one per size of each module that runs alone. A check that raised fails
its test with each failing rank's traceback; a job that crashed or ran past its timeout (then the whole
job is killed, tests/support/launch.py) fails every test of that launch with the job's output. The
launches are listed at the end of the session (their command lines with -v).

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


def job_of(node) -> str:
    """The job a test's checks run in at its size: its module's own (``checks(..., alone=True)``), or the shared
    one ("")."""
    marker = node.get_closest_marker("checks")
    return marker.args[0] if marker.kwargs.get("alone", False) else ""


def pytest_generate_tests(metafunc):
    if "size" in metafunc.fixturenames:
        metafunc.parametrize("size", check_module(metafunc.definition)[1], ids=lambda n: f"np{n}")


class Launches:
    """The jobs of one session: one per world size (and one per size of each module that runs alone), started
    on first use."""

    def __init__(self, session: pytest.Session, tmp_path_factory: pytest.TempPathFactory):
        self.session, self.tmp_path_factory = session, tmp_path_factory
        #: (module, size) -> the module's report, or the text every test of a failed launch fails with
        self.reports: Dict[Tuple[str, int], Union[dict, str]] = {}
        self.log: List[str] = []

    def selected(self, job: str, size: int) -> Dict[str, List[str]]:
        """module -> its checks, of this session's tests in ``job`` at ``size``; in test order, each once."""
        names: Dict[str, List[str]] = {}
        for item in self.session.items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "check" in params and params.get("size") == size and "result" in item.fixturenames:
                if job_of(item) == job:
                    names.setdefault(check_module(item)[0], []).append(params["check"])
        return {module: list(dict.fromkeys(checks)) for module, checks in names.items()}

    def outcome(self, module: str, size: int, name: str, job: str) -> dict:
        """``{"result": ...}``, or ``{"failure": text}`` for a check that raised or a launch that failed."""
        key = (module, size)
        if key not in self.reports:
            groups = self.selected(job, size)
            if name not in groups.setdefault(module, []):
                groups[module].append(name)
            for other in groups:  # stays if the launch is interrupted (pytest-timeout): no relaunch
                self.reports[(other, size)] = (f"the job at np {size} running the {other} checks was interrupted; "
                                               f"see the test that launched it")
            self.reports.update({(other, size): report for other, report in self.launch(groups, size).items()})
        report = self.reports[key]
        if isinstance(report, str):
            return {"failure": report}
        if name not in report["checks"]:
            return {"failure": f"the {module} job at np {size} reported nothing for check {name!r}"}
        outcome = report["checks"][name]
        if "error" in outcome:
            return {"failure": f"check {name!r} failed at np {size}:\n{outcome['error']}"}
        return outcome

    def launch(self, groups: Dict[str, List[str]], size: int) -> Dict[str, Union[dict, str]]:
        """One job running ``groups`` (module -> checks) at ``size``: module -> its report, or the failure text."""
        outs = {module: self.tmp_path_factory.mktemp(f"{module}-np{size}") / "report.json" for module in groups}
        args: List[str] = []
        for module, names in groups.items():  # each module's files go beside its own report
            args += (["--"] if args else []) + [str(outs[module]), module, *names]
        cmd = horovodrun_command(size, [str(RUNNER), *args])
        command = shlex.join(cmd)
        print(f"launching: {command}", flush=True)  # captured: shown with a failing test's output
        start = time.monotonic()
        try:
            proc = run(cmd, timeout=LAUNCH_TIMEOUT, np_=size)
        except AssertionError as exc:  # timed out: launch.run killed the job's process group
            failure = str(exc)
        else:
            failure = (f"{command}\nexited with status {proc.returncode}; output:\n{proc.stdout[-5000:]}"
                       if proc.returncode != 0 else None)
        reports: Dict[str, Union[dict, str]] = {}
        for module, out in outs.items():
            if failure is not None:
                reports[module] = failure
            elif not out.exists():
                reports[module] = f"{command}\nwrote no report for {module}; output:\n{proc.stdout[-5000:]}"
            else:
                reports[module] = json.loads(out.read_text())
                if reports[module]["size"] != size:
                    reports[module] = f"{command}\nran with {reports[module]['size']} processes, not {size}"
        checks = sum(map(len, groups.values()))
        status = "failed" if any(isinstance(r, str) for r in reports.values()) else \
            f"{checks} check{'s' * (checks > 1)}"
        self.log.append(f"np {size} {'+'.join(groups)}: {status} in {time.monotonic() - start:.1f} s :: {command}")
        return reports


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
    outcome = launches.outcome(check_module(request.node)[0], size, check, job_of(request.node))
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
