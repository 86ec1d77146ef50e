"""Online embedding over gRPC with dynamic batching.

Requests are decoded on arrival (thread pool), then queued; a DynamicBatcher collects queued
images up to `embed_batch` or `embed_max_wait_ms` and runs them as one model batch. The queue is
bounded: when it is full, callers get RESOURCE_EXHAUSTED at once instead of unbounded memory.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common import metrics, server
from services.common.batching import DynamicBatcher
from services.common.config import Settings, get_settings
from services.common.convert import vectors_to_proto
from services.common.errors import InvalidInput, TooLarge
from services.common.images import decode_image
from services.embedder.runtime import embedder_for

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Embedder"].full_name


class EmbedderService(pb_grpc.EmbedderServicer):
    def __init__(self, embedder, batcher: DynamicBatcher, settings: Settings):
        self.embedder, self.batcher, self.settings = embedder, batcher, settings

    def _decode(self, images: list[bytes]) -> np.ndarray:
        size = self.embedder.spec.image_size
        out = np.empty((len(images), size, size, 3), np.uint8)
        for i, data in enumerate(images):
            try:
                out[i] = decode_image(data, size, self.settings.max_image_bytes, self.settings.max_image_pixels).pixels
            except (InvalidInput, TooLarge) as e:
                raise type(e)(f"image {i}: {e}") from None
        return out

    @server.rpc
    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        if not request.images:
            raise InvalidInput("no images given")
        if len(request.images) > self.settings.max_batch:
            raise TooLarge(f"{len(request.images)} images in one call; the limit is {self.settings.max_batch}")
        pixels = await asyncio.get_running_loop().run_in_executor(None, self._decode, list(request.images))
        vectors = await self.batcher.submit(pixels)
        spec = self.embedder.spec
        return pb.EmbedResponse(vectors=vectors_to_proto(vectors), model=spec.name, dim=spec.dim)

    @server.rpc
    async def Info(self, request, context) -> pb.ModelInfo:
        spec = self.embedder.spec
        return pb.ModelInfo(name=spec.name, dim=spec.dim, fingerprint=spec.fingerprint, image_size=spec.image_size)


async def serve(port: int = 0, settings: Settings | None = None, model: str | None = None,
                host: str = "127.0.0.1") -> tuple[server.Running, DynamicBatcher]:
    settings = settings or get_settings()
    name = model or settings.model
    weights = str(settings.model_weights) if settings.model_weights else None
    embedder = await asyncio.get_running_loop().run_in_executor(None, embedder_for, name, weights, settings)
    batcher = DynamicBatcher(embedder.embed, settings.embed_batch, settings.embed_max_wait_ms / 1000,
                             settings.embed_queue, name="embed")
    batcher.start()
    service = EmbedderService(embedder, batcher, settings)
    running = await server.start([(pb_grpc.add_EmbedderServicer_to_server, service, SERVICE)], port, settings, host)
    metrics.serve_metrics(settings.metrics_port, host)
    log.info("embedder %s (%s) serving on %s:%d", name, embedder.label(), host, running.port)
    return running, batcher
