"""
The configuration of a program the daemon starts (L{ProcessSettings}: subprocess models,
and HTTP models with a C{command}) and of a subprocess model (L{SubprocessModelSpec}),
each key declared once (L{aibackend.configbase}), with their parsers.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from typing import Mapping

from aibackend.configbase import (
    BATCHING_DOC,
    DEFAULT_TIMEOUT,
    REQUIRED,
    MODEL_FIELDS,
    ModelSpec,
    Table,
    boolean,
    check_env_map,
    choice,
    custom,
    expand_env,
    holds_env_reference,
    integer,
    keys_of,
    number,
    read_batching,
    public_of,
    read_setting,
    read_settings,
    setting_of,
    string,
    string_map,
)

# The daemon's own variables a model process inherits; everything else (the admin token,
# other models' keys) stays out unless the model's `env` names it.
INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME", "VIRTUAL_ENV")
PYTHON_NAMES = ("python", "python3")
PROTOCOLS = ("raw", "jsonl")
COMMAND_DOC = (
    "the program and its arguments, as a list; never run through a shell. `python`/`python3` mean the "
    "daemon's own interpreter; a relative path is relative to `cwd`; another name is looked up on `PATH`."
)


def _check_cwd(table: Table, key: str, value: str, environ) -> str | None:
    if not os.path.isdir(value):
        table.problem(key, f"directory {value!r} does not exist")
        return None
    return value


def seconds(default, **options):
    """Seconds, kept as written (an int stays an int in the masked view)."""
    return number(default, as_float=False, **options)


@dataclass(frozen=True)
class ProcessSettings:
    """How the daemon starts and supervises a model's processes."""

    command: tuple = custom(REQUIRED, doc=COMMAND_DOC)
    executable: str  # the command's program, found (not a key: L{resolve_program})
    cwd: str | None = string(None, shown="the daemon's", check=_check_cwd, doc="the working directory")
    env: Mapping[str, str] = string_map(
        check=check_env_map, secret=holds_env_reference,
        doc="extra environment variables (values may hold `${ENV_VAR}`). A process gets only these, "
            + ", ".join(f"`{name}`" for name in INHERITED_ENV)
            + " and `PYTHONUNBUFFERED=1`: never the daemon's other variables (tokens, other models' keys).",
    )
    startup_timeout: float = seconds(
        60.0, minimum=0, exclusive_minimum=True, maximum=86400,
        doc="seconds to become ready; past it the process is restarted and requests waiting for it get 503",
    )
    kill_timeout: float = seconds(5.0, minimum=0, exclusive_minimum=True, maximum=3600,
                                 doc="seconds between SIGTERM and SIGKILL when a process is stopped")
    restart_backoff: float = seconds(
        1.0, minimum=0, exclusive_minimum=True, maximum=3600,
        doc="seconds before the first restart after a crash; doubles with each quick crash",
    )
    max_backoff: float = seconds(30.0, minimum=0, exclusive_minimum=True, maximum=86400,
                                doc="the longest wait between restarts, and the first wait of a crash loop")
    max_crash_loop_backoff: float = seconds(
        300.0, minimum=0, exclusive_minimum=True, maximum=86400,
        doc="the longest wait between two tries of a `failed` model; the wait doubles from `max_backoff` with "
            "each try that fails",
    )
    max_restarts: int = integer(
        5, minimum=1, maximum=1000,
        doc="quick crashes in a row after which the model is `failed` (a crash loop): requests get 503 with "
            "`Retry-After` until a try of it lasts (see [Supervision](#supervision))",
    )
    min_uptime: float = seconds(
        10.0, minimum=0, maximum=86400,
        doc="a process that lived at least this long before crashing starts the count again; a try of a "
            "`failed` model takes requests once it has run this long",
    )
    max_line_bytes: int = integer(64 * 1024 * 1024, minimum=64,
                                  doc="a longer stdout line fails the request (502) and restarts the process")

    def public(self) -> dict:
        return public_of(self)

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


# What a process of a line protocol has that an HTTP model's server has not.
LINE_ONLY = ("max_line_bytes",)
# The keys that mean nothing without a command.
WITH_COMMAND_ONLY = keys_of(ProcessSettings, skip=("command", *LINE_ONLY))


def parse_process(table: Table, environ: Mapping[str, str], *, required: bool, line_protocol: bool):
    """
    Read the keys of a process the daemon starts (C{command}, C{cwd}, C{env}, timeouts,
    restart settings). Without C{command}, and not C{required}: None.
    """
    if not table.has("command"):
        if required:
            table.problem("command", "is required (the program and its arguments, as a list)")
        else:
            for key in WITH_COMMAND_ONLY:
                if table.has(key):
                    table.pop_alias(key)
                    table.problem(key, "is only used with command (a program the daemon starts)")
            return None
    values = read_settings(
        table, ProcessSettings, environ,
        skip=() if line_protocol else LINE_ONLY,
        readers={"command": lambda values: table.string_list("command", ())},
    )
    command = values.pop("command")
    if not command:
        return None
    path = values["env"].get("PATH") or environ.get("PATH")
    executable, problem = resolve_program(command[0], values["cwd"], path)
    if problem:
        table.problem("command", problem)
        return None
    return ProcessSettings(command=tuple(command), executable=executable, **values)


@dataclass(frozen=True)
class SubprocessModelSpec(ModelSpec):
    """A program the daemon starts, speaking JSON lines on stdin/stdout."""

    process: ProcessSettings | None = custom(None, key="command", required=True, doc=COMMAND_DOC,
                                             public="flatten")
    per_process: bool = boolean(
        False,
        doc="with `--processes N`: each reactor process starts its own pool of `workers` (N pools in all) "
            "instead of one pool in the primary that the others forward to "
            "(see [Every core](#every-core---processes-n))",
    )
    protocol: str = choice("raw", PROTOCOLS, doc="`raw` or `jsonl` (below)")
    workers: int = integer(1, minimum=1, maximum=256, doc="processes in the pool")
    max_inflight: int = integer(1, minimum=1, maximum=100_000,
                                doc="requests at once per process (`jsonl` only; `raw` is always 1)")
    timeout: float = number(DEFAULT_TIMEOUT, minimum=0, exclusive_minimum=True, maximum=86400,
                            doc="seconds a request may take, queueing included (504 past it)")
    max_queue: int = integer(100, minimum=0, maximum=1_000_000,
                             doc="requests that may wait for a free process; past it, 503 at once")
    batching: object = custom(None, doc=BATCHING_DOC, label="`[models.batching]`", shown="none",
                              public="unless-default", show=lambda spec: spec.public())


def parse_subprocess_model(table: Table, common: dict, environ: Mapping[str, str]) -> SubprocessModelSpec:
    def max_inflight(values):
        value = read_setting(table, "max_inflight", setting_of(SubprocessModelSpec, "max_inflight"))
        if values["protocol"] == "raw" and value != 1:
            table.problem("max_inflight", "a raw process takes one request at a time; use protocol = \"jsonl\"")
        return value

    def batching(values):
        def refuse(where) -> bool:
            if values["protocol"] != "jsonl":
                where.problem(None, 'needs protocol = "jsonl": a raw process takes one request at a time')
                return True
            return False

        return read_batching(table, values, refuse=refuse)

    values = read_settings(table, SubprocessModelSpec, environ, skip=MODEL_FIELDS, readers={
        "process": lambda values: parse_process(table, environ, required=True, line_protocol=True),
        "max_inflight": max_inflight,
        "batching": batching,
    })
    return SubprocessModelSpec(**common, **values)
