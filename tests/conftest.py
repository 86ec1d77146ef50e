"""Shared fixtures: settings isolated per test, and real servers (S3) on free ports."""

from __future__ import annotations

import pytest

from services.common.config import Settings, get_settings
from services.stack.part import free_port, wait_http


@pytest.fixture(scope="session", autouse=True)
def shared_model_exports(tmp_path_factory):
    """One folder of exported models for the whole run (every test's processes inherit it): a model is exported
    for the inference runtime once, not once per test's IMSEARCH_HOME."""
    import os

    folder = tmp_path_factory.mktemp("model-exports")
    before = os.environ.get("IMSEARCH_MODEL_CACHE_DIR")
    os.environ["IMSEARCH_MODEL_CACHE_DIR"] = str(folder)
    yield folder
    if before is None:
        os.environ.pop("IMSEARCH_MODEL_CACHE_DIR", None)
    else:
        os.environ["IMSEARCH_MODEL_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path, monkeypatch):
    """Each test gets its own IMSEARCH_HOME and a fresh settings cache."""
    monkeypatch.setenv("IMSEARCH_HOME", str(tmp_path / "imsearch-home"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


class S3Server:
    """moto's S3-protocol server in a thread, on a free port."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.running = False

    def start(self) -> "S3Server":
        self.server.start()
        wait_http(f"http://127.0.0.1:{self.port}/", timeout=20, any_status=True)
        self.running = True
        return self

    def stop(self) -> None:
        if self.running:
            self.server.stop()
            self.running = False

    def restart(self) -> "S3Server":
        """A new server on the same port; moto keeps its buckets in this process, so data survives."""
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        return self.start()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture()
def s3(monkeypatch):
    server = S3Server().start()
    monkeypatch.setenv("IMSEARCH_S3_ENDPOINT", server.endpoint)
    monkeypatch.setenv("IMSEARCH_S3_ACCESS_KEY", "testing")
    monkeypatch.setenv("IMSEARCH_S3_SECRET_KEY", "testing")
    monkeypatch.setenv("IMSEARCH_S3_REGION", "us-east-1")
    get_settings.cache_clear()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture()
def settings() -> Settings:
    return get_settings()
