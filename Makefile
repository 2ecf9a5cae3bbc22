# dwsproxy: `make demo` and `make test` work on a fresh machine (they install what they need).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup system-deps demo test unit lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# PostgreSQL server binaries, psql and (for the JDBC test) pgjdbc and a JDK; apt-get only for
# what is missing, and only when we may (root).
system-deps:
	@bash .ci/system-deps

setup: system-deps $(STAMP)

demo: setup
	$(PY) -m proxy demo --dir demo

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

bench: setup
	benchmarks/run

clean:
	rm -rf $(VENV) demo .pytest_cache
