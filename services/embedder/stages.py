"""The embedding stages, each a function of one batch (a dict of numpy columns), so that the same code runs
in-process or as a Ray Data `map_batches` stage (services.embedder.engines): fetch the bytes (I/O), decode
(CPU), embed (the model: CPU or GPU)."""

from __future__ import annotations

import numpy as np

from services.common.checksums import sha256_bytes
from services.common.config import Settings, get_settings
from services.common.errors import ImsearchError, Unavailable
from services.common.images import decode_image, probe_image
from services.common.store import read_uri
from services.embedder.gpu_decode import JPEG_MODES

Batch = dict[str, np.ndarray]


def fetch_batch(batch: Batch, settings: Settings) -> Batch:
    """I/O stage: the bytes of every uri. A missing or unreadable file is that row's error; storage that
    stays unreachable (after the store's retries) stops the run instead — a rerun resumes it, whereas
    error rows would be final."""
    data, err = [], []
    for uri in batch["uri"]:
        try:
            data.append(read_uri(str(uri), settings))
            err.append("")
        except Unavailable:
            raise
        except ImsearchError as e:
            data.append(b"")
            err.append(str(e))
    return {**batch, "data": np.array(data, dtype=object), "read_error": np.array(err, dtype=object)}


def decode_batch(batch: Batch, size: int, settings: Settings, defer_jpeg: bool = False) -> Batch:
    """CPU stage: read bytes (unless fetched already), hash, decode. A bad image becomes an error row,
    never an exception. defer_jpeg (the model runs on a GPU): plain JPEGs are only checked here and
    travel as bytes in a `jpeg` column, for the model stage to decode on the device."""
    if "data" not in batch:
        batch = fetch_batch(batch, settings)
    uris = [str(u) for u in batch["uri"]]
    n = len(uris)
    pixels = np.zeros((n, size, size, 3), np.uint8)
    sha, err, jpeg = [""] * n, [str(e) for e in batch["read_error"]], [b""] * n
    width, height = np.zeros(n, np.int32), np.zeros(n, np.int32)
    limits = (settings.max_image_bytes, settings.max_image_pixels)
    for i, data in enumerate(batch["data"]):
        if err[i]:
            continue
        try:
            sha[i] = sha256_bytes(data)
            if defer_jpeg:
                fmt, mode, width[i], height[i] = probe_image(data, *limits)
                if fmt == "JPEG" and mode in JPEG_MODES:
                    jpeg[i] = data
                    continue
            d = decode_image(data, size, *limits)
            pixels[i], width[i], height[i] = d.pixels, d.width, d.height
        except ImsearchError as e:
            err[i] = str(e)
    out = {"uri": np.array(uris, dtype=object), "sha256": np.array(sha, dtype=object),
           "width": width, "height": height, "error": np.array(err, dtype=object), "pixels": pixels}
    if defer_jpeg:
        out["jpeg"] = np.array(jpeg, dtype=object)
    return out


class EmbedStage:
    """Model stage (a Ray actor in the Ray path): embeds the rows that decoded."""

    def __init__(self, model: str, weights: str | None = None, settings: Settings | None = None,
                 threads: int | None = None):
        """threads: the model's intra-op threads (None: the runtime's default, every core). A Ray actor on CPU gets
        the CPUs it reserved, set here rather than left to the OMP_NUM_THREADS Ray happens to export."""
        from services.embedder.runtime import embedder_for  # the model's runtime: only where images get embedded

        self.embedder = embedder_for(model, weights, settings or get_settings(), threads)

    @property
    def on_gpu(self) -> bool:
        return self.embedder.on_gpu

    def __call__(self, batch: Batch) -> Batch:
        error = batch["error"].copy()
        pixels = self._device_pixels(batch, error)
        ok = np.array([not e for e in error], dtype=bool)
        vectors = np.zeros((len(ok), self.embedder.spec.dim), np.float32)
        if ok.any():
            vectors[ok] = self.embedder.embed(pixels[ok])
        out = {k: v for k, v in batch.items() if k not in ("pixels", "jpeg")}
        out["error"], out["vector"] = error, vectors
        return out

    def _device_pixels(self, batch: Batch, error: np.ndarray):
        """The batch's pixels; JPEGs left undecoded by decode_batch(defer_jpeg) are decoded on the
        model's device here (a decode failure becomes that row's error)."""
        jpeg = batch.get("jpeg")
        rows = [i for i in range(len(error)) if jpeg is not None and len(jpeg[i]) and not error[i]]
        if not rows:
            return batch["pixels"]
        import torch

        from services.embedder.gpu_decode import decode_on_device

        size, device = batch["pixels"].shape[1], self.embedder.device  # torch's model: on_gpu says it is
        pixels = torch.from_numpy(batch["pixels"]).to(device)
        try:  # one batched call (nvjpeg's fast path); it fails whole, so then row by row
            pixels[rows] = decode_on_device([jpeg[i] for i in rows], size, device)
        except RuntimeError:
            for i in rows:
                try:
                    pixels[i] = decode_on_device([jpeg[i]], size, device)[0]
                except RuntimeError as e:
                    error[i] = f"corrupt JPEG data: {str(e).splitlines()[0]}"
        return pixels


class DecodeEmbedStage(EmbedStage):
    """Decode and model in one stage: a CPU actor of the Ray engine is a whole pipeline. (Separate decode
    tasks would wait for CPUs the actors hold: one actor per CPU is the fastest plan on CPUs.)"""

    def __init__(self, model: str, weights: str | None, threads: int | None, size: int, settings: Settings):
        super().__init__(model, weights, settings, threads)
        self.size, self.settings = size, settings

    def __call__(self, batch: Batch) -> Batch:
        return super().__call__(decode_batch(batch, self.size, self.settings))
