# One command runs the demo, one runs the tests (`.ci/run` calls `make test`).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
# Installs are pinned by requirements/*.lock (Linux x86_64, Python 3.11; `make lock` regenerates them from
# pyproject.toml). Elsewhere the ranges of pyproject.toml are installed, with a torch build for the machine:
# on aarch64 use TORCH="torch==2.9.1 torchvision==0.24.1".
TORCH ?= torch==2.14.1 torchvision==0.29.1
ARCH := $(shell uname -m)
LOCKED = requirements/dev.lock requirements/serve.lock requirements/embed.lock requirements/infer.lock

.PHONY: demo test install protos observability lock clean images compose-test

$(VENV)/.installed: pyproject.toml requirements/dev.lock
	python3 -m venv $(VENV)
ifeq ($(ARCH),x86_64)
	$(PY) -m pip install -q -r requirements/dev.lock
	$(PY) -m pip install -q --no-deps -e .
else
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[all,dev]"
endif
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/imsearch demo

test: install
	$(VENV)/bin/ruff check services tests benchmarks scripts
	$(PY) -m pytest -q -ra $(PYTEST_ARGS) tests

protos: install
	$(PY) scripts/gen_protos.py

# deploy/k8s/common/observability.yaml from deploy/observability/rules.yml (after editing the rules)
observability: install
	$(PY) scripts/gen_k8s_observability.py

# dev: everything, for the tests and `make demo`; serve: the slim serving image; embed: the embedder image;
# infer: serve + the inference runtimes + the weights, no torch (embeds with a model exported beforehand).
# Needs uv in the venv (the dev extra has it).
lock:
	printf 'torch==2.14.1\ntorchvision==0.29.1\n' > requirements/torch.txt
	for set in "dev:--extra all --extra dev" "serve:--extra serve" "embed:--extra embed --extra ray" \
	           "infer:--extra serve --extra infer --extra models"; do \
	  $(VENV)/bin/uv pip compile pyproject.toml $${set#*:} -c requirements/torch.txt --python-version 3.11 \
	    --python-platform x86_64-manylinux_2_28 --no-header -q -o requirements/$${set%%:*}.lock || exit 1; \
	done

# The compose stack in real containers on this machine's podman (root): images built first (what is missing;
# wheelhouses kept while the locks are unchanged), then tests/compose against the running containers.
images: install
	command -v podman >/dev/null && command -v debootstrap >/dev/null && command -v runc >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc debootstrap >/dev/null)
	command -v $(VENV)/bin/podman-compose >/dev/null || $(PY) -m pip install -q podman-compose==1.6.0
	PY=$(PY) deploy/podman/images.sh

compose-test: images
	IMSEARCH_COMPOSE_TEST=1 PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m pytest -q -ra -p no:cacheprovider tests/compose

clean:
	rm -rf .imsearch test-artifacts
