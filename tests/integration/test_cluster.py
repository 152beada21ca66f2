"""Emulated hosts for real (root, network namespaces): a DPSGD job across them, shaping, and teardown that
leaves the machine exactly as it was, on success, failure, Ctrl-C, SIGTERM and a killed creator.

The pure parts (rates, names, the ssh stand-in's parsing, error messages) are in tests/unit/test_cluster_names.py.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from horovod_dpsgd.experiments import cluster as C
from horovod_dpsgd.experiments.cluster import system
from launch import REPO, emulated_hosts, run


pytestmark = emulated_hosts(shaping=True)
CLI = [sys.executable, "-m", "horovod_dpsgd.experiments.cli", "cluster"]


def footprint() -> dict:
    """Everything a cluster may touch on the machine."""
    def out(*argv):
        return subprocess.run(argv, capture_output=True, text=True).stdout
    return {"netns": out("ip", "netns", "list"), "links": sorted(os.listdir("/sys/class/net")),
            "qdiscs": out("tc", "qdisc", "show"), "hosts": Path("/etc/hosts").read_text(),
            "run": sorted(os.listdir("/run")), "netns_mounts": [line for line in open("/proc/self/mountinfo")
                                                                 if "/run/netns" in line]}


def processes_with(token: str) -> list:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture
def unchanged():
    """The machine before the test (returned); after it, the machine must be exactly the same."""
    before = footprint()
    yield before
    assert footprint() == before


_TRANSFER = """
import socket, sys, time
role, peer, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if role == "recv":
    server = socket.create_server(("", 5701)); conn, _ = server.accept(); start, got = time.monotonic(), 0
    while True:
        chunk = conn.recv(1 << 16)
        if not chunk: break
        got += len(chunk)
    print(got, time.monotonic() - start)
else:
    for _ in range(200):
        try: conn = socket.create_connection((peer, 5701)); break
        except OSError: time.sleep(0.05)
    conn.sendall(b"x" * size); conn.close()
"""


def _transfer(cluster, sender, receiver, size):
    env = cluster.env()
    program = [sys.executable, "-c", shlex.quote(_TRANSFER)]  # ssh runs its command words through a shell
    recv = subprocess.Popen(["ssh", receiver, *program, "recv", "-", str(size)], env=env, stdout=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        subprocess.run(["ssh", sender, *program, "send", receiver, str(size)], env=env, check=True, timeout=60)
        got, seconds = recv.communicate(timeout=60)[0].split()
    finally:
        if recv.poll() is None:
            os.killpg(recv.pid, signal.SIGKILL)
    assert int(got) == size
    return float(seconds)


@pytest.fixture(scope="class")
def cluster():
    before = footprint()
    with C.EmulatedCluster(hosts=2, slots=2, rate="1gbit", prefix="hdt1") as c:
        yield c
    assert footprint() == before


class TestTwoHostsOfTwoSlots:
    """One cluster, 2 hosts x 2 slots at 1 Gbit/s, shared by the tests of this class."""

    def test_dpsgd_ring_across_two_hosts_of_two_processes(self, cluster, tmp_path):
        out = tmp_path / "report.json"
        before = cluster.counters()
        proc = run(cluster.horovodrun_command([sys.executable, "tests/integration/jobs/cluster_job.py", str(out)]),
                   timeout=240, env=cluster.env(), np_=4)
        assert proc.returncode == 0, proc.stdout[-5000:]
        after = cluster.counters()
        report = json.loads(out.read_text())
        ranks = report["ranks"]
        # Horovod sees a real 2 x 2 layout: two hosts by name, two processes on each.
        assert [(r["hostname"], r["processor"]) for r in ranks] == [("hdt1-h1",) * 2] * 2 + [("hdt1-h2",) * 2] * 2
        assert [(r["local_size"], r["cross_size"]) for r in ranks] == [(2, 2)] * 4
        assert [(r["local_rank"], r["cross_rank"]) for r in ranks] == [(0, 0), (1, 0), (0, 1), (1, 1)]
        assert report["max_abs_diff"] <= 1e-6 and report["learner_spread"] > 1e-4 and report["steps"] == 5
        # On a ring 0-1-2-3-0 over hosts {0,1},{2,3}, two models leave and enter each host per step.
        least = 2 * report["steps"] * report["model_bytes"]
        for host in cluster.hosts:
            sent, received = (after[host][k] - before[host][k] for k in ("sent", "received"))
            assert sent >= least and received >= least, (host, sent, received, least)

    def test_links_are_shaped_on_both_ends_and_shape_changes_them(self, cluster):
        def tbf(host):
            shown = [system.run(["tc", "qdisc", "show", "dev", cluster.layout.link(host)]),
                     system.run(["tc", "-n", host, "qdisc", "show", "dev", "veth0"])]
            return ["rate 1Gbit" in s for s in shown], ["tbf" in s for s in shown]
        assert [tbf(h)[0] for h in cluster.hosts] == [[True, True]] * 2
        cluster.shape(None, hosts=["hdt1-h2"])
        assert tbf("hdt1-h2")[1] == [False, False] and tbf("hdt1-h1")[0] == [True, True]
        assert [h["rate"] for h in cluster.status()["hosts"]] == [10 ** 9, None]
        cluster.shape("1gbit")
        assert [tbf(h)[0] for h in cluster.hosts] == [[True, True]] * 2

    def test_shaping_limits_what_a_host_sends_and_what_it_receives(self, cluster):
        # Only h1 shaped, to 20 Mbit/s: 2.5 MB take about 1 s through either end of its link. A lower bound
        # only (a busy machine is slower, never faster): it fails if either direction is not shaped.
        cluster.shape("20mbit", hosts=["hdt1-h1"])
        cluster.shape(None, hosts=["hdt1-h2"])
        try:
            sent = _transfer(cluster, "hdt1-h1", "hdt1-h2", 2_500_000)  # through the tbf on veth0 inside h1
            received = _transfer(cluster, "hdt1-h2", "hdt1-h1", 2_500_000)  # ... on the bridge's end of the link
        finally:
            cluster.shape("1gbit")
        assert sent > 0.5 and received > 0.5, (sent, received)

    def test_a_second_cluster_with_the_same_prefix_says_what_exists(self, cluster):
        with pytest.raises(C.ClusterExistsError, match=r"'hdt1' is already up: 2 hosts \(hdt1-h1, hdt1-h2\) x 2 "
                                                       r"slots.*cluster down --prefix hdt1"):
            C.EmulatedCluster(hosts=3, prefix="hdt1").up()
        assert cluster.status()["bridge_present"] and all(h["present"] for h in cluster.status()["hosts"])


def test_names_taken_by_something_else_are_refused_and_left_alone(unchanged):
    subprocess.run(["ip", "netns", "add", "hdt3-h2"], check=True)
    try:
        with pytest.raises(C.ClusterExistsError, match=r"not by a horovod-dpsgd cluster: network namespace hdt3-h2\."):
            C.EmulatedCluster(hosts=2, prefix="hdt3").up()
        assert "hdt3-h2" in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not Path("/run/horovod-dpsgd/hdt3").exists()
    finally:
        subprocess.run(["ip", "netns", "del", "hdt3-h2"], check=True)
        if "netns" not in unchanged["run"]:  # `ip netns add` created and mounted /run/netns
            subprocess.run(["umount", "/run/netns"])
            os.rmdir("/run/netns")


@pytest.mark.parametrize("fail_at", [3, 6, 8, 13, 18, 21])  # bridge, netns, link, host 2, tc
def test_a_failure_part_way_through_up_removes_what_was_created(unchanged, monkeypatch, fail_at):
    real, calls = system.run, []
    error = KeyboardInterrupt if fail_at == 13 else C.ClusterError  # Ctrl-C while host 2 is created

    def failing(argv):
        calls.append(argv)
        if len(calls) == fail_at:
            raise error(f"injected failure at {argv}")
        return real(argv)
    monkeypatch.setattr(system, "run", failing)
    with pytest.raises(error, match="injected failure"):
        C.EmulatedCluster(hosts=2, slots=1, rate="1gbit", prefix="hdt4").up()
    assert footprint() == unchanged


def _interruptible() -> None:
    """In the child: SIGINT acts as Ctrl-C in a terminal, even where pytest itself was started with it ignored
    (a background job of a non-interactive shell ignores SIGINT, and the CLI would inherit that)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(*args, **kwargs):
    return subprocess.Popen([*CLI, *args], cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=_interruptible, **kwargs)


def _finish(proc, timeout=120):
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"`cluster` did not finish within {timeout} s:\n{proc.communicate()[0][-4000:]}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_cluster_run_stops_the_job_and_leaves_the_machine_as_it_was(unchanged, tmp_path, signum):
    token = f"hdt-job-{signum}-{os.getpid()}"
    job = (f"import os, pathlib, time  # {token}\n"
           f"pathlib.Path({str(tmp_path)!r}, os.environ['OMPI_COMM_WORLD_RANK']).touch(); time.sleep(600)")
    proc = _cli("run", "--prefix", "hdt5", "--hosts", "2", "--rate", "1gbit", "--", sys.executable, "-c", job)
    deadline = time.monotonic() + 120
    while len(list(tmp_path.iterdir())) < 2:  # both ranks, one per host, are running
        assert proc.poll() is None and time.monotonic() < deadline, _finish(proc)
        time.sleep(0.2)
    assert len(processes_with(token)) >= 2
    os.kill(proc.pid, signum)  # what Ctrl-C or a scheduler's kill sends to the command
    output = _finish(proc)
    assert proc.returncode == 128 + signum, output[-4000:]
    assert footprint() == unchanged, output[-4000:]
    assert processes_with(token) == []


@pytest.mark.parametrize("case,code", [("fail", 3), ("timeout", 124)])
def test_a_failing_or_stuck_command_leaves_the_machine_as_it_was(unchanged, case, code):
    if case == "fail":  # across the hosts
        command = [sys.executable, "-c", "raise SystemExit(3)"]
    else:  # a horovodrun command runs unchanged
        command = [str(Path(sys.executable).parent / "horovodrun"), "-np", "1", sys.executable, "-c",
                   "import time; time.sleep(600)"]
    proc = _cli("run", "--prefix", "hdt6", "--hosts", "2", "--timeout", "10", "--", *command)
    output = _finish(proc)
    assert proc.returncode == code, output[-4000:]
    assert footprint() == unchanged


def test_down_from_another_process_removes_a_cluster_whose_creator_was_killed(unchanged):
    creator = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom horovod_dpsgd.experiments import "
                                "cluster as C\nC.up(2, 1, '1gbit', prefix='hdt7'); print('up', flush=True); "
                                "time.sleep(600)"], env={**os.environ, "PYTHONPATH": str(REPO)},
                               stdout=subprocess.PIPE, text=True)
    try:
        assert creator.stdout.readline().strip() == "up"
    finally:
        creator.kill()
        creator.wait()
    status = _finish(_cli("status", "--prefix", "hdt7"))
    assert "hdt7-h1" in status and "exited" in status and "horovodrun -np 2 -H hdt7-h1:1,hdt7-h2:1" in status
    output = _finish(_cli("down", "--prefix", "hdt7"))
    assert "removed" in output and "netns hdt7-h1" in output, output
    assert footprint() == unchanged
