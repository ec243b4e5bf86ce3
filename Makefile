# snapgen developer commands. `make run` and `make test` work on a fresh clone (they create .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.snapgen-installed

.PHONY: setup run test bench bench-peers clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

# The main job (for now): the paper presets at 1024px, then a real forward pass of `small` at 512px.
run: setup
	$(VENV)/bin/snapgen info --preset all --resolution 1024
	$(VENV)/bin/snapgen info --preset small --resolution 512 --forward

test: setup
	$(PY) -m pytest -q

# Benchmarks (minutes to tens of minutes on 2 cores); results land in benchmarks/results/.
bench: setup
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/ablation.py

bench-peers: setup
	$(VENV)/bin/pip install -q --disable-pip-version-check -e '.[bench]'
	$(PY) benchmarks/peers.py

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
