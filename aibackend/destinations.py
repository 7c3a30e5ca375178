"""
Where runtime-registered HTTP models may send requests.

A model added at runtime names a URL chosen by whoever called C{addmodel}: without a
check that is server-side request forgery (the cloud metadata service at
169.254.169.254 hands out credentials). L{DestinationPolicy} says which addresses are
allowed; L{GuardedEndpointFactory} applies it to the address a connection is really made
to, after name resolution, so a name that resolves (or is rebound) to a denied address
is denied too. Models of the configuration file are trusted and not checked.

An IPv6 address can carry an IPv4 address that the packets end up at (mapped, compatible,
NAT64, 6to4, Teredo, ISATAP): a denied IPv4 address is denied in each of those forms
(L{embedded_ipv4}). Odd IPv4 spellings (C{0xa9.0xfe.0xa9.0xfe}, C{2852039166},
C{169.254.43518}) are not addresses to L{ipaddress}, so they go through C{getaddrinfo},
which reads them as C{inet_aton} does: what is checked is the dotted address that is
connected to.
"""

from __future__ import annotations

import ipaddress
import socket

from twisted.internet.defer import fail, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, wrapClientTLS
from twisted.internet.threads import deferToThread
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgentEndpointFactory
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

# Link-local (where cloud metadata services live), the metadata addresses by name, and
# "this host" addresses that reach local services in surprising ways.
DEFAULT_DENIED = (
    "169.254.0.0/16",
    "fe80::/10",
    "fd00:ec2::254/128",
    "100.100.100.200/32",
    "0.0.0.0/8",
    "::/128",
)


# IPv6 ranges whose addresses carry an IPv4 address (RFC 4291, 6052, 8215, 3056, 4380, 6145).
_MAPPED = ipaddress.ip_network("::ffff:0:0/96")
_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_COMPATIBLE = ipaddress.ip_network("::/96")
_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_SIX_TO_FOUR = ipaddress.ip_network("2002::/16")
_TEREDO = ipaddress.ip_network("2001::/32")


def _v4(value: int) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(value & 0xFFFFFFFF)


def _nat64_local(value: int) -> list:
    """
    The IPv4 addresses that an address of C{64:ff9b:1::/48} may carry: the network-specific
    prefix in it may be 48, 56, 64 or 96 bits long (RFC 6052, section 2.2), so each length
    whose format the address fits (the "u" octet, bits 64 to 71, and the bits after the
    IPv4 address zero) is read, but for an all-zero reading (no address there).
    """
    found = [_v4(value)] if value & 0xFFFFFFFF else []
    if (value >> 56) & 0xFF == 0:
        without_u = ((value >> 64) << 56) | (value & ((1 << 56) - 1))  # 120 bits
        for length in (48, 56, 64):
            suffix_bits = 120 - length - 32
            if without_u & ((1 << suffix_bits) - 1) == 0:
                address = (without_u >> suffix_bits) & 0xFFFFFFFF
                if address:
                    found.append(_v4(address))
    return found


def embedded_ipv4(ip) -> list:
    """
    The IPv4 addresses an IPv6 address carries, that packets to it may end up at: mapped
    (C{::ffff:a.b.c.d}), translated (C{::ffff:0:a.b.c.d}), compatible (C{::a.b.c.d}, but for
    C{::} and C{::1}), NAT64 (C{64:ff9b::/96}, and C{64:ff9b:1::/48} with each prefix length
    RFC 6052 allows within it), 6to4 (C{2002:AABB:CCDD::}), Teredo (the server and the
    client, whose bits are inverted) and ISATAP (an interface identifier C{0:5efe:a.b.c.d}).
    """
    if ip.version != 6:
        return []
    value = int(ip)
    found = []
    if ip in _MAPPED or ip in _TRANSLATED or ip in _NAT64_WELL_KNOWN:
        found.append(_v4(value))
    elif ip in _COMPATIBLE:
        if value > 1:
            found.append(_v4(value))
    elif ip in _NAT64_LOCAL:
        found.extend(_nat64_local(value))
    elif ip in _SIX_TO_FOUR:
        found.append(_v4(value >> 80))
    elif ip in _TEREDO:
        found.extend(ip.teredo)
    if (value >> 32) & 0xFDFFFFFF == 0x5EFE:  # ISATAP, with any prefix; u/l bit either way
        found.append(_v4(value))
    return found


class DestinationDenied(Exception):
    pass


def _network(text: str):
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        return None


class DestinationPolicy:
    """
    @param allowed: None for the default (everything but L{DEFAULT_DENIED}), or a list of
        host names and addresses/CIDRs: then only those (the denied ranges stay denied
        unless a listed CIDR names them).
    """

    def __init__(self, allowed=None):
        self.denied = [ipaddress.ip_network(text) for text in DEFAULT_DENIED]
        self.allowed_networks = None
        self.allowed_names: frozenset = frozenset()
        if allowed is not None:
            networks, names = [], set()
            for entry in allowed:
                network = _network(entry)
                if network is not None:
                    networks.append(network)
                else:
                    names.add(entry.strip().lower().rstrip("."))
            self.allowed_networks = networks
            self.allowed_names = frozenset(names)

    def allows(self, host: str, address: str) -> bool:
        """
        May a connection for C{host} be made to C{address}? Not if the address, or an
        IPv4 address it carries, is denied, unless a listed CIDR names that very address
        (a listed C{2002::/16} does not re-allow the metadata service in its 6to4 form).
        """
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a connection to the IPv4 address itself
        for form in (ip, *embedded_ipv4(ip)):
            if any(form in network for network in self.denied) and not self._listed(form):
                return False
        if self.allowed_networks is None or self._listed(ip):
            return True
        return host.strip().lower().rstrip(".") in self.allowed_names

    def _listed(self, ip) -> bool:
        return self.allowed_networks is not None and any(ip in network for network in self.allowed_networks)

    def describe(self) -> str:
        if self.allowed_networks is None:
            return "any destination but link-local and cloud metadata addresses"
        return "only " + ", ".join([*map(str, self.allowed_networks), *sorted(self.allowed_names)])


def resolve(host: str, port: int):
    """The addresses C{host} resolves to (in a thread: getaddrinfo blocks)."""
    try:
        ipaddress.ip_address(host)
        return succeed([host])
    except ValueError:
        pass

    def lookup():
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        seen = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6) and sockaddr[0] not in seen:
                seen.append(sockaddr[0])
        return seen

    return deferToThread(lookup)


def check_destination(policy: DestinationPolicy, host: str, port: int):
    """
    @return: a Deferred firing with the first allowed address of C{host}, or failing with
        L{DestinationDenied}.
    """

    def choose(addresses):
        for address in addresses:
            if policy.allows(host, address):
                return address
        shown = ", ".join(addresses) or "nothing"
        raise DestinationDenied(f"{host} resolves to {shown}, which allowed_destinations does not allow")

    return resolve(host, port).addCallback(choose)


@implementer(IStreamClientEndpoint)
class GuardedEndpoint:
    def __init__(self, reactor, policy, scheme: bytes, host: str, port: int, timeout: float, tls_policy):
        self._reactor = reactor
        self._policy = policy
        self._scheme = scheme
        self._host = host
        self._port = port
        self._timeout = timeout
        self._tls_policy = tls_policy

    def connect(self, factory):
        d = check_destination(self._policy, self._host, self._port)

        def connect_to(address):
            kind = TCP6ClientEndpoint if ":" in address else TCP4ClientEndpoint
            endpoint = kind(self._reactor, address, self._port, timeout=self._timeout)
            if self._scheme == b"https":
                creator = self._tls_policy.creatorForNetloc(self._host.encode("idna"), self._port)
                endpoint = wrapClientTLS(creator, endpoint)
            return endpoint.connect(factory)

        return d.addCallback(connect_to)


@implementer(IAgentEndpointFactory)
class GuardedEndpointFactory:
    """An Agent's endpoints that connect only where L{DestinationPolicy} allows."""

    def __init__(self, reactor, policy: DestinationPolicy, connect_timeout: float = 10.0):
        self._reactor = reactor
        self._policy = policy
        self._connect_timeout = connect_timeout
        self._tls_policy = BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri):
        if uri.scheme not in (b"http", b"https"):
            return _Refused(f"scheme {uri.scheme.decode('latin-1')} is not allowed")
        host = uri.host.decode("idna").strip("[]")
        return GuardedEndpoint(
            self._reactor, self._policy, uri.scheme, host, uri.port, self._connect_timeout, self._tls_policy
        )


@implementer(IStreamClientEndpoint)
class _Refused:
    def __init__(self, why):
        self._why = why

    def connect(self, factory):
        return fail(DestinationDenied(self._why))
