"""
C{twistd aibackend}: the command-line options and the service they make.

Like C{twisted/web/tap.py}: L{Options} is declarative and only checks, in
C{postOptions} (nothing is made, opened or set there); L{makeService} hands what it
found to L{aibackend.daemon.build}. The C{.tac} file uses both. A bad configuration or a
listening address that cannot be used ends the start with one clear line on stderr and
a non-zero exit, never a traceback (L{aibackend.listeners.StartupError}).
"""

from __future__ import annotations

import os
import sys

from twisted.python import usage

from aibackend import __version__
from aibackend.auth import TokenError, read_admin_token
from aibackend.config import Config, ConfigError, check_store_url, load_config, read_key_file
from aibackend.daemon import build
from aibackend.listeners import StartupError, check_endpoint, shared_address
from aibackend.logs import json_log_observer
from aibackend.processes import parse_processes, worker_settings
from aibackend.store import default_state_dir


class Options(usage.Options):
    """twistd aibackend [options]"""

    synopsis = "[options]"
    longdesc = (
        "aibackend: one daemon in front of every AI model. Clients call "
        "/post/predict?id=MODEL (and getlogs, cleanlogs); models are HTTP model servers "
        "or supervised programs, configured in a TOML file. Listens on "
        "tcp:8080:interface=127.0.0.1 unless the configuration or --listen says otherwise."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file (models, listen addresses, limits)."],
        ["max-body-bytes", None, None, "The largest request body accepted, in bytes (default 16 MiB).", int],
        ["state", None, None,
         "The state directory, where models added or removed at runtime are kept "
         "(default: the configuration's state_dir, else $XDG_STATE_HOME/aibackend or ~/.local/state/aibackend)."],
        ["log-format", None, "text", "text (twistd's own lines) or json (one JSON object a line, for log shippers)."],
        ["processes", None, "1",
         "How many reactor processes serve the listening sockets (TCP and TLS; not unix sockets), sharing one set of "
         "models: a number, or auto for one per core."],
        ["store", None, None,
         "redis://HOST:PORT/DB (rediss:// for TLS): keep the runtime registry, the client keys and the usage in Redis, shared "
         "by every daemon on it, instead of SQLite in the state directory (the configuration's store)."],
        ["store-password-file", None, None,
         "A file whose one line is the Redis password, when not in the store's URL."],
        ["admin-token-file", None, None,
         "A file whose first line is the admin token (16 characters or more) that admin "
         "operations need; AIBACKEND_ADMIN_TOKEN works too. Without one, admin operations are "
         "allowed only from loopback while the daemon listens on loopback alone."],
    ]

    compData = usage.Completions(optActions={"config": usage.CompleteFiles("*.toml")})

    def __init__(self):
        super().__init__()
        self["listen"] = []

    def opt_listen(self, description):
        """
        A Twisted server endpoint to listen on, such as tcp:8080:interface=127.0.0.1,
        ssl:8443:privateKey=key.pem:certKey=cert.pem or unix:/run/aibackend.sock.
        Repeat for several; replaces the configuration's addresses.
        """
        self["listen"].append(description)

    def opt_version(self):
        """Print the version and exit."""
        print(f"aibackend {__version__}")
        sys.exit(0)

    def postOptions(self):
        try:
            self.config = load_config(self["config"]) if self["config"] else Config()
        except ConfigError as e:
            raise StartupError(e.lines()) from None
        server = self.config.server
        self.listen = tuple(self["listen"]) or server.listen
        self.max_body_bytes = self["max-body-bytes"] or server.max_body_bytes
        if self.max_body_bytes < 1:
            raise StartupError("--max-body-bytes must be at least 1")
        for description in self.listen:
            problem = check_endpoint(description)
            if problem:
                raise StartupError(f"cannot listen on {description!r}: {problem}")
        self.worker = worker_settings(os.environ)
        try:
            self.processes = 1 if self.worker else parse_processes(self["processes"])
            if self.processes > 1:
                for description in self.listen:
                    shared_address(description)
        except ValueError as e:
            raise StartupError(str(e)) from None
        if self["log-format"] not in ("text", "json"):
            raise StartupError(f"--log-format must be text or json, got {self['log-format']!r}")
        try:
            self.admin_token = read_admin_token(self["admin-token-file"], os.environ)
        except TokenError as e:
            raise StartupError(str(e)) from None
        self.store_url = self["store"] or server.store
        if self["store"]:
            problem = check_store_url(self["store"])
            if problem:
                raise StartupError(f"--store {problem}")
        self.store_password = None
        password_file = self["store-password-file"] or server.store_password_file
        if self.store_url and password_file:
            try:
                self.store_password = read_key_file(password_file)
            except (OSError, ValueError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else e
                raise StartupError(f"cannot read the store's password file {password_file}: {why}") from None
        # Made (0700) by makeService, when the store opens it.
        self.state_dir = os.path.abspath(self["state"] or server.state_dir or default_state_dir())

    @property
    def logfile(self) -> str | None:
        """twistd's C{--logfile} (None in a C{.tac}, whose Options have no parent)."""
        return self.parent.get("logfile") if self.parent is not None else None

    def worker_argv(self) -> list[str]:
        """The command line of a worker process (C{--processes}): the same daemon, one reactor."""
        argv = ["-c", "from twisted.scripts.twistd import run; run()", "--pidfile=", "--nodaemon"]
        logfile = self.logfile
        if logfile and logfile != "-":
            argv.append(f"--logfile={os.path.abspath(logfile)}")
        argv += ["aibackend", "--state", self.state_dir, "--max-body-bytes", str(self.max_body_bytes),
                 "--log-format", self["log-format"]]
        if self["config"]:
            argv += ["--config", os.path.abspath(self["config"])]
        if self["admin-token-file"]:
            argv += ["--admin-token-file", os.path.abspath(self["admin-token-file"])]
        if self["store"]:  # else the configuration's, which the worker reads too
            argv += ["--store", self["store"]]
        if self["store-password-file"]:
            argv += ["--store-password-file", os.path.abspath(self["store-password-file"])]
        for description in self.listen:
            argv += ["--listen", description]
        return argv


def makeService(options: Options):
    # The global reactor, here only: twistd has installed the one asked for (-r) by now.
    from twisted.internet import reactor

    logfile = options.logfile
    return build(
        options.config,
        reactor,
        listen=options.listen,
        max_body_bytes=options.max_body_bytes,
        state_dir=options.state_dir,
        store_url=options.store_url,
        store_password=options.store_password,
        admin_token=options.admin_token,
        processes=options.processes,
        worker=options.worker,
        worker_argv=options.worker_argv() if options.processes > 1 else None,
        subreaper=True,
        log_observer=(lambda: json_log_observer(logfile)) if options["log-format"] == "json" else None,
    ).service
