"""
Configuration: TOML in, frozen validated specs out.

Pure on purpose (no Twisted): the daemon's start-up, the C{.tac} file and the runtime
C{addmodel} operation all validate with this one code. Every problem is collected with
its key path (C{models[1].url}) and reported together, so a user fixes a file in one go.

A model type is a name (with aliases), a parser that turns a C{[[models]]} table into a
frozen spec, and the dotted name of the L{aibackend.interfaces.ISender} class built from
it. L{register} adds one.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from aibackend.tensors import DATATYPES, TensorSpec, check_shape_value

DEFAULT_LISTEN = ("tcp:8080:interface=127.0.0.1",)
DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_LOG_ENTRIES = 1000
MAX_ID_LENGTH = 128
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

_REQUIRED = object()


class ConfigError(Exception):
    """
    The configuration is not valid.

    @ivar problems: C{(key path, what is wrong)} pairs.
    @ivar source: where the configuration came from (a file name), or None.
    """

    def __init__(self, problems, source: str | None = None):
        self.problems = list(problems)
        self.source = source
        super().__init__(str(self))

    def lines(self) -> list[str]:
        prefix = f"{self.source}: " if self.source else ""
        return [f"{prefix}{path}: {message}" if path else f"{prefix}{message}" for path, message in self.problems]

    def __str__(self) -> str:
        return "\n".join(self.lines())


def _type_name(value) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }.get(type(value), type(value).__name__)


class Table:
    """
    Reads one TOML table (or JSON object), collecting problems with their key path.

    Each getter takes the key out of the table; L{finish} reports the keys left over as
    unknown.
    """

    def __init__(self, data: Mapping, path: str, problems: list):
        self._data = dict(data)
        self.path = path
        self.problems = problems

    def key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str | None, message: str) -> None:
        self.problems.append((self.key_path(key) if key else self.path, message))

    def has(self, key: str) -> bool:
        return key in self._data

    def pop_alias(self, key: str, *aliases: str):
        """
        Take C{key}, or one of its aliases, out of the table.

        @return: C{(the name used, the value)}, or C{(key, _REQUIRED)} if absent.
        """
        present = [name for name in (key, *aliases) if name in self._data]
        if len(present) > 1:
            self.problem(present[1], f"give only one of {', '.join(present)}")
        values = [self._data.pop(name) for name in present]
        if present:
            return present[0], values[0]
        return key, _REQUIRED

    def _get(self, key, default, aliases=()):
        name, value = self.pop_alias(key, *aliases)
        if value is _REQUIRED:
            if default is _REQUIRED:
                self.problem(key, "is required")
            return name, default
        return name, value

    def string(self, key: str, default=_REQUIRED, *, aliases=(), nonempty=True):
        name, value = self._get(key, default, aliases)
        if value is default:
            return value
        if not isinstance(value, str):
            self.problem(name, f"must be a string, got {_type_name(value)}")
            return default if default is not _REQUIRED else None
        if nonempty and not value.strip():
            self.problem(name, "must not be empty")
        return value

    def number(self, key: str, default=_REQUIRED, *, minimum=None, maximum=None, integer=False, exclusive_minimum=False):
        name, value = self._get(key, default, ())
        if value is default:
            return value
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            wanted = "an integer" if integer else "a number"
            self.problem(name, f"must be {wanted}, got {_type_name(value)}")
            return default if default is not _REQUIRED else None
        if value != value or value in (float("inf"), float("-inf")):
            self.problem(name, "must be a finite number")
            return default if default is not _REQUIRED else None
        if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
            self.problem(name, f"must be {'more than' if exclusive_minimum else 'at least'} {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.problem(name, f"must be at most {maximum}, got {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        name, value = self._get(key, default, ())
        if not isinstance(value, bool):
            self.problem(name, f"must be true or false, got {_type_name(value)}")
            return default
        return value

    def string_list(self, key: str, default=_REQUIRED, *, allow_single=False, nonempty=True):
        name, value = self._get(key, default, ())
        if value is default:
            return value
        if allow_single and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.problem(name, "must be a list of strings")
            return default if default is not _REQUIRED else ()
        if nonempty and not value:
            self.problem(name, "must not be empty")
        return tuple(value)

    def string_map(self, key: str, default=_REQUIRED):
        name, value = self._get(key, default, ())
        if value is default:
            return value
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            self.problem(name, "must be a table of strings")
            return default if default is not _REQUIRED else MappingProxyType({})
        return MappingProxyType(dict(value))

    def table(self, key: str):
        name, value = self._get(key, {}, ())
        if not isinstance(value, dict):
            self.problem(name, f"must be a table, got {_type_name(value)}")
            value = {}
        return Table(value, self.key_path(name), self.problems)

    def finish(self) -> None:
        for key in sorted(self._data):
            self.problem(key, "is not a known key")
        self._data.clear()


def check_model_id(value) -> str | None:
    """
    @return: what is wrong with a model id, or None if it is a good one.
    """
    if not isinstance(value, str):
        return f"must be a string, got {_type_name(value)}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_LENGTH:
        return f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}"
    if not ID_PATTERN.match(value):
        return "must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
    return None


def check_http_url(value: str, *, default_scheme: bool = False):
    """
    Check an HTTP(S) URL; with C{default_scheme}, C{host:port} means C{http://host:port}.

    @return: C{(url, None)} or C{(None, what is wrong)}.
    """
    text = value.strip().strip('"').strip("'")
    if default_scheme and "://" not in text:
        text = "http://" + text
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        return None, f"is not a valid URL ({e}): {value!r}"
    if parts.scheme not in ("http", "https"):
        return None, f"must be an http:// or https:// URL, got {value!r}"
    if not parts.hostname:
        return None, f"has no host: {value!r}"
    if port == 0:
        return None, f"has port 0: {value!r}"
    if parts.username or parts.password:
        return None, "must not hold credentials (user:password@); put them in headers"
    return text, None


def check_destination_entry(entry: str) -> str | None:
    """@return: what is wrong with an C{allowed_destinations} entry (a host name, an address or a CIDR), or None."""
    try:
        ipaddress.ip_network(entry, strict=False)
        return None
    except ValueError:
        pass
    name = entry.strip().rstrip(".")
    if not name or any(c in name for c in "/:@ ") or len(name) > 253:
        return f"{entry!r} is neither a host name nor an address or CIDR"
    return None


def env_references(template: str) -> list[str]:
    """The names of the C{${VAR}} references in C{template}."""
    return ENV_REFERENCE.findall(template)


def expand_env(template: str, environ: Mapping[str, str]) -> str:
    """
    Replace each C{${VAR}} in C{template} by the variable's value.

    @raise KeyError: naming a variable that is not set.
    """
    return ENV_REFERENCE.sub(lambda match: environ[match.group(1)], template)


# --- model specs ---------------------------------------------------------------


@dataclass(frozen=True)
class V2Spec:
    """
    How a model is seen through the Open Inference Protocol (C{[models.v2]}).

    @ivar inputs: the declared inputs (L{TensorSpec}s); empty means any inputs.
    @ivar outputs: the declared outputs; empty means whatever the model answers.
    @ivar platform: what the metadata says the model runs on.
    @ivar version: the model's one version (an adapted model has exactly one).
    @ivar native: the model's server speaks v2 itself (HTTP models): requests are proxied.
    @ivar model: the model's name on that server (default: the model's id).
    """

    inputs: tuple = ()
    outputs: tuple = ()
    platform: str | None = None
    version: str = "1"
    native: bool = False
    model: str | None = None

    def public(self) -> dict:
        described = {
            "inputs": [tensor.public() for tensor in self.inputs],
            "outputs": [tensor.public() for tensor in self.outputs],
            "version": self.version,
            "native": self.native,
        }
        if self.platform:
            described["platform"] = self.platform
        if self.model:
            described["model"] = self.model
        return described


DEFAULT_V2 = V2Spec()


def _tensor_specs(table: Table, key: str) -> tuple:
    name, value = table._get(key, [], ())
    if not isinstance(value, list):
        table.problem(name, f"must be a list of {{name, datatype, shape}} tables, got {_type_name(value)}")
        return ()
    specs = []
    for index, item in enumerate(value):
        where = Table(item if isinstance(item, dict) else {}, f"{table.key_path(key)}[{index}]", table.problems)
        if not isinstance(item, dict):
            where.problem(None, f"must be a table with name, datatype and shape, got {_type_name(item)}")
            continue
        tensor_name = where.string("name")
        datatype = where.string("datatype")
        if isinstance(datatype, str) and datatype.upper() not in DATATYPES:
            where.problem("datatype", f"must be one of {', '.join(DATATYPES)}, got {datatype!r}")
        _, shape = where._get("shape", _REQUIRED, ())
        problem = check_shape_value(shape, declared=True) if shape is not _REQUIRED else None
        if problem:
            where.problem("shape", problem)
        where.finish()
        if isinstance(tensor_name, str) and tensor_name in [spec.name for spec in specs]:
            where.problem("name", f"{tensor_name!r} is declared twice")
        elif isinstance(tensor_name, str) and isinstance(datatype, str) and not problem and shape is not _REQUIRED:
            specs.append(TensorSpec(tensor_name, datatype.upper(), tuple(shape)))
    return tuple(specs)


def parse_v2(table: Table, type_name: str) -> V2Spec:
    """Read a model's C{[models.v2]} table."""
    inputs = _tensor_specs(table, "inputs")
    outputs = _tensor_specs(table, "outputs")
    platform = table.string("platform", None)
    version = table.string("version", "1")
    if isinstance(version, str) and not ID_PATTERN.match(version):
        table.problem("version", f"must be letters, digits, '.', '_' or '-', got {version!r}")
    native = table.boolean("native", False)
    model = table.string("model", None)
    if native and type_name != "http":
        table.problem("native", "only an HTTP model's server can speak v2 itself")
    if model is not None and not native:
        table.problem("model", "names the model on a server that speaks v2: it needs native = true")
    if native and (inputs or outputs):
        table.problem("native", "a native v2 model declares its own inputs and outputs: leave them out")
    table.finish()
    return V2Spec(
        inputs=inputs, outputs=outputs, platform=platform, version=version if isinstance(version, str) else "1",
        native=native, model=model,
    )


@dataclass(frozen=True)
class ModelSpec:
    """What every model has."""

    id: str
    type: str
    log_entries: int = DEFAULT_LOG_ENTRIES
    v2: V2Spec = DEFAULT_V2

    def public(self) -> dict:
        """The spec as JSON, secrets masked."""
        described = {"id": self.id, "type": self.type, "log_entries": self.log_entries}
        if self.v2 is not DEFAULT_V2:
            described["v2"] = self.v2.public()
        return described


@dataclass(frozen=True)
class HttpModelSpec(ModelSpec):
    """An HTTP model server: the daemon POSTs each request's JSON body to C{url}."""

    url: str = ""
    timeout: float = 60.0
    connect_timeout: float = 10.0
    headers: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    max_response_bytes: int = 64 * 1024 * 1024
    max_concurrency: int = 0
    max_queue: int = 100
    urls: tuple = ()
    eject_after: int = 5
    eject_seconds: float = 10.0
    max_eject_seconds: float = 300.0
    health_interval: float | None = None
    process: "ProcessSettings | None" = None
    health_path: str | None = None

    def public(self) -> dict:
        masked = {
            name: (value if not env_references(value) and name.lower() not in SECRET_HEADERS else "***")
            for name, value in self.headers.items()
        }
        return {
            **super().public(),
            "url": self.url,
            "timeout": self.timeout,
            "connect_timeout": self.connect_timeout,
            "headers": masked,
            "max_response_bytes": self.max_response_bytes,
            "max_concurrency": self.max_concurrency,
            "max_queue": self.max_queue,
            "urls": list(self.urls),
            "eject_after": self.eject_after,
            "eject_seconds": self.eject_seconds,
            "max_eject_seconds": self.max_eject_seconds,
            "health_interval": self.health_interval,
            **({"health_path": self.health_path} if self.health_path else {}),
            **(self.process.public() if self.process else {}),
        }


SECRET_HEADERS = frozenset({"authorization", "proxy-authorization", "x-api-key", "api-key", "cookie"})


def parse_http_model(table: Table, common: dict, environ: Mapping[str, str]) -> HttpModelSpec:
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
        url = urls[0] if urls else ""
    else:
        name, raw_url = table.pop_alias("url", "dest")
        url = ""
        if raw_url is _REQUIRED:
            table.problem("url", "is required (the model server's URL; 'dest' is accepted too; urls for replicas)")
        elif not isinstance(raw_url, str):
            table.problem(name, f"must be a string, got {_type_name(raw_url)}")
        else:
            url, problem = check_http_url(raw_url, default_scheme=(name == "dest"))
            if problem:
                table.problem(name, problem)
        urls = [url] if url else []
    eject_after = table.number("eject_after", 5, minimum=1, maximum=1000, integer=True)
    eject_seconds = table.number("eject_seconds", 10.0, minimum=0, exclusive_minimum=True, maximum=86400)
    max_eject_seconds = table.number("max_eject_seconds", 300.0, minimum=0, exclusive_minimum=True, maximum=86400)
    health_interval = table.number("health_interval", None, minimum=0.1, maximum=86400)
    timeout = table.number("timeout", 60.0, minimum=0, exclusive_minimum=True, maximum=86400)
    connect_timeout = table.number("connect_timeout", 10.0, minimum=0, exclusive_minimum=True, maximum=3600)
    headers = table.string_map("headers", MappingProxyType({}))
    for header, value in headers.items():
        if not re.match(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$", header):
            table.problem(f"headers.{header}", "is not a valid HTTP header name")
        if "\r" in value or "\n" in value:
            table.problem(f"headers.{header}", "must not hold a line break")
        for variable in env_references(value):
            if variable not in environ:
                table.problem(f"headers.{header}", f"names environment variable {variable} that is not set")
    max_response_bytes = table.number("max_response_bytes", 64 * 1024 * 1024, minimum=1, integer=True)
    max_concurrency = table.number("max_concurrency", 0, minimum=0, maximum=100_000, integer=True)
    max_queue = table.number("max_queue", 100, minimum=0, maximum=1_000_000, integer=True)
    process = parse_process(table, environ, required=False, line_protocol=False)
    health_path = table.string("health_path", None)
    if health_path is not None and not health_path.startswith("/"):
        table.problem("health_path", f"must start with '/', got {health_path!r}")
    if health_interval is not None and health_path is None:
        table.problem("health_interval", "needs health_path (the path the active health check GETs)")
    return HttpModelSpec(
        **common,
        url=url or "",
        timeout=float(timeout or 60.0),
        connect_timeout=float(connect_timeout or 10.0),
        headers=headers,
        max_response_bytes=max_response_bytes or 64 * 1024 * 1024,
        max_concurrency=max_concurrency or 0,
        urls=tuple(urls),
        eject_after=eject_after or 5,
        eject_seconds=float(eject_seconds or 10.0),
        max_eject_seconds=float(max_eject_seconds or 300.0),
        health_interval=float(health_interval) if health_interval is not None else None,
        max_queue=max_queue if max_queue is not None else 100,
        process=process,
        health_path=health_path,
    )


# --- processes the daemon starts -------------------------------------------------

# The daemon's own variables a model process inherits; everything else (the admin token,
# other models' keys) stays out unless the model's `env` names it.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME", "VIRTUAL_ENV")
PYTHON_NAMES = ("python", "python3")


@dataclass(frozen=True)
class ProcessSettings:
    """How the daemon starts and supervises a model's processes."""

    command: tuple
    executable: str
    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    startup_timeout: float = 60.0
    kill_timeout: float = 5.0
    restart_backoff: float = 1.0
    max_backoff: float = 30.0
    max_crash_loop_backoff: float = 300.0
    max_restarts: int = 5
    min_uptime: float = 10.0
    max_line_bytes: int = 64 * 1024 * 1024

    def public(self) -> dict:
        return {
            "command": list(self.command),
            "cwd": self.cwd,
            "env": {name: ("***" if env_references(value) else value) for name, value in self.env.items()},
            "startup_timeout": self.startup_timeout,
            "kill_timeout": self.kill_timeout,
            "restart_backoff": self.restart_backoff,
            "max_backoff": self.max_backoff,
            "max_crash_loop_backoff": self.max_crash_loop_backoff,
            "max_restarts": self.max_restarts,
            "min_uptime": self.min_uptime,
            "max_line_bytes": self.max_line_bytes,
        }

    def child_env(self, environ: Mapping[str, str]) -> dict:
        """
        The environment a model process gets: a few of the daemon's variables, the
        configured ones (C{${VAR}} expanded), and unbuffered Python output.
        """
        env = {name: environ[name] for name in INHERITED_ENV if name in environ}
        env["PYTHONUNBUFFERED"] = "1"
        for name, template in self.env.items():
            env[name] = expand_env(template, environ)
        return env


def resolve_program(program: str, cwd: str | None, path: str | None) -> tuple[str | None, str | None]:
    """
    Find the program a command starts: C{python}/C{python3} mean the daemon's own
    interpreter; a name with a slash is a path (relative to C{cwd}); any other name is
    looked up on C{path}.

    @return: C{(absolute executable, None)} or C{(None, what is wrong)}.
    """
    if program in PYTHON_NAMES:
        return sys.executable, None
    if "/" in program:
        candidate = program if os.path.isabs(program) else os.path.join(cwd or os.getcwd(), program)
        if not os.path.isfile(candidate):
            return None, f"program {program!r} does not exist"
        if not os.access(candidate, os.X_OK):
            return None, f"program {program!r} is not executable"
        return os.path.abspath(candidate), None
    found = shutil.which(program, path=path)
    if found is None:
        return None, f"program {program!r} is not found on PATH"
    return os.path.abspath(found), None


def parse_process(table: Table, environ: Mapping[str, str], *, required: bool, line_protocol: bool):
    """
    Read the keys of a process the daemon starts (C{command}, C{cwd}, C{env}, timeouts,
    restart settings). Without C{command}, and not C{required}: None.
    """
    if not table.has("command"):
        if required:
            table.problem("command", "is required (the program and its arguments, as a list)")
        else:
            for key in ("cwd", "env", "startup_timeout", "kill_timeout", "restart_backoff", "max_backoff",
                        "max_crash_loop_backoff", "max_restarts", "min_uptime"):
                if table.has(key):
                    table.pop_alias(key)
                    table.problem(key, "is only used with command (a program the daemon starts)")
        if not required:
            return None
    command = table.string_list("command", ())
    cwd = table.string("cwd", None)
    if cwd is not None and not os.path.isdir(cwd):
        table.problem("cwd", f"directory {cwd!r} does not exist")
        cwd = None
    env = table.string_map("env", MappingProxyType({}))
    for name, value in env.items():
        for variable in env_references(value):
            if variable not in environ:
                table.problem(f"env.{name}", f"names environment variable {variable} that is not set")
    number = table.number
    settings = dict(
        startup_timeout=number("startup_timeout", 60.0, minimum=0, exclusive_minimum=True, maximum=86400),
        kill_timeout=number("kill_timeout", 5.0, minimum=0, exclusive_minimum=True, maximum=3600),
        restart_backoff=number("restart_backoff", 1.0, minimum=0, exclusive_minimum=True, maximum=3600),
        max_backoff=number("max_backoff", 30.0, minimum=0, exclusive_minimum=True, maximum=86400),
        max_crash_loop_backoff=number("max_crash_loop_backoff", 300.0, minimum=0, exclusive_minimum=True,
                                      maximum=86400),
        max_restarts=number("max_restarts", 5, minimum=1, maximum=1000, integer=True),
        min_uptime=number("min_uptime", 10.0, minimum=0, maximum=86400),
    )
    if line_protocol:
        settings["max_line_bytes"] = number("max_line_bytes", 64 * 1024 * 1024, minimum=64, integer=True)
    if not command:
        return None
    path = env.get("PATH") or environ.get("PATH")
    executable, problem = resolve_program(command[0], cwd, path)
    if problem:
        table.problem("command", problem)
        return None
    settings = {key: value for key, value in settings.items() if value is not None}
    return ProcessSettings(command=tuple(command), executable=executable, cwd=cwd, env=env, **settings)


@dataclass(frozen=True)
class SubprocessModelSpec(ModelSpec):
    """A program the daemon starts, speaking JSON lines on stdin/stdout."""

    process: ProcessSettings | None = None
    protocol: str = "raw"
    workers: int = 1
    max_inflight: int = 1
    timeout: float = 60.0
    max_queue: int = 100
    per_process: bool = False

    def public(self) -> dict:
        return {
            **super().public(),
            "per_process": self.per_process,
            "protocol": self.protocol,
            "workers": self.workers,
            "max_inflight": self.max_inflight,
            "timeout": self.timeout,
            "max_queue": self.max_queue,
            **(self.process.public() if self.process else {}),
        }


PROTOCOLS = ("raw", "jsonl")


def parse_subprocess_model(table: Table, common: dict, environ: Mapping[str, str]) -> SubprocessModelSpec:
    process = parse_process(table, environ, required=True, line_protocol=True)
    protocol = table.string("protocol", "raw")
    if isinstance(protocol, str):
        protocol = protocol.strip().lower()
        if protocol not in PROTOCOLS:
            table.problem("protocol", f"must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    workers = table.number("workers", 1, minimum=1, maximum=256, integer=True)
    max_inflight = table.number("max_inflight", 1, minimum=1, maximum=100_000, integer=True)
    if protocol == "raw" and max_inflight not in (None, 1):
        table.problem("max_inflight", "a raw process takes one request at a time; use protocol = \"jsonl\"")
    timeout = table.number("timeout", 60.0, minimum=0, exclusive_minimum=True, maximum=86400)
    max_queue = table.number("max_queue", 100, minimum=0, maximum=1_000_000, integer=True)
    per_process = table.boolean("per_process", False)
    return SubprocessModelSpec(
        per_process=per_process,
        **common,
        process=process,
        protocol=protocol if protocol in PROTOCOLS else "raw",
        workers=workers or 1,
        max_inflight=max_inflight or 1,
        timeout=float(timeout or 60.0),
        max_queue=max_queue if max_queue is not None else 100,
    )


@dataclass(frozen=True)
class ModelType:
    """
    A kind of model.

    @ivar name: the canonical type name.
    @ivar aliases: other accepted names (type names are case-insensitive).
    @ivar parse: C{(Table, common fields, environ) -> spec}; reports problems on the table.
    @ivar factory: C{"module:Class"}, an L{ISender} with C{from_spec(spec, deps)}.
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
    type_name = table.string("type")
    model_type = None
    if isinstance(type_name, str) and type_name.strip():
        model_type = find_type(type_name)
        if model_type is None:
            table.problem("type", f"unknown model type {type_name!r}: use one of {known_type_names()}")
    log_entries = table.number("log_entries", default_log_entries, minimum=1, maximum=1_000_000, integer=True)
    v2 = parse_v2(table.table("v2"), model_type.name if model_type else "") if table.has("v2") else DEFAULT_V2
    if model_type is None:
        return None
    common = {
        "id": model_id or "", "type": model_type.name, "log_entries": log_entries or default_log_entries, "v2": v2,
    }
    spec = model_type.parse(table, common, environ)
    table.finish()
    return spec


# --- the whole file ------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    listen: tuple = DEFAULT_LISTEN
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    log_entries: int = DEFAULT_LOG_ENTRIES
    api_keys: tuple = ()
    allowed_commands: tuple = ()
    allowed_destinations: tuple | None = None
    state_dir: str | None = None
    header_timeout: float = 10.0
    idle_timeout: float = 60.0
    max_connections: int = 10000
    max_connections_per_peer: int = 1000
    body_timeout: float = 60.0
    min_body_rate: float = 240.0
    send_timeout: float = 60.0
    access_log: bool = True
    drain_timeout: float = 30.0


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
    server_table = root.table("server")
    listen = server_table.string_list("listen", DEFAULT_LISTEN, allow_single=True)
    max_body = server_table.number("max_body_bytes", DEFAULT_MAX_BODY_BYTES, minimum=1, integer=True)
    log_entries = server_table.number("log_entries", DEFAULT_LOG_ENTRIES, minimum=1, maximum=1_000_000, integer=True)
    environ = os.environ if environ is None else environ
    api_keys = []
    for index, template in enumerate(server_table.string_list("api_keys", (), nonempty=False)):
        missing = [name for name in env_references(template) if name not in environ]
        if missing:
            server_table.problem(f"api_keys[{index}]", f"names environment variable {missing[0]} that is not set")
            continue
        key = expand_env(template, environ)
        if len(key) < 16:
            server_table.problem(f"api_keys[{index}]", "is too weak: use at least 16 characters")
        api_keys.append(key)
    allowed_commands = server_table.string_list("allowed_commands", (), nonempty=False)
    for index, path in enumerate(allowed_commands):
        if not os.path.isabs(path):
            server_table.problem(f"allowed_commands[{index}]", f"must be an absolute path, got {path!r}")
    allowed_destinations = server_table.string_list("allowed_destinations", None, nonempty=False)
    for index, entry in enumerate(allowed_destinations or ()):
        problem = check_destination_entry(entry)
        if problem:
            server_table.problem(f"allowed_destinations[{index}]", problem)
    state_dir = server_table.string("state_dir", None)
    header_timeout = server_table.number("header_timeout", 10.0, minimum=0, exclusive_minimum=True, maximum=3600)
    idle_timeout = server_table.number("idle_timeout", 60.0, minimum=0, exclusive_minimum=True, maximum=86400)
    max_connections = server_table.number("max_connections", 10000, minimum=1, maximum=10_000_000, integer=True)
    max_per_peer = server_table.number("max_connections_per_peer", 1000, minimum=0, maximum=10_000_000, integer=True)
    body_timeout = server_table.number("body_timeout", 60.0, minimum=0, maximum=86400)
    min_body_rate = server_table.number("min_body_rate", 240.0, minimum=0, maximum=1e12)
    send_timeout = server_table.number("send_timeout", 60.0, minimum=0, maximum=86400)
    access_log = server_table.boolean("access_log", True)
    drain_timeout = server_table.number("drain_timeout", 30.0, minimum=0, maximum=86400)
    server_table.finish()
    server = ServerSpec(
        listen=tuple(listen or DEFAULT_LISTEN),
        max_body_bytes=max_body or DEFAULT_MAX_BODY_BYTES,
        log_entries=log_entries or DEFAULT_LOG_ENTRIES,
        api_keys=tuple(api_keys),
        allowed_commands=tuple(os.path.realpath(path) for path in allowed_commands),
        allowed_destinations=tuple(allowed_destinations) if allowed_destinations is not None else None,
        state_dir=state_dir,
        header_timeout=float(header_timeout or 10.0),
        idle_timeout=float(idle_timeout or 60.0),
        max_connections=max_connections or 10000,
        max_connections_per_peer=max_per_peer if max_per_peer is not None else 1000,
        body_timeout=float(body_timeout if body_timeout is not None else 60.0),
        min_body_rate=float(min_body_rate if min_body_rate is not None else 240.0),
        send_timeout=float(send_timeout if send_timeout is not None else 60.0),
        access_log=access_log,
        drain_timeout=float(drain_timeout if drain_timeout is not None else 30.0),
    )

    _, raw_models = root.pop_alias("models")
    if raw_models is _REQUIRED:
        raw_models = []
    models = []
    if not isinstance(raw_models, list):
        root.problem("models", "must be an array of tables ([[models]])")
        raw_models = []
    seen: dict[str, int] = {}
    for index, raw in enumerate(raw_models):
        path = f"models[{index}]"
        if not isinstance(raw, dict):
            problems.append((path, f"must be a table, got {_type_name(raw)}"))
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
