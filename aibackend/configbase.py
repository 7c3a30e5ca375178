"""
What the configuration is made of: each key declared once, and read, shown and documented
from that one declaration.

A spec is a frozen dataclass whose fields are declared with L{number}, L{integer},
L{string}, L{boolean}, L{choice}, L{strings}, L{string_map} or L{custom}: the key, its
aliases, its default, its bounds, whether it is a secret, and a line of documentation.
L{read_settings} reads a L{Table} with them (every problem collected with its key path),
L{public_of} is the masked view of a spec (C{status}, C{models}), L{reference_rows} the
rows of the README's configuration reference.

Also here: L{ConfigError}, L{Table}, the checks every part uses (model ids, URLs,
destinations, C{${VAR}} references), and what every model has (L{ModelSpec}, L{V2Spec}, L{OpenAISpec}).
Pure on purpose (no Twisted).
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from aibackend.ratelimit import LIMIT_KEYS, Limits, parse_limits
from aibackend.tensors import DATATYPES, TensorSpec, check_shape_value

DEFAULT_LOG_ENTRIES = 1000
MAX_ID_LENGTH = 128
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
EMPTY_MAP: Mapping[str, str] = MappingProxyType({})

# A key that must be given (a getter's default), or that was not (what pop_alias returns).
REQUIRED = object()


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


def type_name(value) -> str:
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

        @return: C{(the name used, the value)}, or C{(key, REQUIRED)} if absent.
        """
        present = [name for name in (key, *aliases) if name in self._data]
        if len(present) > 1:
            self.problem(present[1], f"give only one of {', '.join(present)}")
        values = [self._data.pop(name) for name in present]
        if present:
            return present[0], values[0]
        return key, REQUIRED

    def get(self, key, default=REQUIRED, aliases=()):
        """
        Take C{key} (or an alias) out of the table, unchecked.

        @return: C{(the name used, the value)}; C{default} if absent (a problem if required).
        """
        name, value = self.pop_alias(key, *aliases)
        if value is REQUIRED:
            if default is REQUIRED:
                self.problem(key, "is required")
            return name, default
        return name, value

    def string(self, key: str, default=REQUIRED, *, aliases=(), nonempty=True):
        name, value = self.get(key, default, aliases)
        if value is default:
            return value
        if not isinstance(value, str):
            self.problem(name, f"must be a string, got {type_name(value)}")
            return default if default is not REQUIRED else None
        if nonempty and not value.strip():
            self.problem(name, "must not be empty")
        return value

    def number(self, key: str, default=REQUIRED, *, minimum=None, maximum=None, integer=False, exclusive_minimum=False):
        name, value = self.get(key, default, ())
        if value is default:
            return value
        kinds = (int,) if integer else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            wanted = "an integer" if integer else "a number"
            self.problem(name, f"must be {wanted}, got {type_name(value)}")
            return default if default is not REQUIRED else None
        if value != value or value in (float("inf"), float("-inf")):
            self.problem(name, "must be a finite number")
            return default if default is not REQUIRED else None
        if minimum is not None and (value <= minimum if exclusive_minimum else value < minimum):
            self.problem(name, f"must be {'more than' if exclusive_minimum else 'at least'} {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.problem(name, f"must be at most {maximum}, got {value}")
        return value

    def boolean(self, key: str, default: bool | None) -> bool | None:
        name, value = self.get(key, default, ())
        if value is default:  # absent (a default of None: neither true nor false was said)
            return value
        if not isinstance(value, bool):
            self.problem(name, f"must be true or false, got {type_name(value)}")
            return default
        return value

    def string_list(self, key: str, default=REQUIRED, *, allow_single=False, nonempty=True):
        name, value = self.get(key, default, ())
        if value is default:
            return value
        if allow_single and isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            self.problem(name, "must be a list of strings")
            return default if default is not REQUIRED else ()
        if nonempty and not value:
            self.problem(name, "must not be empty")
        return tuple(value)

    def string_map(self, key: str, default=REQUIRED):
        name, value = self.get(key, default, ())
        if value is default:
            return value
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            self.problem(name, "must be a table of strings")
            return default if default is not REQUIRED else MappingProxyType({})
        return MappingProxyType(dict(value))

    def table(self, key: str):
        name, value = self.get(key, {}, ())
        if not isinstance(value, dict):
            self.problem(name, f"must be a table, got {type_name(value)}")
            value = {}
        return Table(value, self.key_path(name), self.problems)

    def finish(self) -> None:
        for key in sorted(self._data):
            self.problem(key, NOT_HERE.get(key, "is not a known key"))
        self._data.clear()


# Keys some tables know and others not: what a table that does not know one says of it.
NOT_HERE = {
    "batching": "is not a known key here: only a subprocess model with protocol = \"jsonl\" and an HTTP "
                "model can batch",
}


# --- declarations ------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """
    One configuration key, declared once (the metadata of a spec's dataclass field).

    @ivar kind: how it is read: C{number}, C{integer}, C{string}, C{boolean}, C{choice},
        C{strings}, C{string_map}, or C{custom} (read by its spec's parser).
    @ivar default: the value when the key is absent (L{REQUIRED}: it must be given).
    @ivar doc: what it means, one line of Markdown (the README's reference).
    @ivar key: the key in the table, if not the field's name.
    @ivar aliases: other names accepted for the key.
    @ivar required: the key must be given although the field has a default.
    @ivar minimum: the least value (numbers); more than it with C{exclusive_minimum}.
    @ivar maximum: the largest value (numbers).
    @ivar as_float: a number is made a float (else kept as written: an int stays one).
    @ivar choices: the values a C{choice} may take (given in any case, with spaces around).
    @ivar allow_single: a C{strings} key may be one string, meaning a list of one.
    @ivar nonempty: a C{string} or C{strings} key may not be empty.
    @ivar check: C{(table, key, value, environ) -> value}, run once the value is read:
        more problems to report, or the value made what the spec holds.
    @ivar secret: C{(name, value) -> bool} for a table of strings: which values the
        masked view (L{public_of}) shows as C{"***"}.
    @ivar show: C{value -> JSON} for the masked view, when the value is not one already
        (a tuple is shown as a list, a mapping as an object).
    @ivar public: in the masked view: C{always}, C{if-set} (left out when empty, shown
        after the others when not), C{unless-default} (left out when it is the default
        itself), C{flatten} (a nested spec whose keys are shown at the end, beside the
        others), C{never}.
    @ivar shown: the reference's "default" cell, when not the default itself.
    @ivar label: the reference's "key" cell, when not the key itself.
    """

    kind: str
    default: Any
    doc: str
    key: str | None = None
    aliases: tuple = ()
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    as_float: bool = True
    choices: tuple = ()
    allow_single: bool = False
    nonempty: bool = True
    check: Callable | None = None
    secret: Callable[[str, str], bool] | None = None
    show: Callable | None = None
    public: str = "always"
    shown: str | None = None
    label: str | None = None


def _declare(kind: str, default, doc: str, **options):
    setting = Setting(kind, default, doc, **options)
    metadata = {"setting": setting}
    if default is REQUIRED:
        return field(metadata=metadata)
    if isinstance(default, Mapping):
        return field(default_factory=lambda: default, metadata=metadata)
    return field(default=default, metadata=metadata)


def number(default, *, doc: str, minimum=None, maximum=None, exclusive_minimum=False, as_float=True, **options):
    """
    A number of seconds, bytes/s...: an int or a float in the file, a float in the spec
    (or, not C{as_float}, kept as written).
    """
    return _declare("number", default, doc, minimum=minimum, maximum=maximum, exclusive_minimum=exclusive_minimum,
                    as_float=as_float, **options)


def integer(default, *, doc: str, minimum=None, maximum=None, **options):
    return _declare("integer", default, doc, minimum=minimum, maximum=maximum, **options)


def string(default, *, doc: str, **options):
    return _declare("string", default, doc, **options)


def boolean(default: bool, *, doc: str, **options):
    return _declare("boolean", default, doc, **options)


def choice(default: str, choices: tuple, *, doc: str, **options):
    return _declare("choice", default, doc, choices=choices, **options)


def strings(default, *, doc: str, **options):
    """A list of strings (a tuple in the spec)."""
    return _declare("strings", default, doc, **options)


def string_map(default=EMPTY_MAP, *, doc: str, **options):
    """A table of strings (a read-only mapping in the spec)."""
    return _declare("string_map", default, doc, **options)


def custom(default, *, doc: str, **options):
    """A key its spec's parser reads itself (see L{read_settings}'s C{readers})."""
    return _declare("custom", default, doc, **options)


@functools.cache
def settings_of(cls) -> tuple[tuple[str, Setting], ...]:
    """C{(field name, L{Setting})} for each declared field of a spec class, in field order."""
    return tuple((f.name, f.metadata["setting"]) for f in fields(cls) if "setting" in f.metadata)


def setting_of(cls, name: str) -> Setting:
    return next(setting for field_name, setting in settings_of(cls) if field_name == name)


def read_setting(table: Table, name: str, setting: Setting, environ: Mapping[str, str] = EMPTY_MAP):
    """
    Read one declared key from C{table}, reporting its problems there.

    @return: the value for the spec: the default when the key is absent, or when its
        value is of the wrong kind (a problem is reported then).
    """
    key = setting.key or name
    kind = setting.kind
    wanted = REQUIRED if setting.required else setting.default
    fallback = None if setting.default is REQUIRED else setting.default
    if kind in ("number", "integer"):
        value = table.number(key, wanted, minimum=setting.minimum, maximum=setting.maximum,
                             integer=kind == "integer", exclusive_minimum=setting.exclusive_minimum)
        if kind == "number" and setting.as_float and isinstance(value, (int, float)):
            value = float(value)
    elif kind == "string":
        value = table.string(key, wanted, aliases=setting.aliases, nonempty=setting.nonempty)
    elif kind == "boolean":
        value = table.boolean(key, setting.default)
    elif kind == "choice":
        value = table.string(key, wanted)
        if isinstance(value, str) and value is not setting.default:
            value = value.strip().lower()
            if value not in setting.choices:
                # Kept as given: a spec with problems is never used, and its parser may
                # tell a wrong value from an absent one.
                table.problem(key, f"must be one of {', '.join(setting.choices)}, got {value!r}")
    elif kind == "strings":
        value = table.string_list(key, wanted, allow_single=setting.allow_single, nonempty=setting.nonempty)
    elif kind == "string_map":
        value = table.string_map(key, wanted)
    else:
        raise TypeError(f"{name} ({kind}) is read by its spec's parser: give read_settings a reader for it")
    if value is None or value is REQUIRED:
        value = fallback
    if setting.check is not None and value is not None:
        value = setting.check(table, key, value, environ)
    return value


def read_settings(table: Table, cls, environ: Mapping[str, str] = EMPTY_MAP, *, skip=(), readers=None) -> dict:
    """
    Read every declared key of spec class C{cls} from C{table}, in field order.

    @param skip: field names not to read (those already read, e.g. what every model has).
    @param readers: field name -> a callable that reads that field in its turn (the
        C{custom} ones, or one checked against those before it), given the values read so far.
    @return: field name -> value, for the spec's constructor.
    """
    readers = readers or {}
    values = {}
    for name, setting in settings_of(cls):
        if name in skip:
            continue
        if name in readers:
            values[name] = readers[name](values)
        else:
            values[name] = read_setting(table, name, setting, environ)
    return values


def keys_of(cls, *, skip=()) -> tuple:
    """The keys a spec class reads (aliases not included), in field order."""
    return tuple(setting.key or name for name, setting in settings_of(cls) if name not in skip)


def _public_value(value):
    if isinstance(value, tuple):
        return list(value)
    if isinstance(value, Mapping):
        return dict(value)
    return value


def public_of(spec) -> dict:
    """
    A spec as JSON, from its declarations: secrets masked, nested specs (a model's
    process) flattened after the other keys.
    """
    described: dict = {}
    optional: dict = {}
    nested = []
    for name, setting in settings_of(type(spec)):
        value = getattr(spec, name)
        shown = setting.public
        if shown == "never" or (shown == "if-set" and not value) or (
            shown == "unless-default" and value is setting.default
        ):
            continue
        if shown == "flatten":
            if value is not None:
                nested.append(value.public())
            continue
        if setting.secret is not None:
            value = {key: ("***" if setting.secret(key, item) else item) for key, item in value.items()}
        shown_as = optional if setting.public == "if-set" else described
        shown_as[name] = setting.show(value) if setting.show is not None else _public_value(value)
    described.update(optional)
    for more in nested:
        described.update(more)
    return described


def _default_cell(setting: Setting) -> str:
    if setting.shown is not None:
        return setting.shown
    if setting.required or setting.default is REQUIRED:
        return "required"
    value = setting.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, float):
        text = f"{value:g}"
    elif isinstance(value, (tuple, list)):
        text = json.dumps(list(value))
    elif isinstance(value, Mapping):
        text = json.dumps(dict(value))
    elif isinstance(value, str):
        text = json.dumps(value)
    else:
        text = str(value)
    return f"`{text}`"


def reference_rows(cls, *, skip=(), only=None) -> list[str]:
    """
    The README's reference rows (C{| key | default | meaning |}) of a spec class's keys.

    @param skip: field names left out (e.g. those of L{ModelSpec}, in a model type's table).
    @param only: if given, just these field names.
    """
    rows = []
    for name, setting in settings_of(cls):
        if name in skip or (only is not None and name not in only):
            continue
        label = setting.label or f"`{setting.key or name}`"
        if setting.aliases:
            label += f" (alias {', '.join(f'`{alias}`' for alias in setting.aliases)})"
        rows.append(f"| {label} | {_default_cell(setting)} | {setting.doc} |")
    return rows


def reference_table(rows: list[str]) -> str:
    return "\n".join(["| key | default | meaning |", "| --- | --- | --- |", *rows])


# --- checks every part uses ------------------------------------------------------------


def check_model_id(value) -> str | None:
    """
    @return: what is wrong with a model id, or None if it is a good one.
    """
    if not isinstance(value, str):
        return f"must be a string, got {type_name(value)}"
    if not value:
        return "must not be empty"
    if len(value) > MAX_ID_LENGTH:
        return f"must be at most {MAX_ID_LENGTH} characters, got {len(value)}"
    if not ID_PATTERN.match(value):
        return "must start with a letter or digit and hold only letters, digits, '_', '.' and '-'"
    return None


MAX_FALLBACKS = 8  # a chain longer than this is a mistake, and each step costs the client time


def check_fallbacks(table: Table, key: str, value: tuple, environ=None) -> tuple:
    """
    A model's C{fallbacks}: model ids, none twice, at most L{MAX_FALLBACKS}. (That a
    model is not its own fallback is checked where its id is known, L{check_not_own_fallback}.)
    """
    seen = set()
    for index, item in enumerate(value):
        problem = check_model_id(item)
        if problem:
            table.problem(f"{key}[{index}]", problem)
        elif item in seen:
            table.problem(f"{key}[{index}]", f"names model {item!r} twice")
        seen.add(item)
    if len(value) > MAX_FALLBACKS:
        table.problem(key, f"may name at most {MAX_FALLBACKS} models, got {len(value)}")
    return value


def check_not_own_fallback(table: Table, model_id: str | None, fallbacks: tuple) -> None:
    """A model may not name itself among its C{fallbacks}."""
    if model_id is not None and model_id in fallbacks:
        table.problem(f"fallbacks[{fallbacks.index(model_id)}]", f"names the model itself ({model_id!r})")


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


def check_env_map(table: Table, key: str, value: Mapping[str, str], environ: Mapping[str, str]):
    """A table of strings whose values may hold C{${VAR}}: each variable must be set."""
    for name, template in value.items():
        for variable in env_references(template):
            if variable not in environ:
                table.problem(f"{key}.{name}", f"names environment variable {variable} that is not set")
    return value


def holds_env_reference(name: str, value: str) -> bool:
    """A value shown masked: it names an environment variable (a secret kept out of files)."""
    return bool(env_references(value))


# --- what every model has --------------------------------------------------------------


def _check_version(table: Table, key: str, value: str, environ) -> str:
    if not ID_PATTERN.match(value):
        table.problem(key, f"must be letters, digits, '.', '_' or '-', got {value!r}")
    return value


def _public_tensors(tensors: tuple) -> list:
    return [tensor.public() for tensor in tensors]


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

    inputs: tuple = custom((), doc="the declared inputs: a list of `{name, datatype, shape}` (`-1` for any size)",
                           show=_public_tensors)
    outputs: tuple = custom((), doc="the declared outputs, likewise", show=_public_tensors)
    platform: str | None = string(None, doc="what the metadata says the model runs on", public="if-set")
    version: str = string("1", doc="the model's one version", check=_check_version)
    native: bool = boolean(False, doc="an HTTP model's server speaks v2 itself: requests are proxied")
    model: str | None = string(None, doc="with `native`: the model's name on its server (default: the id)",
                               public="if-set")

    def public(self) -> dict:
        return public_of(self)


DEFAULT_V2 = V2Spec()


def _tensor_specs(table: Table, key: str) -> tuple:
    name, value = table.get(key, [], ())
    if not isinstance(value, list):
        table.problem(name, f"must be a list of {{name, datatype, shape}} tables, got {type_name(value)}")
        return ()
    specs = []
    for index, item in enumerate(value):
        where = Table(item if isinstance(item, dict) else {}, f"{table.key_path(key)}[{index}]", table.problems)
        if not isinstance(item, dict):
            where.problem(None, f"must be a table with name, datatype and shape, got {type_name(item)}")
            continue
        tensor_name = where.string("name")
        datatype = where.string("datatype")
        if isinstance(datatype, str) and datatype.upper() not in DATATYPES:
            where.problem("datatype", f"must be one of {', '.join(DATATYPES)}, got {datatype!r}")
        _, shape = where.get("shape", REQUIRED, ())
        problem = check_shape_value(shape, declared=True) if shape is not REQUIRED else None
        if problem:
            where.problem("shape", problem)
        where.finish()
        if isinstance(tensor_name, str) and tensor_name in [spec.name for spec in specs]:
            where.problem("name", f"{tensor_name!r} is declared twice")
        elif isinstance(tensor_name, str) and isinstance(datatype, str) and not problem and shape is not REQUIRED:
            specs.append(TensorSpec(tensor_name, datatype.upper(), tuple(shape)))
    return tuple(specs)


def parse_v2(table: Table, type_name: str) -> V2Spec:
    """Read a model's C{[models.v2]} table."""
    values = read_settings(table, V2Spec, readers={
        "inputs": lambda values: _tensor_specs(table, "inputs"),
        "outputs": lambda values: _tensor_specs(table, "outputs"),
    })
    native, model = values["native"], values["model"]
    if native and type_name != "http":
        table.problem("native", "only an HTTP model's server can speak v2 itself")
    if model is not None and not native:
        table.problem("model", "names the model on a server that speaks v2: it needs native = true")
    if native and (values["inputs"] or values["outputs"]):
        table.problem("native", "a native v2 model declares its own inputs and outputs: leave them out")
    table.finish()
    return V2Spec(**values)


V2_DOC = (
    "how the model looks through the [Open Inference Protocol](#the-open-inference-protocol-kserve-v2): "
    "`inputs` and `outputs` (lists of `{name, datatype, shape}`, `-1` for any size), `platform`, "
    f"`version` (default {_default_cell(setting_of(V2Spec, 'version'))}), and for an HTTP model whose server "
    "speaks v2 itself `native = true` and `model` (its name there, default the id)"
)

def _mask(value):
    return "***"


@dataclass(frozen=True)
class OpenAISpec:
    """
    How a model is seen through the OpenAI-compatible API (C{[models.openai]}).

    @ivar native: the model's server speaks OpenAI itself (HTTP models): each C{/v1}
        request is proxied to the same route under the model's URL (its base, e.g.
        C{http://host:port/v1}), only C{model} rewritten.
    @ivar model: the model's name on that server (default: the model's id).
    @ivar api_key: the upstream's key, sent as C{Authorization: Bearer}; may hold
        C{${VAR}} (expanded when the model is made, as C{headers} are). Always masked.
    @ivar api_key_file: a file whose text (stripped) is the key, instead.
    """

    native: bool = boolean(False, doc="an HTTP model's server speaks OpenAI itself: /v1 requests are proxied")
    model: str | None = string(None, doc="with `native`: the model's name on its server (default: the id)",
                               public="if-set")
    api_key: str | None = string(None, doc="with `native`: the upstream's key (`${VAR}` allowed), sent as "
                                           "`Authorization: Bearer`", public="if-set", show=_mask)
    api_key_file: str | None = string(None, doc="with `native`: a file holding the upstream's key",
                                      public="if-set")

    def public(self) -> dict:
        return public_of(self)


DEFAULT_OPENAI = OpenAISpec()


def read_key_file(path: str) -> str:
    """
    The key in the file at C{path}: its text without the whitespace around it.

    @raise OSError: it cannot be read.
    @raise ValueError: it holds no key.
    """
    with open(path, encoding="utf-8") as f:
        key = f.read().strip()
    if not key:
        raise ValueError("is empty")
    if "\n" in key or "\r" in key:
        raise ValueError("holds more than one line")
    return key


def parse_openai(table: Table, type_name: str, environ: Mapping[str, str]) -> OpenAISpec:
    """Read a model's C{[models.openai]} table."""
    values = read_settings(table, OpenAISpec, environ)
    native = values["native"]
    if native and type_name != "http":
        table.problem("native", "only an HTTP model's server can speak OpenAI itself")
    for key in ("model", "api_key", "api_key_file"):
        if values[key] is not None and not native:
            table.problem(key, "is for a server that speaks OpenAI itself: it needs native = true")
    key, path = values["api_key"], values["api_key_file"]
    if key is not None and path is not None:
        table.problem("api_key", "give either api_key or api_key_file")
    if key is not None:
        missing = [name for name in env_references(key) if name not in environ]
        if missing:
            table.problem("api_key", f"names environment variable {', '.join(missing)}, which is not set")
        if "\r" in key or "\n" in key:
            table.problem("api_key", "must not hold a line break")
    if path is not None:
        try:
            read_key_file(path)
        except OSError as e:
            table.problem("api_key_file", f"{path!r} cannot be read: {e.strerror or e}")
        except UnicodeDecodeError:
            table.problem("api_key_file", f"{path!r} is not UTF-8 text")
        except ValueError as e:
            table.problem("api_key_file", f"{path!r} {e}")
    table.finish()
    return OpenAISpec(**values)


OPENAI_DOC = (
    "how the model is served by the [OpenAI-compatible API](#openai-compatible-api): for an HTTP model whose "
    "server speaks OpenAI itself `native = true` (its `url` is the base of its routes, e.g. "
    "`http://host:8000/v1`), `model` (its name there, default the id) and its key, `api_key` (`${VAR}` "
    "allowed) or `api_key_file`, sent as `Authorization: Bearer` and always masked"
)

# --- [models.batching] -------------------------------------------------------------------


def _check_preferred(table: Table, key: str, value, environ) -> tuple:
    if not isinstance(value, list) or not all(isinstance(size, int) and not isinstance(size, bool)
                                              for size in value):
        table.problem(key, f"must be a list of integers, got {type_name(value)}")
        return ()
    if any(size < 1 for size in value):
        table.problem(key, f"must hold sizes of at least 1, got {value}")
        return ()
    if len(set(value)) != len(value):
        table.problem(key, f"names a size twice: {value}")
    return tuple(sorted(set(value)))


@dataclass(frozen=True)
class BatchingSpec:
    """
    How a model's requests are gathered into batches (C{[models.batching]},
    L{aibackend.batching}).

    @ivar max_batch_size: the most requests in one batch (a full batch leaves at once).
    @ivar max_delay_ms: how long the first request of a batch may wait for company.
    @ivar preferred_sizes: sizes a batch leaves at as soon as nothing else is waiting.
    """

    max_batch_size: int = integer(REQUIRED, minimum=1, maximum=65536,
                                  doc="the most requests in one batch; a full batch leaves at once")
    max_delay_ms: float = number(0, minimum=0, maximum=60_000, as_float=False,
                                 doc="milliseconds the first request of a batch may wait for company (`0`: "
                                     "only those that arrive in the same turn of the reactor)")
    preferred_sizes: tuple = custom((), check=_check_preferred, show=list,
                                    doc="sizes a batch leaves at as soon as it reaches one and nothing else "
                                        "is waiting")

    def public(self) -> dict:
        return public_of(self)


def parse_batching(table: Table, *, max_queue: int, timeout: float, cls=BatchingSpec,
                   environ: Mapping[str, str] = EMPTY_MAP) -> BatchingSpec | None:
    """
    Read a model's C{[models.batching]} table (the model's C{max_queue} bounds a batch).

    @param cls: L{BatchingSpec}, or a subclass of it declaring a model type's own keys
        (an HTTP model's C{url}).
    """
    values = read_settings(table, cls, environ, readers={
        "preferred_sizes": lambda values: _check_preferred(
            table, "preferred_sizes", table.get("preferred_sizes", [], ())[1], EMPTY_MAP),
    })
    table.finish()
    size = values["max_batch_size"]
    if not isinstance(size, int):
        return None
    too_big = [preferred for preferred in values["preferred_sizes"] if preferred > size]
    if too_big:
        table.problem("preferred_sizes", f"must be at most max_batch_size ({size}), got {too_big[0]}")
    if size > max_queue:
        table.problem("max_batch_size", f"is more than the model's max_queue ({max_queue}): the requests that "
                                        "wait to be batched count in that queue, so no batch could fill")
    if values["max_delay_ms"] / 1000 >= timeout:
        table.problem("max_delay_ms", f"must be shorter than the model's timeout ({timeout:g} s)")
    return cls(**values)


def read_batching(table: Table, values: dict, *, cls=BatchingSpec, environ: Mapping[str, str] = EMPTY_MAP,
                  refuse=None, check=None) -> BatchingSpec | None:
    """
    A model's C{[models.batching]} (L{parse_batching}), read once its C{max_queue} and
    C{timeout} are (C{values}); None when it is absent or wrong.

    @param refuse: C{refuse(where)}: true when the model cannot batch (it said why on C{where}).
    @param check: C{check(where, spec)}: the model type's own checks of the spec read.
    """
    if not table.has("batching"):
        return None
    problems = len(table.problems)
    where = table.table("batching")
    if len(table.problems) > problems:
        return None  # not a table
    if refuse is not None and refuse(where):
        return None
    max_queue, timeout = values["max_queue"], values["timeout"]
    if not isinstance(max_queue, int) or not isinstance(timeout, (int, float)):
        return None
    spec = parse_batching(where, max_queue=max_queue, timeout=timeout, cls=cls, environ=environ)
    if spec is not None and check is not None:
        check(where, spec)
    return spec


BATCHING_DOC = (
    "[dynamic batching](#batching) (`protocol = \"jsonl\"` only): `max_batch_size` (required), `max_delay_ms` "
    "(default `0`: only what arrives in the same turn of the reactor) and `preferred_sizes` (a list)"
)


# --- [models.limits] ---------------------------------------------------------------------


def read_limits(table: Table) -> Limits | None:
    """
    A model's C{[models.limits]} (L{aibackend.ratelimit.parse_limits}, as a key's limits
    are read); None when it is absent, sets no limit, or is wrong (a problem reported).
    """
    if not table.has("limits"):
        return None
    _, value = table.get("limits")
    try:
        limits = parse_limits(value, "limits")
    except ValueError as e:
        table.problem(None, str(e))
        return None
    return limits if limits.any() else None


LIMITS_DOC = (
    "[limits](#limits) of the model, over all its callers and every `--processes` process: "
    + ", ".join(f"`{name}` ({meaning})" for name, meaning in LIMIT_KEYS.items())
    + "; past one a request is refused with 429 and `Retry-After`"
)


DEFAULT_TIMEOUT = 60.0
DEFAULT_KEEPALIVE = 15.0
DEFAULT_STREAM_BUFFER = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    """
    What every model has.

    Every spec also answers these, whatever its type (a type without them has the
    defaults), so that callers need not ask which type a spec is:

    @ivar timeout: seconds a request to the model may take (L{DEFAULT_TIMEOUT} for a
        type that has no such key).
    @ivar process: the L{aibackend.subprocspec.ProcessSettings} of the program the daemon
        starts for the model, or None.
    @ivar urls: every URL the daemon connects to for the model; C{()} for none.
    """

    id: str = custom(REQUIRED, doc=f"letters, digits, `_`, `.`, `-`; at most {MAX_ID_LENGTH} characters")
    type: str = custom(REQUIRED, doc="`http` (alias `httpmodel`) or `subprocess` (alias `subprocessmodel`); "
                                     "case-insensitive")
    log_entries: int = integer(DEFAULT_LOG_ENTRIES, minimum=1, maximum=1_000_000, shown="server's",
                               doc="how many entries the model's log keeps (oldest dropped first)")
    v2: V2Spec = custom(DEFAULT_V2, doc=V2_DOC, label="`[models.v2]`", shown="none",
                        public="unless-default", show=V2Spec.public)
    openai: OpenAISpec = custom(DEFAULT_OPENAI, doc=OPENAI_DOC, label="`[models.openai]`", shown="none",
                                public="unless-default", show=OpenAISpec.public)
    limits: Limits | None = custom(None, doc=LIMITS_DOC, label="`[models.limits]`", shown="none",
                                   public="unless-default", show=Limits.table)
    # How a streamed answer is kept moving (aibackend.relay.StreamWriter); a plain request
    # is not affected by them. Shown in the masked view once given.
    first_chunk_timeout: float | None = number(
        None, minimum=0, exclusive_minimum=True, maximum=86400, public="unless-default", shown="none",
        doc="a [stream](#streamed-answers)'s seconds until the model's first chunk; past it the model's work is "
            "cancelled and the client gets 504 (an `event: error` with the 504 document if a keepalive went "
            "already). Unset: only the model's `timeout` bounds it",
    )
    stream_idle_timeout: float | None = number(
        None, minimum=0, exclusive_minimum=True, maximum=86400, public="unless-default", shown="none",
        doc="a stream's seconds allowed between two chunks (after the first; while the client's connection is "
            "full the model is not idle); past it the stream ends with an error event (the 504 document) and the "
            "model's work is cancelled",
    )
    keepalive_seconds: float = number(
        DEFAULT_KEEPALIVE, minimum=0, maximum=3600, public="unless-default",
        doc="while an SSE stream has written nothing for this long, the comment `: keepalive` is written (the "
            "first one sends the status 200 and headers), so that proxies do not cut a slow first chunk; `0`: "
            "none. NDJSON streams get none (a line there would be a chunk)",
    )
    max_stream_buffer_bytes: int = integer(
        DEFAULT_STREAM_BUFFER, minimum=1, maximum=1 << 30, public="unless-default",
        doc="bytes of a stream that may wait, unsent, while its client reads slower than the model writes (its "
            "connection's send buffer is full); past it the stream ends with an error event (408 `slow_client`) "
            "and the model's work is cancelled",
    )

    # The models a request goes to, in turn, when this one fails before its client got a
    # byte (aibackend.relay's chains). Names are resolved when a request comes: a model
    # named here may be added later, or removed (it is then skipped).
    fallbacks: tuple = strings(
        (), nonempty=False, public="if-set", check=check_fallbacks,
        doc="model ids a request goes to, in turn, when this model fails before the client got a byte (connection "
            "refused or reset, 429, 5xx, timeout, not ready), under this model's `timeout` from when the request "
            "came; see [Fallbacks](#keys-limits-fallbacks-and-usage). Not followed further (a fallback's own `fallbacks` are not used); "
            "a model named that does not exist when a request comes is skipped",
    )

    timeout = DEFAULT_TIMEOUT
    process = None
    urls = ()
    batching = None  # a BatchingSpec where the type can batch and [models.batching] says so

    def public(self) -> dict:
        """The spec as JSON, secrets masked."""
        return public_of(self)

    @property
    def destinations(self) -> tuple:
        """Every URL the daemon connects to for the model: its L{urls}, and any other route's."""
        return self.urls


MODEL_FIELDS = tuple(name for name, _ in settings_of(ModelSpec))
# What every model has for its streams, read with the other common keys (L{read_stream_settings}).
STREAM_FIELDS = ("first_chunk_timeout", "stream_idle_timeout", "keepalive_seconds", "max_stream_buffer_bytes")


def read_fallbacks(table: Table, model_id: str | None) -> tuple:
    """A model's C{fallbacks} (L{check_fallbacks}), none of them the model itself."""
    fallbacks = read_setting(table, "fallbacks", setting_of(ModelSpec, "fallbacks"))
    check_not_own_fallback(table, model_id, fallbacks)
    return fallbacks


def read_stream_settings(table: Table) -> dict:
    """A model's stream settings (L{STREAM_FIELDS}), for the fields every model has."""
    return read_settings(table, ModelSpec, skip=tuple(name for name in MODEL_FIELDS if name not in STREAM_FIELDS))


def read_log_entries(table: Table, default: int) -> int:
    """A model's C{log_entries}, whose default is the server's."""
    return read_setting(table, "log_entries", replace(setting_of(ModelSpec, "log_entries"), default=default))
