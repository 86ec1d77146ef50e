"""How a router turns query images into model vectors: through the Embedder service (which batches across
requests and routers), or in its own process with the index's model (the embedded default)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common import server
from services.common.config import Settings
from services.common.convert import vectors_from_proto
from services.common.errors import from_status
from services.searcher.local import IndexSearcher
from services.searcher.router import Embed


def remote_embedder(address: str, settings: Settings, metadata) -> tuple[Embed, pb_grpc.EmbedderStub]:
    """Embed query images through the Embedder service at address."""
    stub = pb_grpc.EmbedderStub(server.channel(address, settings))

    async def embed(images: list[bytes]) -> np.ndarray:
        try:
            reply = await stub.Embed(pb.EmbedRequest(images=images), timeout=settings.embed_timeout_s,
                                     metadata=metadata)
        except grpc.aio.AioRpcError as e:
            raise from_status(e.code(), e.details(), f"embedder {address}") from None
        return vectors_from_proto(reply.vectors)

    return embed, stub


def local_embedder(index: str, settings: Settings) -> tuple[Embed, int]:
    """Embed query images in this process with the index's own model (blocking: loads the model's spec)."""
    searcher = IndexSearcher(index, settings, only=[])

    async def embed(images: list[bytes]) -> np.ndarray:
        return await asyncio.get_running_loop().run_in_executor(None, searcher.embed_images, images)

    return embed, searcher.manifest.model_dim
