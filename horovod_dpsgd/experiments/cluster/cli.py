"""``horovod-dpsgd cluster``: emulated hosts on this machine (see docs/cluster.md).

    horovod-dpsgd cluster up --hosts 2 --slots 2 --rate 1gbit     # prints the horovodrun line to use
    horovod-dpsgd cluster shape --rate 10gbit
    horovod-dpsgd cluster down
    horovod-dpsgd cluster run --hosts 2 --slots 2 --rate 1gbit -- python train.py   # up, run, always down
"""

import json
import shlex
import subprocess
import sys

import click

from horovod_dpsgd.experiments import cluster as C
from horovod_dpsgd.experiments.cluster.emulated import run_command

_prefix = click.option("--prefix", default=C.DEFAULT_PREFIX, show_default=True,
                       help="Names the cluster's hosts (PREFIX-h1...), links and state; clusters with different "
                            "prefixes coexist.")


def _layout_options(f):
    for option in reversed([
        click.option("--hosts", type=int, default=2, show_default=True, help="Number of emulated hosts."),
        click.option("--slots", type=int, default=1, show_default=True, help="Process slots per host."),
        click.option("--rate", default="none", show_default=True,
                     help="Each host's link rate, both directions, in tc notation (1gbit, 10gbit, 100mbit); "
                          "none: unshaped."),
        click.option("--subnet", default=None, help="IPv4 subnet of the hosts (default: a free /24 of 10.77.0.0/16)."),
        _prefix,
        click.option("--mpi-args", default="", help="More Open MPI arguments for horovodrun's --mpi-args, e.g. "
                                                    "'--mca btl_tcp_links 2' (see docs/cluster.md)."),
    ]):
        f = option(f)
    return f


def _fail(exc: C.ClusterError):
    raise click.ClickException(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cluster():
    """Emulated hosts on this machine (network namespaces on a bridge, shaped links). Needs root."""


@cluster.command()
@_layout_options
def up(hosts, slots, rate, subnet, prefix, mpi_args):
    """Bring up emulated hosts and print how to launch across them. They stay until `cluster down`."""
    try:
        c = C.up(hosts, slots, rate, prefix=prefix, subnet=subnet)
    except C.ClusterError as exc:
        _fail(exc)
    click.echo(f"{hosts} emulated hosts up: {', '.join(c.hosts)} ({slots} slots each, links "
               f"{C.format_rate(c.rate)}, subnet {c.layout.subnet}).\n")
    click.echo(_usage(c, mpi_args))
    click.echo(f"\nRemove them with: horovod-dpsgd cluster down --prefix {prefix}")


def _usage(c: C.EmulatedCluster, mpi_args: str = "") -> str:
    env = c.env({})
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items() if k != "PATH")
    return (f"In the shell that launches (the ssh stand-in must come first on PATH):\n"
            f"  export PATH={c.bin_dir}:$PATH {exports}\n"
            f"  {shlex.join(['horovodrun', *c.horovodrun_args(mpi_args=mpi_args)])} python train.py")


@cluster.command()
@click.option("--rate", required=True, help="New rate, tc notation (1gbit, 10gbit, 100mbit); none: unshaped.")
@click.option("--host", "hosts", multiple=True, help="Shape only this host's link (repeatable). Default: all.")
@_prefix
def shape(rate, hosts, prefix):
    """Change the link rate of the emulated hosts (both directions)."""
    try:
        C.shape(rate, prefix=prefix, hosts=hosts or None)
    except C.ClusterError as exc:
        _fail(exc)
    click.echo(f"{', '.join(hosts) or 'all hosts'} of {prefix!r}: {C.format_rate(C.parse_rate(rate))}")


@cluster.command()
@_prefix
def down(prefix):
    """Remove the emulated hosts, and whatever still runs on them, leaving the machine as it was."""
    try:
        removed = C.down(prefix)
    except C.ClusterError as exc:
        _fail(exc)
    click.echo(f"cluster {prefix!r} removed: {', '.join(removed) or 'nothing was left'}")


@cluster.command()
@_prefix
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(prefix, as_json):
    """What the cluster holds now: hosts, links, rates, processes, bytes through each link."""
    try:
        c = C.EmulatedCluster.attach(prefix)
        info = c.status()
    except C.ClusterError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(info, indent=1))
        return
    click.echo(f"cluster {prefix!r}: subnet {info['subnet']}, {info['slots']} slots per host, created "
               f"{info['created']} by process {info['pid']}{'' if info['pid_alive'] else ' (exited)'}")
    for h in info["hosts"]:
        traffic = f", sent {h['sent']} B, received {h['received']} B" if h["present"] else " MISSING"
        click.echo(f"  {h['name']:<12} {h['address']:<15} link {C.format_rate(h['rate'])}, "
                   f"{h['processes']} processes{traffic}")
    click.echo("\n" + _usage(c))


@cluster.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@_layout_options
@click.option("--np", "np_", type=int, default=None, help="Processes (default: hosts x slots).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Stop the command after this many seconds (exit status 124).")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(hosts, slots, rate, subnet, prefix, mpi_args, np_, timeout, command):
    """Bring up hosts, run COMMAND across them, and always tear down (failure and Ctrl-C included).

    COMMAND is launched as `horovodrun -np N -H PREFIX-h1:SLOTS,... <interface options> COMMAND`; a
    COMMAND that starts with horovodrun runs unchanged. Either way it gets the cluster's environment
    (PATH with the ssh stand-in, HOROVOD_DPSGD_CLUSTER=PREFIX).
    """
    try:
        with C.EmulatedCluster(hosts, slots, rate, prefix=prefix, subnet=subnet) as c:
            argv = c.launch_command(command, np=np_, mpi_args=mpi_args)
            click.echo(f"[cluster {prefix}] {shlex.join(argv)}", err=True)
            code = run_command(argv, c.env(), timeout).returncode
    except C.ClusterError as exc:
        _fail(exc)
    except subprocess.TimeoutExpired:
        click.echo(f"[cluster {prefix}] the command did not finish in {timeout:g} s: stopped; hosts removed", err=True)
        sys.exit(124)
    except KeyboardInterrupt:
        click.echo(f"[cluster {prefix}] interrupted: command stopped, hosts removed", err=True)
        sys.exit(130)
    sys.exit(code if code >= 0 else 128 - code)  # killed by signal N: 128 + N, as a shell reports it
