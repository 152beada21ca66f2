"""The emulated cluster's pure parts, without root: rates, names, the ssh stand-in's parsing, commands, errors.

The cluster itself (root, network namespaces) is tested in tests/integration/test_cluster.py.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from horovod_dpsgd.experiments import cluster as C
from horovod_dpsgd.experiments.cli import main
from horovod_dpsgd.experiments.cluster import ssh, system
from horovod_dpsgd.experiments.cluster.emulated import run_command
from horovod_dpsgd.experiments.cluster.layout import tbf_args


@pytest.mark.parametrize("text,bits", [
    ("1gbit", 10 ** 9), ("10gbit", 10 ** 10), ("100mbit", 10 ** 8), ("1.5Gbit", 15 * 10 ** 8),
    ("500kbit", 5 * 10 ** 5), ("125mbps", 10 ** 9), ("1gibit", 2 ** 30), (" 2 gbit ", 2 * 10 ** 9),
    (None, None), ("none", None), ("off", None), ("unshaped", None),
])
def test_rates_are_read_in_tc_notation(text, bits):
    assert C.parse_rate(text) == bits


@pytest.mark.parametrize("text", ["1g", "fast", "1000", "gbit", "-1gbit", "1gbit/s", "0bit", "2tbit"])
def test_a_rate_tc_would_reject_or_tbf_cannot_shape_is_refused_with_examples(text):
    with pytest.raises(C.ClusterError, match=r"1gbit|8kbit to 1tbit"):
        C.parse_rate(text)


def test_rates_print_as_written():
    assert [C.format_rate(b) for b in (10 ** 9, 10 ** 10, 10 ** 8, 15 * 10 ** 8, None)] == \
        ["1gbit", "10gbit", "100mbit", "1.5gbit", "unshaped"]


def test_the_token_bucket_holds_2_ms_of_traffic_within_16_kib_and_1_mib():
    assert tbf_args(10 ** 9) == ["tbf", "rate", "1000000000bit", "burst", "250000", "latency", "50ms"]
    assert tbf_args(10 ** 10)[4] == str(2 ** 20)   # the measured recipe: burst 1mb at 10 Gbit/s
    assert tbf_args(10 ** 7)[4] == str(16 * 1024)  # never below a few packets


def test_layout_names_and_addresses():
    layout = C.Layout(prefix="ab", hosts=3, slots=2, subnet="10.77.5.0/24")
    assert layout.host_names == ["ab-h1", "ab-h2", "ab-h3"]
    assert [layout.address(h) for h in layout.host_names] == ["10.77.5.1", "10.77.5.2", "10.77.5.3"]
    assert [layout.link(h) for h in layout.host_names] == ["ab-v1", "ab-v2", "ab-v3"]
    assert (layout.bridge, layout.bridge_address, layout.interface) == ("ab-br", "10.77.5.254", "veth0")
    with pytest.raises(C.ClusterError, match="not a host of cluster 'ab'"):
        layout.address("h1")


def test_the_longest_names_fit_linux_interface_names():
    layout = C.Layout(prefix="abcdefgh", hosts=253, slots=1, subnet="10.77.0.0/24")
    assert max(len(layout.link(h)) for h in layout.host_names) <= 15 and len(layout.bridge) <= 15


@pytest.mark.parametrize("options,words", [
    (dict(hosts=0), "at least 1 host"), (dict(hosts=-2), "at least 1 host"), (dict(slots=0), "at least 1 slot"),
    (dict(prefix="Big"), "lower-case"), (dict(prefix="toolongname"), "1-8"), (dict(prefix="a-b"), "letters and digits"),
    (dict(hosts=300), "cannot hold 300 hosts"), (dict(subnet="10.77.0.0/33"), "subnet"),
    (dict(subnet="fd00::/64"), "IPv4"), (dict(interface="a" * 16), "1-15"),
])
def test_bad_layouts_are_refused_naming_the_fix(options, words):
    with pytest.raises(C.ClusterError, match=words):
        C.Layout(**{"prefix": "t", "hosts": 2, "slots": 1, "subnet": "10.77.0.0/24", **options})


def test_horovodrun_line_and_environment():
    cluster = C.EmulatedCluster(hosts=2, slots=2, rate="1gbit", prefix="ab", subnet="10.77.9.0/24")
    assert cluster.horovodrun_args() == [
        "-np", "4", "-H", "ab-h1:2,ab-h2:2", "--disable-cache", "--network-interface", "veth0",
        "--mpi-args=--mca oob_tcp_if_include 10.77.9.0/24"]
    assert cluster.horovodrun_command(["python", "x.py"], np=3)[1:3] == ["-np", "3"]
    assert cluster.horovodrun_command(["python", "x.py"])[-2:] == ["python", "x.py"]
    own = ["/venv/bin/horovodrun", "-np", "2", "x"]
    assert cluster.launch_command(own) == own  # a horovodrun command runs unchanged
    assert cluster.launch_command(["python", "x.py"], mpi_args="--mca btl_tcp_links 2")[-3:] == [
        "--mpi-args=--mca oob_tcp_if_include 10.77.9.0/24 --mca btl_tcp_links 2", "python", "x.py"]
    env = cluster.env({"PATH": "/usr/bin"})
    assert env["PATH"] == f"{system.STATE_ROOT}/ab/bin:/usr/bin"
    assert env["OMPI_MCA_mpi_yield_when_idle"] == "1" and env["HOROVOD_DPSGD_CLUSTER"] == "ab"


# -- the ssh stand-in -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,host,command", [
    # horovodrun's reachability check: options before and after the host
    ("-o PasswordAuthentication=no -o StrictHostKeyChecking=no h1 -o ConnectTimeout=10 true", "h1", ["true"]),
    ("-o PasswordAuthentication=no -o StrictHostKeyChecking=no h1 -p 2222 -i /k python -m x a",
     "h1", ["python", "-m", "x", "a"]),
    ("-x h1 orted -mca ess env", "h1", ["orted", "-mca", "ess", "env"]),   # Open MPI's launch
    ("-oConnectTimeout=10 -xT user@h2 echo hi", "h2", ["echo", "hi"]),     # attached argument, grouped flags
    ("-xo ConnectTimeout=10 h2 echo", "h2", ["echo"]),                     # grouped, argument in the next word
    ("-oUser=bob h2 echo", "h2", ["echo"]),                                # attached argument ending like an option
    ("h1", "h1", []),                                                       # no command: a shell
    ("-- h1 -x", "h1", ["-x"]),                                             # -- ends the options
    ("h1 -- -x", "h1", ["-x"]),
])
def test_ssh_stand_in_skips_options_before_and_after_the_host(argv, host, command):
    assert ssh.parse_ssh_args(argv.split()) == (host, command)


def _stand_in(tmp_path):
    """A stand-in as `cluster up` writes it, whose `ip` only prints the command it would run, as JSON."""
    (tmp_path / "bin").mkdir()
    ip = tmp_path / "ip"
    ip.write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    ip.chmod(0o755)
    (tmp_path / "ssh.json").write_text(json.dumps({"cluster": "ab", "hosts": {"ab-h1": "ab-h1", "10.77.9.1": "ab-h1"},
                                                   "ip": str(ip), "unshare": "/usr/bin/unshare",
                                                   "hostname": "/usr/bin/hostname"}))
    script = tmp_path / "bin" / "ssh"
    script.write_text(f"#!{sys.executable} -I\n" + Path(ssh.__file__).read_text())
    script.chmod(0o755)
    return script


def test_ssh_stand_in_runs_the_command_in_the_hosts_namespace_with_its_hostname(tmp_path):
    script = _stand_in(tmp_path)
    for host in ("ab-h1", "10.77.9.1"):
        out = subprocess.run([str(script), "-o", "StrictHostKeyChecking=no", host, "-o", "ConnectTimeout=10",
                              "echo", "$HOSTNAME", ";", "true"], capture_output=True, text=True, check=True).stdout
        assert json.loads(out) == ["netns", "exec", "ab-h1", "/usr/bin/unshare", "--uts", "/bin/sh", "-c",
                                   '"$1" "$2" && exec /bin/sh -c "$3"', "sh", "/usr/bin/hostname", host,
                                   "echo $HOSTNAME ; true"]  # joined by spaces for the shell, as ssh does
    out = subprocess.run([str(script), "ab-h1"], capture_output=True, text=True, check=True).stdout
    assert json.loads(out)[7] == '"$1" "$2" && exec "${SHELL:-/bin/sh}"'  # no command: a login shell


def test_ssh_stand_in_names_the_cluster_for_an_unknown_host_when_there_is_no_real_ssh(tmp_path):
    script = _stand_in(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([str(script), "elsewhere", "true"], capture_output=True, text=True,
                          env={"PATH": f"{script.parent}:{empty}"})
    assert proc.returncode == 255
    assert "'elsewhere' is not a host of the emulated cluster 'ab'" in proc.stderr and "ab-h1" in proc.stderr


def test_ssh_stand_in_without_its_cluster_says_so(tmp_path):
    script = _stand_in(tmp_path)
    (tmp_path / "ssh.json").unlink()
    proc = subprocess.run([str(script), "ab-h1", "true"], capture_output=True, text=True)
    assert proc.returncode == 255 and "is the emulated cluster still up?" in proc.stderr


# -- requirements -------------------------------------------------------------------------------------------
def test_not_root_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(C.ClusterUnavailableError, match=r"need root .* `sudo horovod-dpsgd cluster up"):
        C.EmulatedCluster(hosts=2).up()


def test_missing_tc_is_refused_only_when_shaping(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, **kw: None if name == "tc" else real_which(name, **kw))
    with pytest.raises(C.ClusterUnavailableError, match=r"`tc` is not installed.*apt-get install iproute2"):
        system.check_requirements(shaping=True)


def test_no_permission_for_network_namespaces_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(system, "tool", lambda name: f"/usr/bin/{name}")
    refused = subprocess.CompletedProcess([], 1, "", "unshare: unshare failed: Operation not permitted")
    monkeypatch.setattr(system.subprocess, "run", lambda *a, **kw: refused)
    with pytest.raises(C.ClusterUnavailableError, match=r"network namespaces .* Operation not permitted.*privileged"):
        system.check_requirements(shaping=False)


@pytest.mark.parametrize("args,words", [
    (["up", "--hosts", "0"], "at least 1 host"),
    (["up", "--rate", "fast"], "is not a tc rate"),
    (["run", "--slots", "0", "--", "true"], "at least 1 slot"),
    (["shape", "--rate", "1g", "--prefix", "zzunused"], "is not a tc rate"),
    (["down", "--prefix", "zzunused"], "no emulated cluster 'zzunused' is up"),
    (["status", "--prefix", "zzunused"], "no emulated cluster 'zzunused' is up"),
])
def test_cli_errors_are_clear_and_change_nothing(args, words):
    before = sorted(os.listdir("/run"))
    result = CliRunner().invoke(main, ["cluster", *args])
    assert result.exit_code == 1, result.output
    assert words in result.output
    assert sorted(os.listdir("/run")) == before


def test_a_command_that_outlives_its_timeout_is_stopped_with_its_whole_process_group():
    token = f"hdt-orphan-{os.getpid()}"
    child = f"import time; time.sleep(600)  # {token}"
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(600)"
    with pytest.raises(subprocess.TimeoutExpired):
        run_command([sys.executable, "-c", parent], timeout=2, capture=True)
    leftovers = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if token in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                leftovers.append(pid)
        except OSError:
            pass
    assert leftovers == []
