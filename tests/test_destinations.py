"""
Where runtime HTTP models may connect (L{aibackend.destinations}): the policy, the check
after name resolution, and the Agent endpoint factory that applies it to the address a
connection is really made to (over a L{MemoryReactor}: a refused connection is never
even attempted), then an L{HttpModel} on the real reactor against a loopback canary.
"""

from __future__ import annotations

import ipaddress
import json
import socket

import pytest
import pytest_twisted
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import URI

from aibackend.destinations import (
    DestinationDenied,
    DestinationPolicy,
    GuardedEndpointFactory,
    check_destination,
    embedded_ipv4,
)
from aibackend.testing import Daemon, failure_of, has_fired, result_of

METADATA = ["169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "fe80::1", "fe80::1%eth0",
            "0.0.0.0", "::", "::ffff:169.254.169.254", "::ffff:0.0.0.0"]
ORDINARY = ["127.0.0.1", "127.0.0.2", "::1", "10.1.2.3", "192.168.0.10", "8.8.8.8", "2001:4860:4860::8888",
            "::ffff:8.8.8.8"]


# --- the policy -------------------------------------------------------------------------------


@pytest.mark.parametrize("address", METADATA)
def test_by_default_link_local_and_metadata_addresses_are_denied(address):
    assert not DestinationPolicy().allows("whatever.example", address)


@pytest.mark.parametrize("address", ORDINARY)
def test_by_default_everything_else_is_allowed(address):
    assert DestinationPolicy().allows("whatever.example", address)


# The metadata service (169.254.169.254 = a9fe:a9fe) in each IPv6 form that carries an IPv4 address.
METADATA_IN_IPV6 = [
    "::169.254.169.254",  # IPv4-compatible
    "::a9fe:a9fe",
    "::ffff:169.254.169.254",  # mapped
    "::ffff:a9fe:a9fe",
    "::ffff:0:a9fe:a9fe",  # translated (SIIT)
    "64:ff9b::a9fe:a9fe",  # NAT64, the well-known prefix
    "64:ff9b::169.254.169.254",
    "64:ff9b:1::a9fe:a9fe",  # NAT64, the local-use /48, in its /96 form
    "64:ff9b:1:a9fe:a9:fe00::",  # ... in its /48 form (the "u" octet, bits 64-71, is skipped)
    "64:ff9b:1:a9:fe:a9fe::",  # ... /56
    "64:ff9b:1:0:a9:fea9:fe00::",  # ... /64
    "2002:a9fe:a9fe::1",  # 6to4
    "2002:a9fe:a9fe:1234:5678:9abc:def0:1",
    "2001:0:4136:e378:8000:63bf:5601:5601",  # Teredo: the client is the last 32 bits inverted
    "2001:0:a9fe:a9fe:8000:63bf:3fff:fdd2",  # Teredo, with the metadata service as its server
    "fe80::5efe:a9fe:a9fe",  # ISATAP (link-local anyway)
    "2001:db8::5efe:a9fe:a9fe",  # ISATAP under a global prefix
    "2001:db8::200:5efe:a9fe:a9fe",
    "2002:6464:64c8::1",  # 6to4 of 100.100.100.200 (Alibaba's metadata service)
    "64:ff9b::0.0.0.7",  # "this host"
]
# The same forms around ordinary addresses: allowed.
ORDINARY_IN_IPV6 = ["64:ff9b::808:808", "64:ff9b:1::808:808", "64:ff9b:1:808:8:800::", "2002:808:808::1",
                    "2001:0:4136:e378:8000:63bf:3fff:fdd2", "2001:db8::5efe:808:808", "::ffff:0:808:808", "::1"]


@pytest.mark.parametrize("address", METADATA_IN_IPV6)
def test_a_denied_ipv4_address_is_denied_in_every_ipv6_form_that_carries_it(address):
    assert not DestinationPolicy().allows("whatever.example", address)
    # a listed name does not allow it, and neither does a listed CIDR of the IPv6 form
    assert not DestinationPolicy(["whatever.example", "::/0", "2002::/16", "2001::/32", "64:ff9b::/95"]).allows(
        "whatever.example", address)


@pytest.mark.parametrize("address", ORDINARY_IN_IPV6)
def test_ipv6_forms_of_ordinary_ipv4_addresses_are_allowed(address):
    assert DestinationPolicy().allows("whatever.example", address)


@pytest.mark.parametrize(
    "address, carried",
    [("::ffff:1.2.3.4", ["1.2.3.4"]), ("::1.2.3.4", ["1.2.3.4"]), ("::1", []), ("::", []),
     ("64:ff9b::1.2.3.4", ["1.2.3.4"]), ("2002:102:304::", ["1.2.3.4"]), ("2001:db8::1", []),
     ("2001:0:4136:e378:8000:63bf:3fff:fdd2", ["65.54.227.120", "192.0.2.45"]),
     ("64:ff9b:1::102:304", ["1.2.3.4"]), ("64:ff9b:1:102:3:400::", ["1.2.3.4", "2.3.4.0", "3.4.0.0"]),
     ("fe80::200:5efe:1.2.3.4", ["1.2.3.4"]), ("1.2.3.4", [])],
)
def test_the_ipv4_addresses_an_address_carries(address, carried):
    assert [str(ip) for ip in embedded_ipv4(ipaddress.ip_address(address))] == carried


def test_a_denied_address_carried_in_ipv6_is_re_allowed_only_by_a_cidr_that_names_it():
    policy = DestinationPolicy(["169.254.0.0/16", "2002::/16"])

    assert policy.allows("x", "2002:a9fe:a9fe::1")
    assert policy.allows("x", "::ffff:169.254.169.254")
    assert not policy.allows("x", "64:ff9b::a9fe:a9fe")  # not listed itself


def test_an_explicit_list_allows_only_what_it_names():
    policy = DestinationPolicy(["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"])

    for address in ("127.0.0.1", "10.0.0.1", "10.255.255.254", "2001:db8::7", "::ffff:10.1.1.1"):
        assert policy.allows("x", address), address
    for address in ("127.0.0.2", "::1", "8.8.8.8", "11.0.0.1", "192.168.0.1", "169.254.169.254", "2001:db9::1"):
        assert not policy.allows("x", address), address


def test_an_empty_list_allows_nothing():
    policy = DestinationPolicy([])

    for address in ORDINARY:
        assert not policy.allows("localhost", address)


def test_a_listed_cidr_can_re_allow_a_denied_range():
    policy = DestinationPolicy(["169.254.0.0/16"])

    assert policy.allows("x", "169.254.169.254")
    assert policy.allows("x", "::ffff:169.254.169.254")
    assert not policy.allows("x", "fd00:ec2::254")


def test_a_listed_host_name_is_allowed_by_name_but_not_to_a_denied_address():
    policy = DestinationPolicy(["models.internal."])

    assert policy.allows("models.internal", "10.9.8.7")
    assert policy.allows("MODELS.INTERNAL.", "10.9.8.7")
    assert not policy.allows("other.internal", "10.9.8.7")
    # a listed name that resolves (or is rebound) to the metadata service is still denied
    assert not policy.allows("models.internal", "169.254.169.254")
    assert not policy.allows("models.internal", "fd00:ec2::254")


def test_the_policy_describes_itself_for_the_startup_log():
    assert "link-local" in DestinationPolicy().describe()
    assert DestinationPolicy(["127.0.0.1", "models.internal"]).describe() == "only 127.0.0.1/32, models.internal"


# --- the check, after resolution ------------------------------------------------------------------


def test_an_address_is_checked_without_resolving():
    assert result_of(check_destination(DestinationPolicy(), "127.0.0.1", 80)) == "127.0.0.1"
    assert result_of(check_destination(DestinationPolicy(), "::1", 80)) == "::1"
    failure = failure_of(check_destination(DestinationPolicy(), "169.254.169.254", 80), DestinationDenied)
    assert "169.254.169.254" in failure.getErrorMessage()


@pytest_twisted.ensureDeferred
async def test_a_name_is_checked_on_the_address_it_resolves_to():
    assert await check_destination(DestinationPolicy(["127.0.0.1/32"]), "localhost", 80) == "127.0.0.1"

    with pytest.raises(DestinationDenied) as caught:
        await check_destination(DestinationPolicy(["10.0.0.0/8"]), "localhost", 80)

    assert "localhost resolves to" in str(caught.value) and "127.0.0.1" in str(caught.value)


# --- the endpoint factory, over a memory reactor ------------------------------------------------


def connect(policy, url: bytes):
    reactor = MemoryReactorClock()
    endpoint = GuardedEndpointFactory(reactor, policy, connect_timeout=3).endpointForURI(URI.fromBytes(url))
    return reactor, endpoint.connect(Factory.forProtocol(Protocol))


@pytest.mark.parametrize(
    "url",
    [b"http://169.254.169.254/latest/meta-data/", b"http://[fd00:ec2::254]/", b"http://[fe80::1]:8080/",
     b"http://0.0.0.0:8080/", b"http://[::ffff:169.254.169.254]/", b"https://169.254.169.254/",
     b"http://[::169.254.169.254]/", b"http://[64:ff9b::a9fe:a9fe]/", b"http://[64:ff9b:1::a9fe:a9fe]/",
     b"http://[2002:a9fe:a9fe::1]/", b"https://[2001:0:4136:e378:8000:63bf:5601:5601]/",
     b"http://[::ffff:0:a9fe:a9fe]:8080/"],
)
def test_a_denied_address_is_refused_before_any_connection_attempt(url):
    reactor, d = connect(DestinationPolicy(), url)

    failure_of(d, DestinationDenied)
    assert reactor.tcpClients == []


def test_an_address_off_the_list_is_refused_before_any_connection_attempt():
    reactor, d = connect(DestinationPolicy(["127.0.0.1"]), b"http://127.0.0.2:9999/")

    failure_of(d, DestinationDenied)
    assert reactor.tcpClients == []


def test_a_scheme_other_than_http_is_refused():
    reactor, d = connect(DestinationPolicy(), b"ftp://127.0.0.1/x")

    assert "ftp" in failure_of(d, DestinationDenied).getErrorMessage()
    assert reactor.tcpClients == []


@pytest.mark.parametrize("url, host", [(b"http://127.0.0.1:8080/predict", "127.0.0.1"), (b"http://[::1]:8080/", "::1")])
def test_an_allowed_address_is_connected_to_with_the_connect_timeout(url, host):
    reactor, d = connect(DestinationPolicy(), url)

    assert not has_fired(d)
    [(connected_host, port, _, timeout, _)] = reactor.tcpClients
    assert (connected_host, port, timeout) == (host, 8080, 3)


@pytest_twisted.ensureDeferred
async def test_a_name_that_resolves_to_a_denied_address_is_refused_at_connection_time():
    reactor, d = connect(DestinationPolicy(["10.0.0.0/8"]), b"http://localhost:8080/")

    with pytest.raises(DestinationDenied):
        await d

    assert reactor.tcpClients == []


# What getaddrinfo makes of IPv4 spellings that are not dotted quads (inet_aton's reading):
# ipaddress refuses them, so they are resolved, and what is checked is what is connected to.
ODD_SPELLINGS = ["0xa9.0xfe.0xa9.0xfe", "2852039166", "169.254.43518", "0251.0376.0251.0376", "0xa9fea9fe",
                 "169.0xfe.169.254", "\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14"]


@pytest.mark.parametrize("host", ODD_SPELLINGS)
@pytest_twisted.ensureDeferred
async def test_odd_spellings_of_a_denied_address_are_read_as_it_and_denied(host):
    with pytest.raises(DestinationDenied) as caught:
        await check_destination(DestinationPolicy(), host, 80)

    assert "169.254.169.254" in str(caught.value)


@pytest.mark.parametrize("host", ["0x7f.0.0.1", "2130706433", "127.1"])
@pytest_twisted.ensureDeferred
async def test_odd_spellings_of_an_allowed_address_are_connected_to_as_the_dotted_address(host):
    assert await check_destination(DestinationPolicy(["127.0.0.1/32"]), host, 80) == "127.0.0.1"


@pytest_twisted.ensureDeferred
async def test_a_name_that_resolves_to_an_ipv6_form_of_a_denied_address_is_refused_at_connection_time(monkeypatch):
    resolved = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("64:ff9b::a9fe:a9fe", 80, 0, 0)),
                (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("2002:a9fe:a9fe::1", 80, 0, 0))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: resolved)

    reactor, d = connect(DestinationPolicy(), b"http://rebound.example:8080/")
    await resolved_and_tried(reactor, d)

    assert reactor.tcpClients == []
    assert "64:ff9b::a9fe:a9fe, 2002:a9fe:a9fe::1" in failure_of(d, DestinationDenied).getErrorMessage()


async def resolved_and_tried(reactor, d) -> None:
    """Wait (boundedly) until the name was resolved in its thread: the connection refused or tried."""
    from twisted.internet import reactor as real_reactor
    from twisted.internet.task import deferLater

    for _ in range(200):
        if has_fired(d) or reactor.tcpClients:
            return
        await deferLater(real_reactor, 0.01, lambda: None)


@pytest_twisted.ensureDeferred
async def test_a_name_is_connected_to_by_the_address_that_was_checked():
    reactor, d = connect(DestinationPolicy(["127.0.0.1/32"]), b"http://localhost:8080/")
    await resolved_and_tried(reactor, d)

    [(host, port, _, _, _)] = reactor.tcpClients
    assert (host, port) == ("127.0.0.1", 8080)
    assert not has_fired(d)


# --- an HTTP model on the real reactor, against a canary -------------------------------------------


class Canary(Factory):
    """A loopback listener that answers any request with JSON and counts the connections it accepts."""

    def __init__(self):
        self.accepted = 0

    def buildProtocol(self, addr):
        self.accepted += 1
        return _Answer()


class _Answer(Protocol):
    def dataReceived(self, data):
        if b"\r\n\r\n" in data:
            body = json.dumps({"canary": True}).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            self.transport.loseConnection()


@pytest_twisted.async_yield_fixture
async def canary():
    from twisted.internet import reactor

    factory = Canary()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    factory.port = port.getHost().port
    yield factory
    await port.stopListening()


def runtime_model(url: str, policy):
    from twisted.internet import reactor

    from aibackend.config import Table, parse_model
    from aibackend.httpmodel import HttpModel

    problems = []
    spec = parse_model(Table({"id": "runtime", "type": "http", "url": url, "timeout": 5}, "", problems), environ={})
    assert problems == []
    return HttpModel(spec, reactor=reactor, environ={}, destination_policy=policy)


@pytest_twisted.ensureDeferred
async def test_a_runtime_model_whose_name_resolves_to_a_denied_address_is_403_and_connects_nowhere(canary):
    from aibackend.errors import Forbidden
    from aibackend.interfaces import RequestContext

    model = runtime_model(f"http://localhost:{canary.port}/predict", DestinationPolicy(["10.0.0.0/8"]))

    with pytest.raises(Forbidden) as caught:
        await model.send(b"{}", RequestContext(request_id="r1"))

    assert caught.value.status == 403
    assert caught.value.model == "runtime"
    assert "localhost resolves to" in caught.value.message
    assert canary.accepted == 0
    assert model.in_flight == 0


@pytest_twisted.ensureDeferred
async def test_a_runtime_model_reaches_an_allowed_name(canary):
    from aibackend.interfaces import RequestContext

    model = runtime_model(f"http://localhost:{canary.port}/predict", DestinationPolicy(["127.0.0.1/32"]))

    answer = await model.send(b"{}", RequestContext(request_id="r1"))

    assert (answer.status, json.loads(answer.body)) == (200, {"canary": True})
    assert canary.accepted == 1


# --- addmodel in the real daemon -------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    """The real daemon with the default destinations and no admin token (loopback only)."""
    directory = tmp_path_factory.mktemp("destinations")
    config = directory / "aibackend.toml"
    config.write_text("")
    running = Daemon(str(config), state=str(directory / "state"), cwd=str(directory))
    try:
        yield running
    finally:
        running.stop()
    running.assert_no_bug_logged()


ADDMODEL_DENIED = [f"http://[{address}]/latest/meta-data/" for address in METADATA_IN_IPV6] + [
    f"http://{host}/latest/meta-data/" for host in ODD_SPELLINGS] + [
    "http://[::169.254.169.254]:80/", "[64:ff9b::a9fe:a9fe]:80", "https://[2002:a9fe:a9fe::1]/",
    "http://0xA9.0xFE.0xA9.0xFE:8080/",
]


@pytest.mark.timeout(60)
def test_addmodel_refuses_every_spelling_of_the_metadata_service_with_403(daemon):
    for dest in ADDMODEL_DENIED:
        reply = daemon.add({"id": "metadata", "type": "http", "dest": dest})
        error = reply.error(403, "forbidden")
        assert "allowed_destinations" in error["message"], (dest, error)
    assert daemon.status("metadata").status == 404


@pytest.mark.timeout(30)
def test_addmodel_takes_an_ipv6_form_of_an_ordinary_address(daemon):
    # 6to4 of 127.0.0.1: allowed, as 127.0.0.1 is (the model is only registered, never asked).
    reply = daemon.add({"id": "sixtofour", "type": "http", "dest": "http://[2002:7f00:1::1]:9/"})

    assert reply.status == 201, reply
    assert daemon.remove("sixtofour").status == 200
