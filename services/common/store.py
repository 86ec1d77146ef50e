"""Object storage behind one small protocol: a local folder (the default) or S3/MinIO.

Keys are '/'-separated paths relative to the store's root. Every write is atomic per key:
locally temp file -> fsync -> rename; on S3 a PUT is atomic by itself. Multi-object
publishes are made atomic by writing all objects first and flipping one pointer object last.

Anything two writers can change is written with put_if, a compare-and-swap against the token
get_versioned returned: locally under an exclusive flock (one machine; a folder shared over NFS
should be an S3 bucket instead), on S3 as a conditional PUT (If-Match / If-None-Match), which
S3, MinIO and moto's server all check.

A full or read-only destination is NoSpace / ReadOnly (one line for the user), never an OSError.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import logging
import os
import shutil
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable

from services.common.config import Settings, get_settings
from services.common.errors import Conflict, InvalidInput, NoSpace, NotFound, NotSupported, ReadOnly, Unavailable

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"


@runtime_checkable
class Store(Protocol):
    url: str

    def put_bytes(self, key: str, data: bytes) -> None: ...
    def put_file(self, key: str, path: Path) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, dest: Path) -> None: ...
    def get_versioned(self, key: str) -> tuple[bytes, str]: ...
    def put_if(self, key: str, data: bytes, token: str | None) -> None: ...
    def exists(self, key: str) -> bool: ...
    def modified(self, key: str) -> float: ...
    def list(self, prefix: str = "") -> list[str]: ...
    def delete(self, key: str) -> None: ...
    def delete_prefix(self, prefix: str) -> None: ...
    def local_path(self, key: str) -> Path | None: ...
    def child(self, prefix: str) -> "Store": ...
    def uri(self, key: str) -> str: ...


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}  # EFBIG: over a file-size limit (RLIMIT_FSIZE)
READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}


@contextmanager
def write_errors(where: str | Path) -> Iterator[None]:
    """A full or read-only destination as the domain error the user sees in one line."""
    try:
        yield
    except OSError as e:
        if e.errno in FULL:
            raise NoSpace(f"no space left to write {where} ({e.strerror}); what was there before is intact") from None
        if e.errno in READ_ONLY:
            raise ReadOnly(f"cannot write {where}: {e.strerror}") from None
        raise


def atomic_write(path: Path, data: bytes | None = None, src: Path | None = None) -> None:
    """Write bytes (or copy a file) to path so a crash leaves either the old file or the new one."""
    tmp = path.parent / f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(tmp, "wb") as f:
                if src is not None:
                    with open(src, "rb") as s:
                        shutil.copyfileobj(s, f, 1 << 20)
                else:
                    f.write(data or b"")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        fsync_dir(path.parent)


@contextmanager
def file_lock(path: Path, timeout: float = 30.0) -> Iterator[None]:
    """An exclusive flock on `path` (created if need be), held for the block: writers of one machine take
    turns. A holder stuck past `timeout` (e.g. a stopped process) is Unavailable, not a hang."""
    with write_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+b")
    with f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise Unavailable(f"{path} is held by another writer for over {timeout:.0f} s") from None
                time.sleep(0.01)
        yield  # closing the file releases the lock


class LocalStore:
    """A folder on the local filesystem."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        self.url = str(self.root)

    def _path(self, key: str) -> Path:
        p = (self.root / key).resolve()
        if p != self.root and self.root not in p.parents:
            raise InvalidInput(f"key escapes the store root: {key!r}")
        return p

    def put_bytes(self, key: str, data: bytes) -> None:
        atomic_write(self._path(key), data=data)

    def put_file(self, key: str, path: Path) -> None:
        atomic_write(self._path(key), src=Path(path))

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            raise NotFound(f"not found: {self.uri(key)}") from None

    def get_file(self, key: str, dest: Path) -> None:
        src = self._path(key)
        if not src.is_file():
            raise NotFound(f"not found: {self.uri(key)}")
        with write_errors(dest):
            shutil.copyfile(src, dest)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The bytes and their token for put_if (their sha256: every change writes other bytes)."""
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def put_if(self, key: str, data: bytes, token: str | None) -> None:
        """Write key only if it still holds what `token` was read from (None: only if it does not exist);
        else Conflict and nothing is written."""
        path = self._path(key)
        with file_lock(path.parent / f".{path.name}.lock"):
            current = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
            if current != token:
                raise Conflict(f"{self.uri(key)} was changed by another writer")
            atomic_write(path, data)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def modified(self, key: str) -> float:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            raise NotFound(f"not found: {self.uri(key)}") from None

    def list(self, prefix: str = "") -> list[str]:
        """Keys under prefix; hidden files (temp files of writes in flight, locks) are not keys."""
        base = self._path(prefix) if prefix else self.root
        if base.is_file():
            return [prefix]
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            for name in filenames:
                if not name.startswith("."):
                    keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def delete(self, key: str) -> None:
        with write_errors(self.uri(key)):
            self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        """Every key under prefix, and whatever else is there (temp files of killed writes)."""
        base = self._path(prefix)
        if base == self.root:
            raise InvalidInput("refusing to delete a whole store")
        with write_errors(self.uri(prefix)):
            shutil.rmtree(base, ignore_errors=False) if base.is_dir() else base.unlink(missing_ok=True)

    def local_path(self, key: str) -> Path | None:
        return self._path(key)

    def child(self, prefix: str) -> "LocalStore":
        return LocalStore(self._path(prefix))

    def uri(self, key: str) -> str:
        return str(self.root / key) if key else self.url


RETRYABLE_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "ServerBusy"}


class S3Store:
    """A bucket prefix on any S3-compatible server, through the `minio` client."""

    def __init__(self, bucket: str, prefix: str = "", settings: Settings | None = None, client=None):
        self.settings = settings or get_settings()
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.client = client or make_minio_client(self.settings)
        self.url = f"s3://{_join(bucket, self.prefix)}"
        self._bucket_checked = False

    def _key(self, key: str) -> str:
        return _join(self.prefix, key)

    def _call(self, fn, *args, **kwargs):
        """One client operation, retried with exponential backoff while the server is unreachable, hangs or
        answers 5xx/throttling; the whole operation, every attempt's connect and read included, ends within
        IMSEARCH_S3_RETRY_S (each attempt also within IMSEARCH_S3_TIMEOUT_S), then Unavailable.
        404 → NotFound at once."""
        delay, deadline = 0.2, time.monotonic() + max(self.settings.s3_retry_s, MIN_ATTEMPT_S)
        outer, _budget.deadline = getattr(_budget, "deadline", None), deadline
        try:
            while True:
                try:
                    return self._once(fn, *args, **kwargs)
                except Unavailable as e:
                    if not getattr(e, "retry", True) or time.monotonic() + delay + MIN_ATTEMPT_S > deadline:
                        raise
                    log.warning("S3 call failed (%s); retrying in %.1fs", e, delay)
                    time.sleep(delay)
                    delay = min(delay * 2, 5.0)
        finally:
            _budget.deadline = outer

    def _once(self, fn, *args, **kwargs):
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except S3Error as e:
            name = getattr(e, "object_name", "") or ""
            if e.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                raise NotFound(f"not found: s3://{self.bucket}/{name} ({e.code})") from None
            if e.code in ("PreconditionFailed", "ConditionalRequestConflict"):
                raise Conflict(f"s3://{self.bucket}/{name} was changed by another writer ({e.code})") from None
            err = Unavailable(f"S3 error from {self.settings.s3_endpoint}: {e.code}: {e.message}")
            err.retry = e.code in RETRYABLE_S3_CODES
            raise err from None
        except (HTTPError, OSError) as e:
            raise Unavailable(f"cannot reach S3 server {self.settings.s3_endpoint}: {e}") from None

    def _ensure_bucket(self) -> None:
        if not self._bucket_checked:
            if not self._call(self.client.bucket_exists, self.bucket):
                self._call(self.client.make_bucket, self.bucket)
            self._bucket_checked = True

    def put_bytes(self, key: str, data: bytes) -> None:
        self._ensure_bucket()
        # A fresh stream per attempt: a retried PUT must send the bytes again from the start.
        self._call(lambda: self.client.put_object(self.bucket, self._key(key), io.BytesIO(data), len(data)))

    def put_file(self, key: str, path: Path) -> None:
        self._ensure_bucket()
        self._call(self.client.fput_object, self.bucket, self._key(key), str(path))

    def get_bytes(self, key: str) -> bytes:
        return self._call(self._read, key)  # the retry covers the whole download, not just the request

    def _read(self, key: str) -> bytes:
        resp = self.client.get_object(self.bucket, self._key(key))
        try:
            return b"".join(self._chunks(resp))
        finally:
            resp.close()
            resp.release_conn()

    def _chunks(self, resp):
        """The body as it arrives, ended (Unavailable) once its operation's deadline passes: urllib3's read timeout
        holds for each recv, so a server trickling a byte at a time would otherwise never be cut off."""
        deadline = getattr(_budget, "deadline", None)
        while True:
            chunk = resp.read1(1 << 20)
            if not chunk:
                return
            yield chunk
            if deadline is not None and time.monotonic() > deadline:
                error = Unavailable(f"S3 server {self.settings.s3_endpoint} sent too slowly: the object was not whole "
                                    f"within IMSEARCH_S3_RETRY_S ({self.settings.s3_retry_s:g} s)")
                error.retry = False
                raise error

    def get_file(self, key: str, dest: Path) -> None:
        with write_errors(dest):
            self._call(self._download, key, dest)

    def _download(self, key: str, dest: Path) -> None:
        resp = self.client.get_object(self.bucket, self._key(key))
        try:
            with open(dest, "wb") as f:
                for chunk in self._chunks(resp):
                    f.write(chunk)
        finally:
            resp.close()
            resp.release_conn()

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The bytes and their ETag (the token of put_if)."""

        def read() -> tuple[bytes, str]:
            resp = self.client.get_object(self.bucket, self._key(key))
            try:
                return b"".join(self._chunks(resp)), (resp.headers.get("ETag") or "").strip('"')
            finally:
                resp.close()
                resp.release_conn()

        return self._call(read)

    def put_if(self, key: str, data: bytes, token: str | None) -> None:
        """A conditional PUT: If-Match the ETag read (If-None-Match: * when token is None); Conflict when
        the object changed meanwhile. minio's public put_object turns unknown headers into user metadata,
        so this one request goes through its _put_object, which sends the headers as given."""
        self._ensure_bucket()
        self._check_conditional_writes()
        headers = {"If-Match": f'"{token}"'} if token else {"If-None-Match": "*"}
        self._call(self.client._put_object, self.bucket, self._key(key), data, headers)

    def _check_conditional_writes(self) -> None:
        """Once per process and server: a probe object written, then written again under conditions it does not
        meet (If-None-Match: *, If-Match another ETag), both of which the server must refuse. A server (or a proxy
        in front of it) that ignores the conditions would turn every compare-and-swap of CURRENT into
        last-writer-wins, acknowledged changes silently lost: nothing is written to it."""
        where = (self.settings.s3_endpoint, self.bucket)
        if where in _conditional_ok:
            return
        probe = self._key(f".imsearch-conditional-probe-{uuid.uuid4().hex}")
        self._call(self.client._put_object, self.bucket, probe, b"1", {"If-None-Match": "*"})
        try:
            ignored = []
            for headers in ({"If-None-Match": "*"}, {"If-Match": '"00000000000000000000000000000000"'}):
                try:
                    self._call(self.client._put_object, self.bucket, probe, b"2", headers)
                    ignored.append(next(iter(headers)))
                except Conflict:
                    pass
        finally:
            self._call(self.client.remove_object, self.bucket, probe)
        if ignored:
            raise NotSupported(f"the S3 server {self.settings.s3_endpoint} ignores conditional writes "
                               f"({', '.join(ignored)}): concurrent index changes would overwrite each other unseen, "
                               "so imsearch does not write there (a proxy in front of it may drop the headers)")
        _conditional_ok.add(where)

    def modified(self, key: str) -> float:
        return self._call(self.client.stat_object, self.bucket, self._key(key)).last_modified.timestamp()

    def delete_prefix(self, prefix: str) -> None:
        if not prefix.strip("/"):
            raise InvalidInput("refusing to delete a whole store")
        for key in self.list(prefix):
            self.delete(key)

    def exists(self, key: str) -> bool:
        try:
            self._call(self.client.stat_object, self.bucket, self._key(key))
            return True
        except NotFound:
            return False

    def list(self, prefix: str = "") -> list[str]:
        if not self._call(self.client.bucket_exists, self.bucket):
            return []
        full = self._key(prefix)
        objs = self._call(lambda: list(self.client.list_objects(
            self.bucket, prefix=f"{full}/" if full else None, recursive=True)))
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = sorted(o.object_name[strip:] for o in objs if not o.is_dir)
        if not keys and prefix and self.exists(prefix):  # the prefix names one object
            return [prefix]
        return keys

    def delete(self, key: str) -> None:
        self._call(self.client.remove_object, self.bucket, self._key(key))

    def local_path(self, key: str) -> Path | None:
        return None

    def child(self, prefix: str) -> "S3Store":
        return S3Store(self.bucket, _join(self.prefix, prefix), self.settings, self.client)

    def uri(self, key: str) -> str:
        return f"s3://{_join(self.bucket, self._key(key))}"


MIN_ATTEMPT_S = 0.05
_budget = threading.local()  # the deadline of the S3 operation this thread is running (S3Store._call)
_clients: dict[tuple, object] = {}
_conditional_ok: set[tuple[str, str]] = set()  # (endpoint, bucket) seen to refuse a stale conditional write
_clients_lock = threading.Lock()


def _bounded_pool(settings: Settings):
    """minio's HTTP client with our timeouts: every request's connect and read are cut to what is left of
    its operation's budget (a hung endpoint cannot hold a call past IMSEARCH_S3_RETRY_S), no retries of its
    own (S3Store._call retries, with backoff, within the same budget)."""
    import certifi
    import urllib3

    per_attempt = settings.s3_timeout_s

    class BoundedPool(urllib3.PoolManager):
        def urlopen(self, method, url, redirect=True, **kw):
            deadline = getattr(_budget, "deadline", None)
            left = per_attempt if deadline is None else max(MIN_ATTEMPT_S, min(per_attempt,
                                                                              deadline - time.monotonic()))
            kw["timeout"] = urllib3.Timeout(connect=left, read=left)
            return super().urlopen(method, url, redirect=redirect, **kw)

    return BoundedPool(maxsize=16, cert_reqs="CERT_REQUIRED" if settings.s3_secure else "CERT_NONE",
                       ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(), retries=False)


def make_minio_client(settings: Settings):
    """One client per endpoint and credentials, shared (connections reused: no new pool and bucket-region
    round trip per image on the ingestion path)."""
    from minio import Minio

    key = (settings.s3_endpoint, settings.s3_access_key.get_secret_value(), settings.s3_secret_key.get_secret_value(),
           settings.s3_secure, settings.s3_region, settings.s3_timeout_s, os.getpid())  # pid: no pool across a fork
    with _clients_lock:
        if key not in _clients:
            _clients[key] = Minio(settings.s3_endpoint, access_key=key[1], secret_key=key[2],
                                  secure=settings.s3_secure, region=settings.s3_region,
                                  http_client=_bounded_pool(settings))
        return _clients[key]


def open_store(url: str | Path, settings: Settings | None = None) -> Store:
    """`s3://bucket/prefix` -> S3Store, anything else -> LocalStore (a folder path)."""
    url = str(url)
    if url.startswith("s3://"):
        rest = url[len("s3://"):].strip("/")
        if not rest:
            raise InvalidInput(f"S3 url needs a bucket: {url!r}")
        bucket, _, prefix = rest.partition("/")
        return S3Store(bucket, prefix, settings)
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        raise InvalidInput(f"unsupported url scheme: {url!r} (use a folder path or s3://bucket/prefix)")
    return LocalStore(url)


def read_uri(uri: str, settings: Settings | None = None) -> bytes:
    """Bytes of one object named by a full uri (local path or s3://bucket/key)."""
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return S3Store(bucket, "", settings).get_bytes(key)
    path = Path(uri[len("file://"):] if uri.startswith("file://") else uri)
    try:
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise NotFound(f"not found: {uri}") from None

