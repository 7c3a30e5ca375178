"""Request ids: the client's C{X-Request-Id} when it is a sane one, else a new one."""

from __future__ import annotations

import itertools
import os
import re

MAX_REQUEST_ID = 200
_GOOD_ID = re.compile(rb"^[\x21-\x7e]{1,200}$")


_prefix = os.urandom(8).hex()
_count = itertools.count(1)


def _draw_again() -> None:
    global _prefix, _count
    _prefix, _count = os.urandom(8).hex(), itertools.count(1)


os.register_at_fork(after_in_child=_draw_again)  # a forked process draws its own


def new_request_id() -> str:
    """
    32 hex digits, like C{uuid4().hex}: 64 random bits drawn once per process, then a
    counter, so ids are unique without a system call for each request. Not secret: an id
    is a label for finding a request in the logs.
    """
    return f"{_prefix}{next(_count):016x}"


def request_id_from_headers(headers) -> str:
    """
    @param headers: the request's L{twisted.web.http_headers.Headers}.
    @return: the client's X-Request-Id if it is 1 to 200 printable ASCII characters,
        otherwise a new id.
    """
    given = headers.getRawHeaders(b"x-request-id")
    if given and _GOOD_ID.match(given[0]):
        return given[0].decode("ascii")
    return new_request_id()
