# Two commands for a fresh machine:  `make run` (the main job)  and  `make test`.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: run compare test lint format bench clean

$(VENV)/.ready-run: pyproject.toml scripts/setup-venv.sh
	./scripts/setup-venv.sh
	touch $@

$(VENV)/.ready-dev: pyproject.toml scripts/setup-venv.sh
	./scripts/setup-venv.sh dev
	touch $@ $(VENV)/.ready-run

run: $(VENV)/.ready-run
	$(VENV)/bin/attnkit compare --quick --out attnkit-report

compare: $(VENV)/.ready-run
	$(VENV)/bin/attnkit compare --out attnkit-report

test: $(VENV)/.ready-dev lint
	$(PY) -m pytest -q

lint: $(VENV)/.ready-dev
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV)/.ready-dev
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

bench: $(VENV)/.ready-dev
	$(PY) benchmarks/attention.py

clean:
	rm -rf attnkit-report $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
