"""Named collections: several indexes behind one router (and one gateway), each with its own shards, version
pinning, coarse quantizer, projection, model and cache namespace.

They are declared in a JSON file (IMSEARCH_COLLECTIONS, or `router --collections FILE`):

    {"collections": {"shoes": {"index": "s3://b/idx-shoes", "shards": "h1:50061|h2:50061,h1:50062"},
                     "bags":  {"index": "s3://b/idx-bags",  "shards": "h3:50061"}}}

which the router re-reads when it changes (every IMSEARCH_RELOAD_INTERVAL_S): a collection added to it is
served from then on, a removed one stops being served (its in-flight requests finish first), and the
others are not touched. Publishing or rolling back a collection's index is the index's own CURRENT flip,
which its shard servers follow as always. A request names its collection; one without a name goes to the
first collection of the file (or the one a router started with --shards serves, named "default").
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from services.common.errors import InvalidInput, NotFound

log = logging.getLogger(__name__)
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
DEFAULT = "default"
LOCAL = "local"  # shards searched inside the router's process (one host): no shard servers
CLOSE_GRACE_S = 30.0  # a removed collection's router is closed after its in-flight requests had this long


@dataclass(frozen=True)
class CollectionSpec:
    name: str
    shards: str  # host:port[|replica],... one group per shard (router --shards), or "local": in-process
    index: str | None = None  # the index root (router --index): list assignment, projection, query images
    embedder: str | None = None  # host:port of an Embedder service for query images
    shard_count: int | None = None  # with a shards template on {i} (a StatefulSet's pods): how many shards

    @property
    def in_process(self) -> bool:
        """shards "local": the router searches the index's shards itself."""
        return self.shards.strip() == LOCAL


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):  # `$` would let "shoes\n" through
        raise InvalidInput(f"collection name {name!r}: use 1-63 lowercase letters, digits, '-' or '_'")
    return name


def parse_collections(text: str, where: str = "collections file") -> list[CollectionSpec]:
    """The collections of a file's text, in the file's order (the first is the default)."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidInput(f"{where} is not valid JSON: {e.msg} at line {e.lineno}") from None
    table = doc.get("collections") if isinstance(doc, dict) else None
    if not isinstance(table, dict) or not table:
        raise InvalidInput(f'{where}: expected {{"collections": {{"NAME": {{"index": ..., "shards": ...}}}}}}')
    specs = []
    for name, body in table.items():
        if not isinstance(body, dict) or not isinstance(body.get("shards"), str) or not body["shards"].strip():
            raise InvalidInput(f"{where}: collection {name!r} needs \"shards\": \"host:port,...\"")
        unknown = set(body) - {"index", "shards", "embedder", "shard_count"}
        if unknown:
            raise InvalidInput(f"{where}: collection {name!r} has unknown keys {sorted(unknown)}")
        count = body.get("shard_count")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
            raise InvalidInput(f"{where}: collection {name!r}: shard_count must be an integer")
        spec = CollectionSpec(check_name(name), body["shards"], body.get("index"), body.get("embedder"), count)
        shard_groups(spec)  # a bad shards string is refused with the file, not when the first request comes
        specs.append(spec)
    return specs


def parse_shards(spec: str, count: int | None = None) -> list[list[str]]:
    """'a:1|b:1,a:2' -> [['a:1', 'b:1'], ['a:2']] (shard i = i-th comma group, '|' = replicas). With a count,
    the spec is one group templated on {i}: ('s-{i}.a:1|s-{i}.b:1', 2) -> [['s-0.a:1', 's-0.b:1'], [...]]
    (a StatefulSet's pod names, whatever the number of shards)."""
    if count is not None:
        if count < 1 or "{i}" not in spec or "," in spec:
            raise InvalidInput(f"bad --shards {spec!r} with --shard-count {count}: expected one "
                               "host:port[|host:port] group naming the shard as {i}, and a count of at least 1")
        spec = ",".join(spec.replace("{i}", str(i)) for i in range(count))
    elif "{i}" in spec:
        raise InvalidInput(f"--shards {spec!r} names shard {{i}}: say how many shards with --shard-count")
    groups = [[a.strip() for a in group.split("|") if a.strip()] for group in spec.split(",")]
    if not groups or any(not g for g in groups):
        raise InvalidInput(f"bad --shards {spec!r}: expected host:port[|host:port],... one group per shard")
    return groups


def shard_groups(spec: CollectionSpec) -> list[list[str]]:
    """The collection's shards as the router asks them: one group of replica addresses per shard (none when the
    router searches them in-process: shards "local")."""
    if spec.in_process:
        if not spec.index:
            raise InvalidInput(f"collection {spec.name!r}: shards \"local\" (searched inside the router) needs "
                               "its index (--index)")
        return []
    try:
        return parse_shards(spec.shards, spec.shard_count)
    except InvalidInput as e:
        raise InvalidInput(f"collection {spec.name!r}: {e}") from None


def collections_json(specs: list[CollectionSpec]) -> str:
    return json.dumps({"collections": {s.name: {k: v for k, v in (("index", s.index), ("shards", s.shards),
                                                                  ("embedder", s.embedder),
                                                                  ("shard_count", s.shard_count)) if v}
                                       for s in specs}}, indent=1)


class Collections:
    """name -> a running Router (router.py), kept in step with the collections file."""

    def __init__(self, start: Callable[[CollectionSpec], Awaitable], path: Path | None = None):
        """start(spec) -> a started Router for one collection (awaited)."""
        self.start, self.path = start, path
        self.routers: dict = {}
        self.specs: dict[str, CollectionSpec] = {}  # the collections the file named, as it named them
        self._mtime: float | None = None

    @property
    def names(self) -> list[str]:
        return list(self.routers)

    def get(self, name: str):
        """The router of a collection ("" = the default: the first)."""
        return self.pick(name)[1]

    def pick(self, name: str) -> tuple:
        """(the collection's name, its router); "" names the default: the first."""
        if not self.routers:
            raise NotFound("this router serves no collection")
        name = name or next(iter(self.routers))
        router = self.routers.get(name)
        if router is None:
            raise NotFound(f"no collection {name!r} (served: {', '.join(self.routers)})")
        return name, router

    async def add(self, spec: CollectionSpec) -> None:
        """Serve a collection given outside the file (router --shards): the file never retires it."""
        self.routers[spec.name] = await self.start(spec)
        log.info("serving collection %s (%s)", spec.name, spec.index or spec.shards)

    async def _add_from_file(self, spec: CollectionSpec) -> None:
        await self.add(spec)
        self.specs[spec.name] = spec

    async def load(self) -> None:
        """Read the file and apply it: new collections started, removed or changed ones replaced."""
        if self.path is None:
            return
        if not self.path.is_file():
            raise NotFound(f"collections file {self.path} does not exist")
        stat = self.path.stat()
        if stat.st_mtime == self._mtime:
            return
        wanted = parse_collections(self.path.read_text(), str(self.path))
        keep = {s.name: s for s in wanted}
        taken = [n for n in keep if n in self.routers and n not in self.specs]
        if taken:
            raise InvalidInput(f"{self.path}: collection(s) {taken} are served from the command line already")
        for name in [n for n in self.specs if keep.get(n) != self.specs[n]]:
            self._retire(name)
        for spec in wanted:
            if spec.name not in self.routers:
                await self._add_from_file(spec)
        fixed = {n: r for n, r in self.routers.items() if n not in keep}  # --shards' "default" stays first
        self.routers = fixed | {s.name: self.routers[s.name] for s in wanted}  # then the file's order
        self._mtime = stat.st_mtime  # applied: a failed start is tried again at the next look

    def _retire(self, name: str) -> None:
        router = self.routers.pop(name)
        self.specs.pop(name)
        log.info("collection %s is no longer served", name)
        asyncio.get_running_loop().call_later(CLOSE_GRACE_S, lambda: asyncio.ensure_future(router.close()))

    async def watch(self, interval: float) -> None:
        """Follow the file; a broken edit is logged and the collections served stay as they were."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.load()
            except Exception as e:  # noqa: BLE001 - a half-written or wrong file must not stop the others
                log.error("collections file %s: %s (still serving %s)", self.path, e, ", ".join(self.routers))

    async def close(self) -> None:
        await asyncio.gather(*(r.close() for r in self.routers.values()))
