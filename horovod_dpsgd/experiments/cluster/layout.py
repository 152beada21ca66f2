"""Names, addresses and link rates of an emulated cluster: pure data, no system calls."""

import ipaddress
import re
from dataclasses import dataclass, replace
from typing import List, Optional

from horovod_dpsgd.errors import DPSGDError

DEFAULT_PREFIX = "dpsgd"
#: The interface of every host (one name common to all hosts: Horovod's interface discovery wants it).
INTERFACE = "veth0"
_PREFIX_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789")
_RATE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?)?(bit|bps)", re.IGNORECASE)
_UNIT = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "g": 10 ** 9, "t": 10 ** 12,
         "ki": 2 ** 10, "mi": 2 ** 20, "gi": 2 ** 30, "ti": 2 ** 40}
_UNSHAPED = ("none", "off", "unshaped", "")


class ClusterError(DPSGDError):
    """An emulated cluster cannot be built, changed or removed as asked."""


class ClusterExistsError(ClusterError):
    """A cluster with this prefix, or something with one of its names, already exists."""


class ClusterUnavailableError(ClusterError):
    """This machine or user cannot emulate hosts: not root, no network namespaces, or a tool missing."""


def parse_rate(rate) -> Optional[int]:
    """A link rate in bits per second from tc's notation (``"1gbit"``, ``"100mbit"``, ``"125mbps"``
    (bytes), ``"1gibit"``), or None for an unshaped link (``None``, ``"none"``, ``"off"``, ``"unshaped"``)."""
    if rate is None or (isinstance(rate, str) and rate.strip().lower() in _UNSHAPED):
        return None
    match = _RATE.fullmatch(str(rate).strip())
    if not match:
        raise ClusterError(f"rate {rate!r} is not a tc rate: write a number and a unit, e.g. 1gbit, 10gbit, "
                           f"100mbit, 500kbit (bits/s) or 125mbps (bytes/s); 'none' for an unshaped link")
    number, unit, kind = match.groups()
    bits = float(number) * _UNIT[(unit or "").lower()] * (8 if kind.lower() == "bps" else 1)
    if not 8_000 <= bits <= 10 ** 12:
        raise ClusterError(f"rate {rate!r} is outside what tbf shapes well here: use 8kbit to 1tbit")
    return int(bits)


def format_rate(bits: Optional[int]) -> str:
    """``1000000000`` -> ``"1gbit"``; None -> ``"unshaped"``."""
    if bits is None:
        return "unshaped"
    for unit, scale in (("tbit", 10 ** 12), ("gbit", 10 ** 9), ("mbit", 10 ** 6), ("kbit", 10 ** 3)):
        if bits >= scale:
            return f"{bits / scale:g}{unit}"
    return f"{bits}bit"


def tbf_args(bits: int) -> List[str]:
    """tc's tbf for ``bits``/s: a bucket of 2 ms of traffic (256 KB at 1 Gbit/s), within 16 KiB-1 MiB."""
    burst = min(max(bits // 8 // 500, 16 * 1024), 1024 * 1024)
    return ["tbf", "rate", f"{bits}bit", "burst", str(burst), "latency", "50ms"]


@dataclass(frozen=True)
class Layout:
    """Names and addresses of a cluster: hosts ``PREFIX-h1``..., links ``PREFIX-v1``..., bridge ``PREFIX-br``."""

    prefix: str
    hosts: int
    slots: int
    subnet: str
    interface: str = INTERFACE

    def __post_init__(self):
        if not (1 <= len(self.prefix) <= 8 and self.prefix[0].isalpha() and set(self.prefix) <= _PREFIX_CHARS):
            raise ClusterError(f"prefix {self.prefix!r}: use 1-8 lower-case letters and digits, "
                                         f"starting with a letter (it names hosts PREFIX-h1, links PREFIX-v1)")
        if not isinstance(self.hosts, int) or self.hosts < 1:
            raise ClusterError(f"hosts={self.hosts!r}: a cluster needs at least 1 host")
        if not isinstance(self.slots, int) or self.slots < 1:
            raise ClusterError(f"slots={self.slots!r}: each host needs at least 1 slot")
        try:
            network = ipaddress.ip_network(self.subnet)
        except ValueError as exc:
            raise ClusterError(f"subnet {self.subnet!r}: {exc}; write e.g. 10.77.0.0/24") from None
        if network.version != 4 or network.num_addresses - 3 < self.hosts:
            raise ClusterError(f"subnet {self.subnet!r} cannot hold {self.hosts} hosts and the "
                                         f"bridge: use an IPv4 subnet of at least {self.hosts + 3} addresses")
        if not (1 <= len(self.interface) <= 15 and set(self.interface) <= _PREFIX_CHARS | set("_-.")):
            raise ClusterError(f"interface {self.interface!r}: 1-15 letters, digits, '_', '-', '.'")

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(self.subnet)

    @property
    def host_names(self) -> List[str]:
        return [f"{self.prefix}-h{i}" for i in range(1, self.hosts + 1)]

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    @property
    def bridge_address(self) -> str:
        return str(self.network.broadcast_address - 1)

    def index(self, host: str) -> int:
        if host not in self.host_names:
            raise ClusterError(f"{host!r} is not a host of cluster {self.prefix!r} "
                                         f"({', '.join(self.host_names)})")
        return self.host_names.index(host) + 1

    def address(self, host: str) -> str:
        return str(self.network.network_address + self.index(host))

    def link(self, host: str) -> str:
        """The root-namespace end of ``host``'s link (its other end is ``interface`` inside the host)."""
        return f"{self.prefix}-v{self.index(host)}"

    def with_subnet(self, subnet: str) -> "Layout":
        return replace(self, subnet=subnet)
