"""
aibackend.config: TOML in, frozen validated specs out, every problem named by its key path.
"""

import dataclasses
import os
import tomllib

import pytest

from aibackend.config import ConfigError, HttpModelSpec, Table, load_config, parse_config, parse_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "etc", "aibackend.toml")


def http_model(**fields):
    table = {"id": "m", "type": "http", "url": "http://127.0.0.1:9001/predict"}
    table.update(fields)
    return {key: value for key, value in table.items() if value is not None}


def problems_of(data, environ=None, source=None):
    with pytest.raises(ConfigError) as caught:
        parse_config(data, source, environ=environ if environ is not None else {})
    return caught.value.problems


def problem_at(data, path, environ=None):
    """The one message about C{path}; fails if there is none."""
    problems = problems_of(data, environ)
    messages = [message for where, message in problems if where == path]
    assert messages, f"no problem reported at {path!r}; got {problems!r}"
    return messages[0]


# --- what loads ----------------------------------------------------------------


def test_the_example_configuration_loads():
    config = load_config(EXAMPLE, environ={})

    assert config.source == EXAMPLE
    assert config.server.listen == ("tcp:8080:interface=127.0.0.1",)
    assert config.server.max_body_bytes == 16 * 1024 * 1024
    by_id = {spec.id: spec for spec in config.models}
    assert list(by_id)[:2] == ["sentiment", "echo"]
    sentiment = by_id["sentiment"]
    assert isinstance(sentiment, HttpModelSpec)
    assert sentiment.type == "http"
    assert sentiment.url == "http://127.0.0.1:9001/sentiment"
    assert sentiment.timeout == 30
    assert sentiment.connect_timeout == 5
    assert dict(by_id["echo"].headers) == {"X-Served-By": "aibackend"}


def test_specs_are_frozen():
    config = parse_config({"models": [http_model()]}, environ={})

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.models[0].url = "http://elsewhere/"


def test_an_empty_configuration_has_the_defaults():
    config = parse_config({}, environ={})

    assert config.models == ()
    assert config.server.listen == ("tcp:8080:interface=127.0.0.1",)
    assert config.server.max_body_bytes == 16 * 1024 * 1024
    assert config.server.log_entries == 1000


def test_a_single_listen_string_is_a_list_of_one():
    config = parse_config({"server": {"listen": "tcp:0:interface=127.0.0.1"}}, environ={})

    assert config.server.listen == ("tcp:0:interface=127.0.0.1",)


@pytest.mark.parametrize("type_name", ["http", "HTTP", "httpmodel", "HttpModel", " HTTPMODEL "])
def test_type_names_and_aliases_are_case_insensitive(type_name):
    config = parse_config({"models": [http_model(type=type_name)]}, environ={})

    assert config.models[0].type == "http"


@pytest.mark.parametrize(
    "dest, url",
    [
        ("127.0.0.1:8888", "http://127.0.0.1:8888"),
        ('"127.0.0.1:8888"', "http://127.0.0.1:8888"),  # the original README quotes it
        ("localhost:8888/predict", "http://localhost:8888/predict"),
        ("https://models.example/v1", "https://models.example/v1"),
    ],
)
def test_dest_is_an_alias_of_url_and_defaults_to_http(dest, url):
    config = parse_config({"models": [http_model(url=None, dest=dest)]}, environ={})

    assert config.models[0].url == url


def test_url_without_a_scheme_is_refused():
    message = problem_at({"models": [http_model(url="localhost:8888")]}, "models[0].url")

    assert "http://" in message


def test_header_values_may_name_environment_variables_that_are_set():
    data = {"models": [http_model(headers={"Authorization": "Bearer ${API_KEY}"})]}

    config = parse_config(data, environ={"API_KEY": "s3cret"})

    # The spec keeps the reference; the secret is expanded only when sending.
    assert dict(config.models[0].headers) == {"Authorization": "Bearer ${API_KEY}"}
    assert "s3cret" not in repr(config.models[0].public())


def test_model_log_entries_default_to_the_servers():
    config = parse_config({"server": {"log_entries": 7}, "models": [http_model()]}, environ={})

    assert config.models[0].log_entries == 7


# --- what is refused, and where --------------------------------------------------


def test_unknown_keys_are_named_wherever_they_are():
    problems = problems_of(
        {
            "colour": "blue",
            "server": {"listen_on": "tcp:1"},
            "models": [http_model(), http_model(id="n", urll="http://x/")],
        }
    )

    unknown = sorted(where for where, message in problems if message == "is not a known key")
    assert unknown == ["colour", "models[1].urll", "server.listen_on"]


@pytest.mark.parametrize(
    "data, path, wanted",
    [
        ({"server": {"max_body_bytes": "16M"}}, "server.max_body_bytes", "must be an integer, got a string"),
        ({"server": {"max_body_bytes": 0}}, "server.max_body_bytes", "must be at least 1"),
        ({"server": {"listen": [8080]}}, "server.listen", "must be a list of strings"),
        ({"server": {"listen": []}}, "server.listen", "must not be empty"),
        ({"server": 3}, "server", "must be a table, got an integer"),
        ({"models": {"id": "m"}}, "models", "must be an array of tables"),
        ({"models": ["m"]}, "models[0]", "must be a table, got a string"),
        ({"models": [http_model(timeout="30")]}, "models[0].timeout", "must be a number, got a string"),
        ({"models": [http_model(timeout=True)]}, "models[0].timeout", "must be a number, got a boolean"),
        ({"models": [http_model(timeout=0)]}, "models[0].timeout", "must be more than 0"),
        ({"models": [http_model(timeout=float("nan"))]}, "models[0].timeout", "must be a finite number"),
        ({"models": [http_model(log_entries=2.5)]}, "models[0].log_entries", "must be an integer"),
        ({"models": [http_model(headers={"A": 1})]}, "models[0].headers", "must be a table of strings"),
        ({"models": [http_model(headers={"Bad Name": "x"})]}, "models[0].headers.Bad Name", "not a valid HTTP header name"),
        ({"models": [http_model(url=42)]}, "models[0].url", "must be a string, got an integer"),
        ({"models": [http_model(id=7)]}, "models[0].id", "must be a string"),
        ({"models": [http_model(id="")]}, "models[0].id", "must not be empty"),
        ({"models": [http_model(id="a b")]}, "models[0].id", "must start with a letter or digit"),
        ({"models": [http_model(id="x" * 129)]}, "models[0].id", "at most 128 characters"),
        ({"models": [http_model(id=None)]}, "models[0].id", "is required"),
        ({"models": [http_model(type=None)]}, "models[0].type", "is required"),
        ({"models": [http_model(type="telepathy")]}, "models[0].type", "unknown model type 'telepathy'"),
        ({"models": [http_model(url=None)]}, "models[0].url", "is required"),
    ],
)
def test_wrong_values_are_named_by_key_path(data, path, wanted):
    assert wanted in problem_at(data, path)


@pytest.mark.parametrize(
    "url, wanted",
    [
        ("ftp://127.0.0.1/model", "must be an http:// or https:// URL"),
        ("http://", "has no host"),
        ("http:///predict", "has no host"),
        ("http://user:password@127.0.0.1/predict", "must not hold credentials"),
        ("http://127.0.0.1:99999/", "is not a valid URL"),
        ("http://127.0.0.1:0/", "has port 0"),
    ],
)
def test_bad_urls_are_refused(url, wanted):
    message = problem_at({"models": [http_model(url=url)]}, "models[0].url")

    assert wanted in message


def test_dest_with_credentials_is_refused():
    message = problem_at({"models": [http_model(dest="user:password@127.0.0.1:8888", url=None)]}, "models[0].dest")

    assert "must not hold credentials" in message


def test_the_credentials_error_does_not_repeat_the_password():
    message = problem_at({"models": [http_model(url="http://user:hunter2@127.0.0.1/")]}, "models[0].url")

    assert "hunter2" not in message


def test_duplicate_ids_name_both_places():
    problems = problems_of({"models": [http_model(id="twin"), http_model(id="other"), http_model(id="twin")]})

    assert problems == [("models[2].id", "duplicate model id 'twin' (also models[0])")]


def test_a_missing_environment_variable_in_a_header_is_an_error():
    message = problem_at(
        {"models": [http_model(headers={"Authorization": "Bearer ${NOT_SET_ANYWHERE}"})]},
        "models[0].headers.Authorization",
        environ={"SOMETHING_ELSE": "x"},
    )

    assert "NOT_SET_ANYWHERE" in message


def test_every_problem_is_reported_at_once():
    problems = problems_of(
        {
            "server": {"max_body_bytes": -1},
            "models": [http_model(url="ftp://x/"), http_model(id="n", timeout="soon")],
        }
    )

    assert [where for where, _ in problems] == ["server.max_body_bytes", "models[0].url", "models[1].timeout"]


def test_error_lines_name_the_file_and_the_key_path():
    with pytest.raises(ConfigError) as caught:
        parse_config({"models": [http_model(), http_model(id="n", url="ftp://x/")]}, "models.toml", environ={})

    assert caught.value.lines() == ["models.toml: models[1].url: must be an http:// or https:// URL, got 'ftp://x/'"]
    assert str(caught.value) == caught.value.lines()[0]


def test_url_and_dest_together_is_one_problem_about_dest():
    problems = problems_of({"models": [http_model(url="http://127.0.0.1:1/", dest="h:1")]})

    assert problems == [("models[0].dest", "give only one of url, dest")]


# --- files ---------------------------------------------------------------------


def test_a_file_with_a_toml_syntax_error(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text('[[models]]\nid = "m"\ntype = http\n')

    with pytest.raises(ConfigError) as caught:
        load_config(str(path), environ={})

    [line] = caught.value.lines()
    assert line.startswith(f"{path}: is not valid TOML")
    assert "line 3" in line


def test_a_missing_file(tmp_path):
    path = tmp_path / "nowhere.toml"

    with pytest.raises(ConfigError) as caught:
        load_config(str(path), environ={})

    assert caught.value.lines() == [f"{path}: cannot read the configuration: No such file or directory"]


def test_a_file_with_problems_names_itself(tmp_path):
    path = tmp_path / "aibackend.toml"
    path.write_text('[[models]]\nid = "m"\ntype = "http"\nurl = "http://127.0.0.1:1/"\n\n'
                    '[[models]]\nid = "n"\ntype = "http"\ndest = "ftp://x"\n')

    with pytest.raises(ConfigError) as caught:
        load_config(str(path), environ={})

    assert [line.split(": ")[:2] for line in caught.value.lines()] == [[str(path), "models[1].dest"]]


def test_environment_variables_come_from_the_given_environ(tmp_path):
    path = tmp_path / "aibackend.toml"
    path.write_text('[[models]]\nid = "m"\ntype = "http"\nurl = "http://127.0.0.1:1/"\n'
                    'headers = { X-Api-Key = "${MODEL_KEY}" }\n')

    assert load_config(str(path), environ={"MODEL_KEY": "k"}).models[0].id == "m"
    with pytest.raises(ConfigError):
        load_config(str(path), environ={})


# --- each key declared once: the parser, the masked view and the reference read it ---------


README = os.path.join(ROOT, "README.md")
REGENERATE = "python -m aibackend.config --reference README.md"


def test_the_readmes_reference_is_rendered_from_the_declarations():
    from aibackend.config import REFERENCE_BEGIN, REFERENCE_END, reference_markdown

    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert REFERENCE_BEGIN in text and REFERENCE_END in text, f"README.md lost its reference markers; run {REGENERATE}"
    written = text.split(REFERENCE_BEGIN, 1)[1].split(REFERENCE_END, 1)[0]

    assert written.strip() == reference_markdown().strip(), (
        f"README.md's configuration reference differs from the declarations: run {REGENERATE}"
    )


def test_with_reference_rewrites_only_the_marked_section():
    from aibackend.config import REFERENCE_BEGIN, REFERENCE_END, reference_markdown, with_reference

    stale = f"# before\n\n{REFERENCE_BEGIN}\n| stale | table |\n{REFERENCE_END}\n\n# after\n"

    rewritten = with_reference(stale)

    assert rewritten == f"# before\n\n{REFERENCE_BEGIN}\n\n{reference_markdown()}\n{REFERENCE_END}\n\n# after\n"
    assert with_reference(rewritten) == rewritten
    with pytest.raises(ValueError):
        with_reference("no markers here")


def test_the_reference_command_prints_the_reference():
    import subprocess
    import sys

    from aibackend.config import reference_markdown

    printed = subprocess.run([sys.executable, "-m", "aibackend.config", "--reference"], cwd=ROOT,
                             capture_output=True, text=True, check=True, timeout=60).stdout

    assert printed == reference_markdown()


@pytest.mark.parametrize("spec_class", ["ServerSpec", "ModelSpec", "HttpModelSpec", "SubprocessModelSpec",
                                        "ProcessSettings"])
def test_every_declared_key_is_in_the_reference(spec_class):
    from aibackend import config
    from aibackend.configbase import settings_of

    reference = config.reference_markdown()
    for name, setting in settings_of(getattr(config, spec_class)):
        if name == "command" and spec_class == "ProcessSettings":
            continue  # shown in each model type's table
        key = setting.label or f"`{setting.key or name}`"
        assert f"| {key}" in reference, f"{spec_class}.{name} is not in the reference"


def test_the_reference_shows_the_declared_defaults_bounds_aside():
    from aibackend.config import reference_markdown

    reference = reference_markdown()

    assert "| `url` (alias `dest`) | required | where requests are POSTed." in reference
    assert "| `timeout` | `60` | seconds for the whole exchange" in reference
    assert "| `listen` | `[\"tcp:8080:interface=127.0.0.1\"]` |" in reference
    assert "| `protocol` | `\"raw\"` | `raw` or `jsonl` (below) |" in reference
    assert "| `access_log` | `true` |" in reference
    assert "| `max_concurrency` | `0` (no limit) |" in reference
    assert "| `[models.v2]` | none |" in reference


def test_a_parsed_spec_has_the_dataclass_defaults():
    """One default per key: what the parser fills in is what the dataclass says."""
    import sys

    from aibackend.config import ProcessSettings, ServerSpec, SubprocessModelSpec

    config = parse_config({"models": [http_model(), {"id": "s", "type": "subprocess", "command": ["python", "x.py"]}]},
                          environ={})

    assert config.server == ServerSpec()
    http, subprocess_spec = config.models
    assert http == HttpModelSpec(id="m", type="http", url="http://127.0.0.1:9001/predict")
    assert subprocess_spec == SubprocessModelSpec(
        id="s", type="subprocess", process=ProcessSettings(command=("python", "x.py"), executable=sys.executable),
    )


def test_every_spec_answers_timeout_process_and_urls():
    import sys

    from aibackend.config import ModelSpec, ProcessSettings, SubprocessModelSpec

    bare = ModelSpec(id="b", type="mine")
    assert (bare.timeout, bare.process, bare.urls) == (60.0, None, ())

    single = HttpModelSpec(id="m", type="http", url="http://127.0.0.1:9/p", timeout=5.0)
    assert (single.timeout, single.process, single.urls) == (5.0, None, ("http://127.0.0.1:9/p",))
    replicas = HttpModelSpec(id="r", type="http", url="http://a:1/", urls=("http://a:1/", "http://b:1/"))
    assert replicas.urls == ("http://a:1/", "http://b:1/")

    settings = ProcessSettings(command=("python", "x.py"), executable=sys.executable)
    spec = SubprocessModelSpec(id="s", type="subprocess", process=settings, timeout=7.0)
    assert (spec.timeout, spec.process, spec.urls) == (7.0, settings, ())


def test_the_masked_view_of_an_http_model_with_a_server_process(tmp_path):
    import sys

    data = {"models": [http_model(
        headers={"Authorization": "Bearer plain", "X-Api-Key": "k", "X-Token": "${TOKEN}", "X-Mode": "fast"},
        command=["python", "server.py"], cwd=str(tmp_path), env={"SECRET": "${TOKEN}", "MODE": "fast"},
        health_path="/health", kill_timeout=2, timeout=30,
    )]}

    (spec,) = parse_config(data, environ={"TOKEN": "t0ken"}).models
    described = spec.public()

    assert list(described.items()) == [
        ("id", "m"), ("type", "http"), ("log_entries", 1000),
        ("url", "http://127.0.0.1:9001/predict"), ("timeout", 30.0), ("connect_timeout", 10.0),
        ("headers", {"Authorization": "***", "X-Api-Key": "***", "X-Token": "***", "X-Mode": "fast"}),
        ("max_response_bytes", 64 * 1024 * 1024), ("max_concurrency", 0), ("max_queue", 100),
        ("urls", ["http://127.0.0.1:9001/predict"]), ("eject_after", 5), ("eject_seconds", 10.0),
        ("max_eject_seconds", 300.0), ("health_interval", None), ("health_path", "/health"),
        ("command", ["python", "server.py"]), ("cwd", str(tmp_path)), ("env", {"SECRET": "***", "MODE": "fast"}),
        ("startup_timeout", 60.0), ("kill_timeout", 2), ("restart_backoff", 1.0), ("max_backoff", 30.0),
        ("max_crash_loop_backoff", 300.0), ("max_restarts", 5), ("min_uptime", 10.0),
        ("max_line_bytes", 64 * 1024 * 1024),
    ]
    assert sys.executable not in repr(described)  # the resolved program is not shown


def test_the_masked_view_of_a_subprocess_model():
    data = {"models": [{"id": "s", "type": "subprocess", "command": ["python", "x.py"], "protocol": " JSONL ",
                        "max_inflight": 4, "v2": {"platform": "p", "version": "2"}}]}

    (spec,) = parse_config(data, environ={}).models

    assert list(spec.public()) == [
        "id", "type", "log_entries", "v2", "per_process", "protocol", "workers", "max_inflight", "timeout",
        "max_queue", "command", "cwd", "env", "startup_timeout", "kill_timeout", "restart_backoff", "max_backoff",
        "max_crash_loop_backoff", "max_restarts", "min_uptime", "max_line_bytes",
    ]
    assert spec.public()["protocol"] == "jsonl"
    assert spec.public()["v2"] == {"inputs": [], "outputs": [], "version": "2", "native": False, "platform": "p"}
    assert list(spec.public()["v2"]) == ["inputs", "outputs", "version", "native", "platform"]


def test_a_wrong_protocol_is_not_also_a_raw_process_problem():
    problems = problems_of({"models": [{"id": "s", "type": "subprocess", "command": ["python", "x.py"],
                                        "protocol": "grpc", "max_inflight": 4}]})

    assert problems == [("models[0].protocol", "must be one of raw, jsonl, got 'grpc'")]


def test_a_raw_process_with_more_in_flight_is_refused_in_its_turn():
    problems = problems_of({"models": [{"id": "s", "type": "subprocess", "command": ["python", "x.py"],
                                        "max_inflight": 4, "timeout": 0}]})

    assert problems == [
        ("models[0].max_inflight", "a raw process takes one request at a time; use protocol = \"jsonl\""),
        ("models[0].timeout", "must be more than 0, got 0"),
    ]


def test_process_keys_without_a_command_are_named():
    problems = problems_of({"models": [http_model(cwd="/", max_restarts=3, max_line_bytes=100)]})

    assert problems == [
        ("models[0].cwd", "is only used with command (a program the daemon starts)"),
        ("models[0].max_restarts", "is only used with command (a program the daemon starts)"),
        ("models[0].max_line_bytes", "is not a known key"),
    ]


# --- every model's stream settings ---------------------------------------------------------


@pytest.mark.parametrize("table", [
    http_model(),
    {"id": "s", "type": "subprocess", "command": ["python", "x.py"], "protocol": "jsonl"},
])
def test_every_model_type_has_the_stream_settings_with_their_defaults(table):
    (spec,) = parse_config({"models": [table]}, environ={}).models

    assert (spec.first_chunk_timeout, spec.stream_idle_timeout, spec.keepalive_seconds,
            spec.max_stream_buffer_bytes) == (None, None, 15.0, 1024 * 1024)
    for key in ("first_chunk_timeout", "stream_idle_timeout", "keepalive_seconds", "max_stream_buffer_bytes"):
        assert key not in spec.public()  # the masked view shows them once given


@pytest.mark.parametrize("table", [
    http_model(first_chunk_timeout=5, stream_idle_timeout=2.5, keepalive_seconds=0, max_stream_buffer_bytes=4096),
    {"id": "s", "type": "subprocess", "command": ["python", "x.py"], "protocol": "jsonl", "first_chunk_timeout": 5,
     "stream_idle_timeout": 2.5, "keepalive_seconds": 0, "max_stream_buffer_bytes": 4096},
])
def test_the_stream_settings_given_are_read_and_shown(table):
    (spec,) = parse_config({"models": [table]}, environ={}).models

    assert (spec.first_chunk_timeout, spec.stream_idle_timeout, spec.keepalive_seconds,
            spec.max_stream_buffer_bytes) == (5.0, 2.5, 0.0, 4096)
    public = spec.public()
    assert {key: public[key] for key in ("first_chunk_timeout", "stream_idle_timeout", "keepalive_seconds",
                                         "max_stream_buffer_bytes")} == {
        "first_chunk_timeout": 5.0, "stream_idle_timeout": 2.5, "keepalive_seconds": 0.0,
        "max_stream_buffer_bytes": 4096,
    }


def test_bad_stream_settings_are_each_named_with_their_key_path():
    problems = problems_of({"models": [http_model(first_chunk_timeout=0, stream_idle_timeout="1",
                                                  keepalive_seconds=-1, max_stream_buffer_bytes=1.5)]})

    assert problems == [
        ("models[0].first_chunk_timeout", "must be more than 0, got 0"),
        ("models[0].stream_idle_timeout", "must be a number, got a string"),
        ("models[0].keepalive_seconds", "must be at least 0, got -1"),
        ("models[0].max_stream_buffer_bytes", "must be an integer, got a number"),
    ]


def test_addmodels_json_takes_the_stream_settings_too():
    problems = []
    spec = parse_model(Table({"id": "g", "type": "http", "url": "http://127.0.0.1:1/", "keepalive_seconds": 5,
                              "max_stream_buffer_bytes": 0}, "", problems), environ={})
    assert problems == [("max_stream_buffer_bytes", "must be at least 1, got 0")]
    assert spec.keepalive_seconds == 5.0


# --- [models.openai] (a server that speaks OpenAI itself) -------------------------------------


def test_a_native_openai_model(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-a-file\n")
    data = {"models": [
        http_model(id="a", url="http://127.0.0.1:8000/v1", openai={"native": True, "model": "llama",
                                                                    "api_key": "${UP_KEY}"}),
        http_model(id="b", url="http://127.0.0.1:8000/v1", openai={"native": True, "api_key_file": str(key_file)}),
        http_model(id="c"),
    ]}

    a, b, c = parse_config(data, environ={"UP_KEY": "sk-secret"}).models

    assert (a.openai.native, a.openai.model, a.openai.api_key) == (True, "llama", "${UP_KEY}")
    assert a.public()["openai"] == {"native": True, "model": "llama", "api_key": "***"}
    assert b.public()["openai"] == {"native": True, "api_key_file": str(key_file)}
    assert not c.openai.native and "openai" not in c.public()
    assert "sk-secret" not in repr(a) and "sk-from-a-file" not in repr(b)


@pytest.mark.parametrize("openai, path, words", [
    ({"native": "yes"}, "models[0].openai.native", "must be true or false"),
    ({"model": "x"}, "models[0].openai.model", "needs native = true"),
    ({"api_key": "k"}, "models[0].openai.api_key", "needs native = true"),
    ({"native": True, "api_key": "${NOT_SET}"}, "models[0].openai.api_key", "NOT_SET, which is not set"),
    ({"native": True, "api_key": "k", "api_key_file": "/nowhere"}, "models[0].openai.api_key",
     "either api_key or api_key_file"),
    ({"native": True, "api_key_file": "/nowhere/key"}, "models[0].openai.api_key_file", "cannot be read"),
    ({"native": True, "modle": "x"}, "models[0].openai.modle", ""),
])
def test_bad_openai_tables(openai, path, words):
    assert words in problem_at({"models": [http_model(openai=openai)]}, path)


def test_only_an_http_model_is_native_and_its_key_is_not_also_a_header(tmp_path):
    subprocess = {"id": "s", "type": "subprocess", "command": ["python", "x.py"], "openai": {"native": True}}
    assert "only an HTTP model" in problem_at({"models": [subprocess]}, "models[0].openai.native")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    assert "is empty" in problem_at({"models": [http_model(openai={"native": True, "api_key_file": str(empty)})]},
                                    "models[0].openai.api_key_file")
    both = http_model(openai={"native": True, "api_key": "k"}, headers={"Authorization": "Bearer x"})
    assert "leave that header out" in problem_at({"models": [both]}, "models[0].openai.api_key")


def test_the_readmes_native_openai_example_loads():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    block = text.split("**Native upstreams.**", 1)[1].split("```toml\n", 1)[1].split("```", 1)[0]
    (spec,) = parse_config(tomllib.loads(block), environ={"UPSTREAM_API_KEY": "k"}).models
    assert spec.openai.native and spec.openai.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert spec.url == "http://127.0.0.1:8000/v1"
