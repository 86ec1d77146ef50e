"""The Embedder service (real model, real process) alone and behind the router."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from PIL import Image

from protos.imsearch.v1 import imsearch_pb2 as pb
from protos.imsearch.v1 import imsearch_pb2_grpc as pb_grpc
from services.common.config import Settings
from services.embedder.pipeline import embed_catalogue
from services.embedder.runtime import load_embedder
from services.indexer.build import build_index
from services.searcher.client import SearchClient
from services.stack.part import Part
from tests.helpers import DEFAULT_MODEL, encode, write_photos


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("embsvc")
    write_photos(tmp / "photos", 6)
    return tmp


@pytest.fixture(scope="module")
def embedder(photos):
    svc = Part.python("embedder", "services.embedder", [], env={
        "IMSEARCH_HOME": str(photos / "home"), "IMSEARCH_EMBED_QUEUE": "2", "IMSEARCH_EMBED_BATCH": "8"},
        log=photos / "embedder.log")
    try:
        yield svc.start()
    finally:
        svc.stop()


def test_embed_matches_the_offline_model(photos, embedder):
    files = sorted((photos / "photos").iterdir())[:3]
    with grpc.insecure_channel(embedder.address) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        reply = stub.Embed(pb.EmbedRequest(images=[f.read_bytes() for f in files]), timeout=60)
        info = stub.Info(pb.InfoRequest(), timeout=10)
    model = load_embedder(DEFAULT_MODEL, device="cpu")  # what the service runs with no --model
    size = model.spec.image_size
    pixels = np.stack([np.array(Image.open(f).convert("RGB").resize((size, size), Image.Resampling.BICUBIC))
                       for f in files])
    offline = model.embed(pixels)
    online = np.array([v.values for v in reply.vectors], np.float32)
    assert reply.dim == info.dim == 1280 and info.fingerprint == model.spec.fingerprint
    assert np.allclose(online, offline, atol=0.02)  # same model; resize paths differ slightly


def test_bad_images_and_overload_get_status_codes_and_it_recovers(photos, embedder):
    good = (sorted((photos / "photos").iterdir())[0]).read_bytes()
    with grpc.insecure_channel(embedder.address) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(pb.EmbedRequest(images=[good, b"GIF89a broken"]), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "image 1" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            stub.Embed(pb.EmbedRequest(), timeout=30)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        def call(_):
            try:
                stub.Embed(pb.EmbedRequest(images=[good] * 8), timeout=120)
                return "ok"
            except grpc.RpcError as err:
                return err.code()

        with ThreadPoolExecutor(24) as pool:  # 24 x 8 images at a queue of 2 requests
            codes = list(pool.map(call, range(24)))
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes and "ok" in codes
        assert set(codes) <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert len(stub.Embed(pb.EmbedRequest(images=[good]), timeout=60).vectors) == 1  # recovered


def test_router_embeds_query_images_through_the_service(photos, embedder, start_stack):
    settings = Settings(home=photos / "home")
    embed_catalogue(str(photos / "photos"), str(photos / "emb"), engine="local", settings=settings)
    build_index(str(photos / "emb"), str(photos / "idx"), shards=2, settings=settings)
    router = start_stack(photos / "idx", router_index=False, embedder=embedder.address,
                         env={"IMSEARCH_HOME": str(photos / "home")}).router
    target = sorted((photos / "photos").iterdir())[4]
    query = encode(Image.open(target).resize((160, 120)), "JPEG", quality=40)
    with SearchClient(router.address, timeout=60) as client:
        result = client.search(query, k=3)
    assert result.hits[0].uri == str(target) and result.coverage == 1.0
