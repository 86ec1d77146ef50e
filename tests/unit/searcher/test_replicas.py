"""Replica ejection and re-admission, against a real gRPC health server in this process."""

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.config import Settings
from services.searcher.replicas import ReplicaSet


async def _health_server():
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, servicer, port


def test_an_ejected_replica_is_probed_and_readmitted_with_no_traffic_to_its_shard():
    """A replica out of service is probed on a timer, not only when a call comes: after a quiet spell it is
    back (and its gauge reads 0) without any request having been made."""

    async def scenario():
        server, servicer, port = await _health_server()
        await servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        replicas = ReplicaSet(0, [f"127.0.0.1:{port}"], Settings(eject_after=2, eject_s=0.1), None)
        try:
            r = replicas.replicas[0]
            for _ in range(2):
                replicas.failed(r, "test")
            assert r.ejected
            await asyncio.sleep(0.5)  # probes come (and fail: NOT_SERVING), backing off 0.2, 0.4 ...
            assert r.ejected and r.backoff > 0.1
            await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            for _ in range(40):  # no call to the shard from here on
                if not r.ejected:
                    break
                await asyncio.sleep(0.1)
            assert not r.ejected and r.strikes == 0
        finally:
            await replicas.close()
            await server.stop(None)

    asyncio.run(scenario())
