# aibackend: `make run` starts the daemon with the example models, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check --quiet
# compat mode keeps the source tree on sys.path, so twistd finds twisted/plugins/.
EDITABLE := --config-settings editable_mode=compat -e

CONFIG ?= etc/aibackend.toml
PYTEST_ARGS ?=

.PHONY: run test venv clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run-installed: setup.py | $(BIN)/python
	$(PIP) install $(EDITABLE) '.[examples]'
	touch $@

$(VENV)/.test-installed: setup.py | $(BIN)/python
	$(PIP) install $(EDITABLE) '.[test,examples]'
	touch $@

venv: $(VENV)/.run-installed

# The daemon starts the example models itself (etc/aibackend.toml); Ctrl-C stops it all.
run: $(VENV)/.run-installed
	$(BIN)/twistd --pidfile= -n aibackend --config $(CONFIG)

test: $(VENV)/.test-installed
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache twisted/plugins/dropin.cache
