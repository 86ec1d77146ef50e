"""The Ray build: one task per shard, each streaming its rows (id mod S) out of the embeddings parts, so no
process ever holds every vector. With more than 2 shards the parts are first split by shard (a task a part,
files staged beside the plan), so each shard task reads its own rows, not every part.

The driver reads the parts one at a time for what choosing needs (row counts, the metadata fields' kinds)
and for the projection's sample (a fixed 100k rows), learns the projection; one Ray task reads the training
sample (64 rows a list: it grows with the catalogue, so not in the driver) and the tuning queries and trains
the empty index once (every core of a node, a GPU when the cluster has one); the driver stages
what the tasks share under the index root (`builds/<key>/`: the plan, the trained index, the projection,
the tuning queries). Each task fills the trained index with its shard's rows, answers the tuning queries
(stages.make_shard, as the in-process build does), writes its shard files into the new version and then its
marker (`builds/<key>/shard-NNNNN.json`: the shard's entry with checksums, and its answers). The driver tunes
nprobe from the answers and writes the manifest and the pointer as any build does.

Resume: the key is a digest of the embeddings and the options, so the same command run again after a kill
finds the plan, keeps every shard (and every split part) whose marker and files verify against their
checksums, and builds only the rest — with the same trained index, so the result is the one an unbroken run gives.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import shutil
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from services.common.checksums import read_sealed_json, sealed_json, sha256_bytes, verified_bytes
from services.common.config import Settings
from services.common.errors import Corrupt, NotFound
from services.common.faults import crash_point
from services.common.rayinit import start_ray
from services.common.store import Store, open_store
from services.embedder.embeddings import read_part, vectors_of
from services.index import faiss_util, fields
from services.index.layout import BUILDS, version_key
from services.index.manifest import Manifest, ShardEntry, has_version
from services.index.projection import Projection, from_wire, to_wire
from services.index.versions import check_new_version, read_pointer
from services.index.writer import Step, finish_version, write_shard
from services.indexer.driver import (
    BuildOptions,
    check_not_empty,
    choose_index_params,
    first_rows,
    learn_gate,
    learn_projection,
    publish_build,
    version_template,
)
from services.indexer.params import IndexParams
from services.indexer.stages import Probe, ShardBuilder, clone, plan_rows

log = logging.getLogger(__name__)
PLAN_FORMAT = 1
SPLIT_MIN_SHARDS = 2  # more shards than this: the parts are split by shard first (split_by_shard)


@dataclass
class Plan:
    """What every shard task shares, staged so a rerun builds the same index."""
    version: str
    n: int  # embedded rows (before dropping repeated ids)
    dim: int
    params: IndexParams
    kinds: dict
    qids: np.ndarray
    queries: np.ndarray
    trained: bytes
    projection: Projection | None


def build_key(meta: dict, o: BuildOptions, settings: Settings) -> str:
    """Same embeddings and same options: same key, so a rerun finds what the killed run staged."""
    asked = {"embeddings": meta, "shards": o.shards, "factory": o.factory, "version": o.version,
             "projection": o.projection_options(settings), "fields": o.asked_fields(settings),
             "memory_budget_gb": settings.memory_budget_gb, "flat_max": settings.flat_max,
             "disk_rerank": settings.disk_rerank}
    return hashlib.sha256(json.dumps(asked, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_parallel(emb_store: Store, meta: dict, out: Store, o: BuildOptions, settings: Settings,
                   step: Step) -> Manifest:
    base = read_pointer(out)  # as in the local build: a change published meanwhile is not undone
    staging = f"{BUILDS}/{build_key(meta, o, settings)}"
    plan = load_plan(out, staging, step)
    if plan is None:
        plan = make_plan(emb_store, meta, check_new_version(out, o.version, build_key(meta, o, settings)), o,
                         settings, step)
        save_plan(out, staging, plan)
    markers = finished_shards(out, staging, plan, o.shards, step)
    if len(markers) < o.shards:
        todo = sorted(set(range(o.shards)) - set(markers))
        sources = split_by_shard(emb_store, meta["parts"], meta["dim"], out, staging, o.shards, todo, settings, step)
        markers |= run_tasks(sources, out, staging, plan, o.shards, todo, settings, step)
    entries = [ShardEntry(**markers[s]["entry"]) for s in range(o.shards)]
    probes = [Probe.from_json(markers[s]["probe"]) for s in range(o.shards)]
    count = sum(e.count for e in entries)
    trained = clone(plan.trained)
    template = version_template(plan.version, meta, emb_store.url, plan.dim, plan.params, o, 0, plan.projection,
                                plan.kinds, plan.n - count, probes, plan.qids, count, settings, step,
                                learn_gate(emb_store, plan.projection, trained, meta["model"]["fingerprint"],
                                           step))
    manifest = publish_build(lambda: finish_version(out, template, entries, faiss_util.ivf_quantizer(trained),
                                                    o.publish_it, step, base, plan.projection), out, plan.version)
    out.delete_prefix(staging)
    return manifest


# --- the driver: the plan


def make_plan(emb_store: Store, meta: dict, version: str, o: BuildOptions, settings: Settings, step: Step) -> Plan:
    """Count the rows and gather the fields' statistics (one part at a time), then read only the rows the
    projection, the training and the tuning need."""
    parts = meta["parts"]
    asked = o.asked_fields(settings)
    stats, n = fields.FieldStats(), 0
    step(f"reading {len(parts)} embeddings part(s) from {emb_store.url} (row counts and fields)")
    for part in parts:
        table = read_part(emb_store, part, ["id", "metadata"] if asked.strip() else ["id"])
        n += table.num_rows
        if asked.strip() and "metadata" in table.column_names:
            stats.update(fields.decode(table["metadata"].to_pylist(), table.num_rows))
    check_not_empty(n, meta, emb_store.url)
    kinds = fields.choose_fields(stats, asked, step)
    del stats
    projection = learn_projection(n, meta["dim"], lambda rows: gather(emb_store, parts, rows, meta["dim"])[1],
                                  *o.projection_options(settings), step)
    dim = projection.out_dim if projection is not None else meta["dim"]
    params = choose_index_params(n, dim, o.factory, settings)
    sample, query = plan_rows(n, params, not faiss_util.make_index(dim, params.factory).is_trained)
    if sample is None:
        step(f"reading the {len(query)} tuning queries")
        qids, queries, trained = sample_and_train(settings, emb_store.url, parts, query, None, meta["dim"],
                                                  to_wire(projection), dim, params)
    else:  # the training sample (64 rows a list: it grows with the catalogue) is read and used in a Ray task
        step(f"training {params.factory} on {len(sample)} of {n} vectors in a Ray task (which reads them and "
             f"the {len(query)} tuning queries)")
        start_ray(settings)
        call = (settings, emb_store.url, parts, query, sample, meta["dim"], to_wire(projection), dim, params)
        _, (qids, queries, trained) = next(each_result(sample_and_train, {0: call}, **training_resources()))
    return Plan(version, n, dim, params, kinds, qids, queries, trained, projection)


def sample_and_train(settings: Settings, emb_url: str, parts: list[dict], query: np.ndarray,
                     sample: np.ndarray | None, model_dim: int, projection: bytes | None, dim: int,
                     params: IndexParams) -> tuple[np.ndarray, np.ndarray, bytes]:
    """(ids, vectors) of the tuning query rows and the empty index trained on the sample rows (None: nothing
    to train), both read in one pass over the parts — in a Ray task, so the driver never holds the sample."""
    wanted = query if sample is None else np.concatenate([query, sample])
    projection = from_wire(projection)
    ids, rows = gather(open_store(emb_url, settings), parts, wanted, model_dim, projection)
    trained = faiss_util.make_index(dim, params.factory)
    if sample is not None:
        faiss_util.train(trained, rows[len(query):])
    return ids[:len(query)], rows[:len(query)].copy(), faiss_util.to_bytes(trained)


def training_resources() -> dict:
    """k-means runs on every core of one node (Ray gives a task as many OpenMP threads as CPUs it asked for),
    and on a GPU when the cluster has one."""
    import ray

    cpus = max((int(node["Resources"].get("CPU", 1)) for node in ray.nodes() if node.get("Alive")), default=1)
    return {"num_cpus": cpus, "num_gpus": 1 if ray.cluster_resources().get("GPU") else 0}


def gather(store: Store, parts: list[dict], rows: np.ndarray, dim: int,
           projection: Projection | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors) of the embedded rows at these positions (in the order given), one part at a time."""
    order = np.argsort(rows, kind="stable")
    wanted = rows[order]
    ids, vectors, start = np.empty(len(rows), np.int64), np.empty((len(rows), dim), np.float32), 0
    for part in parts:
        if not len(wanted) or start > wanted[-1]:
            break
        table = read_part(store, part, ["id", "vector"])
        lo, hi = np.searchsorted(wanted, start), np.searchsorted(wanted, start + table.num_rows)
        if hi > lo:
            local = wanted[lo:hi] - start
            taken = table.take(pa.array(local))
            ids[order[lo:hi]] = taken["id"].to_numpy()
            vectors[order[lo:hi]] = vectors_of(taken, dim)
        start += table.num_rows
    return ids, (projection.apply(vectors) if projection is not None else vectors)


def save_plan(out: Store, staging: str, plan: Plan) -> None:
    """Blobs first, the plan (with their checksums) last: a plan that exists names complete files."""
    files = {"trained.faiss": plan.trained, "queries.npy": _npy(plan.queries), "qids.npy": _npy(plan.qids)}
    if plan.projection is not None:
        files["projection.npz"] = plan.projection.to_bytes()
    for name, blob in files.items():
        out.put_bytes(f"{staging}/{name}", blob)
    body = {"format": PLAN_FORMAT, "version": plan.version, "n": plan.n, "dim": plan.dim,
            "params": plan.params.as_dict(), "kinds": plan.kinds,
            "files": {name: sha256_bytes(blob) for name, blob in files.items()}}
    out.put_bytes(f"{staging}/plan.json", sealed_json(body))


def load_plan(out: Store, staging: str, step: Step) -> Plan | None:
    """The plan a killed run staged, every file verified; None when there is none to resume (or it is damaged,
    or its version was written meanwhile)."""
    try:
        body = read_sealed_json(out.get_bytes(f"{staging}/plan.json"))
        if body.get("format") != PLAN_FORMAT or has_version(out, body["version"]):
            raise ValueError("stale")
        blobs = {name: verified_bytes(out, f"{staging}/{name}", sha) for name, sha in body["files"].items()}
    except NotFound:
        return None
    except (Corrupt, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        step(f"not resuming the staged build at {out.uri(staging)}: {e}; starting again")
        out.delete_prefix(staging)
        return None
    step(f"resuming the build of {body['version']} staged at {out.uri(staging)}")
    projection = Projection.from_bytes(blobs["projection.npz"]) if "projection.npz" in blobs else None
    return Plan(body["version"], body["n"], body["dim"], IndexParams(**body["params"]), body["kinds"],
                np.load(io.BytesIO(blobs["qids.npy"])), np.load(io.BytesIO(blobs["queries.npy"])),
                blobs["trained.faiss"], projection)


def finished_shards(out: Store, staging: str, plan: Plan, shards: int, step: Step) -> dict[int, dict]:
    """Markers of the shards an earlier run finished whose files still match their checksums."""
    def check(_: int, marker: dict) -> None:
        entry = ShardEntry(**marker["entry"])
        verified_bytes(out, version_key(plan.version, entry.file), entry.sha256)
        verified_bytes(out, version_key(plan.version, entry.docs_file), entry.docs_sha256)

    done = verified_markers(out, {s: marker_key(staging, s) for s in range(shards)}, check,
                            "shard {n}: built before, but {e}: building it again", step)
    if done:
        step(f"{len(done)} of {shards} shard(s) already built and verified: kept ({', '.join(map(str, done))})")
    return done


def verified_markers(out: Store, keys: dict[int, str], check, redo: str, step: Step) -> dict[int, dict]:
    """The markers (number -> key) an earlier run wrote that check(number, marker) accepts (it raises on a file
    that no longer matches); each one refused is said (redo, formatted with n and e) and left out, to be done
    again."""
    done = {}
    for n, key in keys.items():
        try:
            marker = read_sealed_json(out.get_bytes(key))
            check(n, marker)
        except NotFound:
            continue
        except (Corrupt, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            step(redo.format(n=n, e=e))
            continue
        done[n] = marker
    return done


def marker_key(staging: str, shard: int) -> str:
    return f"{staging}/shard-{shard:05d}.json"


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


# --- the tasks


@dataclass
class Sources:
    """Where each shard task reads its rows: a store and, per shard, the parts (or split files) holding them."""
    url: str
    parts: dict[int, list[dict]]


def split_by_shard(emb_store: Store, parts: list[dict], dim: int, out: Store, staging: str, shards: int,
                   todo: list[int], settings: Settings, step: Step) -> Sources:
    """Each part's rows split into one file per shard (a Ray task a part), staged beside the plan, so a shard
    task reads its own rows only: the catalogue is read twice and written once, where S tasks each reading every
    part read it S times. Not worth it for 2 shards or fewer (or one left to build): those read the parts."""
    if shards <= SPLIT_MIN_SHARDS or len(todo) <= 1:
        return Sources(emb_store.url, {s: parts for s in todo})
    short = short_of_room(out, staging, parts, dim)
    if short:
        step(f"not splitting the parts by shard: {short}; each shard task reads every part instead")
        return Sources(emb_store.url, {s: parts for s in todo})
    done = finished_splits(out, staging, parts, shards, step)
    missing = [p for p in range(len(parts)) if p not in done]
    if missing:
        import ray

        start_ray(settings)
        step(f"splitting {len(missing)} embeddings part(s) by shard in Ray tasks "
             f"({int(ray.cluster_resources().get('CPU', 1))} CPUs), so each shard task reads its own rows only")
        calls = {p: (settings, emb_store.url, parts[p], p, shards, out.url, staging) for p in missing}
        for p, marker in each_result(split_part, calls):
            done[p] = marker
            step(f"part {p} split: {sum(f['rows'] for f in marker['files'])} rows ({len(done)}/{len(parts)})")
            crash_point("index.part-split")
    return Sources(out.url, {s: [done[p]["files"][s] for p in range(len(parts)) if done[p]["files"][s]["rows"]]
                             for s in todo})


def short_of_room(out: Store, staging: str, parts: list[dict], dim: int) -> str:
    """Why the split files would not fit where they are staged ("" when they would, or when the store is not a
    local folder: object stores have no free space to ask about). An estimate: the vectors (float32) and ~64
    bytes a row of id, uri and metadata."""
    path = out.local_path(staging)
    if path is None:
        return ""
    while not path.exists():
        path = path.parent
    need = sum(int(p.get("rows", 0)) for p in parts) * (4 * dim + 64)
    free = shutil.disk_usage(path).free
    if need <= free:
        return ""
    return f"they would take ~{need / 2**20:,.0f} MiB under {out.uri(staging)} and {free / 2**20:,.0f} MiB is free"


def split_part(settings: Settings, emb_url: str, part: dict, index: int, shards: int, out_url: str,
               staging: str) -> dict:
    """One part's embedded rows, one parquet file a shard (rows in the part's order), then the part's marker."""
    table = read_part(open_store(emb_url, settings), part, ["id", "uri", "vector", "metadata", "error"])
    shard_of = table["id"].to_numpy() % shards
    out, files = open_store(out_url, settings), []
    for s in range(shards):
        rows = np.flatnonzero(shard_of == s)
        buf = io.BytesIO()
        pq.write_table(table.take(pa.array(rows)), buf)
        key = f"{staging}/split/part-{index:05d}-shard-{s:05d}.parquet"
        out.put_bytes(key, buf.getvalue())
        files.append({"key": key, "sha256": sha256_bytes(buf.getvalue()), "rows": len(rows)})
    marker = {"part": part["key"], "part_sha256": part["sha256"], "files": files}
    out.put_bytes(split_marker_key(staging, index), sealed_json(marker))
    return marker


def finished_splits(out: Store, staging: str, parts: list[dict], shards: int, step: Step) -> dict[int, dict]:
    """Markers of the parts an earlier run split whose files still match their checksums."""
    def check(p: int, marker: dict) -> None:
        if (marker["part"], marker["part_sha256"], len(marker["files"])) != (parts[p]["key"], parts[p]["sha256"],
                                                                            shards):
            raise ValueError("it was split from another part")
        for f in marker["files"]:
            verified_bytes(out, f["key"], f["sha256"])

    done = verified_markers(out, {p: split_marker_key(staging, p) for p in range(len(parts))}, check,
                            "part {n}: split before, but {e}: splitting it again", step)
    if done:
        step(f"{len(done)} of {len(parts)} part(s) already split and verified: kept")
    return done


def split_marker_key(staging: str, part: int) -> str:
    return f"{staging}/split/part-{part:05d}.json"


def run_tasks(sources: Sources, out: Store, staging: str, plan: Plan, shards: int, todo: list[int],
              settings: Settings, step: Step) -> dict[int, dict]:
    """Build the shards in todo, one Ray task each; their markers as they finish."""
    import ray

    start_ray(settings)
    shared = ray.put((plan.trained, plan.queries, to_wire(plan.projection)))
    step(f"building {len(todo)} shard(s) in Ray tasks ({int(ray.cluster_resources().get('CPU', 1))} CPUs)")
    done: dict[int, dict] = {}
    calls = {s: (settings, sources.url, sources.parts[s], s, shards, shared, plan.kinds, plan.params, out.url,
                 plan.version, staging) for s in todo}
    for number, marker in each_result(build_shard, calls):
        done[number] = marker
        entry = marker["entry"]
        step(f"shard {number} built: {entry['count']} vectors, {entry['bytes'] / 2**20:.1f} MiB "
             f"({len(done)}/{len(todo)})")
        crash_point("index.shard-built")
    return done


def each_result(fn, calls: dict[int, tuple], num_cpus: int = 1, num_gpus: int = 0):
    """Run fn(*args) for each call in its own Ray task (one CPU unless asked, no retry: a failed shard fails the
    run, and a rerun resumes or redoes it); yield (key, result) as they finish. The first task error cancels the
    rest and is raised as the task raised it (an InvalidInput stays one)."""
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)(fn)
    pending = {task.remote(*args): key for key, args in calls.items()}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        key = pending.pop(ready[0])
        try:
            result = ray.get(ready[0])
        except ray.exceptions.RayTaskError as e:
            for ref in pending:
                ray.cancel(ref, force=True)
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, Exception) else e) from None
        yield key, result


class ShardRows:
    """The embedded rows of one shard (id mod shards), streamed out of the parts a part at a time: (ids, model
    vectors, uris, metadata or None) per part, the first row of each id kept as the local build keeps it."""

    def __init__(self, store: Store, parts: list[dict], number: int, shards: int, dim: int, metadata: bool):
        self.store, self.parts, self.number, self.shards, self.dim = store, parts, number, shards, dim
        self.metadata = metadata
        self.rows = 0  # of this shard, repeated ids included
        self.seen: set[int] = set()

    @property
    def dropped(self) -> int:
        return self.rows - len(self.seen)

    def __iter__(self):
        for part in self.parts:
            table = read_part(self.store, part, ["id", "uri", "vector", *(["metadata"] if self.metadata else [])])
            ids = table["id"].to_numpy()
            mine = np.flatnonzero(ids % self.shards == self.number)
            self.rows += len(mine)
            listed = ids.tolist()
            first = [i for i in mine[first_rows(ids[mine])[0]].tolist() if listed[i] not in self.seen]
            if not first:
                continue
            table, ids = table.take(pa.array(first)), ids[first]
            self.seen.update(ids.tolist())
            metadata = None
            if self.metadata:
                metadata = table["metadata"].to_pylist() if "metadata" in table.column_names else [None] * len(ids)
            yield ids, vectors_of(table, self.dim), table["uri"].to_pylist(), metadata


def build_shard(settings: Settings, emb_url: str, parts: list[dict], number: int, shards: int, shared,
                kinds: dict, params: IndexParams, out_url: str, version: str, staging: str) -> dict:
    """One shard, in a Ray task: its rows streamed from the parts (or its split files) at emb_url, projected and
    added to the trained index; written; then its marker."""
    trained, queries, projection = shared
    projection = from_wire(projection)
    builder = ShardBuilder(number, trained, queries, params)
    rows = ShardRows(open_store(emb_url, settings), parts, number, shards,
                     projection.in_dim if projection is not None else queries.shape[1], bool(kinds))
    metadata: list = []
    for ids, vectors, uris, meta in rows:
        builder.add(ids, projection.apply(vectors) if projection is not None else vectors, uris)
        metadata += meta or []
    columns = fields.columns_of(fields.decode(metadata, len(metadata)), kinds) if kinds else {}
    shard, probe = builder.finish(columns)
    out = open_store(out_url, settings)
    entry = write_shard(out, version, shard, log.info)
    marker = {"entry": entry.model_dump(), "probe": probe.to_json(), "dropped": rows.dropped}
    out.put_bytes(marker_key(staging, number), sealed_json(marker))
    return marker
