"""
The replicas of an HTTP model: the request goes to the available one with the fewest in
flight; connection failures, resets and 5xx in a row eject one for a time that doubles
with each ejection (up to C{max_eject_seconds}); an active health check (C{health_path}
every C{health_interval}) takes one out while it fails and back once it answers.
"""

from __future__ import annotations

from hyperlink import DecodedURL
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import URI, ResponseFailed

from aibackend.errors import BadGateway, ModelUnavailable

# What counts against a replica: it could not be reached, or it broke the exchange off.
CONNECT_FAILURES = (ierror.ConnectError, ierror.DNSLookupError, ierror.ConnectingCancelledError)
BROKEN = CONNECT_FAILURES + (ResponseFailed, ierror.ConnectionLost, ierror.ConnectionDone)


def uri_bytes(url: DecodedURL) -> bytes:
    """A URL as the ASCII bytes of a request target (IDNA host, percent-encoded path and query)."""
    if ":" not in url.host:
        return url.to_uri().to_text().encode("ascii")
    # hyperlink runs an IPv6 address through IDNA too, which refuses its colons.
    placeholder = "ipv6-address.invalid"
    text = url.replace(host=placeholder).to_uri().to_text()
    return text.replace(placeholder, f"[{url.host}]", 1).encode("ascii")


class ReplicaRefused(BadGateway):
    """A replica could not be connected to: nothing of the request reached it."""


class Replica:
    """One URL of an HTTP model, with what the daemon knows of its health."""

    __slots__ = ("url", "uri", "head", "text", "base_path", "in_flight", "failures", "ejected_until", "ejections", "healthy")

    def __init__(self, text: str):
        self.text = text
        self.url = DecodedURL.from_text(text)
        # The request target, encoded once: each request sends these bytes as they are.
        self.uri = uri_bytes(self.url)
        # What a POST to it starts with, made once: the request line and the Host header.
        target = URI.fromBytes(self.uri)
        default_port = 443 if target.scheme == b"https" else 80
        host = b"[" + target.host + b"]" if b":" in target.host else target.host
        if target.port != default_port:
            host += b":%d" % target.port
        self.head = b"POST " + target.originForm + b" HTTP/1.1\r\nHost: " + host + b"\r\n"
        # What comes before the routes of a server with several (the Open Inference
        # Protocol's /v2/...): the URL's path up to a "v2" segment, or all of it.
        path = tuple(segment for segment in self.url.path if segment)
        self.base_path = path[:path.index("v2")] if "v2" in path else path
        self.in_flight = 0
        self.failures = 0  # in a row
        self.ejected_until = 0.0
        self.ejections = 0
        self.healthy = True  # what the active health check last saw

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now

    def describe(self, now: float) -> dict:
        return {
            "url": self.text,
            "in_flight": self.in_flight,
            "failures_in_a_row": self.failures,
            "ejected_for_s": round(max(self.ejected_until - now, 0.0), 3),
            "ejections": self.ejections,
            "healthy": self.healthy,
        }


class ReplicaSet:
    """
    The replicas of one HTTP model and what is known of their health.

    @param spec: the model's L{aibackend.config.HttpModelSpec} (its URLs and the
        ejection and health check settings).
    @param probe: C{probe(replica)} -> Deferred[bool]: does the replica's server answer?
        (The health check's question; the model asks it with its own client.)
    @ivar replicas: the L{Replica}s, in the order of the model's URLs.
    """

    log = Logger()

    def __init__(self, spec, clock, model_log, probe):
        self.model_id = spec.id
        self.spec = spec
        self._clock = clock
        self.model_log = model_log
        self._probe = probe
        self.replicas = [Replica(text) for text in (spec.urls or (spec.url,))]
        self.several = len(self.replicas) > 1
        self._checking = False
        self._health_timer = None
        self._health_probes: list = []

    @property
    def ejections(self) -> int:
        return sum(replica.ejections for replica in self.replicas)

    def describe(self) -> list:
        now = self._clock.seconds()
        return [replica.describe(now) for replica in self.replicas]

    # --- choosing -------------------------------------------------------------

    def pick(self, tried) -> Replica | None:
        """The available replica with the fewest requests in flight (of those not in C{tried})."""
        now = self._clock.seconds()
        best = None
        for replica in self.replicas:
            if replica not in tried and replica.available(now):
                if best is None or replica.in_flight < best.in_flight:
                    best = replica
        return best

    def none_left(self) -> ModelUnavailable:
        """The 503 of a request no replica may take, with when one is back."""
        now = self._clock.seconds()
        back = [replica.ejected_until - now for replica in self.replicas if replica.ejected_until > now]
        retry_after = max(1, int(min(back)) + 1) if back else max(1, int(self.spec.health_interval or 1))
        return ModelUnavailable(
            f"model {self.model_id!r} has no replica to take the request: every one is ejected or unhealthy",
            model=self.model_id,
            retry_after=retry_after,
        )

    # --- what happened --------------------------------------------------------

    def outcome(self, result, replica: Replica):
        """
        Count what a replica did with a request (a Deferred's callback and errback:
        C{result}, the response and its body or a failure, is given back): connection
        failures, resets and 5xx count against it.
        """
        replica.in_flight -= 1
        if isinstance(result, Failure):
            if result.check(*BROKEN):
                self._failed(replica, result.getErrorMessage())
        elif result[0].code >= 500:
            self._failed(replica, f"status {result[0].code}")
        else:
            replica.failures = 0
        return result

    def _failed(self, replica: Replica, why: str) -> None:
        replica.failures += 1
        if not self.several or replica.failures < self.spec.eject_after:
            return
        seconds = min(self.spec.eject_seconds * 2 ** replica.ejections, self.spec.max_eject_seconds)
        replica.ejected_until = self._clock.seconds() + seconds
        replica.ejections += 1
        replica.failures = 0
        self.model_log.append(
            "warning", "replica ejected", url=replica.text, error=why, seconds=seconds,
        )
        self.log.warn("model {model}: replica {url} ejected for {seconds} s ({why})",
                      model=self.model_id, url=replica.text, seconds=seconds, why=why)

    # --- the active health check ------------------------------------------------

    def start_checks(self) -> None:
        """Check every replica now and each C{health_interval} (if the model has a health check)."""
        if self.spec.health_interval and self.spec.health_path:
            self._checking = True
            self._health_timer = self._clock.callLater(0, self._health_check)

    def stop_checks(self) -> None:
        self._checking = False
        if self._health_timer is not None and self._health_timer.active():
            self._health_timer.cancel()
        self._health_timer = None
        for probe in list(self._health_probes):
            probe.cancel()

    def _health_check(self) -> None:
        """GET health_path on every replica, each interval."""
        self._health_timer = None
        try:
            for replica in self.replicas:
                probe = self._probe(replica)
                self._health_probes.append(probe)
                probe.addBoth(self._health_seen, replica, probe)
        except Exception:
            self.log.failure("model {model}: the health check failed to run", model=self.model_id)
        if self._checking:
            self._health_timer = self._clock.callLater(self.spec.health_interval, self._health_check)

    def _health_seen(self, result, replica: Replica, probe) -> None:
        if probe in self._health_probes:
            self._health_probes.remove(probe)
        if isinstance(result, Failure) and result.check(CancelledError):
            return
        healthy = result is True
        if healthy != replica.healthy:
            replica.healthy = healthy
            if healthy:
                replica.ejected_until = 0.0
                replica.failures = 0
            self.model_log.append(
                "info" if healthy else "warning",
                "replica restored" if healthy else "replica ejected",
                url=replica.text,
                error=None if healthy else "the health check failed",
            )
