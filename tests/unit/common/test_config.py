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


def test_tls_files_are_checked_at_start(tmp_path, monkeypatch):
    cert = tmp_path / "tls.crt"
    cert.write_text("pem")
    with pytest.raises(ValidationError, match="go together"):
        Settings(tls_cert=cert)
    with pytest.raises(ValidationError, match="does not exist"):
        Settings(tls_ca=tmp_path / "missing.crt")
    monkeypatch.setenv("IMSEARCH_TLS_CA", "")  # compose's ${VAR:-}: unset, not the current folder
    assert Settings().tls_ca is None


def test_secrets_come_from_files_too(tmp_path, monkeypatch):
    from services.common.config import get_settings

    (tmp_path / "imsearch_auth_token").write_text("from-a-file\n")
    monkeypatch.setenv("IMSEARCH_SECRETS_DIR", str(tmp_path))
    get_settings.cache_clear()
    try:
        assert get_settings().auth_token.get_secret_value() == "from-a-file"
        monkeypatch.setenv("IMSEARCH_AUTH_TOKEN", "from-env")  # the environment wins
        get_settings.cache_clear()
        assert get_settings().auth_token.get_secret_value() == "from-env"
    finally:
        get_settings.cache_clear()
