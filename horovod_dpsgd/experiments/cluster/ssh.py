"""The ``ssh`` of an emulated cluster: runs a command "on" a host, i.e. inside its network namespace.

``horovod-dpsgd cluster up`` copies this file to ``<cluster dir>/bin/ssh`` and puts that directory first on
``PATH``, so that horovodrun's reachability check and Open MPI's daemon launch (both call ``ssh``) reach the
emulated hosts. For

    ssh [OPTIONS] [USER@]HOST [OPTIONS] [COMMAND ...]

it runs COMMAND (joined by spaces and given to ``/bin/sh -c``, as ssh does) inside HOST's network namespace
and a fresh UTS namespace whose hostname is HOST; without COMMAND it starts a shell there. ssh options are
skipped before *and* after the host name (horovodrun calls ``ssh -o ... HOST -o ConnectTimeout=10 true``).
A host that is not part of the cluster goes to the real ssh, when there is one. Unlike ssh, the command
inherits the caller's environment and working directory.

It runs as a script, with the standard library only, and reads the cluster's ``ssh.json`` (written next to
``bin/``): ``{"cluster": ..., "hosts": {name or address: namespace}, "ip", "unshare", "hostname"}``.
"""

import json
import os
import shutil
import sys
from typing import List, Optional, Sequence, Tuple

#: ssh options that take an argument (OpenSSH 9, ``man ssh``); every other option letter is a flag.
OPTIONS_WITH_ARGUMENT = frozenset("BbcDEeFIiJLlmOoPpQRSWw")


def parse_ssh_args(argv: Sequence[str]) -> Tuple[Optional[str], List[str]]:
    """``(host, command words)`` of an ssh command line; options before and after the host are skipped.

    Like OpenSSH, option letters may be grouped (``-xT``), an option's argument may be attached
    (``-oConnectTimeout=10``) or be the next word (``-o ConnectTimeout=10``), ``--`` ends the options,
    and ``user@`` is dropped from the host.
    """
    host, i, options_ended = None, 0, False
    while i < len(argv):
        word = argv[i]
        if not options_ended and word == "--":
            options_ended, i = True, i + 1
        elif not options_ended and word.startswith("-") and len(word) > 1:
            i += 1
            for position, letter in enumerate(word[1:], start=1):
                if letter in OPTIONS_WITH_ARGUMENT:
                    i += position == len(word) - 1  # the argument is the next word
                    break
        elif host is None:
            host, i = word.rpartition("@")[2], i + 1
        else:
            return host, list(argv[i:])
    return host, []


def namespace_command(config: dict, host: str, command: Sequence[str]) -> List[str]:
    """The argv that runs ``command`` (or a shell) on ``host``, with ``host`` as its hostname."""
    namespace = config["hosts"][host]
    run = 'exec /bin/sh -c "$3"' if command else 'exec "${SHELL:-/bin/sh}"'
    return [config["ip"], "netns", "exec", namespace, config["unshare"], "--uts", "/bin/sh", "-c",
            f'"$1" "$2" && {run}', "sh", config["hostname"], host, " ".join(command)]


def _real_ssh() -> Optional[str]:
    here = os.path.dirname(os.path.realpath(__file__))
    path = os.pathsep.join(d for d in os.environ.get("PATH", "").split(os.pathsep)
                           if d and os.path.realpath(d) != here)
    return shutil.which("ssh", path=path)


def main(argv: Sequence[str]) -> int:
    config_file = os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(__file__))), "ssh.json")
    try:
        with open(config_file) as f:
            config = json.load(f)
    except OSError as exc:
        sys.stderr.write(f"ssh stand-in: cannot read {config_file} ({exc.strerror}): is the emulated cluster "
                         f"still up? Remove {os.path.dirname(os.path.realpath(__file__))} from PATH.\n")
        return 255
    host, command = parse_ssh_args(argv)
    if host in config["hosts"]:
        os.execv(config["ip"], namespace_command(config, host, command))
    real = _real_ssh()
    if real:
        os.execv(real, [real, *argv])
    sys.stderr.write(f"ssh stand-in: {host!r} is not a host of the emulated cluster {config['cluster']!r} "
                     f"(hosts: {', '.join(sorted(config['hosts']))}) and no real ssh is installed.\n")
    return 255


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
