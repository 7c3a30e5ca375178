"""
Who may do what.

Admin operations (C{addmodel}, C{removemodel}, C{cleanlogs}, C{restart}) change what
the daemon runs, so they are guarded, and safe by default:

  - with an admin token (C{--admin-token-file}, or C{AIBACKEND_ADMIN_TOKEN}), a request
    needs C{Authorization: Bearer <token>} (compared in constant time); a token under 16
    characters is refused at start;
  - with none, they are allowed only while the daemon listens on loopback (or a unix
    socket) alone, only from a loopback peer, only with a C{Host} that is a loopback name
    (a DNS-rebinding page has its own name there) and without a foreign C{Origin} (a
    page in a browser on the same machine). Otherwise they are refused (403), and the
    start-up log says why.

Client keys (C{api_keys}) optionally guard the other operations.
"""

from __future__ import annotations

import hmac
import ipaddress
import re

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from aibackend.errors import Forbidden, Unauthorized

MIN_TOKEN_LENGTH = 16
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")


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


def is_loopback_host(host: str) -> bool:
    """Is C{host} (an address or a name, maybe with a port) a loopback one?"""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    @param api_keys: client keys for the non-admin operations; empty means none needed.
    """

    def __init__(self, admin_token: str | None, listen, api_keys=(), *, internal_token: str | None = None):
        self.admin_token = admin_token
        # With --processes: what a worker process sends when it forwards a request it has
        # already checked. Random for each start; never configured, never logged.
        self.internal_token = internal_token
        self.api_keys = tuple(api_keys)
        self.local_only = all(endpoint_is_local(description) for description in listen)

    def startup_note(self) -> str:
        if self.admin_token:
            return "admin operations need the admin token (Authorization: Bearer)"
        if self.local_only:
            return "admin operations are allowed from loopback only (no admin token is set)"
        return (
            "admin operations are refused: no admin token is set (--admin-token-file or "
            "AIBACKEND_ADMIN_TOKEN) and the daemon listens beyond loopback"
        )

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
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        if not is_loopback_host(host):
            raise Forbidden(
                f"without an admin token, admin operations need a loopback Host header, not {host!r}"
            )
        origin = request.getHeader(b"origin")
        if origin is not None:
            origin_host = origin.decode("latin-1").split("://", 1)[-1].split("/", 1)[0]
            if not is_loopback_host(origin_host):
                raise Forbidden("admin operations are not allowed from a web page of another origin")

    def check_client(self, request) -> None:
        """@raise Unauthorized: C{api_keys} are set and the request has none of them (nor the admin token)."""
        if not self.api_keys or self._internal(request):
            return
        given = bearer(request)
        if given is not None:
            encoded = given.encode("utf-8")
            keys = self.api_keys + ((self.admin_token,) if self.admin_token else ())
            # Compare with every key, always, so the time taken says nothing about which.
            matches = [hmac.compare_digest(encoded, key.encode("utf-8")) for key in keys]
            if any(matches):
                return
        raise Unauthorized(
            "send a client key: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": 'Bearer realm="aibackend"'},
        )

