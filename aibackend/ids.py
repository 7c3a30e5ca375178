"""Request ids: the client's C{X-Request-Id} when it is a sane one, else a new one."""

from __future__ import annotations

import re
import os

MAX_REQUEST_ID = 200
_GOOD_ID = re.compile(rb"^[\x21-\x7e]{1,200}$")


def new_request_id() -> str:
    # 128 random bits as 32 hex digits, like uuid4().hex without building a UUID.
    return os.urandom(16).hex()


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
