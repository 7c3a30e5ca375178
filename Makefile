# aibackend: `make run` starts the daemon with the example models, `make test` runs every test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check --quiet
# compat mode keeps the source tree on sys.path, so twistd finds twisted/plugins/.
EDITABLE := --config-settings editable_mode=compat -e

CONFIG ?= etc/aibackend.toml
PYTEST_ARGS ?=

.PHONY: run test venv clean bench

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

# The suite mostly waits (real daemons, model processes), so it runs on TEST_WORKERS
# pytest-xdist workers, a test module to a worker (--dist loadscope: a module's shared
# daemon starts once, its tests run in order), the slowest modules first (in the order
# tests/conftest.py collects them); TEST_WORKERS=0 runs it all in one process.
# The fleet's tests (tests/test_fleet_daemon.py, tests/test_redisstore.py) start redis-server
# themselves: Debian's package is installed when it is missing (as root, or through sudo -n,
# never prompting); without it those tests skip, and fail under CI=true.
TEST_WORKERS ?= 4
test: $(VENV)/.test-installed
	@{ command -v redis-server >/dev/null 2>&1 || test -x /usr/bin/redis-server; } || { \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo -n"; \
	  echo "test: installing redis-server (Debian package)"; \
	  { $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq redis-server; } || \
	  echo "test: could not install redis-server; the tests that need it will say so"; }
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache twisted/plugins/dropin.cache

# The benchmark (bench/README.md): wrk and nginx from Debian packages when missing (as root,
# or through sudo), aiohttp for the Python peer, then bench/run.py. BENCH_QUICK=1 for a short
# run; BENCH_DURATION, BENCH_SOAK_REQUESTS and BENCH_ARGS (run.py's flags) tune it.
BENCH_ARGS ?=
$(VENV)/.bench-installed: setup.py | $(BIN)/python
	$(PIP) install $(EDITABLE) '.[test,examples,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	@missing=""; \
	command -v wrk >/dev/null 2>&1 || missing="wrk"; \
	{ command -v nginx >/dev/null 2>&1 || test -x /usr/sbin/nginx; } || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo="sudo"; \
	  pkgs=$$(echo "$$missing" | sed 's/nginx/nginx-light/'); \
	  echo "bench: installing $$pkgs (Debian packages)"; \
	  $$sudo apt-get update -qq && \
	  { DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$pkgs || \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$(echo "$$pkgs" | sed 's/nginx-light/nginx/'); } || \
	  echo "bench: could not install $$pkgs; bench/run.py will say what is missing"; \
	fi
	$(BIN)/python bench/run.py $(BENCH_ARGS)
