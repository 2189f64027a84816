# Every target sets up .venv itself: on a fresh machine with Python 3.11, `make test` and
# `make demo` are the only commands a user needs.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv lint test test-fast demo bench clean

venv: $(STAMP)

# Re-install when pyproject.toml changes.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

test: $(STAMP) lint
	$(PY) -m pytest -n 2 --dist loadgroup tests

# Style: ruff's lint rules and formatter (settings in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Everything except the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow" tests

demo: $(STAMP)
	$(PY) -m ki.main --config=experiments/droid_ki.py:smoke --workdir=$${WORKDIR:-/tmp/ki_demo}

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache
