"""`imsearch loadtest` against the real stack (shard servers, router with Redis cache): the mix runs, the
figures add up, and the Zipf repeats are served from the cache."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_cli import run


@pytest.fixture()
def cached_stack(catalogue, served, redis_server):
    stack = served(IMSEARCH_REDIS_URL=f"redis://127.0.0.1:{redis_server.port}/0")
    return catalogue, stack.router


def test_loadtest_mix_closed_and_open_loop(cached_stack, tmp_path):
    tmp, router = cached_stack
    proc = run("loadtest", "--router", router.address, "--index", str(tmp / "idx"), "--images", str(tmp / "photos"),
               "--seconds", "3", "--concurrency", "4", "--mix", "new=0.1,popular=0.8,batch=0.1", "--popular", "12",
               "--batch", "4", "--at-fraction", "0.5", "--json", env_home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    peak, half = runs["peak"], runs["at_0.5_of_peak"]
    for r in (peak, half):
        assert r["calls"] > 0 and r["error_rate"] == 0.0 and r["statuses"] == {"OK": r["calls"]}, r
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert set(r["by_kind"]) == {"new", "popular", "batch"}, r
        assert r["cache_hit_rate"] > 0.5, r  # 12 popular ids under Zipf: mostly repeats
        assert r["partial_answers"] == 0
    assert abs(half["qps"] - 0.5 * peak["qps"]) < 0.25 * peak["qps"] + 2  # the open loop holds its rate


def test_loadtest_bad_mix(catalogue, tmp_path):
    from tests.integration.test_cli import assert_one_line_error

    assert_one_line_error(run("loadtest", "--router", "127.0.0.1:1", "--index", str(catalogue / "idx"), "--mix",
                              "new=x", env_home=tmp_path / "home"), "mix entry")
