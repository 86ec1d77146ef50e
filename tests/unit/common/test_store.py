import pytest

from services.common.errors import InvalidInput, NotFound
from services.common.store import LocalStore, S3Store, open_store, read_uri


def test_put_get_list_delete(tmp_path):
    s = LocalStore(tmp_path)
    s.put_bytes("a/b/c.bin", b"hello")
    s.put_bytes("a/top.txt", b"x")
    assert s.get_bytes("a/b/c.bin") == b"hello"
    assert s.exists("a/b/c.bin") and not s.exists("a/b/missing")
    assert s.list() == ["a/b/c.bin", "a/top.txt"]
    assert s.list("a/b") == ["a/b/c.bin"]
    s.delete("a/top.txt")
    assert s.list() == ["a/b/c.bin"]


def test_overwrite_is_atomic_and_leaves_no_temp_files(tmp_path):
    s = LocalStore(tmp_path)
    s.put_bytes("k", b"old")
    s.put_bytes("k", b"new")
    assert s.get_bytes("k") == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["k"]


def test_put_file_copies(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"\x00" * 3_000_000)
    s = LocalStore(tmp_path / "store")
    s.put_file("x/y.bin", src)
    assert s.get_bytes("x/y.bin") == src.read_bytes()


def test_missing_key_is_not_found(tmp_path):
    with pytest.raises(NotFound, match="not found"):
        LocalStore(tmp_path).get_bytes("nope")
    with pytest.raises(NotFound):
        read_uri(str(tmp_path / "nope.jpg"))


def test_keys_cannot_escape_the_root(tmp_path):
    with pytest.raises(InvalidInput, match="escapes"):
        LocalStore(tmp_path / "root").put_bytes("../outside", b"x")


def test_child_and_uri(tmp_path):
    s = LocalStore(tmp_path).child("sub")
    s.put_bytes("f", b"1")
    assert (tmp_path / "sub" / "f").read_bytes() == b"1"
    assert s.uri("f") == str(tmp_path / "sub" / "f")


def test_open_store_dispatch(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}"), LocalStore)
    s3 = open_store("s3://bucket/some/prefix")
    assert isinstance(s3, S3Store) and (s3.bucket, s3.prefix) == ("bucket", "some/prefix")
    assert s3.uri("x.jpg") == "s3://bucket/some/prefix/x.jpg"
    with pytest.raises(InvalidInput, match="bucket"):
        open_store("s3://")
    with pytest.raises(InvalidInput, match="scheme"):
        open_store("gs://bucket/x")


def test_an_s3_server_that_trickles_an_object_is_cut_off_at_the_operations_deadline():
    """Before: urllib3's read timeout held for each recv, so a server sending a byte every 0.3 s was waited on for
    as long as it liked (here 12 s for 40 bytes, past a 1.5 s budget)."""
    import threading
    import time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from services.common.config import Settings
    from services.common.errors import Unavailable

    class Trickle(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "40")
            self.send_header("ETag", '"abc"')
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"x")
                self.wfile.flush()
                time.sleep(0.3)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = Settings(s3_endpoint=f"127.0.0.1:{server.server_address[1]}", s3_region="us-east-1",
                        s3_retry_s=1.5, s3_timeout_s=1.0)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="sent too slowly"):
            S3Store("bucket", "", settings).get_bytes("key")
        assert time.monotonic() - started < 4.0
    finally:
        server.shutdown()
        server.server_close()
