"""The manifest of an index version: model, parameters, and every file with its checksum."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from services.common.checksums import verified_bytes
from services.common.errors import Conflict, Corrupt, InvalidInput, NotFound
from services.common.store import Store
from services.index.gate import QeGate
from services.index.layout import POINTER_KEY, manifest_key

FORMAT = 1


class ShardEntry(BaseModel):
    shard: int
    file: str
    sha256: str
    bytes: int
    count: int
    docs_file: str
    docs_sha256: str


class FileEntry(BaseModel):
    file: str
    sha256: str


DISK_RERANK_KIND = "ivf-pq-disk"  # IVF-PQ codes in RAM, the full vectors re-ranked from the mapped shard file


class Manifest(BaseModel):
    format: int = FORMAT
    version: str
    created_at: str
    model: dict  # ModelSpec.describe(): name, arch, dim, fingerprint, ...
    dim: int  # dimension of the vectors the index holds (after the projection, when there is one)
    metric: str = "inner_product"
    factory: str
    params: dict  # IndexParams + nprobe
    nprobe: int = 1
    k_factor: float = 1
    count: int
    duplicates_dropped: int = 0
    source: dict = {}
    tuning: dict = {}
    shards: list[ShardEntry]
    quantizer: FileEntry | None = None  # plain IVF: the coarse quantizer alone, for routers
    projection: FileEntry | None = None  # model vectors -> index vectors (projection.py); None: used as they are
    fields: dict[str, str] = {}  # filterable metadata fields and their kinds (str, int, float, bool): fields.py
    qe_gate: QeGate | None = None  # the query-expansion gate learned at build (gate.py); None: none learned

    @property
    def model_dim(self) -> int:
        """Dimension of the model's vectors, which queries arrive in."""
        return int(self.model.get("dim") or self.dim)

    @property
    def reranks_from_disk(self) -> bool:
        """Searchers map the re-ranking vectors of this version's shards instead of loading them."""
        return self.params.get("kind") == DISK_RERANK_KIND

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes, where: str = "manifest") -> "Manifest":
        try:
            m = cls.model_validate_json(data)
        except ValidationError as e:
            raise Corrupt(f"{where} is not a valid manifest: {e.errors()[0]['msg']} "
                          f"at {'.'.join(map(str, e.errors()[0]['loc']))}") from None
        if m.format != FORMAT:
            raise InvalidInput(f"{where}: unsupported manifest format {m.format} (this build reads {FORMAT})")
        return m


def write_manifest(store: Store, manifest: Manifest) -> bytes:
    """Write a new version's manifest, only where none is (a conditional write): a version once written never
    changes under its readers. Conflict when another writer wrote it first."""
    data = manifest.to_bytes()
    key = manifest_key(manifest.version)
    try:
        store.put_if(key, data, None)
    except Conflict:
        if store.get_bytes(key) != data:  # our own write, whose reply was lost and the PUT retried, is no conflict
            raise Conflict(f"{store.uri(key)} was written by another writer meanwhile") from None
    return data


def load_version(store: Store, version: str, sha256: str | None = None) -> tuple[Manifest, bytes]:
    """A written version's manifest (published or staged) and its bytes, verified against sha256 when given
    (the checksum CURRENT records)."""
    key = manifest_key(version)
    try:
        data = store.get_bytes(key) if sha256 is None else verified_bytes(store, key, sha256, POINTER_KEY)
    except NotFound:
        raise NotFound(f"index {store.url} has no version {version!r} (see `imsearch index versions`)") from None
    return Manifest.from_bytes(data, store.uri(key)), data


def has_version(store: Store, version: str) -> bool:
    return store.exists(manifest_key(version))
