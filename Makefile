# `make demo` runs the whole path on this machine; `make check` (lint, types, tests) is what
# a contributor runs before a commit and what CI runs (.ci/run).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint types check bench sample

# The demo needs Fieldgate alone; the checks and benches need the dev extra too (pytest,
# mypy, matplotlib, mqtt5 — which has no wheel for a Pi Zero, so the demo must not ask).
$(PY): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e .
	touch $(PY)

$(VENV)/.dev: $(PY)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(VENV)/.dev

demo: $(PY)
	$(VENV)/bin/gateway demo --cut-cloud 10s

test: $(VENV)/.dev
	$(PY) -m pytest -q

lint: $(VENV)/.dev
	$(PY) -m ruff check gateway devices fieldmqtt fieldkit tests bench

types: $(VENV)/.dev
	$(PY) -m mypy

check: lint types test

bench: $(VENV)/.dev
	$(PY) bench/bench_path.py
	$(PY) bench/bench_engine.py
	$(PY) bench/bench_devices.py
	$(PY) bench/bench_influx.py
	$(PY) bench/bench_mqtt_codec.py
	$(PY) bench/bench_reconnect.py
	$(PY) bench/bench_cloud.py
	$(PY) bench/bench_downlink.py
	$(PY) bench/bench_cold_turn.py

sample: $(VENV)/.dev
	$(PY) -m gateway config sample > deploy/gateway.example.yaml
