import pytest

from services.common.errors import InvalidInput
from services.searcher.collections import parse_shards
from services.searcher.router import shard_budget


def test_parse_shards_groups_and_replicas():
    assert parse_shards("a:1|b:1, a:2") == [["a:1", "b:1"], ["a:2"]]
    for bad in ("", "a:1,,a:2", " | "):
        with pytest.raises(InvalidInput):
            parse_shards(bad)


def test_a_shard_template_expands_to_every_shard_and_its_replicas():
    assert parse_shards("s-{i}.a:1|s-{i}.b:1", 3) == [["s-0.a:1", "s-0.b:1"], ["s-1.a:1", "s-1.b:1"],
                                                     ["s-2.a:1", "s-2.b:1"]]
    for spec, count in (("s-{i}:1", None), ("s-0:1", 2), ("s-{i}:1,t:1", 2), ("s-{i}:1", 0)):
        with pytest.raises(InvalidInput):
            parse_shards(spec, count)


def test_shard_budget_leaves_room_before_the_client_deadline():
    assert shard_budget(None, 2.0) == 2.0
    assert shard_budget(10.0, 2.0) == 2.0
    assert shard_budget(1.0, 2.0) == pytest.approx(0.89)
    assert 0 < shard_budget(0.0, 2.0) < 0.01
