"""
HTTP models: a model server reached over HTTP, local or an external hosted API.

The daemon POSTs the client's JSON body unchanged to the model's URL with
C{Content-Type: application/json}, C{X-Request-Id} and the model's configured headers,
through one daemon-owned persistent connection pool. The whole exchange, body
included, has one deadline on the injected clock; redirects are never followed; the
answer must be JSON, and the model's own status is passed through.
"""

from __future__ import annotations

import json
import os
from http.cookiejar import CookieJar, DefaultCookiePolicy

from hyperlink import DecodedURL
from treq.client import HTTPClient
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.defer import TimeoutError as DeadlineExceeded
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.web.client import Agent, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from zope.interface import implementer

from aibackend import __version__
from aibackend.config import expand_env
from aibackend.errors import ApiError, BadGateway, GatewayTimeout
from aibackend.interfaces import ISender, ModelAnswer
from aibackend.logs import ModelLog

USER_AGENT = f"aibackend/{__version__}".encode()
SNIPPET = 200


class ResponseTooLarge(Exception):
    pass


class _BoundedBody(Protocol):
    """
    Collects a response body up to a limit; past it, or when its Deferred is
    cancelled, the connection is closed instead of read on.
    """

    def __init__(self, limit: int):
        self._limit = limit
        self._chunks: list[bytes] = []
        self._size = 0
        self.finished: Deferred[bytes] = Deferred(self._cancel)

    def _cancel(self, _):
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.finished.called:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._chunks.clear()
            self.finished.errback(ResponseTooLarge(self._limit))
            self.transport.stopProducing()
            return
        self._chunks.append(data)

    def connectionLost(self, reason) -> None:
        if self.finished.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.finished.callback(b"".join(self._chunks))
        else:
            self.finished.errback(reason)


def read_body(response, limit: int) -> Deferred[bytes]:
    """Read C{response}'s body, failing with L{ResponseTooLarge} past C{limit} bytes."""
    if response.length == 0:
        return succeed(b"")
    protocol = _BoundedBody(limit)
    response.deliverBody(protocol)
    return protocol.finished


def _no_cookies() -> CookieJar:
    """A cookie jar that keeps nothing: one client's cookies must never reach another's request."""
    return CookieJar(DefaultCookiePolicy(allowed_domains=[]))


def snippet(body: bytes) -> str:
    text = body[:SNIPPET].decode("utf-8", "replace")
    return repr(text) + (f" ... ({len(body)} bytes)" if len(body) > SNIPPET else "")


@implementer(ISender)
class HttpModel:
    """
    A model served by an HTTP server.

    @param spec: an L{aibackend.config.HttpModelSpec}.
    @param reactor: the reactor (clock and connections).
    @param pool: the daemon's L{HTTPConnectionPool}, shared by every HTTP model.
    @param client: a treq-like client to use instead (tests pass a StubTreq).
    """

    type_name = "http"
    log = Logger()

    def __init__(self, spec, *, reactor, pool=None, environ=None, client=None):
        self.spec = spec
        self.model_id = spec.id
        self.model_log = ModelLog(reactor, spec.log_entries)
        self._clock = reactor
        self._url = DecodedURL.from_text(spec.url)
        if client is None:
            agent = Agent(reactor, connectTimeout=spec.connect_timeout, pool=pool)
            client = HTTPClient(agent, cookiejar=_no_cookies())
        self._client = client
        environ = os.environ if environ is None else environ
        self._headers = {
            b"Content-Type": [b"application/json"],
            b"Accept": [b"application/json"],
            b"User-Agent": [USER_AGENT],
        }
        for name, template in spec.headers.items():
            self._headers[name.encode("ascii")] = [expand_env(template, environ).encode("utf-8")]
        self.in_flight = 0
        self.requests = 0
        self.failures = 0

    @classmethod
    def from_spec(cls, spec, deps):
        return cls(spec, reactor=deps.reactor, pool=deps.pool, environ=deps.environ)

    def describe(self) -> dict:
        return {
            "id": self.model_id,
            "type": self.type_name,
            "state": "ready",
            "url": self.spec.url,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
        }

    def send(self, body: bytes, context) -> Deferred[ModelAnswer]:
        headers = Headers(self._headers)
        headers.setRawHeaders(b"X-Request-Id", [context.request_id.encode("ascii")])
        self.in_flight += 1
        self.requests += 1
        d = self._client.post(self._url, data=body, headers=headers, allow_redirects=False, unbuffered=True)
        d.addCallback(self._read)
        d.addTimeout(self.spec.timeout, self._clock)
        d.addCallbacks(self._answered, self._failed)
        d.addBoth(self._done)
        return d

    def _done(self, result):
        self.in_flight -= 1
        return result

    def _read(self, response):
        d = read_body(response, self.spec.max_response_bytes)
        d.addCallback(lambda body: (response, body))
        return d

    def _answered(self, result) -> ModelAnswer:
        response, body = result
        status = response.code
        if 300 <= status < 400:
            location = response.headers.getRawHeaders(b"location", [b""])[0].decode("latin-1")
            raise BadGateway(
                f"model {self.model_id!r} answered a redirect ({status}) to {location!r}; "
                "redirects are not followed",
                model=self.model_id,
            )
        try:
            json.loads(body)
        except (ValueError, UnicodeDecodeError):
            content_type = response.headers.getRawHeaders(b"content-type", [b"none"])[0].decode("latin-1")
            raise BadGateway(
                f"model {self.model_id!r} answered something that is not JSON "
                f"(status {status}, content-type {content_type}): {snippet(body)}",
                model=self.model_id,
            ) from None
        if status >= 400:
            self.failures += 1
        return ModelAnswer(status=status, body=body)

    def _failed(self, failure):
        if failure.check(ApiError):
            self.failures += 1
            return failure
        if failure.check(CancelledError):
            # The client went away and the request was abandoned: nothing to answer.
            return failure
        self.failures += 1
        model = self.model_id
        if failure.check(DeadlineExceeded):
            raise GatewayTimeout(f"model {model!r} did not answer within {self.spec.timeout:g} s", model=model)
        if failure.check(ierror.TimeoutError):
            raise GatewayTimeout(
                f"cannot connect to model {model!r} at {self.spec.url} within {self.spec.connect_timeout:g} s",
                model=model,
            )
        if failure.check(ResponseTooLarge):
            raise BadGateway(
                f"model {model!r} answered more than max_response_bytes ({self.spec.max_response_bytes} bytes)",
                model=model,
            )
        if failure.check(ierror.ConnectingCancelledError, ierror.ConnectError, ierror.DNSLookupError):
            reason = failure.getErrorMessage()
            if failure.check(ierror.ConnectionRefusedError):
                reason = "connection refused"
            elif failure.check(ierror.DNSLookupError):
                reason = "host name not found"
            raise BadGateway(f"cannot connect to model {model!r} at {self.spec.url}: {reason}", model=model)
        if failure.check(ResponseFailed, ierror.ConnectionLost, ierror.ConnectionDone):
            raise BadGateway(f"model {model!r} closed the connection before answering in full", model=model)
        self.log.failure("model {model} failed in an unexpected way", failure, model=model)
        raise BadGateway(f"model {model!r} failed: {failure.getErrorMessage()}", model=model)
