# `make test` and `make demo` are self-sufficient on a fresh machine: each
# builds .venv (an editable install of this package with its dev extra)
# when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: test demo lint venv clean

$(VENV)/.installed-dev: pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed-dev

test: $(VENV)/.installed-dev
	$(PY) -m pytest -q -n 2 --dist loadfile tests

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pyink --check .

demo: $(VENV)/.installed-dev
	$(PY) scripts/demo.py --workdir=$(DEMO_DIR)

clean:
	rm -rf $(VENV) runs .pytest_cache
