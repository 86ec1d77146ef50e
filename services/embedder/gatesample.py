"""The sample an index learns its query-expansion gate τ from (services/index/gate.py): a few hundred catalogue
images, each embedded as it is and as a synthetic copy (two of crop, rescale, JPEG, rotation, colour, mirror,
blur, caption — the copy-detection protocol's edits), written beside the embeddings when `imsearch embed`
finishes. How far a copy scores from its own original is what a copy query's best hit scores; the index build
projects both into its space and puts τ below nearly all of them.

Written as gate-sample.npz (the vectors) then gate-sample.json (a sealed record: model fingerprint, count,
the npz's sha256): the record is the marker, so a run killed between the two leaves no sample, and a damaged
npz is told by its checksum."""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass

import numpy as np

from services.common.checksums import read_sealed_json, sealed_json, sha256_bytes
from services.common.config import Settings
from services.common.errors import Corrupt, ImsearchError, NotFound
from services.common.images import decode_image, thumbnail
from services.common.store import Store, read_uri
from services.common.transforms import ALL_EDITS, random_copy

log = logging.getLogger(__name__)
SAMPLE_KEY, RECORD_KEY = "gate-sample.npz", "gate-sample.json"
SEED = 0  # the same catalogue gives the same sample, and so the same τ, on every run
MAX_SIDE = 640  # copies are made from the image at this size at most (as the copy-detection protocol does)


@dataclass
class GateSample:
    originals: np.ndarray  # (n, d) model vectors of the sampled catalogue images
    copies: np.ndarray  # (n, d) model vectors of one synthetic copy of each
    model: str  # the model fingerprint both were embedded with


def choose(uris: list[str], n: int) -> list[str]:
    """Up to n catalogue uris, spread over the catalogue by a fixed seed (every image equally likely)."""
    if len(uris) <= n:
        return list(uris)
    rows = np.sort(np.random.default_rng(SEED).choice(len(uris), n, replace=False))
    return [uris[i] for i in rows]


def copy_of(data: bytes, rng: np.random.Generator, settings: Settings) -> bytes:
    """One synthetic copy of an image as the embedder sees it (oriented, transparency on the same background),
    as JPEG q90 (as copies reach a search: re-encoded)."""
    img = thumbnail(data, MAX_SIDE, settings.max_image_bytes, settings.max_image_pixels)
    edited, _ = random_copy(img, rng, ALL_EDITS, 2)
    buf = io.BytesIO()
    edited.convert("RGB").save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make(uris: list[str], embed, size: int, settings: Settings) -> tuple[np.ndarray, np.ndarray]:
    """(originals, copies) model vectors of the images at uris that read and decode (the others left out:
    the embed run already reported them); embed: uint8 pixels (n, size, size, 3) -> vectors."""
    rng = np.random.default_rng(SEED)
    pairs = []
    for uri in uris:
        try:
            data = read_uri(uri, settings)
            original = decode_image(data, size, settings.max_image_bytes, settings.max_image_pixels).pixels
            copy = decode_image(copy_of(data, rng, settings), size, settings.max_image_bytes, settings.max_image_pixels)
        except (ImsearchError, OSError, ValueError) as e:
            log.debug("gate sample: %s left out: %s", uri, e)
            continue
        pairs.append((original, copy.pixels))
    if not pairs:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    out = []
    for pixels in (np.stack([o for o, _ in pairs]), np.stack([c for _, c in pairs])):
        out.append(np.concatenate([embed(pixels[i:i + 32]) for i in range(0, len(pixels), 32)]))
    return out[0], out[1]


def write(store: Store, originals: np.ndarray, copies: np.ndarray, model: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, originals=originals.astype(np.float32), copies=copies.astype(np.float32))
    data = buf.getvalue()
    store.put_bytes(SAMPLE_KEY, data)
    store.put_bytes(RECORD_KEY, sealed_json({"model": model, "count": len(copies), "sha256": sha256_bytes(data),
                                             "edits": sorted(ALL_EDITS), "seed": SEED}))


def record(store: Store) -> dict | None:
    """The sample's sealed record, or None when there is none (or it is damaged: made again)."""
    try:
        return read_sealed_json(store.get_bytes(RECORD_KEY))
    except NotFound:
        return None
    except ValueError:
        log.warning("%s does not match its checksum: the gate sample is made again", store.uri(RECORD_KEY))
        return None


def read(store: Store) -> GateSample | None:
    """The sample beside the embeddings in store, verified; None when the embed run made none (an older run, or
    IMSEARCH_QE_GATE_SAMPLE=0). Corrupt when its vectors do not match the record's checksum."""
    rec = record(store)
    if rec is None:
        return None
    data = store.get_bytes(SAMPLE_KEY)
    if sha256_bytes(data) != rec["sha256"]:
        raise Corrupt(f"{store.uri(SAMPLE_KEY)} does not match the checksum in {RECORD_KEY}: run `imsearch embed` "
                      "again to make it anew")
    with np.load(io.BytesIO(data)) as z:
        return GateSample(z["originals"], z["copies"], rec["model"])

