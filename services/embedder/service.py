"""Online embedding over gRPC with dynamic batching.

Requests are decoded on arrival (thread pool), then queued; one worker collects queued images up
to `embed_batch` or `embed_max_wait_ms` and runs them as one model batch. The queue is bounded:
when it is full, callers get RESOURCE_EXHAUSTED at once instead of unbounded memory.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common import metrics, server
from services.common.config import Settings, get_settings
from services.common.convert import vectors_to_proto
from services.common.errors import InvalidInput, TooLarge
from services.common.images import decode_image
from services.embedder.models import Embedder, load_embedder

log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["Embedder"].full_name


@dataclass
class _Job:
    pixels: np.ndarray
    future: asyncio.Future


class DynamicBatcher:
    """Coalesces concurrent requests into model batches (as Ray Serve's @serve.batch)."""

    def __init__(self, embed: Callable[[np.ndarray], np.ndarray], max_batch: int, max_wait_s: float, max_queue: int):
        self.embed, self.max_batch, self.max_wait_s = embed, max_batch, max_wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.task: asyncio.Task | None = None
        self.batches = 0  # model calls made (for tests and metrics)

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, pixels: np.ndarray) -> np.ndarray:
        job = _Job(pixels, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise TooLarge(f"embedder busy: {self.queue.qsize()} requests queued; retry later") from None
        metrics.QUEUE_DEPTH.set(self.queue.qsize())
        return await job.future

    async def _collect(self) -> list[_Job]:
        jobs = [await self.queue.get()]
        size = len(jobs[0].pixels)
        deadline = asyncio.get_running_loop().time() + self.max_wait_s
        while size < self.max_batch:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                job = await asyncio.wait_for(self.queue.get(), remaining)
            except asyncio.TimeoutError:
                break
            jobs.append(job)
            size += len(job.pixels)
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._collect()
            metrics.QUEUE_DEPTH.set(self.queue.qsize())
            try:
                vectors = await loop.run_in_executor(None, self.embed, np.concatenate([j.pixels for j in jobs]))
                self.batches += 1
                start = 0
                for job in jobs:
                    if not job.future.done():
                        job.future.set_result(vectors[start:start + len(job.pixels)])
                    start += len(job.pixels)
            except Exception as e:  # the model failed: every waiting caller hears it
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e)

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()


class EmbedderService(pb_grpc.EmbedderServicer):
    def __init__(self, embedder: Embedder, batcher: DynamicBatcher, settings: Settings):
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
    embedder = await asyncio.get_running_loop().run_in_executor(
        None, load_embedder, name, weights, settings.device)
    batcher = DynamicBatcher(embedder.embed, settings.embed_batch, settings.embed_max_wait_ms / 1000,
                             settings.embed_queue)
    batcher.start()
    service = EmbedderService(embedder, batcher, settings)
    running = await server.start([(pb_grpc.add_EmbedderServicer_to_server, service, SERVICE)], port, settings, host)
    metrics.serve_metrics(settings.metrics_port, host)
    log.info("embedder %s (%s) serving on %s:%d", name, embedder.device, host, running.port)
    return running, batcher
