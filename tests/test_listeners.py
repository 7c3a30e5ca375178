"""
The C{--processes} listen addresses (L{aibackend.listeners.SharedListener}): the primary
listens alone, accepts every connection and serves it or hands it over a worker's link
(a Unix socket pair, C{SCM_RIGHTS}) to whichever process holds the fewest; the worker's
side adopts what it is handed and says when each ends; the refusal of a port another
process holds; the queue served before the socket closes. Real sockets on loopback; a
MemoryReactor (that builds the protocol of each connection adopted) stands for the reactor.
"""

from __future__ import annotations

import os
import socket

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactor, MemoryReactorClock
from twisted.web.resource import Resource

from aibackend.listeners import MAX_ACCEPTS, SharedListener, StartupError, listening_socket
from aibackend.server import AibackendSite

LOOPBACK = "tcp:0:interface=127.0.0.1"


class AdoptingReactor(MemoryReactorClock):
    """
    A MemoryReactor that, as a reactor does, builds each adopted connection's protocol
    (C{channels}) and keeps a copy of its socket (C{held}, closed after the test).
    """

    made: list = []

    def __init__(self):
        super().__init__()
        self.channels = []
        self.held = []
        self.made.append(self)

    def adoptStreamConnection(self, fileDescriptor, addressFamily, factory):
        super().adoptStreamConnection(fileDescriptor, addressFamily, factory)
        self.held.append(socket.socket(fileno=os.dup(fileDescriptor)))
        self.channels.append(factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000 + len(self.channels))))


@pytest.fixture(autouse=True)
def _close_held():
    yield
    while AdoptingReactor.made:
        close_all(AdoptingReactor.made.pop().held)


def site():
    return AibackendSite(Resource(), max_body_bytes=100)


def started(processes=3, description=LOOPBACK, ready=()):
    """A primary's listener, its workers' ends of their links (number -> socket), those in C{ready} handed connections."""
    reactor = AdoptingReactor()
    listener = SharedListener.bound(reactor, site(), description, processes)
    listener.privilegedStartService()
    listener.startService()
    ends = {}
    for number in range(1, processes):
        ends[number] = listener.socket_for(number)
        ends[number].setblocking(False)
    for number in ready:
        listener.handed_over(number)
    return reactor, listener, ends


def port_of(listener):
    return listener.socket.getsockname()[1]


def connect(listener, count: int) -> list[socket.socket]:
    """C{count} clients connected to the listener's port (waiting in its queue)."""
    return [socket.create_connection(("127.0.0.1", port_of(listener)), timeout=5) for _ in range(count)]


def accept(reactor, listener) -> None:
    """The reactor's turn: the listening socket is readable."""
    (acceptor,) = [reader for reader in reactor.readers if reader.fileno() == listener.socket.fileno()]
    acceptor.doRead()


def handed(end: socket.socket) -> list[int]:
    """The families of the connections handed on a worker's end of its link (their descriptors closed)."""
    families = []
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(end, 64, 64)
        except BlockingIOError:
            return families
        if not message:
            return families
        assert len(message) == len(fds) == 1  # one byte, one descriptor a connection
        families += list(message)
        for fd in fds:
            os.close(fd)


def close_all(*groups):
    for group in groups:
        for sock in group:
            sock.close()


def test_the_primary_listens_alone_on_one_socket_without_so_reuseport():
    reactor, listener, ends = started(processes=3)
    try:
        sock = listener.socket
        assert sock.getsockname()[1] != 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        assert [reader.fileno() for reader in reactor.readers if reader.fileno() == sock.fileno()] == [sock.fileno()]
        assert listener.address == f"http://127.0.0.1:{port_of(listener)}"
    finally:
        listener.stopService()
        close_all(ends.values())


def test_a_burst_of_connections_ends_split_within_one():
    reactor, listener, ends = started(processes=3, ready=(1, 2))
    clients = connect(listener, 31)
    try:
        accept(reactor, listener)
        counts = [len(reactor.channels), len(handed(ends[1])), len(handed(ends[2]))]
        assert sum(counts) == 31
        assert max(counts) - min(counts) <= 1, counts
        assert set(handed(ends[1]) + handed(ends[2])) <= {socket.AF_INET}
    finally:
        listener.stopService()
        close_all(clients, ends.values())


def test_each_connection_goes_to_the_process_with_the_fewest_open_and_ties_take_turns():
    reactor, listener, ends = started(processes=2, ready=(1,))
    clients = []
    try:
        clients += connect(listener, 4)
        accept(reactor, listener)
        assert (len(reactor.channels), len(handed(ends[1]))) == (2, 2)

        # Two of the worker's end: the next two are its.
        ends[1].send(b"--")
        (link,) = [reader for reader in reactor.readers if reader.fileno() not in (listener.socket.fileno(),)]
        link.doRead()
        clients += connect(listener, 2)
        accept(reactor, listener)
        assert (len(reactor.channels), len(handed(ends[1]))) == (2, 2)

        # One of the primary's ends (its site says so): the next is the primary's.
        listener.site.connection_lost(reactor.channels[0])
        clients += connect(listener, 1)
        accept(reactor, listener)
        assert (len(reactor.channels), len(handed(ends[1]))) == (3, 0)

        # Now 2 and 2: one each, in turn, whatever the order.
        clients += connect(listener, 2)
        accept(reactor, listener)
        assert (len(reactor.channels), len(handed(ends[1]))) == (4, 1)
    finally:
        listener.stopService()
        close_all(clients, ends.values())


def test_a_worker_is_handed_nothing_before_it_listens_or_after_it_ended():
    reactor, listener, ends = started(processes=2)
    clients = connect(listener, 3)
    try:
        accept(reactor, listener)
        assert (len(reactor.channels), handed(ends[1])) == (3, [])
        listener.handed_over(1)
        listener.handed_over(1)  # twice: once
        listener.taken_back(1)
        clients += connect(listener, 3)
        accept(reactor, listener)
        assert len(reactor.channels) == 6
        listener.taken_back(1)  # twice: nothing more
    finally:
        listener.stopService()
        close_all(clients, ends.values())


def links_read(reactor, listener):
    """The reactor's turn: each link is readable."""
    for reader in list(reactor.readers):
        if reader.fileno() != listener.socket.fileno():
            reader.doRead()


def test_the_connection_a_gone_worker_cannot_take_is_served_here_and_its_link_dropped():
    reactor, listener, ends = started(processes=2, ready=(1,))
    ends[1].close()  # it died (its link closed)
    clients = connect(listener, 4)
    try:
        accept(reactor, listener)
        assert len(reactor.channels) == 4  # none lost
        links_read(reactor, listener)  # the end of its link
        assert listener.links == {}
        assert all(reader.fileno() == listener.socket.fileno() for reader in reactor.readers)
    finally:
        listener.stopService()
        close_all(clients)


def test_what_a_worker_that_ended_never_took_is_served_here_and_what_it_took_is_not():
    reactor, listener, ends = started(processes=2, ready=(1,))
    listener.links[1].open = -10 ** 6  # the worker seems the emptier, always
    clients = connect(listener, 3)
    try:
        accept(reactor, listener)
        assert reactor.channels == []
        message, fds, _, _ = socket.recv_fds(ends[1], 1, 1)  # it took one, and said so
        ends[1].send(b"+")
        links_read(reactor, listener)
        assert len(listener.links[1].unread) == 2
        ends[1].close()  # then died, two in its link
        for fd in fds:
            os.close(fd)
        links_read(reactor, listener)

        assert len(reactor.channels) == 2
        assert listener.links == {}
        for client in clients:  # the one it took is gone with it; the two it never took are open
            client.setblocking(False)
        assert sum(1 for client in clients if _closed(client)) == 1
    finally:
        listener.stopService()
        close_all(clients)


def test_a_worker_ended_is_taken_back_with_what_it_never_took():
    reactor, listener, ends = started(processes=2, ready=(1,))
    clients = connect(listener, 2)
    try:
        accept(reactor, listener)
        assert len(reactor.channels) == 1
        listener.taken_back(1)  # its process ended (before its link's end was read)
        assert len(reactor.channels) == 2 and listener.links == {}
    finally:
        listener.stopService()
        close_all(clients, ends.values())


def _closed(client: socket.socket) -> bool:
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_a_worker_that_shut_its_link_for_reading_is_passed_over():
    # A worker stopping shuts its end for reading first: what the primary sends then fails
    # there, and is served here.
    reactor, listener, ends = started(processes=2, ready=(1,))
    ends[1].shutdown(socket.SHUT_RD)
    clients = connect(listener, 2)
    try:
        accept(reactor, listener)
        assert len(reactor.channels) == 2
    finally:
        listener.stopService()
        close_all(clients, ends.values())


def test_a_worker_whose_link_is_full_is_passed_over_and_keeps_its_link():
    reactor, listener, ends = started(processes=2, ready=(1,))
    link = listener.links[1]
    link.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the least the kernel allows
    link.open = -10 ** 6  # the worker seems the emptier, always
    clients = []
    try:
        for _ in range(8):
            clients += connect(listener, 16)
            accept(reactor, listener)
            if reactor.channels:
                break
        assert reactor.channels, "the link never filled"
        assert listener.links == {1: link}  # still there: the worker is only slow
        assert len(handed(ends[1])) + len(reactor.channels) == len(clients)
    finally:
        listener.stopService()
        close_all(clients, ends.values())


def test_stopping_serves_what_waits_in_the_queue_here_then_closes_the_socket():
    reactor, listener, ends = started(processes=2, ready=(1,))
    port = port_of(listener)
    clients = connect(listener, MAX_ACCEPTS + 6)
    worker_end = ends[1].dup()  # (the primary closes its copy of the worker's end too)
    try:
        listener.stopService()
        assert len(reactor.channels) == MAX_ACCEPTS + 6  # all of them, none handed to a worker about to stop
        worker_end.setblocking(False)
        assert handed(worker_end) == []
        assert reactor.readers == set()
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2)
        assert listener.links == {}
    finally:
        close_all(clients, [worker_end])


def test_on_stop_what_a_worker_was_sent_is_left_to_it():
    reactor, listener, ends = started(processes=2, ready=(1,))
    clients = connect(listener, 4)
    worker_end = ends[1].dup()
    try:
        accept(reactor, listener)
        listener.stopService()
        worker_end.setblocking(False)
        assert len(reactor.channels) == 2 and len(handed(worker_end)) == 2  # (its to serve: it stops after)
    finally:
        close_all(clients, [worker_end])


def test_the_primary_closes_its_copy_of_a_workers_end_once_the_worker_has_it():
    reactor, listener, ends = started(processes=2)
    try:
        listener.spawned(1)
        assert ends[1].fileno() == -1
        again = listener.socket_for(1)  # another worker in its place: a new link
        assert again.fileno() != -1 and list(listener.links) == [1]
        again.close()
    finally:
        listener.stopService()


# --- the worker's side ------------------------------------------------------------------


def worker_side():
    primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reactor = AdoptingReactor()
    listener = SharedListener.adopted(reactor, site(), os.dup(worker_end.fileno()), socket.AF_UNIX, LOOPBACK)
    worker_end.close()
    listener.privilegedStartService()
    listener.startService()
    (inbox,) = reactor.readers
    return reactor, listener, inbox, primary_end


def hand(primary_end, count: int, server) -> list[socket.socket]:
    """Hand C{count} connected sockets on the link (the client ends returned)."""
    clients = []
    for _ in range(count):
        clients.append(socket.create_connection(server.getsockname(), timeout=5))
        conn, _ = server.accept()
        socket.send_fds(primary_end, [bytes([socket.AF_INET])], [conn.fileno()])
        conn.close()
    return clients


def test_a_worker_adopts_what_it_is_handed_and_says_when_each_ends():
    reactor, listener, inbox, primary_end = worker_side()
    server = listening_socket(socket.AF_INET, "127.0.0.1", 0, 16)
    clients = hand(primary_end, 3, server)
    try:
        inbox.doRead()
        assert [family for _, family, _ in reactor.adoptedStreamConnections] == [socket.AF_INET] * 3
        assert len(reactor.channels) == 3
        for channel in reactor.channels[:2]:
            listener.site.connection_lost(channel)
        other = listener.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1))  # not handed (a private port's)
        listener.site.connection_lost(other)
        assert primary_end.recv(100) == b"+++--"  # took three (one read), two ended
    finally:
        listener.stopService()
        close_all(clients, [server, primary_end])


def test_a_stopping_worker_serves_what_was_sent_and_refuses_the_rest():
    reactor, listener, inbox, primary_end = worker_side()
    server = listening_socket(socket.AF_INET, "127.0.0.1", 0, 16)
    clients = hand(primary_end, 2, server)
    try:
        listener.stopService()
        assert len(reactor.channels) == 2  # sent before it stopped: served
        with pytest.raises(BrokenPipeError):  # what comes after fails on the primary's side
            hand(primary_end, 1, server)
    finally:
        close_all(clients, [server, primary_end])


# --- who may share the port -----------------------------------------------------------------


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
    listener = SharedListener.bound(reactor, site(), f"tcp:{port}:interface=127.0.0.1", 2)
    try:
        with pytest.raises(StartupError) as caught:
            listener.privilegedStartService()
    finally:
        other.close()

    assert str(caught.value) == f"aibackend: cannot listen on 'tcp:{port}:interface=127.0.0.1': " \
                                "[Errno 98] Address already in use"
    assert reactor.readers == set()


def test_ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    reactor, listener, ends = started(processes=2, description="tcp6:0:interface=\\:\\:1", ready=(1,))
    clients = [socket.create_connection(("::1", listener.socket.getsockname()[1]), timeout=5) for _ in range(2)]
    try:
        assert listener.socket.family == socket.AF_INET6
        accept(reactor, listener)
        assert [family for _, family, _ in reactor.adoptedStreamConnections] == [socket.AF_INET6]
        assert handed(ends[1]) == [socket.AF_INET6]
        assert listener.address.startswith("http://[::1]:")
    finally:
        listener.stopService()
        close_all(clients, ends.values())


def test_an_accept_that_fails_is_said_once_until_one_succeeds():
    from twisted.logger import globalLogPublisher

    reactor, listener, ends = started(processes=2)
    (acceptor,) = [reader for reader in reactor.readers if reader.fileno() == listener.socket.fileno()]
    said = []
    globalLogPublisher.addObserver(said.append)
    real = listener.socket

    class Full:
        def accept(self):
            raise OSError(24, "Too many open files")

    try:
        acceptor.sock = Full()
        acceptor.doRead()
        acceptor.doRead()
        acceptor.sock = real
        clients = connect(listener, 1)
        acceptor.doRead()  # one accepted: the next failure is said again
        acceptor.sock = Full()
        acceptor.doRead()
    finally:
        globalLogPublisher.removeObserver(said.append)
        acceptor.sock = real
        listener.stopService()
        close_all(ends.values())
    close_all(clients)

    warnings = [event for event in said if "cannot accept" in event.get("log_format", "")]
    assert [event["why"] for event in warnings] == ["Too many open files"] * 2
    assert len(reactor.channels) == 1


# --- a worker and its primary, both sides (review findings of session 20) ----------------------


def primary_and_worker():
    """A primary's listener with worker 1 ready (and seeming the emptier, always), and that worker's listener."""
    reactor, listener, ends = started(processes=2, ready=(1,))
    listener.links[1].open = -10 ** 6
    worker_reactor = AdoptingReactor()
    worker = SharedListener.adopted(worker_reactor, site(), os.dup(ends[1].fileno()), socket.AF_INET, LOOPBACK)
    ends[1].close()
    worker.privilegedStartService()
    worker.startService()
    (inbox,) = worker_reactor.readers
    return reactor, listener, worker_reactor, worker, inbox


def test_a_worker_stopping_says_what_it_took_so_the_primary_does_not_serve_it_too():
    # SIGTERM to a worker with a connection in its link: it takes it on stop, and says so
    # before its link ends (else the primary, at the link's end, served it as well).
    reactor, listener, worker_reactor, worker, inbox = primary_and_worker()
    clients = connect(listener, 1)
    try:
        accept(reactor, listener)
        assert reactor.channels == [] and len(listener.links[1].unread) == 1
        worker.stopService()
        assert len(worker_reactor.channels) == 1  # taken on stop, served there
        links_read(reactor, listener)  # what it said, then the end of its link
        assert listener.links == {}
        assert reactor.channels == []  # not served twice
    finally:
        listener.stopService()
        close_all(clients)


def test_a_connection_cut_off_a_workers_link_is_served_by_the_primary_and_the_answers_stay_aligned():
    # The worker at its file limit: the descriptor of A is dropped by the kernel (MSG_CTRUNC),
    # its byte comes. The worker says so; the primary serves A, and B's answer is B's.
    resource = pytest.importorskip("resource")
    reactor, listener, worker_reactor, worker, inbox = primary_and_worker()
    clients = connect(listener, 1)
    try:
        accept(reactor, listener)  # A, handed
        probe = os.open(os.devnull, os.O_RDONLY)
        os.close(probe)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (probe, hard))  # no descriptor more can be opened
        try:
            inbox.doRead()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert worker_reactor.channels == []
        links_read(reactor, listener)
        link = listener.links[1]
        assert len(reactor.channels) == 1 and not link.unread  # A: served by the primary
        link.open = -10 ** 6
        clients += connect(listener, 1)
        accept(reactor, listener)  # B, handed
        inbox.doRead()
        links_read(reactor, listener)
        assert len(worker_reactor.channels) == 1 and not link.unread  # B: the worker's, the primary's copy closed
        clients[0].setblocking(False)
        assert not _closed(clients[0])  # A is open (served), not closed for B's answer
        worker_reactor.held[0].close()  # the worker ends B
        worker.site.connection_lost(worker_reactor.channels[0])
        links_read(reactor, listener)
        clients[1].setblocking(False)
        assert _closed(clients[1])  # no copy of B left in the primary
    finally:
        worker.stopService()
        listener.stopService()
        close_all(clients)


def test_a_stop_waits_for_what_it_took_from_the_queue_to_end():
    reactor, listener, ends = started(processes=2, ready=(1,))
    clients = connect(listener, 2)
    try:
        stopped = listener.stopService()
        assert len(reactor.channels) == 2
        done = []
        stopped.addCallback(done.append)
        listener.site.connection_lost(reactor.channels[0])
        assert done == []  # one is still being served
        listener.site.connection_lost(reactor.channels[1])
        assert done == [None] and reactor.getDelayedCalls() == []
        assert listener._ended not in listener.site.on_connection_lost
    finally:
        close_all(clients, ends.values())


def test_a_stop_waits_at_most_stop_serve_seconds():
    from aibackend.listeners import STOP_SERVE_SECONDS

    reactor, listener, worker_reactor, worker, inbox = primary_and_worker()
    clients = connect(listener, 1)
    try:
        accept(reactor, listener)
        stopped = worker.stopService()  # a worker: what was on its link, taken on stop
        assert len(worker_reactor.channels) == 1
        done = []
        stopped.addCallback(done.append)
        worker_reactor.advance(STOP_SERVE_SECONDS - 0.01)
        assert done == []
        worker_reactor.advance(0.01)  # its client kept it after the answer: the reactor's shutdown closes it
        assert done == [None] and worker_reactor.getDelayedCalls() == []
        assert worker._ended not in worker.site.on_connection_lost
    finally:
        listener.stopService()
        close_all(clients)


def test_a_stop_with_nothing_taken_is_done_at_once():
    reactor, listener, ends = started(processes=2, ready=(1,))
    try:
        assert listener.stopService() is None
        assert reactor.getDelayedCalls() == []
    finally:
        close_all(ends.values())
