"""
Who may do what (L{aibackend.auth}): the admin token, the no-token loopback rule (peer,
C{Host}, C{Origin}), and client keys, with fake requests
(L{twisted.web.test.requesthelper.DummyRequest}) from chosen addresses.
"""

from __future__ import annotations

import pytest
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.test.requesthelper import DummyRequest

from aibackend import auth
from aibackend.auth import Guard, TokenError, endpoint_is_local, is_loopback_host, read_admin_token
from aibackend.errors import Forbidden, Unauthorized

TOKEN = "admin-token-0123456789abcdef"
KEY = "client-key-0123456789"
LOOPBACK = ["tcp:0:interface=127.0.0.1"]


def request_from(peer, *, host: str | None = "127.0.0.1:8080", origin: str | None = None,
                 authorization: str | None = None) -> DummyRequest:
    """A request from C{peer} (an address, or an IPv4 host text) with the given headers."""
    request = DummyRequest([b""])
    if isinstance(peer, str):
        peer = IPv6Address("TCP", peer, 50000) if ":" in peer else IPv4Address("TCP", peer, 50000)
    request.client = peer
    for name, value in (("host", host), ("origin", origin), ("authorization", authorization)):
        if value is not None:
            request.requestHeaders.setRawHeaders(name.encode(), [value.encode("latin-1")])
    return request


# --- the admin token at start -------------------------------------------------------------


def test_no_token_anywhere_is_none():
    assert read_admin_token(None, {}) is None
    assert read_admin_token(None, {"AIBACKEND_ADMIN_TOKEN": "   "}) is None


def test_the_token_is_the_first_line_of_the_file(tmp_path):
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}  \nsecond line ignored\n")

    assert read_admin_token(str(path), {}) == TOKEN


def test_the_file_wins_over_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")

    assert read_admin_token(str(path), {"AIBACKEND_ADMIN_TOKEN": "another-token-0123456789"}) == TOKEN


def test_the_token_may_come_from_the_environment():
    assert read_admin_token(None, {"AIBACKEND_ADMIN_TOKEN": TOKEN + "\n"}) == TOKEN


@pytest.mark.parametrize("weak", ["short", "x" * 15])
def test_a_weak_token_in_a_file_is_refused(tmp_path, weak):
    path = tmp_path / "token"
    path.write_text(weak + "\n")

    with pytest.raises(TokenError) as caught:
        read_admin_token(str(path), {})

    message = str(caught.value)
    assert "\n" not in message
    assert str(path) in message and "too weak" in message and "16" in message
    assert weak not in message.replace(str(path), "")


def test_a_weak_token_in_the_environment_is_refused():
    with pytest.raises(TokenError) as caught:
        read_admin_token(None, {"AIBACKEND_ADMIN_TOKEN": "tooshort"})

    assert "AIBACKEND_ADMIN_TOKEN" in str(caught.value) and "too weak" in str(caught.value)


def test_sixteen_characters_are_enough():
    assert read_admin_token(None, {"AIBACKEND_ADMIN_TOKEN": "x" * 16}) == "x" * 16


def test_an_empty_token_file_is_refused(tmp_path):
    path = tmp_path / "token"
    path.write_text("\n")

    with pytest.raises(TokenError):
        read_admin_token(str(path), {})


def test_a_missing_token_file_is_one_clear_line(tmp_path):
    path = tmp_path / "nowhere"

    with pytest.raises(TokenError) as caught:
        read_admin_token(str(path), {"AIBACKEND_ADMIN_TOKEN": TOKEN})

    assert str(caught.value) == f"cannot read the admin token file {path}: No such file or directory"


# --- what is loopback ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.0.0.1:8080", "127.1.2.3:80", "localhost", "LocalHost:8080", "localhost.localdomain",
     "ip6-localhost", "::1", "[::1]", "[::1]:8080", " localhost "],
)
def test_loopback_hosts(host):
    assert is_loopback_host(host)


@pytest.mark.parametrize(
    "host",
    ["", "evil.example", "evil.example:8080", "localhost.evil.example", "127.0.0.1.evil.example",
     "10.0.0.1", "0.0.0.0", "[::]:8080", "192.168.1.10:8080", "[fe80::1]:80", "localhost:8080:junk"],
)
def test_other_hosts(host):
    assert not is_loopback_host(host)


@pytest.mark.parametrize(
    "description",
    ["tcp:8080:interface=127.0.0.1", "tcp:0:interface=127.0.0.1", "tcp:8080:interface=localhost",
     r"tcp6:8080:interface=\:\:1", "unix:/run/aibackend.sock", "unix:address=/tmp/a.sock",
     "ssl:8443:privateKey=k.pem:certKey=c.pem:interface=127.0.0.1"],
)
def test_endpoints_that_listen_on_loopback_alone(description):
    assert endpoint_is_local(description)


@pytest.mark.parametrize(
    "description",
    ["tcp:8080", "tcp:0:interface=0.0.0.0", r"tcp6:8080:interface=\:\:", "tcp:8080:interface=192.168.1.10",
     "ssl:8443:privateKey=k.pem", "systemd:domain=INET:index=0"],
)
def test_endpoints_that_listen_beyond_loopback(description):
    assert not endpoint_is_local(description)


def test_an_ipv6_loopback_listener_allows_admin_from_ipv6_loopback():
    """Twisted escapes the colons of an address in an endpoint string (interface=\\:\\:1)."""
    Guard(None, [r"tcp6:8080:interface=\:\:1"]).check_admin(request_from("::1", host="[::1]:8080"))


def test_one_public_listener_makes_the_daemon_not_local():
    assert Guard(None, ["tcp:0:interface=127.0.0.1", "unix:/tmp/a.sock"]).local_only
    assert not Guard(None, ["tcp:0:interface=127.0.0.1", "tcp:9000"]).local_only


# --- admin operations with a token -------------------------------------------------------------


def test_with_a_token_a_request_without_it_is_401_with_www_authenticate():
    guard = Guard(TOKEN, LOOPBACK)

    with pytest.raises(Unauthorized) as caught:
        guard.check_admin(request_from("127.0.0.1"))

    assert caught.value.status == 401
    assert caught.value.headers["WWW-Authenticate"].startswith("Bearer ")
    assert TOKEN not in caught.value.message


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer ", f"Basic {TOKEN}", TOKEN, "Bearer wrong-token-0123456789"],
)
def test_with_a_token_a_wrong_one_is_401(authorization):
    guard = Guard(TOKEN, LOOPBACK)

    with pytest.raises(Unauthorized) as caught:
        guard.check_admin(request_from("127.0.0.1", authorization=authorization))

    assert caught.value.status == 401
    assert "WWW-Authenticate" in caught.value.headers
    assert TOKEN not in caught.value.message


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_with_a_token_the_right_one_is_allowed(scheme):
    Guard(TOKEN, LOOPBACK).check_admin(request_from("127.0.0.1", authorization=f"{scheme} {TOKEN}"))


def test_with_a_token_any_peer_host_and_origin_may_use_it():
    """The token is the whole rule: the loopback rules are for when there is none."""
    guard = Guard(TOKEN, ["tcp:8080"])

    guard.check_admin(
        request_from("203.0.113.7", host="aibackend.example:8080", origin="https://console.example",
                     authorization=f"Bearer {TOKEN}")
    )


def test_the_token_is_compared_in_constant_time(monkeypatch):
    compared = []
    real = auth.hmac.compare_digest

    def spy(a, b):
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", spy)
    guard = Guard(TOKEN, LOOPBACK)

    guard.check_admin(request_from("127.0.0.1", authorization=f"Bearer {TOKEN}"))
    with pytest.raises(Unauthorized):
        guard.check_admin(request_from("127.0.0.1", authorization="Bearer nope"))

    assert compared == [(TOKEN.encode(), TOKEN.encode()), (b"nope", TOKEN.encode())]


def test_a_token_that_is_not_ascii_is_401_not_a_crash():
    guard = Guard(TOKEN, LOOPBACK)
    request = request_from("127.0.0.1")
    request.requestHeaders.setRawHeaders(b"authorization", [b"Bearer \xff\xfe" + TOKEN.encode()])

    with pytest.raises(Unauthorized):
        guard.check_admin(request)


# --- admin operations without a token ----------------------------------------------------------


@pytest.mark.parametrize(
    "peer, host",
    [
        ("127.0.0.1", "127.0.0.1:8080"),
        ("127.0.0.1", "localhost:8080"),
        ("127.0.0.1", "localhost"),
        ("127.9.9.9", "127.0.0.1"),
        ("::1", "[::1]:8080"),
        ("::1", "localhost:8080"),
    ],
)
def test_without_a_token_loopback_peers_with_a_loopback_host_are_allowed(peer, host):
    Guard(None, LOOPBACK).check_admin(request_from(peer, host=host))


def test_without_a_token_a_unix_socket_peer_is_allowed():
    guard = Guard(None, ["unix:/tmp/aibackend.sock"])

    guard.check_admin(request_from(UNIXAddress(None), host="localhost"))
    guard.check_admin(request_from(UNIXAddress(b"/tmp/aibackend.sock"), host="localhost"))


def test_without_a_token_a_unix_socket_peer_still_needs_a_loopback_host():
    guard = Guard(None, ["unix:/tmp/aibackend.sock"])

    with pytest.raises(Forbidden):
        guard.check_admin(request_from(UNIXAddress(None), host="evil.example"))


@pytest.mark.parametrize("peer", ["10.0.0.5", "192.168.1.20", "203.0.113.7", "2001:db8::1", "fe80::1"])
def test_without_a_token_other_peers_are_403(peer):
    with pytest.raises(Forbidden) as caught:
        Guard(None, LOOPBACK).check_admin(request_from(peer, host="127.0.0.1:8080"))

    assert caught.value.status == 403
    assert "loopback" in caught.value.message


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "127.0.0.1.evil.example", "", None])
def test_without_a_token_a_foreign_host_header_is_403(host):
    """DNS rebinding: a page of evil.example whose name now points at 127.0.0.1 sends its own Host."""
    with pytest.raises(Forbidden) as caught:
        Guard(None, LOOPBACK).check_admin(request_from("127.0.0.1", host=host))

    assert "Host" in caught.value.message


@pytest.mark.parametrize("origin", ["http://evil.example", "https://evil.example:8443", "null",
                                    "http://127.0.0.1.evil.example"])
def test_without_a_token_a_foreign_origin_is_403(origin):
    with pytest.raises(Forbidden) as caught:
        Guard(None, LOOPBACK).check_admin(request_from("127.0.0.1", host="127.0.0.1:8080", origin=origin))

    assert "origin" in caught.value.message


@pytest.mark.parametrize("origin", ["http://127.0.0.1:8080", "http://localhost:3000", "http://[::1]:8080"])
def test_without_a_token_a_loopback_origin_is_allowed(origin):
    Guard(None, LOOPBACK).check_admin(request_from("127.0.0.1", host="127.0.0.1:8080", origin=origin))


def test_without_a_token_and_listening_beyond_loopback_admin_is_403_even_from_loopback():
    guard = Guard(None, ["tcp:0:interface=0.0.0.0"])

    with pytest.raises(Forbidden) as caught:
        guard.check_admin(request_from("127.0.0.1", host="127.0.0.1:8080"))

    assert "listens beyond loopback" in caught.value.message
    assert "--admin-token-file" in caught.value.message


def test_a_bearer_header_does_not_help_without_a_token():
    with pytest.raises(Forbidden):
        Guard(None, ["tcp:8080"]).check_admin(request_from("127.0.0.1", authorization=f"Bearer {TOKEN}"))


def test_the_startup_note_says_which_rule_is_in_force():
    assert "need the admin token" in Guard(TOKEN, ["tcp:8080"]).startup_note()
    assert "allowed from loopback only" in Guard(None, LOOPBACK).startup_note()
    refused = Guard(None, ["tcp:8080"]).startup_note()
    assert "refused" in refused and "beyond loopback" in refused and "AIBACKEND_ADMIN_TOKEN" in refused


# --- client keys --------------------------------------------------------------------------


def test_without_api_keys_clients_need_nothing():
    Guard(None, LOOPBACK).check_client(request_from("203.0.113.7", host="evil.example"))
    Guard(TOKEN, LOOPBACK).check_client(request_from("203.0.113.7"))


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-key-0123456789", f"Basic {KEY}", KEY, "Bearer "])
def test_with_api_keys_a_request_without_one_is_401(authorization):
    guard = Guard(TOKEN, LOOPBACK, [KEY])

    with pytest.raises(Unauthorized) as caught:
        guard.check_client(request_from("127.0.0.1", authorization=authorization))

    assert caught.value.headers["WWW-Authenticate"].startswith("Bearer")


def test_with_api_keys_each_key_and_the_admin_token_work():
    other = "second-client-key-0123"
    guard = Guard(TOKEN, LOOPBACK, [KEY, other])

    for key in (KEY, other, TOKEN):
        guard.check_client(request_from("203.0.113.7", authorization=f"Bearer {key}"))


def test_a_client_key_is_not_an_admin_token():
    guard = Guard(TOKEN, LOOPBACK, [KEY])

    with pytest.raises(Unauthorized):
        guard.check_admin(request_from("127.0.0.1", authorization=f"Bearer {KEY}"))


# --- hardening (issue 12): every Host and Origin, read strictly; proxies ------------------------


def with_headers(request, name: str, *values: str) -> DummyRequest:
    request.requestHeaders.setRawHeaders(name.encode(), [value.encode("latin-1") for value in values])
    return request


@pytest.mark.parametrize("hosts", [("evil.example", "127.0.0.1"), ("127.0.0.1", "evil.example"),
                                   ("127.0.0.1", "127.0.0.1")])
def test_without_a_token_more_than_one_host_is_403(hosts):
    """Only the last Host was read: evil.example then 127.0.0.1 passed."""
    request = with_headers(request_from("127.0.0.1"), "host", *hosts)

    with pytest.raises(Forbidden) as caught:
        Guard(None, LOOPBACK).check_admin(request)

    assert "exactly one Host" in caught.value.message


@pytest.mark.parametrize(
    "host",
    ["localhost:80@evil.example", "evil.example@localhost", "localhost/evil", "localhost:80/x", "localhost:http",
     "localhost:99999", "localhost:", "::1", "[::1", "[evil.example]", "localhost?x", "localhost#x",
     "user@127.0.0.1", "127.0.0.1:80:80", "[::1]junk", "localhost.", "127.0.0.1\x00"],
)
def test_without_a_token_a_host_that_is_not_exactly_host_and_port_is_403(host):
    with pytest.raises(Forbidden):
        Guard(None, LOOPBACK).check_admin(request_from("127.0.0.1", host=host))


@pytest.mark.parametrize("origins", [("http://evil.example", "http://127.0.0.1:8080"),
                                     ("http://127.0.0.1:8080", "http://evil.example")])
def test_without_a_token_more_than_one_origin_is_403(origins):
    request = with_headers(request_from("127.0.0.1"), "origin", *origins)

    with pytest.raises(Forbidden) as caught:
        Guard(None, LOOPBACK).check_admin(request)

    assert "more than one Origin" in caught.value.message


@pytest.mark.parametrize(
    "origin",
    ["http://localhost:80@evil.example", "http://localhost/path", "http://localhost:8080/", "localhost",
     "http://", "null", "NULL", "http://localhost:8080?x", "file:///etc/passwd", "http://[::1"],
)
def test_without_a_token_an_origin_that_is_not_exactly_scheme_host_and_port_is_foreign(origin):
    with pytest.raises(Forbidden) as caught:
        Guard(None, LOOPBACK).check_admin(request_from("127.0.0.1", host="127.0.0.1:8080", origin=origin))

    assert "origin" in caught.value.message


@pytest.mark.parametrize("header", ["Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto",
                                    "X-Real-IP", "Via"])
def test_without_a_token_a_request_through_a_proxy_is_403(header):
    """Behind a proxy on the same machine the peer is loopback, whoever sent the request."""
    request = with_headers(request_from("127.0.0.1"), header, "203.0.113.7")

    with pytest.raises(Forbidden) as caught:
        Guard(None, LOOPBACK).check_admin(request)

    assert "through a proxy" in caught.value.message and header.lower() in caught.value.message
    assert "AIBACKEND_ADMIN_TOKEN" in caught.value.message


def test_with_a_token_a_request_through_a_proxy_may_use_it():
    request = with_headers(request_from("127.0.0.1", authorization=f"Bearer {TOKEN}"), "X-Forwarded-For", "203.0.113.7")

    Guard(TOKEN, LOOPBACK).check_admin(request)


def proxy_warnings(events):
    return [event for event in events if "reverse proxy" in event.get("log_format", "")]


def test_the_first_request_through_a_proxy_is_warned_about_once():
    from twisted.logger import LogLevel, globalLogPublisher

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        guard = Guard(None, LOOPBACK)
        guard.notice_proxy(request_from("127.0.0.1"))
        assert proxy_warnings(events) == []
        for _ in range(3):
            guard.notice_proxy(with_headers(request_from("127.0.0.1"), "X-Forwarded-For", "203.0.113.7"))
        with pytest.raises(Forbidden):
            guard.check_admin(with_headers(request_from("127.0.0.1"), "Via", "1.1 proxy"))
    finally:
        globalLogPublisher.removeObserver(events.append)

    [warning] = proxy_warnings(events)
    assert warning["log_level"] == LogLevel.warn
    assert warning["headers"] == "x-forwarded-for"
    assert not guard.watching_for_proxies


@pytest.mark.parametrize("guard", [Guard(TOKEN, LOOPBACK), Guard(None, ["tcp:8080"])])
def test_no_proxy_warning_when_the_loopback_rule_is_not_in_force(guard):
    """With a token, or when admin operations are refused anyway, a proxy changes nothing."""
    assert not guard.watching_for_proxies
