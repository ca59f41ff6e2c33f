# Two commands for a fresh machine with only python3: `make quickstart` and `make test`.
# TORCH pins the CPU build that lies on these machines' disk; on a GPU cluster run
# `make TORCH=torch quickstart` (or `pip install -e .`) to get the normal CUDA build.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fvdm-installed

.PHONY: quickstart test install clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/fvdm quickstart

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs quickstart
