import pytest
from pydantic import ValidationError

from services.common.config import Settings


def test_env_prefix_is_read(monkeypatch):
    monkeypatch.setenv("IMSEARCH_BATCH_SIZE", "7")
    monkeypatch.setenv("IMSEARCH_S3_ENDPOINT", "127.0.0.1:9999")
    s = Settings()
    assert s.batch_size == 7 and s.s3_endpoint == "127.0.0.1:9999"


@pytest.mark.parametrize("name, value", [
    ("IMSEARCH_BATCH_SIZE", "0"),
    ("IMSEARCH_DEVICE", "tpu"),
    ("IMSEARCH_S3_ENDPOINT", "http://localhost:9000"),
    ("IMSEARCH_TARGET_RECALL", "1.5"),
])
def test_bad_values_fail_at_start(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_secrets_are_not_printed():
    s = Settings(s3_secret_key="hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump())
