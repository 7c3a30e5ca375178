"""
aibackend.config: TOML in, frozen validated specs out, every problem named by its key path.
"""

import dataclasses
import os

import pytest

from aibackend.config import ConfigError, HttpModelSpec, load_config, parse_config

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
