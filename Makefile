VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= config/netd.yaml

.PHONY: run test test-all test-fast install lint bench stress clean

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# Refresh Twisted's plugin cache now, while the tree is writable.
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

install: $(VENV)/.installed

run: install
	$(VENV)/bin/twistd --nodaemon --pidfile= netd -c $(CONFIG)

lint: install
	$(VENV)/bin/ruff check src tests stress $(wildcard bench)
	$(VENV)/bin/ruff format --check src tests stress $(wildcard bench)
	$(VENV)/bin/mypy

# Four pytest workers on two cores: most integration tests wait on sockets and timers,
# not the CPU, so two more workers cut the wall time by a quarter.
# netd's bytecode is written first: where PYTHONDONTWRITEBYTECODE is set, every daemon
# a test starts would otherwise compile each module it imports again (~50 ms of CPU a start).
test: lint
	$(PY) -m compileall -q src
	$(VENV)/bin/python -m pytest -q -n 4 -m "not slow" tests

# Everything, the slow tests too (load batteries that outlast make test's budget).
test-all: lint
	$(PY) -m compileall -q src
	$(VENV)/bin/python -m pytest -q -n 4 tests

# The unit tier alone: no daemon started, seconds rather than minutes.
test-fast: install
	$(VENV)/bin/python -m pytest -q -n 2 -m "not integration" tests

# Every benchmark in bench/ as one dated run: bench/results/NAME-DATE.md and bench-DATE.md.
# BENCH_QUICK=1 runs each briefly (does it start?); BENCH_ONLY=echo,dns picks some.
bench: install
	$(PY) bench/run_all.py

# Probes against real daemons (kill -9, fuzz, security, slow clients, half-close,
# reloads under load): one table, in under 10 minutes; not part of `make test`.
stress: install
	$(PY) -m stress $(STRESS_ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info state
