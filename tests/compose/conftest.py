"""The compose stack in real containers (podman): run by `make compose-test`, which builds the images first
(deploy/podman/images.sh); skipped in `make test`, which has no container runtime to rely on."""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("IMSEARCH_COMPOSE_TEST") != "1":
        skip = pytest.mark.skip(reason="the container stack: make compose-test")
        for item in items:
            if "tests/compose/" in str(item.fspath):
                item.add_marker(skip)
