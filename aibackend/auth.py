"""
Who may do what.

Admin operations (C{addmodel}, C{removemodel}, C{cleanlogs}, C{restart}) change what
the daemon runs, so they are guarded, and safe by default:

  - with an admin token (C{--admin-token-file}, or C{AIBACKEND_ADMIN_TOKEN}), a request
    needs C{Authorization: Bearer <token>} (compared in constant time); a token under 16
    characters is refused at start;
  - with none, they are allowed only while the daemon listens on loopback (or a unix
    socket) alone, only from a loopback peer, only with exactly one C{Host}, a loopback
    name or address (C{host[:port]}, read strictly: a DNS-rebinding page has its own
    name there), without a foreign C{Origin} (a page in a browser on the same machine;
    at most one, C{scheme://host[:port]}, and C{null} is foreign) and without the headers
    a reverse proxy adds (C{Forwarded}, C{X-Forwarded-For}, ...): behind a proxy on the
    same machine every peer is loopback, so the rule cannot tell who is calling, and a
    token is required there. Otherwise they are refused (403), and the log says why: at
    start, which rule is in force; once, the first time a request comes through a proxy.

Client keys guard the other operations once any exists (L{aibackend.keys}): the keys kept
in the store (made by C{addkey}), the configured C{api_keys} and, with them, the admin
token. A request that carries one is named by its L{aibackend.policy.Caller}
(C{request.aibackend_caller}): a stored key's name, C{config-1}, C{config-2}... for the
configured keys by position, C{admin} for the admin token. With no key at all, anyone may
call (the daemon's default); once a key exists (a revoked one too), every client needs one.
"""

from __future__ import annotations

import hmac
import ipaddress
import re

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.logger import Logger
from twisted.web.http_headers import Headers

from aibackend.errors import Forbidden, Unauthorized
from aibackend.keys import KeyRing

MIN_TOKEN_LENGTH = 16
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
# What a reverse proxy adds to the requests it passes on (RFC 7239, the de facto X- ones, RFC 9110's Via).
PROXY_HEADERS = (b"forwarded", b"x-forwarded-for", b"x-forwarded-host", b"x-forwarded-proto", b"x-real-ip", b"via")
# host[:port] as a Host header or an Origin has it: a bracketed IPv6 address or a name
# (or IPv4 address) of the characters names have, then an optional numeric port. No
# userinfo (@), path, query or anything else.
_AUTHORITY = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]+))(?::([0-9]{1,5}))?", re.ASCII)
# What str.strip() strips of an ASCII text (as bearer() strips a header's): bytes.strip() strips less.
_ASCII_SPACE = b" \t\n\r\x0b\x0c\x1c\x1d\x1e\x1f"
_ORIGIN = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.+)", re.ASCII | re.DOTALL)


class TokenError(Exception):
    """The admin token cannot be used (one line for the start-up error)."""


def read_admin_token(path: str | None, environ) -> str | None:
    """
    @return: the admin token from C{path} (first line) or C{AIBACKEND_ADMIN_TOKEN}, or None.
    @raise TokenError: unreadable, empty or weak.
    """
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                token = f.readline().strip()
        except OSError as e:
            raise TokenError(f"cannot read the admin token file {path}: {e.strerror or e}") from None
        source = f"the admin token in {path}"
    else:
        token = (environ.get("AIBACKEND_ADMIN_TOKEN") or "").strip()
        if not token:
            return None
        source = "AIBACKEND_ADMIN_TOKEN"
    if len(token) < MIN_TOKEN_LENGTH:
        raise TokenError(f"{source} is too weak: use at least {MIN_TOKEN_LENGTH} characters")
    return token


def host_of(authority: str) -> str | None:
    """
    The host of C{host[:port]} (as a C{Host} header has it), lower-cased, without the
    brackets of an IPv6 address; None unless it is exactly that.
    """
    found = _AUTHORITY.fullmatch(authority.strip(" \t"))
    if found is None:
        return None
    bracketed, name, port = found.groups()
    if port is not None and int(port) > 65535:
        return None
    if bracketed is not None:
        try:
            ipaddress.IPv6Address(bracketed)
        except ValueError:
            return None
        return bracketed.lower()
    return name.lower()


def _is_loopback_name(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def is_loopback_host(host: str) -> bool:
    """
    Is C{host} a loopback one: a loopback name or address, maybe with a port
    (C{host_of}'s strict form), or a bare IPv6 address (as a listen description has it)?
    """
    text = host.strip(" \t").lower()
    if ":" in text and not text.startswith("["):
        try:
            return ipaddress.IPv6Address(text).is_loopback
        except ValueError:
            pass
    name = host_of(text)
    return name is not None and _is_loopback_name(name)


def origin_is_loopback(origin: str) -> bool:
    """Is an C{Origin} exactly C{scheme://host[:port]} with a loopback host? (C{null} is not.)"""
    found = _ORIGIN.fullmatch(origin.strip(" \t"))
    if found is None:
        return False
    name = host_of(found.group(2))
    return name is not None and _is_loopback_name(name)


# PROXY_HEADERS as Headers.getAllRawHeaders names them (its canonical capitalization).
_PROXY_NAMES = frozenset(name for name, _ in Headers({name: [b""] for name in PROXY_HEADERS}).getAllRawHeaders())


def proxy_headers(request) -> list[str]:
    """The reverse-proxy headers the request carries (their names), if any."""
    headers = request.requestHeaders
    return [name.decode("ascii") for name in PROXY_HEADERS if headers.hasHeader(name)]


def endpoint_is_local(description: str) -> bool:
    """
    Does a server endpoint description listen on loopback or a unix socket only?
    (C{tcp:8080} without C{interface=} listens on every address.)
    """
    # Twisted's endpoint strings escape a colon inside a value as "\:" (tcp6:8080:interface=\:\:1).
    parts = [part.replace("\\:", ":") for part in re.split(r"(?<!\\):", description)]
    kind = parts[0].strip().lower()
    if kind == "unix":
        return True
    if kind not in ("tcp", "tcp6", "ssl"):
        return False
    for part in parts[1:]:
        if part.startswith("interface="):
            return is_loopback_host(part[len("interface="):])
    return False


def bearer(request) -> str | None:
    header = request.getHeader(b"authorization")
    if not header:
        return None
    scheme, _, value = header.decode("latin-1").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def _peer_is_local(request) -> bool:
    peer = request.getClientAddress()
    if isinstance(peer, UNIXAddress):
        return True
    if isinstance(peer, (IPv4Address, IPv6Address)):
        return is_loopback_host(peer.host.split("%")[0])
    return False


class Guard:
    """
    Decides admin and client access.

    @param admin_token: the token, or None.
    @param listen: the daemon's listen descriptions (for the no-token rule).
    @param api_keys: the configured client keys for the non-admin operations.
    @param keys: the L{KeyRing} (by default one of C{api_keys} and the admin token; the
        daemon's L{aibackend.keys.KeyManager} adds the stored keys to it).
    """

    log = Logger()

    def __init__(self, admin_token: str | None, listen, api_keys=(), *, internal_token: str | None = None,
                 keys: KeyRing | None = None):
        self.admin_token = admin_token
        # With --processes: what a worker process sends when it forwards a request it has
        # already checked. Random for each start; never configured, never logged.
        self.internal_token = internal_token
        self.api_keys = tuple(api_keys)
        self.keys = keys if keys is not None else KeyRing(self.api_keys, admin_token)
        self.local_only = all(endpoint_is_local(description) for description in listen)
        # Whether a request through a proxy is still to be warned about (once): only while
        # the loopback rule is in force.
        self.watching_for_proxies = self.local_only and not admin_token

    def notice_proxy(self, request) -> None:
        """
        Warn (once) when a request comes through a reverse proxy while the loopback rule is
        in force. Cheap: called for every request, it looks at headers only until then.
        """
        if self.watching_for_proxies:
            # One pass over the names the request has (as Headers spells them), not a
            # lookup of each proxy header: a request carries a handful of headers.
            for name, _ in request.requestHeaders.getAllRawHeaders():
                if name in _PROXY_NAMES:
                    self._warn_proxy(proxy_headers(request))
                    return

    def _warn_proxy(self, found) -> None:
        if not self.watching_for_proxies:
            return
        self.watching_for_proxies = False
        self.log.warn(
            "a request came through a reverse proxy (it carries {headers}) and no admin token is set: "
            "behind a proxy every caller looks like loopback, so admin operations would be open to anyone "
            "who can reach the proxy. They are refused on requests that carry proxy headers; a proxy that "
            "adds none is not seen. Set an admin token (--admin-token-file or AIBACKEND_ADMIN_TOKEN) "
            "whenever the daemon is behind a proxy.",
            headers=", ".join(found),
        )

    def startup_note(self) -> str:
        if self.admin_token:
            return "admin operations need the admin token (Authorization: Bearer)"
        if self.local_only:
            return ("admin operations are allowed from loopback only (no admin token is set), never through "
                    "a reverse proxy: behind one, set an admin token")
        return (
            "admin operations are refused: no admin token is set (--admin-token-file or "
            "AIBACKEND_ADMIN_TOKEN) and the daemon listens beyond loopback"
        )

    def forwarded(self, request) -> bool:
        """Did a worker process of this daemon (C{--processes}) forward the request, having checked it?"""
        return self._internal(request)

    def _internal(self, request) -> bool:
        if not self.internal_token:
            return False
        given = bearer(request)
        return given is not None and hmac.compare_digest(given.encode("utf-8"), self.internal_token.encode("utf-8"))

    def check_admin(self, request) -> None:
        """@raise Unauthorized, Forbidden: the request may not do admin operations."""
        if self._internal(request):
            return
        if self.admin_token:
            given = bearer(request)
            if given is None:
                raise Unauthorized(
                    "this is an admin operation: send Authorization: Bearer <admin token>",
                    headers={"WWW-Authenticate": 'Bearer realm="aibackend-admin"'},
                )
            if not hmac.compare_digest(given.encode("utf-8"), self.admin_token.encode("utf-8")):
                raise Unauthorized(
                    "the admin token is wrong", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
                )
            return
        if not self.local_only:
            raise Forbidden(
                "admin operations are disabled: the daemon listens beyond loopback and no admin "
                "token is set (--admin-token-file or AIBACKEND_ADMIN_TOKEN)"
            )
        if not _peer_is_local(request):
            raise Forbidden("without an admin token, admin operations are allowed from loopback only")
        through = proxy_headers(request)
        if through:
            self._warn_proxy(through)
            raise Forbidden(
                f"this request came through a proxy (it carries {', '.join(through)}): without an admin "
                "token the daemon cannot tell who sent it, so admin operations through a proxy need one "
                "(--admin-token-file or AIBACKEND_ADMIN_TOKEN)"
            )
        hosts = request.requestHeaders.getRawHeaders(b"host") or []
        if len(hosts) != 1:
            raise Forbidden(
                "without an admin token, admin operations need exactly one Host header, a loopback one; "
                f"this request has {len(hosts)}"
            )
        host = hosts[0].decode("latin-1")
        name = host_of(host)
        if name is None or not _is_loopback_name(name):
            raise Forbidden(
                f"without an admin token, admin operations need a loopback Host header, not {host!r}"
            )
        origins = request.requestHeaders.getRawHeaders(b"origin") or []
        if len(origins) > 1:
            raise Forbidden("admin operations are not allowed with more than one Origin header")
        if origins and not origin_is_loopback(origins[0].decode("latin-1")):
            raise Forbidden("admin operations are not allowed from a web page of another origin")

    def check_client(self, request) -> None:
        """
        Let a client in, and name it: C{request.aibackend_caller} is the L{Caller} of the
        key it carries. No key needed while none exists (the caller stays None), nor for
        a worker's forwarded request.

        @raise Unauthorized: keys are required and the request has none of them (or a
            revoked or rotated-away one).
        """
        keys = self.keys
        if self.internal_token and self._internal(request):
            # A worker's forwarded request (--processes): its caller let in, admitted and
            # settled by the worker's policy already (aibackend.policy.Policy.admit).
            request.aibackend_forwarded = True
            return
        if not keys.required:
            return
        # bearer(request) and keys.caller(), on the header's bytes (every request's path):
        # no text made of an ASCII secret, as ours and most are.
        given = request.getHeader(b"authorization")
        if given:
            if given.startswith(b"Bearer "):  # (the usual spelling: what partition and lower() find)
                value = given[7:]
            else:
                scheme, _, value = given.partition(b" ")
                if scheme.lower() != b"bearer":
                    value = None
            if value is not None:
                if value.isascii():
                    caller = keys.secret_caller(value.strip(_ASCII_SPACE))
                else:
                    caller = keys.caller(value.decode("latin-1").strip())
                if caller is not None:
                    request.aibackend_caller = caller
                    return
        raise Unauthorized(
            "send a client key: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": 'Bearer realm="aibackend"'},
        )
