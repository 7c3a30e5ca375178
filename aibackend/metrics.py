"""
Prometheus metrics, through C{prometheus_client}.

Per-model figures live in the model's registry entry (L{ModelStats}) and are read
at scrape time by L{DaemonCollector}: a removed model's series are gone with it, and label
values are only model ids, operations, status classes and fixed reasons, so cardinality is
bounded by the number of models. Each daemon has its own L{CollectorRegistry} (no global
state: tests run several daemons in one process).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from aibackend.batching import REASONS as BATCH_REASONS
from aibackend.batching import SIZE_BUCKETS, WAIT_BUCKETS
from aibackend.interfaces import READY, IBatching, IReplicated, IRestartable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: a cache hit in a millisecond to a long generation in ten minutes.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
           300.0, 600.0)
REFUSAL_REASONS = (
    "body_too_large", "unauthorized", "forbidden", "model_unavailable",
    # refused by the HTTP server before any route (aibackend.server): not HTTP/1.1 as it
    # must be, too slow (headers, body, or not reading the answer), over a connection cap
    "malformed_request", "slow_client", "connection_limit",
    # past a limit of a key or a model (aibackend.ratelimit): 429, never sent to the model
    "rate_limited",
)


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


# status -> its class, made once (a request's count is kept by class).
_STATUS_CLASSES = {status: status_class(status) for status in range(100, 600)}


# How a streamed answer ended (the C{end} label, and the access event's C{stream_end}).
STREAM_ENDS = ("done", "error", "cancelled", "timeout")


class ModelStats:
    """
    A model's request counts and latency histogram, by operation; and its streams' figures
    (once it has streamed): time to the first chunk, chunks, and how streams ended.
    """

    def __init__(self):
        self.requests: Counter = Counter()  # (operation, status class) -> count
        self.buckets: dict[str, list[int]] = {}  # operation -> counts per bucket (+Inf last)
        self.sums: Counter = Counter()  # operation -> total seconds
        self.in_flight = 0  # requests the front door is waiting on
        self.first_chunk_buckets: list[int] | None = None  # None until the model streams
        self.first_chunk_sum = 0.0
        self.stream_chunks = 0  # chunks written to streaming clients (the relay adds each)
        self.stream_ends: Counter = Counter()  # end (STREAM_ENDS) -> streams
        # (fallback, reason) -> requests that went on from this model to that one
        # (aibackend.relay.Chain): labels are model ids of a chain's spec and fixed reasons.
        self.fallbacks: Counter = Counter()
        self.limited: Counter = Counter()  # (scope, limit) -> requests refused (aibackend.ratelimit)

    def observe(self, operation: str, status: int, seconds: float) -> None:
        self.requests[(operation, _STATUS_CLASSES.get(status) or status_class(status))] += 1
        counts = self.buckets.get(operation)
        if counts is None:
            counts = self.buckets[operation] = [0] * (len(BUCKETS) + 1)
        counts[bisect_left(BUCKETS, seconds)] += 1
        self.sums[operation] += seconds

    def stream_began(self) -> None:
        """A stream began: the model's stream series are exported from now on."""
        if self.first_chunk_buckets is None:
            self.first_chunk_buckets = [0] * (len(BUCKETS) + 1)

    def first_chunk(self, seconds: float) -> None:
        """A stream's first chunk came, C{seconds} after its request."""
        self.first_chunk_buckets[bisect_left(BUCKETS, seconds)] += 1
        self.first_chunk_sum += seconds

    def stream_ended(self, end: str) -> None:
        self.stream_ends[end] += 1


class DaemonStats:
    """Figures of the daemon as a whole."""

    def __init__(self):
        self.open_connections = 0
        self.refusals: Counter = Counter()


class DaemonCollector:
    """Reads the registry and the daemon's figures at each scrape."""

    def __init__(self, registry, daemon: DaemonStats):
        self.registry = registry
        self.daemon = daemon

    def collect(self):
        requests = CounterMetricFamily(
            "aibackend_requests", "Requests answered, by model, operation and status class.",
            labels=["model", "operation", "status_class"],
        )
        latency = HistogramMetricFamily(
            "aibackend_request_duration_seconds", "Time to answer a request, by model and operation.",
            labels=["model", "operation"],
        )
        in_flight = GaugeMetricFamily("aibackend_model_in_flight", "Requests a model is working on.", labels=["model"])
        queued = GaugeMetricFamily("aibackend_model_queued", "Requests waiting for a model process.", labels=["model"])
        ready = GaugeMetricFamily("aibackend_model_ready", "1 if the model is ready, else 0.", labels=["model"])
        restarts = CounterMetricFamily(
            "aibackend_model_restarts", "Model process restarts.", labels=["model"]
        )
        processes = GaugeMetricFamily("aibackend_model_processes", "Live model processes.", labels=["model"])
        ejections = CounterMetricFamily(
            "aibackend_model_ejections", "Replica ejections after failures in a row.", labels=["model"]
        )
        first_chunk = HistogramMetricFamily(
            "aibackend_stream_first_chunk_seconds", "Time from a streamed request to its first chunk, by model.",
            labels=["model"],
        )
        chunks = CounterMetricFamily("aibackend_stream_chunks", "Chunks written to streaming clients.",
                                     labels=["model"])
        streams = CounterMetricFamily(
            "aibackend_streams", "Streamed answers by how they ended (done, error, cancelled, timeout).",
            labels=["model", "end"],
        )
        batch_sizes = HistogramMetricFamily(
            "aibackend_batch_size", "Requests per batch sent to a batching model, by model.", labels=["model"],
        )
        batch_waits = HistogramMetricFamily(
            "aibackend_batch_wait_seconds", "Time requests waited to be batched, by model.", labels=["model"],
        )
        batches = CounterMetricFamily(
            "aibackend_batches", "Batches by why they left (full, preferred, delay, deadline), by model.",
            labels=["model", "reason"],
        )
        fallbacks = CounterMetricFamily(
            "aibackend_fallbacks", "Requests that went on from a model that failed to its fallback, by why "
            "(rate_limited, bad_gateway, unavailable, timeout, error, mock_failure).",
            labels=["model", "fallback", "reason"],
        )
        limited = CounterMetricFamily(
            "aibackend_limited", "Requests refused (429) by a limit of their key or model, by model, scope (key, "
            "model) and limit (rpm, tpm, max_concurrent).", labels=["model", "scope", "limit"],
        )
        batching = chains = False
        for entry in self.registry.entries():
            model, model_id, stats = entry.model, entry.model_id, entry.stats
            if IBatching.providedBy(model):
                batching = True
                figures = model.batch_stats
                batch_sizes.add_metric([model_id], _cumulative(figures.sizes, SIZE_BUCKETS), figures.size_sum)
                batch_waits.add_metric([model_id], _cumulative(figures.waits, WAIT_BUCKETS), figures.wait_sum)
                for reason in BATCH_REASONS:
                    batches.add_metric([model_id, reason], figures.reasons[reason])
            for (operation, klass), count in sorted(stats.requests.items()):
                requests.add_metric([model_id, operation, klass], count)
            for operation, counts in sorted(stats.buckets.items()):
                latency.add_metric([model_id, operation], _cumulative(counts), stats.sums[operation])
            if stats.first_chunk_buckets is not None:
                first_chunk.add_metric([model_id], _cumulative(stats.first_chunk_buckets), stats.first_chunk_sum)
                chunks.add_metric([model_id], stats.stream_chunks)
                for end in STREAM_ENDS:
                    streams.add_metric([model_id, end], stats.stream_ends[end])
            if stats.fallbacks:
                chains = True
                for (fallback, reason), count in sorted(stats.fallbacks.items()):
                    fallbacks.add_metric([model_id, fallback, reason], count)
            for (scope, limit), count in sorted(stats.limited.items()):
                limited.add_metric([model_id, scope, limit], count)
            in_flight.add_metric([model_id], model.in_flight)
            queued.add_metric([model_id], model.queued)
            ready.add_metric([model_id], 1 if model.state == READY else 0)
            if IReplicated.providedBy(model):
                ejections.add_metric([model_id], model.ejections)
            if IRestartable.providedBy(model):
                restarts.add_metric([model_id], model.restarts)
                processes.add_metric([model_id], model.live_processes)
        connections = GaugeMetricFamily("aibackend_open_connections", "Client connections open now.")
        connections.add_metric([], self.daemon.open_connections)
        refusals = CounterMetricFamily(
            "aibackend_refusals", "Requests refused before reaching a model, by reason.", labels=["reason"]
        )
        for reason in REFUSAL_REASONS:
            refusals.add_metric([reason], self.daemon.refusals[reason])
        models = GaugeMetricFamily("aibackend_models", "Registered models.")
        models.add_metric([], len(self.registry.models()))
        families = [requests, latency, in_flight, queued, ready, restarts, processes, ejections, connections,
                    refusals, models, first_chunk, chunks, streams]
        if limited.samples:  # once a limit refused a request
            families.append(limited)
        if batching:  # the batching families exist once a model batches
            families += [batch_sizes, batch_waits, batches]
        if chains:  # and the fallbacks' once a request went on to one
            families.append(fallbacks)
        return families


def _bound(value: float) -> str:
    return repr(float(value))


def _cumulative(counts: list[int], buckets: tuple = BUCKETS) -> list:
    """A histogram's C{(le, count)} pairs from its counts per bucket (+Inf last)."""
    cumulative, running = [], 0
    for bound, count in zip((*map(_bound, buckets), "+Inf"), counts):
        running += count
        cumulative.append((bound, running))
    return cumulative


class Metrics:
    """The daemon's metrics: observe requests, render the exposition text."""

    def __init__(self, registry):
        self.daemon = DaemonStats()
        self.collectors = CollectorRegistry(auto_describe=False)
        self.collectors.register(DaemonCollector(registry, self.daemon))

    def observe(self, entry, operation: str, status: int, seconds: float) -> None:
        """Count a request to the model of registry entry C{entry}."""
        entry.stats.observe(operation, status, seconds)

    def stream_ended(self, entry, end: str) -> None:
        """Count a stream of the model of C{entry} that ended (C{end}, one of L{STREAM_ENDS})."""
        entry.stats.stream_ended(end)

    def limited(self, entry, scope: str, limit: str) -> None:
        """A request to the model of C{entry} refused by a limit (C{scope}: key or model; C{limit}: rpm...)."""
        entry.stats.limited[(scope, limit)] += 1
        self.daemon.refusals["rate_limited"] += 1

    def refused(self, reason: str) -> None:
        if reason in REFUSAL_REASONS:
            self.daemon.refusals[reason] += 1

    def render(self) -> bytes:
        return generate_latest(self.collectors)
