"""What an emulated cluster does to the machine: checks, ip/tc commands, /etc/hosts lines, teardown.

Every object is recorded in the cluster's state file *before* it is created, and teardown walks that
record backwards, skipping what is already gone: a cluster half built when its creator was interrupted
or killed is removed as completely as a whole one.
"""

import contextlib
import ipaddress
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from horovod_dpsgd.experiments.cluster.layout import (ClusterError, ClusterExistsError, ClusterUnavailableError,
                                                      Layout, tbf_args)
from horovod_dpsgd.experiments.cluster.state import (NETNS_DIR_MARKER, STATE_ROOT, State, cluster_dir,
                                                     machine_lock, pid_alive, state_file)

NETNS_DIR = Path("/run/netns")
HOSTS_FILE = Path("/etc/hosts")
SYS_NET = Path("/sys/class/net")
SUBNET_POOL = ipaddress.ip_network("10.77.0.0/16")
_TOOL_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])


# -- checks ------------------------------------------------------------------------------------------
def tool(name: str) -> str:
    path = shutil.which(name, path=_TOOL_PATH)
    if path is None:
        package = {"ip": "iproute2", "tc": "iproute2", "unshare": "util-linux", "hostname": "hostname"}[name]
        raise ClusterUnavailableError(f"`{name}` is not installed, and emulated hosts need it: "
                                      f"install {package} (e.g. apt-get install {package})")
    return path


def check_requirements(shaping: bool) -> None:
    """Root, the tools, and permission to create network namespaces, each with an error naming the fix."""
    if os.geteuid() != 0:
        raise ClusterUnavailableError("emulated hosts need root (they create network namespaces, a bridge, tc "
                                      "qdiscs and /etc/hosts lines): run as root, e.g. `sudo horovod-dpsgd "
                                      "cluster up ...`")
    for name in ("ip", "unshare", "hostname") + (("tc",) if shaping else ()):
        tool(name)
    probe = subprocess.run([tool("unshare"), "--net", "--uts", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise ClusterUnavailableError(f"this machine does not let root create network namespaces (`unshare --net "
                                      f"--uts true`: {probe.stderr.strip()}); in a container, run it with "
                                      f"--privileged, or with CAP_SYS_ADMIN and CAP_NET_ADMIN")
    probe = subprocess.run([tool("ip"), "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise ClusterUnavailableError(f"`ip netns` does not work here ({probe.stderr.strip()}): "
                                      f"install a recent iproute2")


def run(argv: List[str]) -> str:
    """Run a system command; a failure raises ClusterError with its message and a hint."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        hint = ""
        if "qdisc kind is unknown" in message:
            hint = " (this kernel lacks the tbf qdisc, CONFIG_NET_SCH_TBF: use an unshaped cluster)"
        elif "Unknown device type" in message or "not supported" in message:
            hint = " (this kernel lacks bridge or veth support, CONFIG_BRIDGE / CONFIG_VETH)"
        raise ClusterError(f"`{shlex.join(argv)}` failed: {message}{hint}")
    return proc.stdout


def _netns_names() -> List[str]:
    return sorted(os.listdir(NETNS_DIR)) if NETNS_DIR.is_dir() else []


def _used_networks() -> List[ipaddress.IPv4Network]:
    used = [ipaddress.ip_network(State.load(p).layout.subnet) for p in State.prefixes()]
    for line in run([tool("ip"), "-4", "-o", "addr", "show"]).splitlines():
        used.append(ipaddress.ip_interface(line.split()[3]).network)
    for line in run([tool("ip"), "-4", "route", "show", "table", "all"]).splitlines():
        for word in line.split()[:2]:  # "10.1.0.0/16 dev ..." or "unreachable 10.1.0.0/16 ..."
            with contextlib.suppress(ValueError):
                used.append(ipaddress.ip_network(word, strict=False))
                break
    return [u for u in used if u.prefixlen > 0]  # a default route takes no subnet


def free_subnet() -> str:
    used = _used_networks()
    for subnet in SUBNET_POOL.subnets(new_prefix=24):
        if not any(subnet.overlaps(u) for u in used):
            return str(subnet)
    raise ClusterError(f"no free /24 in {SUBNET_POOL}: pass subnet= (--subnet) explicitly")


def refuse_existing(layout: Layout, subnet_given: bool) -> None:
    """Refuse a prefix that is in use: by a cluster (say what it holds) or by anything else on the machine."""
    state = State.load(layout.prefix)
    if state is not None:
        alive = "running" if pid_alive(state.data["pid"]) else "no longer running"
        old = state.layout
        raise ClusterExistsError(
            f"an emulated cluster {layout.prefix!r} is already up: {old.hosts} hosts ({', '.join(old.host_names)}) "
            f"x {old.slots} slots on {old.subnet}, created {state.data['created']} by process {state.data['pid']} "
            f"({alive}); state file {state_file(layout.prefix)}. Use it, remove it with `horovod-dpsgd cluster "
            f"down --prefix {layout.prefix}`, or choose another --prefix.")
    names = set(layout.host_names)
    taken = [f"network namespace {n}" for n in _netns_names() if n in names]
    taken += [f"network interface {n}" for n in os.listdir(SYS_NET)
              if n == layout.bridge or n in {layout.link(h) for h in layout.host_names}]
    taken += [f"/etc/hosts name {w}" for line in HOSTS_FILE.read_text().splitlines()
              for w in line.split("#")[0].split()[1:] if w in names]
    if subnet_given:
        taken += [f"addresses in {u}" for u in _used_networks() if u.overlaps(layout.network)]
    if taken:
        raise ClusterExistsError(f"names of cluster {layout.prefix!r} are in use on this machine, not by a "
                                 f"horovod-dpsgd cluster: {', '.join(taken)}. Choose another --prefix (or --subnet).")


# -- building -------------------------------------------------------------------------------------------
def build(state: State) -> None:
    layout, ip = state.layout, tool("ip")
    prefix_len = layout.network.prefixlen
    if not NETNS_DIR.exists():
        NETNS_DIR_MARKER.touch()
    state.record({"kind": "bridge", "name": layout.bridge})
    run([ip, "link", "add", layout.bridge, "type", "bridge"])
    run([ip, "addr", "add", f"{layout.bridge_address}/{prefix_len}", "dev", layout.bridge])
    run([ip, "link", "set", layout.bridge, "up"])
    for host in layout.host_names:
        state.record({"kind": "netns", "name": host})
        run([ip, "netns", "add", host])
        link, dev = layout.link(host), layout.interface
        state.record({"kind": "link", "name": link})
        run([ip, "link", "add", link, "type", "veth", "peer", "name", dev, "netns", host])
        run([ip, "link", "set", link, "master", layout.bridge, "up"])
        run([ip, "-n", host, "addr", "add", f"{layout.address(host)}/{prefix_len}", "dev", dev])
        run([ip, "-n", host, "link", "set", dev, "up"])
        run([ip, "-n", host, "link", "set", "lo", "up"])
    _add_hosts_lines(state)
    _write_ssh_stand_in(layout)


def _add_hosts_lines(state: State) -> None:
    layout = state.layout
    lines = [f"{layout.address(h)}\t{h}\t# horovod-dpsgd cluster {layout.prefix}" for h in layout.host_names]
    text = HOSTS_FILE.read_text()
    newline = bool(text) and not text.endswith("\n")
    state.record({"kind": "hosts_lines", "lines": lines, "newline_added": newline})
    with open(HOSTS_FILE, "a") as f:
        f.write("\n" * newline + "".join(line + "\n" for line in lines))


def _remove_hosts_lines(resource: dict) -> bool:
    text = original = HOSTS_FILE.read_text()
    for line in resource["lines"]:
        at = (text if text.endswith("\n") else text + "\n").find(line + "\n")
        if at >= 0:
            text = text[:at] + text[at + len(line) + 1:]
    if resource["newline_added"] and text.endswith("\n"):
        text = text[:-1]
    if text != original:
        with open(HOSTS_FILE, "r+") as f:  # in place: /etc/hosts may be a bind mount
            f.write(text)
            f.truncate()
    return text != original


def _write_ssh_stand_in(layout: Layout) -> None:
    directory = cluster_dir(layout.prefix)
    hosts = {h: h for h in layout.host_names}
    hosts.update({layout.address(h): h for h in layout.host_names})
    config = {"cluster": layout.prefix, "hosts": hosts, "ip": tool("ip"), "unshare": tool("unshare"),
              "hostname": tool("hostname")}
    (directory / "ssh.json").write_text(json.dumps(config, indent=1))
    (directory / "bin").mkdir(exist_ok=True)
    source = (Path(__file__).parent / "ssh.py").read_text()
    ssh = directory / "bin" / "ssh"
    ssh.write_text(f"#!{sys.executable} -I\n{source}")
    ssh.chmod(0o755)


def _devices(layout: Layout, host: str) -> List[dict]:
    """The two ends of ``host``'s link: tc on the host's end shapes what it sends, on the bridge's end
    what it receives."""
    return [{"kind": "qdisc", "netns": None, "dev": layout.link(host)},
            {"kind": "qdisc", "netns": host, "dev": layout.interface}]


def _tc(resource: dict) -> List[str]:
    return [tool("tc")] + (["-n", resource["netns"]] if resource["netns"] else [])


def shape(state: State, bits: Optional[int], hosts: List[str]) -> None:
    for host in hosts:
        for qdisc in _devices(state.layout, host):
            if bits is not None:
                state.record(qdisc)
                run(_tc(qdisc) + ["qdisc", "replace", "dev", qdisc["dev"], "root"] + tbf_args(bits))
            else:
                _remove_qdisc(qdisc)
                state.forget(qdisc)
        state.data["rates"][host] = bits
    if set(hosts) >= set(state.layout.host_names):
        state.data["rate"] = bits
    state.save()


def _remove_qdisc(qdisc: dict) -> bool:
    """Back to the device's default qdisc; False if there was no tbf (or no device) any more."""
    if qdisc["netns"] and qdisc["netns"] not in _netns_names():
        return False
    shown = subprocess.run(_tc(qdisc) + ["qdisc", "show", "dev", qdisc["dev"], "root"], capture_output=True,
                           text=True)
    if shown.returncode != 0 or "tbf" not in shown.stdout:  # the device is gone, or not shaped
        return False
    run(_tc(qdisc) + ["qdisc", "del", "dev", qdisc["dev"], "root"])
    return True


def set_link(state: State, host: str, up: bool) -> None:
    run([tool("ip"), "link", "set", state.layout.link(host), "up" if up else "down"])


def link_counters(link: str) -> Dict[str, int]:
    """Traffic through ``link`` as its host sees it (the root end receives what the host sends)."""
    stats = SYS_NET / link / "statistics"
    read = lambda name: int((stats / name).read_text())  # noqa: E731
    return {"sent": read("rx_bytes"), "received": read("tx_bytes"),
            "sent_packets": read("rx_packets"), "received_packets": read("tx_packets")}


def _netns_pids(namespace: str) -> List[int]:
    proc = subprocess.run([tool("ip"), "netns", "pids", namespace], capture_output=True, text=True)
    return [int(p) for p in proc.stdout.split()] if proc.returncode == 0 else []


def describe(state: State) -> dict:
    layout, netns = state.layout, _netns_names()
    hosts = []
    for host in layout.host_names:
        link = layout.link(host)
        present = host in netns and (SYS_NET / link).exists()
        hosts.append({"name": host, "address": layout.address(host), "link": link, "present": present,
                      "rate": state.data["rates"].get(host), "processes": len(_netns_pids(host)) if present else 0,
                      **(link_counters(link) if present else {})})
    return {"prefix": layout.prefix, "hosts": hosts, "slots": layout.slots, "subnet": layout.subnet,
            "interface": layout.interface, "bridge": layout.bridge,
            "bridge_present": (SYS_NET / layout.bridge).exists(), "state_file": str(state_file(layout.prefix)),
            "created": state.data["created"], "pid": state.data["pid"], "pid_alive": pid_alive(state.data["pid"])}


# -- teardown ---------------------------------------------------------------------------------------------
def _kill_processes(namespace: str) -> None:
    """SIGKILL whatever still runs on the host (its namespace was created for this cluster), and wait."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pids = [p for p in _netns_pids(namespace) if p != os.getpid()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)
    raise ClusterError(f"processes {pids} on host {namespace} survived SIGKILL for 10 s")


def _destroy(resource: dict) -> bool:
    """Remove one recorded object; False if it was already gone."""
    kind, ip = resource["kind"], tool("ip")
    if kind in ("bridge", "link"):
        if not (SYS_NET / resource["name"]).exists():
            return False
        run([ip, "link", "del", resource["name"]])
    elif kind == "netns":
        if resource["name"] not in _netns_names():
            return False
        _kill_processes(resource["name"])
        run([ip, "netns", "del", resource["name"]])
    elif kind == "qdisc":
        return _remove_qdisc(resource)
    elif kind == "hosts_lines":
        return _remove_hosts_lines(resource)
    else:
        raise ClusterError(f"unknown object in the state file: {resource}")
    return True


def _describe_resource(resource: dict) -> str:
    if resource["kind"] == "hosts_lines":
        return f"{len(resource['lines'])} lines of {HOSTS_FILE}"
    if resource["kind"] == "qdisc":
        return f"tbf on {resource['dev']}" + (f" in {resource['netns']}" if resource["netns"] else "")
    return f"{resource['kind']} {resource['name']}"


def teardown(prefix: str) -> List[str]:
    """Remove what the state file of ``prefix`` lists, newest first; the state goes last."""
    removed, failures = [], []
    with machine_lock():
        state = State.load(prefix)
        if state is not None:
            for resource in [r for r in state.resources if r["kind"] == "netns"]:
                with contextlib.suppress(Exception):  # first stop the jobs, then cut their links
                    _kill_processes(resource["name"])
            for resource in reversed(list(state.resources)):
                try:
                    if _destroy(resource):
                        removed.append(_describe_resource(resource))
                    state.forget(resource)
                except Exception as exc:  # keep going: remove all that can be removed
                    failures.append(str(exc))
            if failures:
                raise ClusterError(f"could not remove all of cluster {prefix!r}; what is left is listed in "
                                   f"{state_file(prefix)} (retry `horovod-dpsgd cluster down --prefix {prefix}`):"
                                   f"\n  " + "\n  ".join(failures))
        shutil.rmtree(cluster_dir(prefix), ignore_errors=True)
        _remove_machine_dirs()
    return removed


def _remove_machine_dirs() -> None:
    """The last teardown removes /run/netns if a cluster created it, and the (empty) state root."""
    if NETNS_DIR_MARKER.exists() and not State.prefixes() and not _netns_names():
        for _ in range(5):  # `ip netns add` bind-mounts it on itself (os.path.ismount cannot tell)
            if not _mounted(NETNS_DIR):
                break
            subprocess.run([shutil.which("umount", path=_TOOL_PATH) or "umount", str(NETNS_DIR)],
                           capture_output=True)
        try:
            NETNS_DIR.rmdir()
        except FileNotFoundError:
            pass
        except OSError:  # still in use: the next teardown tries again
            return
        NETNS_DIR_MARKER.unlink()
    with contextlib.suppress(OSError):
        STATE_ROOT.rmdir()


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)
