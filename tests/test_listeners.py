"""
The C{--processes} listen addresses (L{aibackend.listeners.SharedListener}): a group of
C{SO_REUSEPORT} sockets on one port, one a process, made by the primary; the refusal of a
port another process holds; the queue accepted before a socket closes. Real sockets on
loopback; a MemoryReactor stands for the reactor that adopts them.
"""

from __future__ import annotations

import select
import socket

import pytest
from twisted.internet.interfaces import IReadDescriptor
from twisted.internet.testing import MemoryReactor
from zope.interface import implementer

from aibackend.listeners import SharedListener, StartupError, accept_waiting, claim, reuseport_socket

LOOPBACK = "tcp:0:interface=127.0.0.1"


def _listeners_of(reactor):
    return [fd for fd, _, _ in reactor.adoptedPorts]


def started(description=LOOPBACK, processes=3):
    reactor = MemoryReactor()
    listener = SharedListener.bound(reactor, object(), description, processes)
    listener.privilegedStartService()
    listener.startService()
    return reactor, listener


def test_the_primary_binds_one_socket_a_process_on_one_free_port():
    reactor, listener = started(processes=3)
    try:
        sockets = [listener.socket, listener.socket_for(1), listener.socket_for(2)]
        ports = {sock.getsockname() for sock in sockets}
        assert len(ports) == 1 and ports.pop()[1] != 0
        assert len({sock.fileno() for sock in sockets}) == 3
        for sock in sockets:
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        # Until its workers say they listen, the primary serves their sockets too.
        assert _listeners_of(reactor) == [sock.fileno() for sock in sockets]
    finally:
        listener.stopService()


def test_the_kernel_spreads_connections_over_the_group():
    reactor, listener = started(processes=2)
    sockets = [listener.socket, listener.socket_for(1)]
    accepted = {0: 0, 1: 0}
    try:
        port = listener.socket.getsockname()[1]
        for _ in range(40):
            client = socket.create_connection(("127.0.0.1", port))
            readable, _, _ = select.select(sockets, [], [], 5)
            assert len(readable) == 1, readable
            readable[0].accept()[0].close()
            accepted[sockets.index(readable[0])] += 1
            client.close()
    finally:
        listener.stopService()

    assert sum(accepted.values()) == 40
    assert min(accepted.values()) >= 5, accepted  # 1 in 10^6 for a fair hash


def test_a_worker_socket_is_served_by_the_primary_whenever_its_worker_is_not_there():
    reactor, listener = started(processes=2)
    try:
        assert len(reactor.adoptedPorts) == 2
        listener.handed_over(1)  # its worker listens
        assert 1 not in listener.serving
        assert listener.handed_over(1) is None  # twice: nothing to stop
        listener.taken_back(1)
        assert reactor.adoptedPorts[-1][0] == listener.socket_for(1).fileno()
        assert 1 in listener.serving
        listener.taken_back(1)  # already served
        assert len(reactor.adoptedPorts) == 3
    finally:
        listener.stopService()
    listener.taken_back(1)  # stopped: the socket is closed, nothing to serve
    assert len(reactor.adoptedPorts) == 3


def test_stopping_closes_every_socket_of_the_group():
    reactor, listener = started(processes=3)
    port = listener.socket.getsockname()[1]
    listener.stopService()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2)
    assert listener.worker_sockets == {} and listener.serving == {}


@pytest.mark.parametrize("reuseport", [True, False])
def test_a_port_another_socket_listens_on_is_refused(reuseport):
    other = socket.socket()
    other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    other.bind(("127.0.0.1", 0))
    other.listen(8)
    port = other.getsockname()[1]
    reactor = MemoryReactor()
    listener = SharedListener.bound(reactor, object(), f"tcp:{port}:interface=127.0.0.1", 2)
    try:
        with pytest.raises(StartupError) as caught:
            listener.privilegedStartService()
    finally:
        other.close()

    assert str(caught.value) == f"aibackend: cannot listen on 'tcp:{port}:interface=127.0.0.1': " \
                                "[Errno 98] Address already in use"
    assert reactor.adoptedPorts == []


def test_claim_finds_a_free_port_and_leaves_it_free():
    port = claim(socket.AF_INET, "127.0.0.1", 0)
    first = reuseport_socket(socket.AF_INET, "127.0.0.1", port, 8)
    second = reuseport_socket(socket.AF_INET, "127.0.0.1", port, 8)
    try:
        assert first.getsockname() == second.getsockname() == ("127.0.0.1", port)
        with pytest.raises(OSError):
            claim(socket.AF_INET, "127.0.0.1", port)  # ours now
    finally:
        first.close()
        second.close()


def test_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    reactor, listener = started("tcp6:0:interface=\\:\\:1", processes=2)
    try:
        assert listener.socket.family == listener.socket_for(1).family == socket.AF_INET6
        assert listener.socket.getsockname()[:2] == listener.socket_for(1).getsockname()[:2]
        assert [family for _, family, _ in reactor.adoptedPorts] == [socket.AF_INET6] * 2
    finally:
        listener.stopService()


@implementer(IReadDescriptor)
class _AcceptingPort:
    """A listening port whose doRead accepts one connection (as Twisted's accepts some)."""

    def __init__(self, sock):
        self.sock = sock
        self.accepted = []

    def fileno(self):
        return self.sock.fileno()

    def doRead(self):
        self.accepted.append(self.sock.accept()[0])

    def connectionLost(self, reason):
        pass

    def logPrefix(self):
        return "port"


def test_what_waits_in_the_queue_is_accepted_before_the_socket_closes():
    sock = reuseport_socket(socket.AF_INET, "127.0.0.1", 0, 16)
    port = _AcceptingPort(sock)
    clients = [socket.create_connection(sock.getsockname()) for _ in range(5)]
    try:
        assert accept_waiting(port) == 5
        assert len(port.accepted) == 5
        assert accept_waiting(port) == 0  # nothing more waits
    finally:
        for conn in clients + port.accepted:
            conn.close()
        sock.close()


def test_a_port_that_is_not_a_descriptor_has_nothing_to_accept():
    assert accept_waiting(object()) == 0
