"""What a URL may reach: the strict parse every hop gets and the
address policy its resolved addresses are checked against.

Public addresses on ports 80 and 443 may be fetched. ``URL_ALLOW_PRIVATE`` adds
every non-public address (loopback, private, link-local, CGNAT, metadata...) on
any port; ``URL_ALLOWLIST`` entries (``host``, ``*.domain`` or a CIDR network) are
fetched on any address and any port. Legacy IPv4 spellings (``127.1``,
``2130706433``, ``0x7f000001``, ``0``) are read as the address they mean, and
IPv6 addresses that carry an IPv4 one (mapped, 6to4, Teredo, NAT64) are judged by it.
"""

import re
import socket
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network

import httpx

IPAddress = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

MAX_URL_LENGTH = 4096
DEFAULT_PORTS = frozenset({80, 443})
_NAME = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*$")  # after IDNA: letters, digits, -, _
_INET_ATON = re.compile(r"^[0-9a-fx.]+$")  # what socket.inet_aton may read as IPv4
# not public, whatever a Python version's is_global says about them
_NEVER_PUBLIC = tuple(
    ip_network(n)
    for n in (
        "0.0.0.0/8",
        "100.64.0.0/10",  # CGNAT; Alibaba Cloud's metadata service is 100.100.100.200
        "169.254.0.0/16",  # link-local; 169.254.169.254 is the usual metadata service
        "192.0.0.0/24",
        "fd00:ec2::254/128",  # AWS metadata over IPv6 (also inside fc00::/7)
        "64:ff9b:1::/48",  # local-use NAT64
    )
)
_NAT64 = ip_network("64:ff9b::/96")


class UrlRefusedError(Exception):
    """Why a URL or hop is not fetched: for the log, never for the client."""


def parse_url(text: str) -> httpx.URL:
    """An absolute http(s) URL without userinfo whose host is a plain name or IP
    literal (lower case, IDNA-encoded, without a trailing dot); else
    ``UrlRefusedError`` saying what is wrong with the text (nothing about the target)."""
    if len(text) > MAX_URL_LENGTH:
        raise UrlRefusedError(f"longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or c == "\\" or not c.isprintable() for c in text):
        raise UrlRefusedError("whitespace, backslash or control character")
    try:
        url = httpx.URL(text)
    except httpx.InvalidURL as e:
        raise UrlRefusedError(f"not a valid URL ({e})") from None
    if url.scheme not in ("http", "https"):
        raise UrlRefusedError(f"scheme {url.scheme or '(none)'!r} is not http or https")
    if url.userinfo or "@" in re.split(r"[/?#]", text.split("//", 1)[-1], maxsplit=1)[0]:
        raise UrlRefusedError("credentials (user@) in a URL are not accepted")
    host = url.raw_host.decode("ascii").lower().removesuffix(".")
    if not host or not (_NAME.match(host) or (":" in host and _ipv6(host))):
        raise UrlRefusedError("the host is not a plain name or IP address")
    if url.port is not None and not 0 < url.port < 65536:
        raise UrlRefusedError("port out of range")
    return url.copy_with(host=host)


def _ipv6(host: str) -> IPv6Address | None:
    if "%" in host:
        return None  # a zone id ("fe80::1%eth0") names an interface: never a public target
    try:
        return IPv6Address(host)
    except ValueError:
        return None


def ip_literal(host: str) -> IPAddress | None:
    """The address ``host`` spells, in any spelling a C resolver accepts for IPv4
    (``127.1``, ``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``0``), else ``None``."""
    if ":" in host:
        return _ipv6(host)
    if _INET_ATON.match(host):
        try:
            return IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def embedded_ipv4(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address an IPv4-mapped, 6to4, Teredo or NAT64 address reaches."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: IPAddress) -> bool:
    """Globally routable unicast, and not a metadata or carrier-internal address."""
    if isinstance(address, IPv6Address) and (embedded := embedded_ipv4(address)) is not None:
        return is_public(embedded)
    if address.is_multicast or address.is_reserved or address.is_unspecified:
        return False
    if address.is_loopback or address.is_link_local or address.is_private:
        return False
    never = (n for n in _NEVER_PUBLIC if n.version == address.version)
    return address.is_global and not any(address in n for n in never)


@dataclass(frozen=True)
class Allowlist:
    """``URL_ALLOWLIST``: exact host names, ``*.domain`` (any name below the
    domain, not the domain itself) and CIDR networks (or single addresses)."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()
    networks: tuple[Network, ...] = ()

    @classmethod
    def parse(cls, entries: tuple[str, ...] | list[str]) -> "Allowlist":
        names, suffixes, networks = set(), [], []
        for entry in entries:
            text = entry.strip().lower().removesuffix(".")
            try:
                networks.append(ip_network(text, strict=False))
                continue
            except ValueError:
                pass
            wildcard = text.startswith("*.")
            try:
                name = text.removeprefix("*.").encode("idna").decode("ascii")
            except UnicodeError:
                name = ""
            if not _NAME.match(name) or ip_literal(name) is not None:
                raise ValueError(f"{entry!r}: expected a host name, *.domain or a CIDR network")
            if wildcard:
                suffixes.append(f".{name}")
            else:
                names.add(name)
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    def allows(self, host: str, address: IPAddress) -> bool:
        if host in self.names or any(host.endswith(s) for s in self.suffixes):
            return True
        return any(address in n for n in self.networks if n.version == address.version)


@dataclass(frozen=True)
class FetchPolicy:
    max_bytes: int
    allow_private: bool = False
    allowlist: Allowlist = field(default_factory=Allowlist)
    ports: frozenset[int] = DEFAULT_PORTS
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    total_timeout_s: float = 20.0

    def refusal(self, host: str, address: IPAddress, port: int) -> str | None:
        """Why ``address:port`` (reached by the name ``host``) is not fetched, or ``None``."""
        if self.allowlist.allows(host, address):
            return None
        if not is_public(address):
            return None if self.allow_private else f"{address} is not a public address"
        return None if port in self.ports else f"port {port} is not allowed"
