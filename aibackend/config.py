"""
Configuration: TOML in, frozen validated specs out.

Pure on purpose (no Twisted): the daemon's start-up, the C{.tac} file and the runtime
C{addmodel} operation all validate with this one code. Every problem is collected with
its key path (C{models[1].url}) and reported together, so a user fixes a file in one go.

Each key is declared once, on its spec's dataclass field (L{aibackend.configbase}): the
parser, the masked view (C{spec.public()}) and the README's reference
(L{reference_markdown}) read that one declaration. Here: the server's keys
(L{ServerSpec}), the model types (L{register}, L{find_type}), the whole file
(L{parse_config}, L{load_config}). Each built-in model type's spec and parser live beside
it (L{aibackend.httpspec}, L{aibackend.subprocspec}); what they share is in
L{aibackend.configbase}. The names other modules use are all here too.

A model type is a name (with aliases), a parser that turns a C{[[models]]} table into a
frozen spec, and the dotted name of the L{aibackend.interfaces.IModel} class built from
it. L{register} adds one.

C{python -m aibackend.config --reference} prints the README's reference;
C{python -m aibackend.config --reference README.md} rewrites it there.
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from aibackend.configbase import (  # noqa: F401 (the names other modules use, here)
    DEFAULT_LOG_ENTRIES,
    DEFAULT_OPENAI,
    DEFAULT_TIMEOUT,
    DEFAULT_V2,
    ENV_REFERENCE,
    ID_PATTERN,
    MAX_ID_LENGTH,
    MODEL_FIELDS,
    REQUIRED,
    ConfigError,
    ModelSpec,
    Setting,
    OpenAISpec,
    Table,
    V2Spec,
    boolean,
    check_destination_entry,
    check_http_url,
    check_model_id,
    custom,
    env_references,
    expand_env,
    integer,
    number,
    parse_openai,
    parse_v2,
    public_of,
    read_key_file,
    read_limits,
    read_log_entries,
    read_setting,
    read_settings,
    read_fallbacks,
    read_stream_settings,
    reference_rows,
    reference_table,
    settings_of,
    string,
    strings,
    type_name,
)
from aibackend.httpspec import REFERENCE_NOTES as HTTP_NOTES
from aibackend.httpspec import SECRET_HEADERS, HttpModelSpec, parse_http_model  # noqa: F401
from aibackend.subprocspec import (  # noqa: F401
    INHERITED_ENV,
    LINE_ONLY,
    PROTOCOLS,
    PYTHON_NAMES,
    ProcessSettings,
    SubprocessModelSpec,
    parse_process,
    parse_subprocess_model,
    resolve_program,
)

DEFAULT_LISTEN = ("tcp:8080:interface=127.0.0.1",)
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_USAGE_RETENTION_DAYS = 30


# --- model types -----------------------------------------------------------------


@dataclass(frozen=True)
class ModelType:
    """
    A kind of model.

    @ivar name: the canonical type name.
    @ivar aliases: other accepted names (type names are case-insensitive).
    @ivar parse: C{(Table, common fields, environ) -> spec}; reports problems on the table.
    @ivar factory: C{"module:Class"}, an L{aibackend.interfaces.IModel} with C{from_spec(spec, deps)}.
    """

    name: str
    aliases: tuple
    parse: Callable[[Table, dict, Mapping[str, str]], ModelSpec]
    factory: str


MODEL_TYPES: dict[str, ModelType] = {}


def register(model_type: ModelType) -> None:
    """Make a model type known under its name and aliases."""
    for name in (model_type.name, *model_type.aliases):
        MODEL_TYPES[name.lower()] = model_type


def find_type(name: str) -> ModelType | None:
    return MODEL_TYPES.get(name.strip().lower())


register(ModelType("http", ("httpmodel",), parse_http_model, "aibackend.httpmodel:HttpModel"))
register(
    ModelType("subprocess", ("subprocessmodel",), parse_subprocess_model, "aibackend.subprocess:SubprocessModel")
)


def known_type_names() -> str:
    return ", ".join(sorted(MODEL_TYPES))


def parse_model(table: Table, *, default_log_entries: int = DEFAULT_LOG_ENTRIES, environ=None) -> ModelSpec | None:
    """
    Validate one model table (a C{[[models]]} entry, or C{addmodel}'s JSON).

    Problems go to C{table.problems}; the result is None when the type is unusable.
    """
    environ = os.environ if environ is None else environ
    model_id = None
    if not table.has("id"):
        table.problem("id", "is required")
    else:
        _, value = table.pop_alias("id")
        problem = check_model_id(value)
        if problem:
            table.problem("id", problem)
        else:
            model_id = value
    given_type = table.string("type")
    model_type = None
    if isinstance(given_type, str) and given_type.strip():
        model_type = find_type(given_type)
        if model_type is None:
            table.problem("type", f"unknown model type {given_type!r}: use one of {known_type_names()}")
    log_entries = read_log_entries(table, default_log_entries)
    v2 = parse_v2(table.table("v2"), model_type.name if model_type else "") if table.has("v2") else DEFAULT_V2
    openai = (parse_openai(table.table("openai"), model_type.name if model_type else "", environ)
              if table.has("openai") else DEFAULT_OPENAI)
    if model_type is None:
        return None
    common = {"id": model_id or "", "type": model_type.name, "log_entries": log_entries, "v2": v2, "openai": openai,
              "fallbacks": read_fallbacks(table, model_id), "limits": read_limits(table),
              **read_stream_settings(table)}
    spec = model_type.parse(table, common, environ)
    table.finish()
    return spec


# --- the whole file ------------------------------------------------------------


def _check_api_keys(table: Table, key: str, templates: tuple, environ: Mapping[str, str]) -> tuple:
    keys = []
    for index, template in enumerate(templates):
        missing = [name for name in env_references(template) if name not in environ]
        if missing:
            table.problem(f"{key}[{index}]", f"names environment variable {missing[0]} that is not set")
            continue
        value = expand_env(template, environ)
        if len(value) < 16:
            table.problem(f"{key}[{index}]", "is too weak: use at least 16 characters")
        keys.append(value)
    return tuple(keys)


def _check_allowed_commands(table: Table, key: str, paths: tuple, environ) -> tuple:
    for index, path in enumerate(paths):
        if not os.path.isabs(path):
            table.problem(f"{key}[{index}]", f"must be an absolute path, got {path!r}")
    return tuple(os.path.realpath(path) for path in paths)


def _check_destinations(table: Table, key: str, entries: tuple, environ) -> tuple:
    for index, entry in enumerate(entries):
        problem = check_destination_entry(entry)
        if problem:
            table.problem(f"{key}[{index}]", problem)
    return entries


def check_store_url(url: str) -> str | None:
    """What is wrong with a shared store's URL (None: nothing). Never quotes it: it may hold a password."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        return f"must be a redis:// or rediss:// (TLS) URL, got {parts.scheme + ':' if parts.scheme else 'no'} scheme"
    if not parts.hostname:
        return "names no host (redis://HOST:PORT/DB)"
    try:
        parts.port
    except ValueError:
        return "has a port that is not a number from 1 to 65535"
    database = parts.path.strip("/")
    if database and not database.isdigit():
        return "names a database that is not a number (redis://HOST:PORT/DB)"
    return None


def _check_store(table: Table, key: str, template: str, environ: Mapping[str, str]) -> str | None:
    missing = [name for name in env_references(template) if name not in environ]
    if missing:
        table.problem(key, f"names environment variable {missing[0]} that is not set")
        return None
    url = expand_env(template, environ)
    problem = check_store_url(url)
    if problem:
        table.problem(key, problem)
    return url


@dataclass(frozen=True)
class ServerSpec:
    """The C{[server]} table."""

    listen: tuple = strings(
        DEFAULT_LISTEN, allow_single=True,
        doc="Twisted server endpoint strings (`tcp:`, `ssl:`, `unix:`...). `--listen` (repeatable) replaces them. "
            "A `tcp:`/`tcp6:`/`ssl:` address listens with a backlog of 1024 (Twisted's default is 50) unless it "
            "says `backlog=`.",
    )
    max_body_bytes: int = integer(DEFAULT_MAX_BODY_BYTES, minimum=1,
                                  doc="the largest request body; larger ones get 413. `--max-body-bytes` overrides.")
    log_entries: int = integer(DEFAULT_LOG_ENTRIES, minimum=1, maximum=1_000_000,
                               doc="each model's log size unless the model says otherwise.")
    api_keys: tuple = strings(
        (), nonempty=False, check=_check_api_keys,
        doc="client keys that non-admin operations then need (values may hold `${VAR}`; 16+ characters)",
    )
    allowed_commands: tuple = strings((), nonempty=False, check=_check_allowed_commands,
                                      doc="absolute paths of programs models added at runtime may start")
    allowed_destinations: tuple | None = strings(
        None, nonempty=False, check=_check_destinations, shown="all but link-local/metadata",
        doc="hosts, addresses and CIDRs runtime HTTP models may reach (every replica URL is checked)",
    )
    state_dir: str | None = string(None, shown="see [State](#state)",
                                   doc="where runtime changes are kept; `--state` overrides")
    store: str | None = string(
        None, check=_check_store, public="never", shown="SQLite in the state directory",
        doc="`redis://HOST:PORT/DB` (or `rediss://` for TLS): the runtime registry, the client keys and the usage in Redis, "
            "shared by every daemon on it, which each follows (`${VAR}` allowed, for a password); `--store` overrides",
    )
    store_password_file: str | None = string(
        None, doc="a file whose one line is the Redis password, when not in `store`'s URL; "
                  "`--store-password-file` overrides")
    store_prefix: str = string("aibackend:", doc="the prefix of the shared store's Redis keys (a fleet's own)")
    store_lease_seconds: float = number(
        30.0, minimum=0.1, maximum=3600,
        doc="with a Redis store, the limits are the fleet's: a request in flight holds a lease, renewed every "
            "third of this; a daemon that dies (`kill -9`) frees its concurrency slots within this many seconds",
    )
    header_timeout: float = number(
        10.0, minimum=0, exclusive_minimum=True, maximum=3600,
        doc="seconds a client has to send a request's headers; past it, 408 and the connection is closed",
    )
    idle_timeout: float = number(
        60.0, minimum=0, exclusive_minimum=True, maximum=86400,
        doc="seconds an idle keep-alive connection is kept (never while a request is in progress)",
    )
    max_connections: int = integer(
        10000, minimum=1, maximum=10_000_000,
        doc="open client connections; past it one is closed to make room (the oldest idle one, else the one "
            "holding the most for the least progress, see [Security](#security)), or a new one gets 503 if every "
            "one is being served (the open-files limit is raised to match, up to the hard limit)",
    )
    max_connections_per_peer: int = integer(
        1000, minimum=0, maximum=10_000_000,
        doc="open connections one client address may hold; past it a new one closes that address's oldest idle "
            "(or slowest) connection, or gets 503 if every one is being served. Loopback is one address: behind a "
            "reverse proxy on the same host raise it, or `0` for no cap",
    )
    body_timeout: float = number(
        60.0, minimum=0, maximum=86400,
        doc="seconds a client has to send a request's whole body; past it, 408 and the connection is closed "
            "(`0`: no deadline)",
    )
    min_body_rate: float = number(
        240.0, minimum=0, maximum=1e12,
        doc="bytes/s a request body must average once it has been coming for 5 s; under it, 408 and the "
            "connection is closed (`0`: no minimum)",
    )
    send_timeout: float = number(
        60.0, minimum=0, maximum=86400,
        doc="seconds a client may leave its answer unread (the daemon's send buffer full) before it is "
            "disconnected (`0`: no limit)",
    )
    access_log: bool = boolean(
        True,
        doc="one access event per request in the daemon's log; `false` leaves them out (at high rates they cost "
            "about a tenth of the daemon's CPU, see [Performance](#performance))",
    )
    drain_timeout: float = number(
        30.0, minimum=0, maximum=86400,
        doc="on SIGTERM or `removemodel`, seconds in-flight requests may take to finish before the model's "
            "processes are stopped (at most each model's `timeout`)",
    )
    # Usage per key and model (aibackend.usage); None: on whenever keys or limits make a policy.
    usage: bool | None = boolean(
        None, shown="on with keys or limits",
        doc="record requests, errors, tokens and latency per key and model (`/get/usage`, `aibackend_usage_*` "
            "metrics), in `usage.sqlite3` under the state directory (with `--store redis://`, in the fleet's "
            "Redis: `/get/usage` on any daemon sums the fleet's); unset, it is on when the daemon has client "
            "keys or limits",
    )
    usage_retention_days: int = integer(
        DEFAULT_USAGE_RETENTION_DAYS, minimum=1, maximum=36500,
        doc="days the usage is kept (one row per key, model and minute; older rows are deleted; in Redis, "
            "each daemon's rows expire by its own: give the fleet one value)",
    )


@dataclass(frozen=True)
class Config:
    server: ServerSpec = ServerSpec()
    models: tuple = ()
    source: str | None = None


def parse_config(data: Mapping[str, Any], source: str | None = None, environ=None) -> Config:
    """
    Validate a configuration already read from TOML.

    @raise ConfigError: listing every problem.
    """
    problems: list = []
    root = Table(data, "", problems)
    environ = os.environ if environ is None else environ
    server_table = root.table("server")
    server = ServerSpec(**read_settings(server_table, ServerSpec, environ))
    server_table.finish()

    _, raw_models = root.pop_alias("models")
    if raw_models is REQUIRED:
        raw_models = []
    models = []
    if not isinstance(raw_models, list):
        root.problem("models", "must be an array of tables ([[models]])")
        raw_models = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_models):
        path = f"models[{index}]"
        if not isinstance(raw, dict):
            problems.append((path, f"must be a table, got {type_name(raw)}"))
            continue
        spec = parse_model(Table(raw, path, problems), default_log_entries=server.log_entries, environ=environ)
        if spec is None or not spec.id:
            continue
        if spec.id in seen:
            problems.append((f"{path}.id", f"duplicate model id {spec.id!r} (also models[{seen[spec.id]}])"))
            continue
        seen[spec.id] = index
        models.append(spec)
    root.finish()
    if problems:
        raise ConfigError(problems, source)
    return Config(server=server, models=tuple(models), source=source)


def load_config(path: str, environ=None) -> Config:
    """
    Read and validate a TOML configuration file.

    @raise ConfigError: the file cannot be read, is not TOML, or is not valid.
    """
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError([("", f"cannot read the configuration: {e.strerror or e}")], path) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([("", f"is not valid TOML: {e}")], path) from None
    return parse_config(data, path, environ)


# --- the README's reference -------------------------------------------------------

REFERENCE_BEGIN = "<!-- reference:begin (python -m aibackend.config --reference README.md) -->"
REFERENCE_END = "<!-- reference:end -->"


def reference_markdown() -> str:
    """The tables of the README's "Configuration reference", from the declarations."""
    sections = [
        "### `[server]`", reference_table(reference_rows(ServerSpec)),
        "### `[[models]]`: every model", reference_table(reference_rows(ModelSpec)),
        '### `type = "http"`', reference_table(reference_rows(HttpModelSpec, skip=MODEL_FIELDS)), HTTP_NOTES,
        '### `type = "subprocess"`',
        reference_table(reference_rows(SubprocessModelSpec, skip=MODEL_FIELDS)
                        + reference_rows(ProcessSettings, only=LINE_ONLY)),
        "Process keys (subprocess models, and HTTP models with a `command`):",
        reference_table(reference_rows(ProcessSettings, skip=("command", *LINE_ONLY))),
    ]
    return "\n\n".join(sections) + "\n"


def with_reference(text: str) -> str:
    """C{text} (the README) with its reference section made L{reference_markdown}."""
    before, begin, rest = text.partition(REFERENCE_BEGIN)
    _, end, after = rest.partition(REFERENCE_END)
    if not begin or not end:
        raise ValueError(f"no {REFERENCE_BEGIN} ... {REFERENCE_END} in the text")
    return f"{before}{REFERENCE_BEGIN}\n\n{reference_markdown()}\n{REFERENCE_END}{after}"


def main(argv: list[str]) -> int:
    """C{--reference}: print the README's reference; C{--reference README.md}: rewrite it there."""
    if not argv or argv[0] != "--reference" or len(argv) > 2:
        print("usage: python -m aibackend.config --reference [README.md]", file=sys.stderr)
        return 2
    if len(argv) == 1:
        sys.stdout.write(reference_markdown())
        return 0
    with open(argv[1], encoding="utf-8") as f:
        text = f.read()
    updated = with_reference(text)
    if updated != text:
        with open(argv[1], "w", encoding="utf-8") as f:
            f.write(updated)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
