"""
The configuration of an HTTP model (L{HttpModelSpec}), each key declared once
(L{aibackend.configbase}), and its parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping

from aibackend.configbase import (
    DEFAULT_TIMEOUT,
    BatchingSpec,
    MODEL_FIELDS,
    REQUIRED,
    Table,
    ModelSpec,
    check_env_map,
    check_http_url,
    custom,
    env_references,
    integer,
    number,
    read_batching,
    read_settings,
    string,
    string_map,
    type_name,
)
from aibackend.subprocspec import ProcessSettings, parse_process

SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"})
HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")

# What the README's reference says after the table of HTTP model keys.
REFERENCE_NOTES = """\
With replicas, a request whose connection was refused (nothing of it was sent) is tried on
another available replica; one that may have reached a replica (a reset, a timeout, a 5xx)
is never sent twice: a POST to a model may not be idempotent. Every replica refusing is a
502; every replica ejected or unhealthy is a 503 with `Retry-After`. A model with a single
URL is never ejected: its errors reach the client as they are.

The daemon always POSTs (as the original design chose) with `Content-Type: application/json`,
`X-Request-Id` and the configured headers, over persistent connections (each model keeps up
to 64 idle ones per server, each closed after 120 s unused). Redirects are never followed (a 3xx answer is a 502): a model cannot send the
daemon somewhere no one configured. Cookies are never kept between requests."""


def _check_batch_url(table: Table, key: str, value: str, environ) -> str:
    if value.startswith("/"):
        if "?" in value or "#" in value:
            table.problem(key, f"must be a path without a query or fragment, got {value!r}")
        return value
    checked, problem = check_http_url(value)
    if problem:
        table.problem(key, f"must be a path ('/predict_batch', on each of the model's servers) or an "
                           f"http(s) URL: {problem}")
        return value
    return checked


@dataclass(frozen=True, kw_only=True)
class HttpBatchingSpec(BatchingSpec):
    """An HTTP model's C{[models.batching]}: the batcher's keys, and where a batch is POSTed."""

    url: str = string(
        REQUIRED, check=_check_batch_url,
        doc="where a batch is POSTed: a path (`/predict_batch`: on the model's server, each replica's with "
            "`urls`) or a whole URL (a model with one `url` only)",
    )


def secret_header(name: str, value: str) -> bool:
    """A header shown masked: it names an environment variable, or it carries credentials."""
    return bool(env_references(value)) or name.lower() in SECRET_HEADERS


def _check_headers(table: Table, key: str, value: Mapping[str, str], environ) -> Mapping[str, str]:
    for header, text in value.items():
        if not HEADER_NAME.match(header):
            table.problem(f"{key}.{header}", "is not a valid HTTP header name")
        if "\r" in text or "\n" in text:
            table.problem(f"{key}.{header}", "must not hold a line break")
    return check_env_map(table, key, value, environ)


def _check_health_path(table: Table, key: str, value: str, environ) -> str:
    if not value.startswith("/"):
        table.problem(key, f"must start with '/', got {value!r}")
    return value


@dataclass(frozen=True)
class HttpModelSpec(ModelSpec):
    """
    An HTTP model server: the daemon POSTs each request's JSON body to C{url}.

    C{urls} holds every URL (replica) requests go to, C{url} among them; a spec made with
    C{url} only has C{urls == (url,)}.
    """

    url: str = custom(
        "", required=True, aliases=("dest",),
        doc="where requests are POSTed. `dest` may omit the scheme (`127.0.0.1:8888` means "
            "`http://127.0.0.1:8888`). Credentials in URLs are refused: use `headers`.",
    )
    timeout: float = number(
        DEFAULT_TIMEOUT, minimum=0, exclusive_minimum=True, maximum=86400,
        doc="seconds for the whole exchange, answer body included (504 past it; the request is abandoned and "
            "its connection closed)",
    )
    connect_timeout: float = number(10.0, minimum=0, exclusive_minimum=True, maximum=3600, doc="seconds to connect")
    headers: Mapping[str, str] = string_map(
        check=_check_headers, secret=secret_header,
        doc="extra request headers; values may hold `${ENV_VAR}`, so API keys stay out of files "
            "(`Authorization = \"Bearer ${OPENAI_API_KEY}\"`). Such values are masked wherever the daemon shows "
            "a spec.",
    )
    max_response_bytes: int = integer(64 * 1024 * 1024, minimum=1, doc="a larger answer is cut off with 502")
    max_concurrency: int = integer(0, minimum=0, maximum=100_000, shown="`0` (no limit)",
                                   doc="requests in flight to the model at once; more wait in a queue")
    max_queue: int = integer(
        100, minimum=0, maximum=1_000_000,
        doc="requests that may wait for a place; past it, 503 with `Retry-After` at once (load shedding, not "
            "counted as a model failure). The `timeout` covers the wait.",
    )
    urls: tuple = custom(
        (), shown="none",
        doc="several replicas instead of one `url`: each request goes to the available replica with the fewest "
            "requests in flight (see below)",
    )
    eject_after: int = integer(
        5, minimum=1, maximum=1000,
        doc="with `urls`: failures in a row (connection refused or reset, 5xx) that eject a replica",
    )
    eject_seconds: float = number(10.0, minimum=0, exclusive_minimum=True, maximum=86400,
                                  doc="how long a first ejection lasts; each further one doubles it")
    max_eject_seconds: float = number(300.0, minimum=0, exclusive_minimum=True, maximum=86400,
                                      doc="the longest ejection")
    health_interval: float | None = number(
        None, minimum=0.1, maximum=86400,
        doc="with `health_path` (and no `command`): GET the health path of every replica this often; a failing "
            "replica is out until it answers 2xx again",
    )
    process: ProcessSettings | None = custom(
        None, key="command", public="flatten",
        doc="a model server the daemon starts and supervises (the process keys below); the model is ready once "
            "its URL answers",
    )
    health_path: str | None = string(
        None, check=_check_health_path, public="if-set",
        doc="with `command`: the path probed for readiness (a 2xx answer; without it, a TCP connection to the "
            "URL's host and port is enough); with `health_interval`: the active health check's path",
    )
    batching: object = custom(
        None, label="`[models.batching]`", shown="none", public="unless-default", show=lambda spec: spec.public(),
        doc="[dynamic batching](#batching): `url` (required: where a batch is POSTed, a path on the model's "
            "server or a whole URL), `max_batch_size` (required), `max_delay_ms` (default `0`) and "
            "`preferred_sizes`",
    )

    def __post_init__(self):
        if self.url and not self.urls:
            object.__setattr__(self, "urls", (self.url,))

    @property
    def destinations(self) -> tuple:
        """The replicas' URLs, and the batches' when it is a whole URL (not a path on them)."""
        batching = self.batching
        if batching is not None and not batching.url.startswith("/"):
            return (*self.urls, batching.url)
        return self.urls


def _read_urls(table: Table) -> list[str]:
    """C{urls} (replicas) or C{url} (or C{dest}): every URL, the first being C{url}."""
    urls: list[str] = []
    if table.has("urls"):
        if table.has("url") or table.has("dest"):
            table.problem("urls", "give either url (or dest) or urls")
            table.pop_alias("url", "dest")
        for index, raw in enumerate(table.string_list("urls", ())):
            checked, problem = check_http_url(raw, default_scheme=True)
            if problem:
                table.problem(f"urls[{index}]", problem)
            elif checked in urls:
                table.problem(f"urls[{index}]", f"{checked} is listed twice")
            else:
                urls.append(checked)
        return urls
    name, raw_url = table.pop_alias("url", "dest")
    if raw_url is REQUIRED:
        table.problem("url", "is required (the model server's URL; 'dest' is accepted too; urls for replicas)")
        return []
    if not isinstance(raw_url, str):
        table.problem(name, f"must be a string, got {type_name(raw_url)}")
        return []
    url, problem = check_http_url(raw_url, default_scheme=(name == "dest"))
    if problem:
        table.problem(name, problem)
        return []
    return [url]


def _read_batching(table: Table, values: dict, urls: list, environ) -> HttpBatchingSpec | None:
    def check(where, spec) -> None:
        if isinstance(spec.url, str) and not spec.url.startswith("/") and len(urls) > 1:
            where.problem("url", "must be a path with urls (replicas): each replica's server is sent its batches")

    return read_batching(table, values, cls=HttpBatchingSpec, environ=environ, check=check)


def parse_http_model(table: Table, common: dict, environ: Mapping[str, str]) -> HttpModelSpec:
    urls = _read_urls(table)
    values = read_settings(table, HttpModelSpec, environ, skip=MODEL_FIELDS, readers={
        "url": lambda values: urls[0] if urls else "",
        "urls": lambda values: tuple(urls),
        "process": lambda values: parse_process(table, environ, required=False, line_protocol=False),
        "batching": lambda values: _read_batching(table, values, urls, environ),
    })
    openai = common["openai"]
    if (openai.api_key is not None or openai.api_key_file is not None) and any(
        name.lower() == "authorization" for name in values["headers"]
    ):
        table.problem("openai.api_key", "the key is sent as the Authorization header: leave that header out")
    if values["health_interval"] is not None and values["health_path"] is None:
        table.problem("health_interval", "needs health_path (the path the active health check GETs)")
    return HttpModelSpec(**common, **values)
