"""In-process search over every shard of a published index (no servers needed)."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from services.common.config import Settings, get_settings
from services.common.errors import Incompatible, InvalidInput, NotFound
from services.common.hits import Hit
from services.common.images import decode_image
from services.common.store import open_store, read_uri
from services.common.validate import check_k, check_qe
from services.index import faiss_util
from services.index.filtered import FilteredSearch
from services.index.filters import Node, check_fields, parse_filter
from services.index.loaded import open_version
from services.index.manifest import Manifest
from services.index.merge import hit_lists, merge_topk
from services.index.projection import to_index_space
from services.index.shards import LoadedShard, shard_files
from services.index.stacked import stack_shards
from services.index.versions import load_current
from services.searcher.expansion import (
    QePlan,
    answer_expanded,
    expand,
    first_depth,
    found_ids,
    gate,
    plan,
    to_expand,
    unknown,
)
from services.searcher.feedback import requery


def check_assign(assign: tuple[np.ndarray, np.ndarray], nq: int, quantizer) -> tuple[np.ndarray, np.ndarray]:
    Dq, Iq = assign
    if quantizer is None:
        raise InvalidInput("a coarse assignment was sent, but this index is not a plain IVF index")
    if Iq.shape != Dq.shape or Iq.ndim != 2 or len(Iq) != nq:
        raise InvalidInput(f"coarse assignment has shape {Iq.shape} for {nq} queries")
    if Iq.size and (Iq.min() < -1 or Iq.max() >= quantizer.ntotal):
        raise InvalidInput(f"coarse assignment names lists outside 0..{quantizer.ntotal - 1}")
    return Dq, Iq


class IndexSearcher:
    """Loads the published version of an index root and searches all its shards."""

    def __init__(self, url: str, settings: Settings | None = None, only: list[int] | None = None,
                 manifest: Manifest | None = None):
        """Load every shard of the published version (or of `manifest`'s version: one a follower read), or `only`
        those numbers (a shard server)."""
        self.settings = settings or get_settings()
        self.store = open_store(url, self.settings)
        self.manifest = manifest or load_current(self.store)
        self.cache = self.settings.file_cache()
        loaded = open_version(self.store, self.manifest, self.cache, only, self.settings.mmap_index, serving=True)
        self.shards, self.projection, self.quantizer = loaded.shards, loaded.projection, loaded.quantizer
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(self.shards)))
        self.stacked = stack_shards(self.shards, self.quantizer)  # plain IVF: all shards as one faiss search
        self.filtered = FilteredSearch(self.shards, self.stacked, self.manifest.k_factor, self.settings.filter_cache_mb)

    @property
    def version(self) -> str:
        return self.manifest.version

    def files(self) -> list[tuple[str, str]]:
        """(key, sha256) of the shard files this searcher loaded: what its cache holds for it."""
        return shard_files(self.manifest, [s.entry for s in self.shards])

    def search(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None,
               where: Node | None = None) -> list[list[Hit]]:
        return hit_lists(*self.search_arrays(queries, k, nprobe, where=where))

    def search_arrays(self, queries: np.ndarray, k: int = 10, nprobe: int | None = None,
                      assign: tuple[np.ndarray, np.ndarray] | None = None, with_uris: bool = True,
                      where: Node | None = None):
        """(D, I, S, uris), each (nq, k), best first; id -1 / uri "" where fewer than k results.

        assign = (scores, lists), each (nq, nprobe): a coarse assignment made elsewhere (the router)
        for plain IVF shards; then nprobe is its width. with_uris False: uris None (evaluation reads
        rankings by id: looking up k uris per query is most of a deep search's merge). where: only rows
        matching this filter (filtered.py chooses how; an assignment is then not used: a filter widens
        nprobe)."""
        queries = np.asarray(queries, dtype=np.float32)
        if queries.ndim == 1:
            queries = queries[None, :]
        if not np.isfinite(queries).all():
            raise InvalidInput("query vectors contain NaN or infinity")
        queries = np.ascontiguousarray(self.to_index_space(queries))
        check_k(k, self.settings.max_k)
        nprobe = nprobe or self.manifest.nprobe
        if nprobe < 1:
            raise InvalidInput(f"nprobe must be >= 1, got {nprobe}")

        if where is not None:
            check_fields(where, self.manifest.fields)
            return self.filtered.search(queries, k, nprobe, where, with_uris)
        if assign is not None:
            assign = check_assign(assign, len(queries), self.quantizer)
        if self.stacked is not None:
            width = assign[1].shape[1] if assign else min(nprobe, self.stacked.index.nlist)
            return self.stacked.search(queries, k, width, self.manifest.k_factor, assign, with_uris)
        if assign is not None:
            Dq, Iq = assign
        elif self.quantizer is not None:  # one coarse search serves every shard (as faiss IndexShardsIVF)
            Dq, Iq = self.quantizer.search(queries, min(nprobe, self.quantizer.ntotal))
        if self.quantizer is not None:
            nprobe = Iq.shape[1]  # faiss reads nprobe entries per query from the assignment

            def shard_search(shard: LoadedShard):
                params = shard.params(nprobe, self.manifest.k_factor)
                return faiss_util.search_preassigned(shard.index, queries, k, Iq, Dq, params)
        else:
            def shard_search(shard: LoadedShard):
                return shard.index.search(queries, k, params=shard.params(nprobe, self.manifest.k_factor))

        def one(shard: LoadedShard):
            D, I = shard_search(shard)
            return (shard.entry.shard, D, I, shard.uris_of(I)) if with_uris else (shard.entry.shard, D, I)

        # Threads pay off for batches; single queries are faster searched shard after shard.
        if len(queries) < 8 or len(self.shards) < 2:
            return merge_topk([one(shard) for shard in self.shards], k)
        # The pool's threads share out the caller's OpenMP threads (a search pool gives a search one core under
        # load): each pool thread would otherwise start a team on every core, S teams at once.
        share = max(1, faiss.omp_get_max_threads() // len(self.shards))

        def pooled(shard: LoadedShard):
            faiss.omp_set_num_threads(share)  # this pool thread's own count: OpenMP keeps one per thread
            return one(shard)

        return merge_topk(list(self._pool.map(pooled, self.shards)), k)

    def to_index_space(self, vectors: np.ndarray) -> np.ndarray:
        """Model vectors projected as the index's were; index vectors (fetched by id) as they are."""
        return to_index_space(self.projection, vectors, self.manifest)

    def find(self, ids: list[int]) -> list[np.ndarray | None]:
        """Stored vectors of ids from whichever of the shards holds each (None where none does)."""
        found: list[np.ndarray | None] = [None] * len(ids)
        for shard in self.shards:
            shard.enable_fetch()  # once: a CLI search by feedback; shard servers did it at load
            for i, v in enumerate(shard.fetch(ids)):
                if v is not None:
                    found[i] = v
        return found

    def fetch(self, ids: list[int]) -> np.ndarray:
        """Stored vectors of catalogue ids from whichever shard holds them (NotFound for unknown ids)."""
        found = self.find(ids)
        unknown = [i for i, v in zip(ids, found) if v is None]
        if unknown:
            raise NotFound(f"unknown catalogue id(s): {', '.join(map(str, unknown[:5]))}")
        return np.array(found, dtype=np.float32).reshape(len(ids), self.manifest.dim)

    def embed_images(self, images: list[bytes], model: str | None = None) -> np.ndarray:
        """Embed query images with the index's own model (refusing any other model)."""
        from services.embedder.runtime import embedder_for  # the model's runtime: only where images get embedded

        spec = self.manifest.model
        if model is not None and model != spec["name"]:
            raise Incompatible(f"index was built with model {spec['name']!r}, not {model!r}")
        size = spec.get("image_size", 224)
        pixels = np.stack([decode_image(b, size, self.settings.max_image_bytes,
                                        self.settings.max_image_pixels).pixels for b in images])
        try:
            embedder = embedder_for(spec["name"], spec.get("weights"), self.settings)
        except (InvalidInput, NotFound) as e:
            raise Incompatible(f"index was built with model {spec['name']!r}, "
                               f"which cannot be loaded here: {e}") from None
        if embedder.spec.fingerprint != spec["fingerprint"]:
            raise Incompatible(f"model {spec['name']!r} here has fingerprint {embedder.spec.fingerprint}, "
                               f"the index was built with {spec['fingerprint']} (different weights or settings)")
        return embedder.embed(pixels)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


def search_uri(index: str, query: str, k: int = 10, nprobe: int | None = None, relevant: list[int] = (),
               not_relevant: list[int] = (), settings: Settings | None = None,
               step=lambda msg: None, qe: int | None = None,
               where: str | None = None) -> tuple[str, list[Hit], bool]:
    """The stage behind `imsearch search`: the query image at a uri (file or s3://), embedded with the index's
    own model, re-queried with relevance feedback when ids are marked, searched on every shard in-process, only
    among rows matching the filter `where` when given; expanded (αQE) as the router does (qe None: gated by the
    index's τ). Returns (index version, hits, whether it expanded)."""
    settings = settings or get_settings()
    check_k(k, settings.max_k)  # before the seconds spent loading the index and model
    if qe is not None:
        check_qe(qe)
    node = parse_filter(where) if where else None  # a typo is reported before the index loads
    data = read_uri(query, settings)
    step(f"loading the index at {index}")
    searcher = IndexSearcher(index, settings)
    try:
        m = searcher.manifest
        step(f"loading model {m.model.get('name')} to embed the query (index {m.version}: {m.count} vectors in "
             f"{len(m.shards)} shard(s))")
        vector = searcher.to_index_space(searcher.embed_images([data]))
        if relevant or not_relevant:
            vector = requery(vector[0], searcher.fetch(list(relevant) + list(not_relevant)), len(relevant), settings)
        qe_plan = plan(qe, gate(m, settings)[0], settings)
        hits, expanded = gated_search(searcher, vector, k, nprobe, qe_plan, node)
        if expanded[0]:
            step(f"query expansion with the top {qe_plan.neighbours} hits (best hit below τ {qe_plan.tau:.3f})"
                 if math.isfinite(qe_plan.tau) else f"query expansion with the top {qe_plan.neighbours} hits")
        return searcher.version, hits[0], bool(expanded[0])
    finally:
        searcher.close()


def gated_search(searcher: IndexSearcher, vectors: np.ndarray, k: int, nprobe: int | None, qe: QePlan | None,
                 where: Node | None = None) -> tuple[list[list[Hit]], np.ndarray]:
    """The router's search (service.Searcher._search) in this process: the queries whose best hit scores below
    the plan's τ searched again expanded, their hits scored by the query itself; (hits, expanded per query)."""
    if qe is None:
        return searcher.search(vectors, k, nprobe, where), np.zeros(len(vectors), bool)
    first = searcher.search_arrays(vectors, first_depth(k, qe), nprobe, where=where)
    D0, I0 = first[:2]
    expanded = to_expand(I0, D0, qe.tau)
    rows = np.flatnonzero(expanded)
    ids, scores = I0[rows, :qe.neighbours], D0[rows, :qe.neighbours]
    D, I, S, U = (a[:, :k].copy() for a in first)
    if len(rows):
        wanted = found_ids(ids)
        fetched = searcher.fetch(wanted)
        known = dict(zip(wanted, fetched))
        D2, I2, S2, U2 = searcher.search_arrays(expand(vectors[rows], ids, scores, fetched), k, nprobe, where=where)
        more = unknown(I2, known, I0[rows])
        known.update(zip(more, searcher.fetch(more) if more else []))
        D[rows], I[rows], S[rows], U[rows] = answer_expanded(vectors[rows], [a[rows] for a in first],
                                                             [D2, I2, S2, U2], known)
    return hit_lists(D, I, S, U), expanded
