# dwsproxy: `make demo` and `make test` work on a fresh machine (they install what they need).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NODE   := tests/integration/node
NODE_STAMP := $(NODE)/node_modules/.installed

.PHONY: setup system-deps demo test unit lint fuzz bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# PostgreSQL server binaries, psql, and the real clients' system parts (pgjdbc and a JDK,
# psqlODBC and unixODBC, Node.js and npm); apt-get only for what is missing, and only when we
# may (root).
system-deps:
	@bash .ci/system-deps

# node-postgres for tests/integration/test_clients.py, at the version package-lock.json pins.
$(NODE_STAMP): $(NODE)/package.json $(NODE)/package-lock.json
	cd $(NODE) && npm install --no-audit --no-fund
	touch $(NODE_STAMP)

setup: system-deps $(STAMP) $(NODE_STAMP)

# DEMO_ARGS: e.g. --port 6433 --metrics-port 9188 when another proxy holds the defaults
demo: setup
	$(PY) -m proxy demo --dir demo $(DEMO_ARGS)

# pytest exits 5 when it collected nothing: say so and fail, never pass as green.
test: setup
	@$(PY) -m pytest -q -p no:cacheprovider tests; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; exit 1; fi; \
	exit $$status

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

lint: $(STAMP)
	$(VENV)/bin/ruff check proxy tests benchmarks
	$(VENV)/bin/mypy --strict --ignore-missing-imports proxy

# Coverage-guided fuzzing (atheris): each target for FUZZ_SECONDS, its working corpus in .fuzz/
# (the seeds in tests/fuzz/corpus stay as they are); a finding is written to .fuzz/ and fails.
# `make test` runs a short pass of the same targets (tests/fuzz/test_fuzz.py).
FUZZ_SECONDS ?= 300
FUZZ_TARGETS := negotiation tls_records proxyproto
fuzz: $(STAMP)
	@for target in $(FUZZ_TARGETS); do \
	  mkdir -p .fuzz/$$target; \
	  echo "fuzz_$$target: $(FUZZ_SECONDS)s"; \
	  $(PY) tests/fuzz/fuzz_$$target.py -max_total_time=$(FUZZ_SECONDS) -timeout=10 \
	    -print_final_stats=1 -artifact_prefix=.fuzz/ \
	    $$([ -f tests/fuzz/$$target.dict ] && echo -dict=tests/fuzz/$$target.dict) \
	    .fuzz/$$target tests/fuzz/corpus/$$target \
	    > .fuzz/$$target.log 2>&1; status=$$?; \
	  grep -E '^(#[0-9]+[[:space:]]+(INITED|DONE)|Done|stat::|==|Traceback|  File|[A-Za-z]*Error)' \
	    .fuzz/$$target.log; \
	  [ $$status -eq 0 ] || { echo "fuzz_$$target failed ($$status): .fuzz/$$target.log"; exit 1; }; \
	done

bench: setup
	benchmarks/run

clean:
	rm -rf $(VENV) demo .pytest_cache .fuzz $(NODE)/node_modules
