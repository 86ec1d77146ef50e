"""Where each part of an index lives under its root (keys of a Store):

  CURRENT                                      the published version and the history (versions.py)
  versions/<version>/manifest.json             what the version is made of, with checksums (manifest.py)
  versions/<version>/shard-00000.faiss         one faiss index per shard (shards.py)
  versions/<version>/shard-00000.docs.parquet  the shard's ids and uris (docs.py)
  versions/<version>/quantizer.faiss           plain IVF: the coarse quantizer, for routers
  versions/<version>/projection.npz            the learned projection of model vectors (projection.py)
  builds/<key>/                                a Ray build in progress: its plan, the parts split by shard and
                                               finished shards' markers, kept for a rerun to resume from
                                               (indexer/parallel.py); a Ray add's split parts (add-<key>-<S>/);
                                               `index gc` removes one untouched for the grace period
"""

from __future__ import annotations

POINTER_KEY = "CURRENT"
VERSIONS = "versions"
BUILDS = "builds"
MANIFEST = "manifest.json"
RESERVED = "RESERVED"  # a version's name taken, atomically, by the writer about to write it
QUANTIZER_FILE = "quantizer.faiss"
PROJECTION_FILE = "projection.npz"


def version_prefix(version: str) -> str:
    return f"{VERSIONS}/{version}"


def version_key(version: str, file: str) -> str:
    """The key of one file of a version."""
    return f"{version_prefix(version)}/{file}"


def manifest_key(version: str) -> str:
    return version_key(version, MANIFEST)


def shard_file(shard: int) -> str:
    return f"shard-{shard:05d}.faiss"


def docs_file(shard: int) -> str:
    return f"shard-{shard:05d}.docs.parquet"
