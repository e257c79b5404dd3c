# `make demo` runs the whole path on this machine; `make check` (lint, types, tests) is what
# a contributor runs before a commit and what CI runs (.ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint types check bench sample

$(PY): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(PY)

demo: $(PY)
	$(VENV)/bin/gateway demo --cut-cloud 10s

test: $(PY)
	$(PY) -m pytest -q

lint: $(PY)
	$(PY) -m ruff check gateway devices tests bench

types: $(PY)
	$(PY) -m mypy

check: lint types test

bench: $(PY)
	$(PY) bench/bench_path.py
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_devices.py
	$(PY) bench/bench_influx.py
	$(PY) bench/bench_mqtt_codec.py

sample: $(PY)
	$(PY) -m gateway config sample > deploy/gateway.example.yaml
