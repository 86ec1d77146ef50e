"""Named crash points of the write protocols, for tests: with IMSEARCH_CRASH_AT=<name> the process kills
itself with SIGKILL the moment it reaches that point — as a power cut or `kill -9` would, at a known place
instead of a random one. Unset (always, outside tests), a crash point costs one settings lookup."""

from __future__ import annotations

import os
import signal

CRASH_POINTS = {
    "index.shards-written": "every shard, docs and quantizer file of a new version written; no manifest yet",
    "index.manifest-written": "the new version's manifest written; CURRENT not yet flipped",
    "index.before-flip": "CURRENT read and the new pointer ready; the compare-and-swap not yet sent",
    "index.after-flip": "CURRENT flipped; the command has not yet said so",
    "index.shard-built": "a Ray build's driver has the first finished shard's marker; other shards still building",
    "index.part-split": "a Ray build's driver has the first split part's marker; other parts still splitting, no "
                        "shard built",
    "gc.marked": "gc has marked the versions it removes in CURRENT; none deleted yet",
    "gc.mid-delete": "gc deleted the first file of the first version it removes",
    "embed.part-written": "an embeddings part written; its done marker not yet",
    "embed.marker-written": "a part and its done marker written; later chunks not yet",
}


def crash_point(name: str) -> None:
    """Die here when the test switch names this point."""
    from services.common.config import get_settings

    if name not in CRASH_POINTS:
        raise ValueError(f"unknown crash point {name!r}")
    if get_settings().crash_at == name:
        os.kill(os.getpid(), signal.SIGKILL)
