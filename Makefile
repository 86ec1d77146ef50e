# One command runs the demo, one runs the tests (`.ci/run` calls `make test`).
VENV ?= .venv
PY := $(VENV)/bin/python
# A build of torch that runs on CPU and CUDA; on aarch64 use TORCH="torch==2.9.1 torchvision==0.24.1".
TORCH ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: demo test install protos clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/imsearch demo

test: install
	$(VENV)/bin/ruff check services tests benchmarks scripts
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

protos: install
	$(PY) scripts/gen_protos.py

clean:
	rm -rf .imsearch test-artifacts
