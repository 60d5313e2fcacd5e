# The two commands a new user needs: `make run` and `make test`. Everything else builds on them.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DEMO   ?= demo/checkpoint
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: install run test bench demo clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml model/native.c
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

demo: install
	@test -f $(DEMO)/checkpoint.json || $(VENV)/bin/holorec train --data synthetic --model holomamba --epochs 3 --out $(DEMO)

run: demo
	$(VENV)/bin/holorec serve --checkpoint $(DEMO) --host $(HOST) --port $(PORT)

# Two test processes (pytest-xdist): most of a test's time is a process starting or waiting (uvicorn, redis-server, a
# CLI), so two overlap well even on two cores. worksteal, not loadfile: loadfile hands out tests by node id, and
# schemathesis gives its seven generated tests one node id between them, so six would silently not run.
test: install
	@bash deploy/test-prereqs.sh
	$(PY) -m pytest -n 2 --dist worksteal

bench: install
	$(VENV)/bin/holorec bench all

clean:
	rm -rf $(VENV) demo .pytest_cache build model/_native*.so
