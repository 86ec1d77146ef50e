"""The collections file: parsed with errors that name the collection, written back as read, and followed by the
Collections registry (added ones started, removed ones no longer served, the order kept: the first is the
default)."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.common.errors import InvalidInput, NotFound
from services.searcher.collections import (
    Collections,
    CollectionSpec,
    collections_json,
    parse_collections,
    shard_groups,
)

FILE = '{"collections": {"shoes": {"index": "s3://b/shoes", "shards": "h:1|h2:1,h:2"}, "bags": {"shards": "h:3"}}}'


def test_a_collections_file_reads_in_order_and_writes_back_the_same():
    specs = parse_collections(FILE)
    assert specs == [CollectionSpec("shoes", "h:1|h2:1,h:2", "s3://b/shoes"), CollectionSpec("bags", "h:3")]
    assert parse_collections(collections_json(specs)) == specs


def test_a_collection_searched_inside_the_router_names_no_shard_servers():
    spec = parse_collections('{"collections": {"shoes": {"index": "idx/", "shards": "local"}}}')[0]
    assert shard_groups(spec) == []


@pytest.mark.parametrize("text,words", [
    ("{", "not valid JSON"),
    ('{"shoes": {}}', "expected"),
    ('{"collections": {"Shoes!": {"shards": "h:1"}}}', "collection name 'Shoes!'"),
    ('{"collections": {"shoes": {"index": "x"}}}', "'shoes' needs \"shards\""),
    ('{"collections": {"shoes": {"shards": "h:1", "nprob": 3}}}', "unknown keys ['nprob']"),
    ('{"collections": {"shoes": {"shards": "local"}}}', "'shoes': shards \"local\" .* needs its index"),
    ('{"collections": {"shoes\\n": {"shards": "h:1"}}}', "collection name 'shoes\\\\n'"),  # before: accepted
])
def test_a_bad_collections_file_says_what_is_wrong(text, words):
    with pytest.raises(InvalidInput, match=words.replace("[", r"\[").replace("]", r"\]")):
        parse_collections(text)


class FakeRouter:
    def __init__(self, spec):
        self.spec, self.closed = spec, False

    async def close(self):
        self.closed = True


def test_the_registry_follows_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr("services.searcher.collections.CLOSE_GRACE_S", 0.01)
    path = tmp_path / "collections.json"

    async def run():
        async def start(spec):
            return FakeRouter(spec)

        served = Collections(start, path)
        path.write_text(FILE)
        await served.load()
        assert served.names == ["shoes", "bags"] and served.get("").spec.name == "shoes"
        shoes, bags = served.get("shoes"), served.get("bags")
        path.write_text('{"collections": {"bags": {"shards": "h:3"}, "hats": {"shards": "h:4"}}}')
        os.utime(path, (1, 1))  # a new mtime, however fast the rewrite
        await served.load()
        assert served.names == ["bags", "hats"] and served.get("bags") is bags  # unchanged: not restarted
        with pytest.raises(NotFound, match="no collection 'shoes' \\(served: bags, hats\\)"):
            served.get("shoes")
        await asyncio.sleep(0.05)
        return shoes, bags

    shoes, bags = asyncio.run(run())
    assert shoes.closed and not bags.closed  # the removed one closed after its grace, the kept one running


def test_a_missing_collections_file_is_named(tmp_path):
    async def run():
        await Collections(lambda spec: None, tmp_path / "nope.json").load()

    with pytest.raises(NotFound, match="collections file .*nope.json does not exist"):
        asyncio.run(run())


def test_a_collection_from_the_command_line_stays_first_and_is_never_retired_by_the_file(tmp_path):
    """router --shards ... --collections FILE: "default" is served beside the file's collections, whatever the
    file says later; the file may not name it."""
    path = tmp_path / "collections.json"

    async def run():
        async def start(spec):
            return FakeRouter(spec)

        served = Collections(start, path)
        await served.add(CollectionSpec("default", "h:9"))
        path.write_text(FILE)
        await served.load()
        assert served.names == ["default", "shoes", "bags"] and served.pick("") == ("default", served.get("default"))
        path.write_text('{"collections": {"hats": {"shards": "h:4"}}}')
        os.utime(path, (1, 1))
        await served.load()
        assert served.names == ["default", "hats"]
        path.write_text('{"collections": {"default": {"shards": "h:5"}}}')
        os.utime(path, (2, 2))
        with pytest.raises(InvalidInput, match="served from the command line already"):
            await served.load()
        assert served.names == ["default", "hats"]

    asyncio.run(run())
