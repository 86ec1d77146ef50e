"""`imsearch <subcommand>`: every stage is a plain function; this module only parses and prints."""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from services.common.errors import ImsearchError, InvalidInput

# Plain click help: typer's rich panels print a "<bool>" type beside every flag, which takes no value.
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Distributed image search: embed a catalogue, build a sharded index, search it.")
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)


def cli_errors(fn):
    """A domain error becomes one line on stderr and exit code 2 — never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ImsearchError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130)

    return wrapper


def _settings(**overrides):
    from services.common.config import Settings, get_settings

    base = get_settings()
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**{**base.model_dump(), **clean}) if clean else base


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="debug logs")) -> None:
    from pydantic import ValidationError

    from services.common.config import get_settings
    from services.common.logs import setup_logging

    try:
        settings = get_settings()
    except ValidationError as e:  # bad IMSEARCH_* values stop the start, named one by one
        bad = "; ".join(f"IMSEARCH_{'_'.join(map(str, x['loc'])).upper()}: {x['msg']}" for x in e.errors())
        err.print(f"[red]error:[/red] invalid settings: {bad}", highlight=False)
        raise typer.Exit(2)
    setup_logging("debug" if verbose else settings.log_level, settings.log_format)


@app.command()
@cli_errors
def embed(
    source: Optional[str] = typer.Argument(None, help="folder, s3://bucket/prefix, or a manifest (.parquet/.csv/.txt)"),
    out_: str = typer.Option(..., "--out", "-o", help="where to write embeddings (folder or s3://)"),
    manifest: Optional[str] = typer.Option(None, help="a manifest of image uris (with SOURCE: relative uris are "
                                                      "under SOURCE) and their metadata columns"),
    model: Optional[str] = typer.Option(None, help="registry name, timm:<arch>, or a checkpoint .pt"),
    weights: Optional[str] = typer.Option(None, help="weights file for timm:<arch> models"),
    engine: str = typer.Option("auto", help="auto | local | ray"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address: the auto engine is then Ray"),
    batch_size: Optional[int] = typer.Option(None, help="images per model batch"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON"),
) -> None:
    """Embed every image of a catalogue into parquet parts."""
    if not source and not manifest:
        raise typer.BadParameter("give SOURCE (a folder, s3:// prefix or manifest), or --manifest")
    _embed(manifest or source, out_, _settings(ray_address=ray_address, batch_size=batch_size), as_json,
           model=model, weights=weights, engine=engine, images_root=source if manifest else None)


def _embed(source: str, out_url: str, settings, as_json: bool = False, **options) -> None:
    """embed_catalogue with a progress bar, then its summary (exit 1 when nothing was embedded)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from services.embedder.pipeline import embed_catalogue

    columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]} img/s"),
               TextColumn("{task.fields[errors]} errors"), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task("embed", total=None, errors=0, rate="-")
        since: dict[str, float] = {}  # rows and time at the first batch: start-up and resumed rows do not count
        said = [0.0]  # when a line was last printed (no terminal: no bar)

        def progress(done: int, total: int, errors: int) -> None:
            now = time.monotonic()
            since.setdefault("before", done)
            if "rows" not in since and done > since["before"]:
                since.update(rows=done, time=now)
            rate = (done - since["rows"]) / (now - since["time"]) if "rows" in since and now > since["time"] else 0.0
            bar.update(task, completed=done, total=total, errors=errors, rate=f"{rate:.1f}")
            if not err.is_terminal and not as_json and (now - said[0] >= 10 or done == total):
                said[0] = now
                eta = f", {(total - done) / rate:.0f} s left" if rate > 0 and done < total else ""
                err.print(f"• embedding: {done}/{total} images, {errors} errors, {rate:.1f} img/s{eta}",
                          highlight=False)

        summary = embed_catalogue(source, out_url, settings=settings, progress=progress,
                                  say=None if as_json else _step(False), **options)
    if as_json:
        print(json.dumps({"out": summary.out, "total": summary.total, "embedded": summary.embedded,
                          "skipped": summary.skipped, "reasons": dict(summary.reasons), "engine": summary.engine,
                          "resumed": summary.resumed, "embedded_this_run": summary.embedded_now,
                          "duplicates": summary.duplicates, "redone": summary.redone,
                          "seconds": round(summary.seconds, 2), "nodes": dict(summary.nodes),
                          "gate_sample": summary.gate_sample}))
    else:
        out.print(summary.line(), highlight=False)
    if summary.embedded == 0:
        raise typer.Exit(1)


model_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="The model as the inference runtime runs it.")
app.add_typer(model_app, name="model")


@model_app.command("export")
@cli_errors
def model_export(
    model: Optional[str] = typer.Option(None, help="registry name, timm:<arch>, or a checkpoint .pt (default: "
                                                   "IMSEARCH_MODEL)"),
    weights: Optional[str] = typer.Option(None, help="weights file for timm:<arch> models"),
) -> None:
    """Export the model for the inference runtimes (OpenVINO, ONNX Runtime) into IMSEARCH_HOME/models (checked
    against torch; needs torch once, the machines that then embed with it do not)."""
    import json as json_

    from services.embedder.runtime import exported
    from services.embedder.spec import resolve_spec

    settings = _settings()
    spec = resolve_spec(model or settings.model, weights or (str(settings.model_weights)
                                                             if settings.model_weights else None))
    path = exported(spec, settings.model_cache())
    record = json_.loads(path.with_suffix(".json").read_text())
    out.print(f"{spec.name} ({spec.fingerprint}) exported to {path}; largest difference from torch "
              f"{record['max_abs_diff']:.1e}", highlight=False)


index_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                        help="Build an index and change it while it serves: versions under one root, CURRENT "
                             "flipped atomically.")
app.add_typer(index_app, name="index")


def _step(quiet: bool):
    return (lambda m: None) if quiet else (lambda m: err.print(f"• {m}", highlight=False))


@index_app.command("build")
@cli_errors
def index_build(
    embeddings: str = typer.Argument(..., help="embeddings folder or s3:// prefix (from `imsearch embed`)"),
    out_: str = typer.Option(..., "--out", "-o", help="index root (folder or s3://); ROOT/NAME of an existing "
                                                      "index stages version NAME without publishing it"),
    shards: int = typer.Option(1, help="number of shards"),
    index_factory: Optional[str] = typer.Option(None, help="faiss factory string; default: chosen from N"),
    pca: Optional[int] = typer.Option(None, help="learn a centred PCA to this many dimensions (0: off) "
                                                 "[default: IMSEARCH_PCA_DIM, 256]"),
    whiten: Optional[float] = typer.Option(None, help="whitening of that PCA: eigenvalue power 0..1, 1 = full "
                                                      "[default: IMSEARCH_WHITEN_POWER, 0]"),
    nprobe: Optional[int] = typer.Option(None, help="default nprobe; default: tuned to the target recall"),
    memory_budget_gb: Optional[float] = typer.Option(None, help="RAM budget for all shards together"),
    version: Optional[str] = typer.Option(None, help="version name (default: from the time)"),
    publish: bool = typer.Option(True, help="flip CURRENT to the new version when written"),
    dba: Optional[int] = typer.Option(None, help="database-side augmentation: re-weight each vector with N "
                                                 "neighbours, 0: off [default: IMSEARCH_DBA, 0]"),
    filterable: Optional[str] = typer.Option(None, help="metadata fields to filter on, e.g. category,in_stock,price; "
                                                        "'*' every scalar column, '' none [default: "
                                                        "IMSEARCH_FILTERABLE, *]"),
    engine: str = typer.Option("auto", help="auto | local | ray: shards built in parallel Ray tasks (auto: Ray "
                                            "from IMSEARCH_INDEX_RAY_MIN_VECTORS, or with a Ray address); a "
                                            "killed Ray build, run again, resumes"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster address: the auto engine is then Ray"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Build a sharded index from embeddings (and publish it)."""
    from services.common.store import open_store
    from services.index.versions import staging_target
    from services.indexer.build import build_index

    settings = _settings(memory_budget_gb=memory_budget_gb, ray_address=ray_address)
    staged = staging_target(out_, lambda url: open_store(url, settings)) if version is None else None
    if staged:
        out_, version, publish = staged[0], staged[1], False
    manifest = build_index(embeddings, out_, shards, index_factory, nprobe, settings, _step(as_json),
                           version=version, publish_it=publish, dba=dba, pca_dim=pca, whiten=whiten,
                           filterable=filterable, engine=engine)
    _report_build(manifest, publish, as_json)


def _report_build(manifest, published: bool, as_json: bool = False) -> None:
    if as_json:
        print(manifest.model_dump_json(indent=1))
        return
    state = "published" if published else "staged (publish with `imsearch index publish`)"
    out.print(f"indexed {manifest.count} vectors into {len(manifest.shards)} shard(s): {manifest.factory}, "
              f"nprobe {manifest.nprobe}, version {manifest.version} {state}", highlight=False)


@index_app.command("publish")
@cli_errors
def index_publish(root: str = typer.Argument(..., help="index root"),
                  version: str = typer.Argument(..., help="a written version (see `imsearch index versions`)")) -> None:
    """Point the index at a version (its files verified first; atomic; serving shard servers follow)."""
    from services.common.store import open_store
    from services.index.versions import publish

    settings = _settings()
    pointer = publish(open_store(root, settings), version, settings.file_cache(), _step(False))
    out.print(f"published {pointer.version} (previous: {(pointer.history or ['none'])[0]})", highlight=False)


@index_app.command("rollback")
@cli_errors
def index_rollback(root: str = typer.Argument(..., help="index root")) -> None:
    """Go back to the version published before the current one (its files verified first)."""
    from services.common.store import open_store
    from services.index.versions import rollback

    settings = _settings()
    pointer = rollback(open_store(root, settings), settings.file_cache(), _step(False))
    out.print(f"rolled back: {pointer.version} is published", highlight=False)


@index_app.command("versions")
@cli_errors
def index_versions(root: str = typer.Argument(..., help="index root")) -> None:
    """List the versions under the root, oldest first: when written, size, and which is published (*),
    which rollback can return to, which are staged."""
    from services.common.store import open_store
    from services.index.versions import describe_versions

    rows = describe_versions(open_store(root, _settings()))
    if not rows:
        out.print("no versions", highlight=False)
    for r in rows:
        count = f"{r['count']:>10,} vectors" if r["count"] is not None else " " * 18
        shards = f"{r['shards']} shard(s)" if r["shards"] is not None else ""
        out.print(f"{'*' if r['state'] == 'published' else ' '} {r['version']:<28} {r['created_at']:<24} {count}  "
                  f"{shards:<10} {r['factory']:<24} {r['state']}", highlight=False)


@index_app.command("add")
@cli_errors
def index_add(root: str = typer.Argument(..., help="index root"),
              embeddings: str = typer.Argument(..., help="embeddings to append (same model)"),
              engine: str = typer.Option("auto", help="auto | local | ray: each shard grown in a Ray task that "
                                                      "streams its rows (auto: Ray from "
                                                      "IMSEARCH_INDEX_RAY_MIN_VECTORS, or with a Ray address)"),
              ray_address: Optional[str] = typer.Option(None, help="Ray cluster address: the auto engine is then "
                                                                   "Ray")) -> None:
    """Append embeddings to the published index (same trained quantizer), as a new published version."""
    from services.indexer.update import add_to_index

    manifest, added, known = add_to_index(root, embeddings, _settings(ray_address=ray_address), _step(False),
                                          engine=engine)
    out.print(f"added {added} vectors ({known} already indexed): {manifest.count} in version {manifest.version}",
              highlight=False)


@index_app.command("delete")
@cli_errors
def index_delete(root: str = typer.Argument(..., help="index root"),
                 ids: Path = typer.Option(..., help="file of catalogue ids, one per line")) -> None:
    """Remove ids from the published index, as a new published version."""
    from services.common.errors import InvalidInput
    from services.indexer.update import delete_from_index

    try:
        wanted = [int(line) for line in ids.read_text().split() if line.strip()]
    except (OSError, ValueError) as e:
        raise InvalidInput(f"--ids {ids}: expected one integer id per line ({e})") from None
    manifest, removed, unknown = delete_from_index(root, wanted, _settings(), _step(False))
    more = " …" if len(unknown) > 5 else ""
    note = f"; not in the index: {', '.join(map(str, unknown[:5]))}{more}" if unknown else ""
    out.print(f"removed {removed} vectors: {manifest.count} in version {manifest.version}{note}", highlight=False)


@index_app.command("gc")
@cli_errors
def index_gc(root: str = typer.Argument(..., help="index root"),
             keep: int = typer.Option(2, min=0, help="earlier versions to keep for rollback"),
             grace: Optional[float] = typer.Option(None, min=0, help="seconds: younger versions are kept "
                                                                     "(default IMSEARCH_GC_GRACE_S, 3600)")) -> None:
    """Delete old versions and killed builds' leftovers (never the published one, the KEEP before it, or
    anything younger than --grace)."""
    from services.common.store import open_store
    from services.index.versions import gc

    settings = _settings()
    removed = gc(open_store(root, settings), keep, settings.gc_grace_s if grace is None else grace,
                 settings.write_retries, _step(False))
    out.print(f"removed {len(removed)} version(s){': ' + ', '.join(removed) if removed else ''}", highlight=False)


@app.command()
@cli_errors
def search(
    index_: str = typer.Argument(..., metavar="INDEX", help="index root (folder or s3://)"),
    query: str = typer.Argument(..., help="query image: a file path or s3:// uri"),
    k: int = typer.Option(10, "-k", help="number of results"),
    nprobe: Optional[int] = typer.Option(None, help="lists probed per shard (default: the index's tuned value)"),
    feedback: list[str] = typer.Option([], help="Rocchio re-query: +ID relevant, -ID not relevant "
                                                "(e.g. --feedback +12 +40 -7)"),
    qe: Optional[int] = typer.Option(None, help="query expansion (αQE): search again with the query re-weighted "
                                             "by its top QE hits; 0 never; default: IMSEARCH_QE_NEIGHBOURS, only "
                                             "when the best hit scores below the index's gate τ"),
    where: Optional[str] = typer.Option(None, help="only rows matching this filter, e.g. 'in_stock and category "
                                                   "in (\"shoes\", \"bags\") and price < 120' (or a JSON filter)"),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
) -> None:
    """Search an index with a query image, in-process (no servers needed)."""
    _search(index_, query, _settings(), k, nprobe, feedback, as_json, qe, where)


def _search(index_: str, query: str, settings, k: int = 10, nprobe: int | None = None, feedback: list[str] = (),
            as_json: bool = False, qe: int | None = None, where: str | None = None) -> None:
    from services.searcher.feedback import parse_marks
    from services.searcher.local import search_uri

    relevant, not_relevant = parse_marks(feedback)
    version, hits, expanded = search_uri(index_, query, k, nprobe, relevant, not_relevant, settings,
                                         _step(as_json), qe, where)
    if as_json:
        print(json.dumps({"query": query, "index_version": version, "k": k, "where": where, "expanded": expanded,
                          "results": [h.as_dict() for h in hits]}))
        return
    title = (f"top {len(hits)} for {query}" + (f" where {where}" if where else "")
             + (" (query expanded)" if expanded else ""))
    table = Table(title=f"{title}  (index {version})")
    for col in ("rank", "score", "id", "shard", "uri"):
        table.add_column(col)
    for rank, h in enumerate(hits, 1):
        table.add_row(str(rank), f"{h.score:.4f}", str(h.id), str(h.shard), h.uri)
    out.print(table)


@app.command()
@cli_errors
def info(
    index_: str = typer.Argument(..., metavar="INDEX", help="index root (folder or s3://)"),
    verify: bool = typer.Option(False, help="re-hash every shard file against the manifest"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest as JSON"),
) -> None:
    """Describe a published index: model, dims, N, shards, parameters, checksums."""
    from services.common.store import open_store
    from services.index.versions import load_current

    settings = _settings()
    store = open_store(index_, settings)
    m = load_current(store)
    if verify:
        from services.index.versions import verify_version

        _step(as_json)(f"verifying every file of {m.version}")
        verify_version(store, m, settings.file_cache())
    if as_json:
        print(m.model_dump_json(indent=1))
        return
    lines = [
        f"index     {store.url}", f"version   {m.version}  (created {m.created_at})",
        f"model     {m.model['name']}  arch={m.model['arch']}  fingerprint={m.model['fingerprint']}",
        f"vectors   {m.count}  dim={m.dim}  metric={m.metric}  duplicates dropped={m.duplicates_dropped}",
        f"index     {m.factory}  ({m.params.get('kind')})  nprobe={m.nprobe}  k_factor={m.k_factor}",
        f"tuning    recall@10={m.tuning.get('recall_at_10')} on {m.tuning.get('queries')} queries vs exact",
        "vectors   " + (f"centred PCA {m.model_dim} -> {m.dim} (whitening power {m.params.get('whiten_power', 0):g})"
                        if m.projection else "as the model gives them") + f", DBA {m.params.get('dba', 0) or 'off'}",
        "filters   " + (", ".join(f"{k} ({v})" for k, v in m.fields.items()) or "none (no filterable fields)"),
    ]
    for s in m.shards:
        lines.append(f"shard {s.shard:<3} {s.count:>10} vectors  {s.bytes / 2**20:8.1f} MiB  sha256 {s.sha256[:16]}…")
    if verify:
        lines.append("checksums verified")
    out.print("\n".join(lines), highlight=False)


@app.command()
@cli_errors
def serve(
    index_: Optional[str] = typer.Argument(None, metavar="[INDEX]", help="index root (folder or s3://)"),
    collection: list[str] = typer.Option([], help="NAME=INDEX: serve several indexes as named collections "
                                                  "(repeat; the first is the default)"),
    port: int = typer.Option(50050, help="router port"),
    host: str = typer.Option("127.0.0.1", help="address to bind (0.0.0.0 for all interfaces)"),
    shard_ports: int = typer.Option(0, help="first shard server port (0: free ports)"),
    http_port: Optional[int] = typer.Option(None, help="web page + HTTP API port (default IMSEARCH_GATEWAY_PORT, "
                                                       "0: a free port)"),
    http: bool = typer.Option(True, help="also start the HTTP gateway and web page"),
    cache: Optional[bool] = typer.Option(None, "--cache/--no-cache", help="a Redis query cache (default: when "
                                                                          "redis-server is installed)"),
    shard_servers: bool = typer.Option(False, "--shard-servers/--in-process",
                                       help="a shard server process per shard, instead of the router searching "
                                            "every shard itself (one host: the default, faster)"),
) -> None:
    """Serve an index (or several, as named collections) on one machine: the router (searching every shard
    in its own process, or over a shard server process per shard with --shard-servers), the web page (and a
    Redis query cache when redis-server is installed)."""
    _serve(index_, _settings(), port, host, shard_ports, http_port, http, cache, _collections(index_, collection),
           in_process=not shard_servers)


def _collections(index_: str | None, given: list[str]) -> dict[str, str]:
    """--collection NAME=INDEX options -> {name: index}; an INDEX as well is refused (one or the other)."""
    from services.common.errors import InvalidInput
    from services.searcher.collections import check_name

    if bool(index_) == bool(given):
        raise InvalidInput("give an INDEX to serve, or --collection NAME=INDEX (repeated) for several")
    out: dict[str, str] = {}
    for item in given:
        name, sep, root = item.partition("=")
        if not sep or not root:
            raise InvalidInput(f"--collection {item!r}: expected NAME=INDEX")
        if check_name(name) in out:
            raise InvalidInput(f"--collection {name} is given twice")
        out[name] = root
    return out


def _serve(index_: str | None, settings, port: int = 50050, host: str = "127.0.0.1", shard_ports: int = 0,
           http_port: int | None = None, http: bool = True, cache: bool | None = None,
           collections: dict[str, str] | None = None, in_process: bool = True) -> None:
    """The stack attached to this command until Ctrl-C / SIGTERM (logs under IMSEARCH_HOME/serve/logs).
    cache: a Redis query cache (None: when redis-server is installed); in_process: the router searches every
    shard itself (else a shard server per shard)."""
    from services.common.store import open_store
    from services.index.versions import load_current
    from services.stack.part import binary, free_port
    from services.stack.stack import Stack, StackSpec, stop_signals, wait_for_signal

    collections = collections or {}
    index_ = index_ or next(iter(collections.values()))
    # every index served loads before anything starts
    manifests = {root: load_current(open_store(root, settings)) for root in collections.values() or [index_]}
    manifest = manifests[index_]
    gateway_port = settings.gateway_port if http_port is None else (http_port or free_port())
    cache = binary("redis-server") is not None if cache is None else cache
    spec = StackSpec(index_, host=host, router_port=port, shard_port=shard_ports, gateway=http,
                     gateway_port=gateway_port, redis=cache, collections=collections, in_process=in_process)
    logs = settings.home / "serve"
    with stop_signals(), Stack(spec, logs, step=_step(False)).up() as stack:
        where = (f"{len(stack.shards)} shard server(s) up: {', '.join(g[0].address for g in stack.shards)}"
                 if stack.shards else "the router searches every shard in its own process (--shard-servers: "
                                      "a process per shard)")
        err.print(f"• {where}; logs in {logs / 'logs'}", highlight=False)
        err.print(f"• query cache: Redis on {stack.redis.address}" if stack.redis else
                  "• no query cache (redis-server is not installed, or --no-cache): a repeated query is searched "
                  "again and answers cached: false", highlight=False)
        served = (f"collections {', '.join(collections)} (followed in {stack.collections_file})" if collections
                  else f"index {manifest.version} ({manifest.count} images)")
        out.print(f"router serving {served} on {host}:{stack.router.port}", highlight=False)
        if http:
            out.print(f"open http://{host}:{gateway_port}/ (API docs: /docs)", highlight=False)
        out.print("Ctrl-C to stop", highlight=False)
        wait_for_signal(stack, _step(False))


@app.command("eval")
@cli_errors
def eval_(
    index_: Optional[str] = typer.Argument(None, metavar="[INDEX]", help="index root; default: embed --data and "
                                                                         "build one under OUT/work"),
    protocol: str = typer.Option("classes", help="classes | unseen-classes | copydetect | labelled"),
    data: Optional[str] = typer.Option(None, help="folder of class subfolders (classes) or of catalogue images"),
    queries: Optional[str] = typer.Option(None, help="labelled: parquet/csv with columns query, uri"),
    ground_truth: Optional[str] = typer.Option(None, help="labelled: JSON query -> relevant uris "
                                                          "(or easy/hard/junk lists)"),
    distractors: Optional[str] = typer.Option(None, help="copydetect with INDEX: images with no copy in it"),
    out_: Path = typer.Option(Path("eval-report"), "--out", "-o", help="report directory"),
    index_factory: Optional[str] = typer.Option(None, help="faiss factory of the index built from --data"),
    shards: int = typer.Option(1, help="shards of the index built from --data"),
    pca: Optional[int] = typer.Option(None, help="centred PCA dimensions of the index built from --data (0: off) "
                                                 "[default: IMSEARCH_PCA_DIM]"),
    whiten: Optional[float] = typer.Option(None, help="its whitening power 0..1 [default: IMSEARCH_WHITEN_POWER]"),
    model: Optional[str] = typer.Option(None, help="model of the index built from --data (name or checkpoint)"),
    depth: Optional[int] = typer.Option(None, help="results ranked per query (default: the whole index)"),
    seed: int = typer.Option(0, help="seed of the copy transforms"),
    predictions: int = typer.Option(1, help="copydetect: results per query pooled into uAP (1..10)"),
    score_norm: str = typer.Option("none", help="copydetect: none | margin (minus the query's 10th score)"),
    qe: Optional[int] = typer.Option(None, help="query-side αQE with N neighbours for every query; 0: off; "
                                             "default: gated, as a search is (IMSEARCH_QE_NEIGHBOURS below τ)"),
    dba: Optional[int] = typer.Option(None, help="database-side augmentation (N neighbours) of the index built "
                                                 "from --data, 0: off [default: IMSEARCH_DBA]"),
    plots: bool = typer.Option(False, "--plots", help="classes: also draw t-SNE and UMAP maps of the vectors "
                                                       "(minutes on thousands of images)"),
    as_json: bool = typer.Option(False, "--json", help="print the metrics as one JSON object"),
) -> None:
    """Measure retrieval quality (mAP, P@k, ANMRR, uAP ...) on a real index; writes a report directory."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from services.eval.run import EvalOptions, run_eval

    opts = EvalOptions(protocol=protocol, index=index_, data=data, out=out_, queries=queries,
                       ground_truth=ground_truth, distractors=distractors, factory=index_factory, shards=shards,
                       pca=pca, whiten=whiten, depth=depth, seed=seed, model=model, predictions=predictions,
                       score_norm=score_norm, qe=qe, dba=dba, plots=plots)
    with Progress(TextColumn("embedding queries"), BarColumn(), MofNCompleteColumn(), console=err,
                  disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task("eval", total=None)
        metrics = run_eval(opts, _settings(), _step(as_json), lambda n: bar.advance(task, n))
    if as_json:
        print(json.dumps(metrics))
        return
    table = Table(title=f"{protocol}: report in {out_}")
    table.add_column("metric")
    table.add_column("value")
    for key, value in metrics.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


@app.command()
@cli_errors
def train(
    base: Optional[str] = typer.Argument(None, help="model to fine-tune (registry name, with @options if any); "
                                                    "default: IMSEARCH_MODEL"),
    data: str = typer.Option(..., help="folder of class subfolders to train on"),
    out_: Path = typer.Option(..., "--out", "-o", help="checkpoint to write (.pt)"),
    loss: str = typer.Option("multisimilarity", help="triplet | contrastive | multisimilarity | proxyanchor"),
    miner: str = typer.Option("none", help="hard | semihard | pair | none"),
    epochs: int = typer.Option(10),
    batch_size: int = typer.Option(32),
    per_class: int = typer.Option(4, help="images of one class per batch"),
    lr: float = typer.Option(1e-4, help="learning rate of the backbone (GeM p: 10x)"),
    train_stages: int = typer.Option(2, help="last backbone stages that learn (the rest stays frozen)"),
    seed: int = typer.Option(0),
    as_json: bool = typer.Option(False, "--json", help="print the training record as JSON"),
) -> None:
    """Fine-tune a model with a metric-learning loss; writes model.pt, model.json and model.loss.png."""
    from dataclasses import asdict

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from services.embedder.train import TrainConfig
    from services.embedder.train import train as run_training

    settings = _settings()
    cfg = TrainConfig(base=base or settings.model, loss=loss, miner=miner, epochs=epochs, batch_size=batch_size,
                      per_class=per_class, lr=lr, train_stages=train_stages, seed=seed, device=settings.device)
    columns = (TextColumn(f"training ({loss})"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn())
    with Progress(*columns, console=err, disable=as_json or not err.is_terminal) as bar:
        task = bar.add_task("train", total=None, loss="-")
        record = run_training(data, out_, cfg, lambda done, total, value: bar.update(
            task, completed=done, total=total, loss=f"{value:.4f}"))
    if as_json:
        print(json.dumps(asdict(record)))
        return
    out.print(f"trained {len(record.losses)} epochs on {record.images} images of {len(record.classes)} classes "
              f"in {record.seconds:.0f} s; loss {record.losses[0]:.4f} -> {record.losses[-1]:.4f}, "
              f"GeM p {record.gem_p[-1]:.3f}; wrote {out_} (use it: --model {out_})", highlight=False)


@app.command()
@cli_errors
def loadtest(
    router_: str = typer.Option(..., "--router", help="router address host:port"),
    index_: str = typer.Option(..., "--index", help="index root (the popular queries are catalogue ids)"),
    images: Optional[str] = typer.Option(None, help="folder of images for the 'new' queries"),
    seconds: float = typer.Option(30.0, help="how long to drive load"),
    concurrency: int = typer.Option(8, help="clients (closed loop) / in-flight bound (open loop)"),
    rate: float = typer.Option(0.0, help="calls per second (open loop); 0: closed loop, as fast as possible"),
    mix: str = typer.Option("new=0.1,popular=0.8,batch=0.1", help="weights of the call kinds"),
    zipf: float = typer.Option(1.1, help="Zipf exponent of the popular queries"),
    popular: int = typer.Option(1000, help="size of the popular-query pool"),
    batch: int = typer.Option(16, help="queries per batch call"),
    at_fraction: Optional[float] = typer.Option(None, help="find the peak (closed loop) first, then run open "
                                                           "loop at this fraction of it (e.g. 0.7)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Drive the router with a mix of new images, Zipf-popular repeats and batch calls; print the figures."""
    import asyncio

    from services.searcher.loadtest import Workload, load_images, parse_mix, popular_pool, run_load

    settings = _settings()
    weights = parse_mix(mix)
    pool = popular_pool(index_, popular, settings)
    new = load_images(images) if weights.get("new") else []

    def once(r: float) -> dict:
        _step(as_json)(f"driving {router_} for {seconds:g} s, " + (f"{r:.0f} calls/s" if r else
                                                                   f"{concurrency} clients as fast as they go"))
        work = Workload(new, pool, zipf, batch)
        return asyncio.run(run_load(router_, work, weights, seconds, concurrency, r, settings.token(),
                                    tls_ca=settings.tls_ca)).summary()

    runs = {"load": once(rate)}
    if at_fraction:
        runs = {"peak": runs["load"]}
        runs[f"at_{at_fraction:g}_of_peak"] = once(runs["peak"]["qps"] * at_fraction)
    if as_json:
        print(json.dumps(runs))
        return
    for name, r in runs.items():
        out.print(f"{name}: {r['qps']} calls/s over {r['seconds']} s, p50 {r['p50_ms']} ms, p95 {r['p95_ms']} ms, "
                  f"p99 {r['p99_ms']} ms, error rate {r['error_rate']}, cache hit rate {r['cache_hit_rate']}, "
                  f"partial {r['partial_answers']}, statuses {r['statuses']}", highlight=False)


@app.command()
def health(
    address: str = typer.Argument(..., help="host:port of a gRPC service, or http://host:port/readyz"),
    timeout: float = typer.Option(2.0),
) -> None:
    """Exit 0 when the service is SERVING (gRPC health) or the URL answers 200: container health checks."""
    from services.stack.part import healthy

    raise typer.Exit(0 if healthy(address, _settings().tls_ca, timeout) else 1)


cluster_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None,
                          help="The whole system on this machine as real processes.")
app.add_typer(cluster_app, name="cluster")
CLUSTER_DIR = Path(".imsearch/cluster")


@cluster_app.command("up")
@cli_errors
def cluster_up(
    index_: str = typer.Argument(..., metavar="INDEX", help="index root (folder or s3://) to serve"),
    workdir: Path = typer.Option(CLUSTER_DIR, help="state, logs and data of the cluster"),
    replicas: int = typer.Option(2, help="shard server replicas per shard"),
    s3: str = typer.Option("auto", help="S3 server: auto | minio | moto | none"),
    ray: bool = typer.Option(True, help="start a Ray head for `imsearch embed --ray-address`"),
    http_port: int = typer.Option(0, help="gateway port (0: a free port)"),
    secure: bool = typer.Option(False, help="TLS on every gRPC hop (self-signed) and a bearer token, as files"),
) -> None:
    """Start Redis, an S3 server, a Ray head, the embedder, shard servers x replicas, the router and the
    gateway (each its own process, detached), wait until all are healthy, print where they are."""
    from services.stack import cluster

    if not 1 <= replicas <= 8:
        raise typer.BadParameter("--replicas must be between 1 and 8")
    procs = cluster.up(index_, workdir, replicas, s3, ray, http_port, _step(False), secure)
    _cluster_table(workdir, [(p, True, "healthy") for p in procs])
    by_name = {p.name: p for p in procs}
    out.print(f"open http://{by_name['gateway'].address}/  ·  router {by_name['router'].address}", highlight=False)
    if "s3" in by_name:
        out.print(f"S3: IMSEARCH_S3_ENDPOINT={by_name['s3'].address}", highlight=False)
    if "ray-head" in by_name:
        out.print(f"Ray: imsearch embed ... --ray-address {by_name['ray-head'].address}", highlight=False)
    if secure:
        out.print(f"gRPC clients: IMSEARCH_TLS_CA={workdir}/tls/tls.crt IMSEARCH_SECRETS_DIR={workdir}/secrets",
                  highlight=False)
    out.print(f"stop with: imsearch cluster down --workdir {workdir}", highlight=False)


@cluster_app.command("status")
@cli_errors
def cluster_status(workdir: Path = typer.Option(CLUSTER_DIR)) -> None:
    """Health of every part; exit 1 if any is down."""
    from services.stack import cluster

    rows = cluster.status(workdir)
    _cluster_table(workdir, rows)
    if not all(ok for _, ok, _ in rows):
        raise typer.Exit(1)


@cluster_app.command("down")
@cli_errors
def cluster_down(workdir: Path = typer.Option(CLUSTER_DIR)) -> None:
    """Stop every part (SIGTERM, then SIGKILL after a grace period)."""
    from services.stack import cluster

    n = cluster.down(workdir, _step(False))
    out.print(f"stopped {n} process(es)", highlight=False)


def _cluster_table(workdir: Path, rows) -> None:
    table = Table(title=f"cluster in {workdir}")
    for col in ("part", "address", "pid", "state", "log"):
        table.add_column(col)
    for p, ok, detail in rows:
        table.add_row(p.name, p.address, str(p.pid), detail if ok else f"[red]{detail}[/red]", str(p.log))
    out.print(table)


@app.command()
@cli_errors
def datasets(
    name: str = typer.Argument(..., help="tuxpaint (Debian tuxpaint-stamps-default photos) | skimage | a folder "
                                         "of class subfolders (e.g. to --split it)"),
    out_: Path = typer.Argument(..., metavar="OUT", help="folder to write <class>/<image>.jpg into"),
    min_per_class: int = typer.Option(8, help="tuxpaint: keep classes with at least this many images"),
    split: bool = typer.Option(False, help="classes alternately into OUT/train and OUT/test (unseen-classes)"),
) -> None:
    """Write a real labelled image set as a folder of class subfolders (input of `eval --protocol classes`)."""
    from services.common.folders import class_folder
    from services.eval.datasets import skimage_photos, split_classes, tuxpaint_stamps, write_class_folder

    if name == "tuxpaint":
        items = tuxpaint_stamps(min_per_class=min_per_class)
    elif name == "skimage":
        items = skimage_photos()
    elif Path(name).is_dir():
        items = class_folder(name)
    else:
        raise InvalidInput(f"unknown data set {name!r}: tuxpaint, skimage or a folder of class subfolders")
    parts = dict(zip(("train", "test"), split_classes(items))) if split else {"": items}
    for part, chosen in parts.items():
        n = write_class_folder(chosen, out_ / part)
        out.print(f"wrote {n} images in {len({it.label for it in chosen})} classes to {out_ / part}",
                  highlight=False)


@app.command()
@cli_errors
def demo(
    workdir: Path = typer.Option(Path(".imsearch/demo"), help="where the sample catalogue and index go"),
    k: int = typer.Option(5, "-k"),
    serve_page: bool = typer.Option(True, "--serve/--no-serve", help="then serve the index and its web page"),
) -> None:
    """Index a sample catalogue (scikit-image photos + variants), answer a query, serve the web page."""
    from services.eval.datasets import write_demo_catalogue
    from services.indexer.build import build_index

    files, query = write_demo_catalogue(workdir)
    err.print(f"• sample catalogue: {len(files)} images in {workdir / 'catalogue'}", highlight=False)
    settings = _settings()
    _embed(str(workdir / "catalogue"), str(workdir / "emb"), settings, engine="local")
    _report_build(build_index(str(workdir / "emb"), str(workdir / "idx"), shards=2, settings=settings,
                              step=_step(False)), published=True)
    _search(str(workdir / "idx"), str(query), settings, k)
    if serve_page:
        _serve(str(workdir / "idx"), settings, port=0)


def _shutdown() -> None:
    import logging

    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()


def join_feedback(argv: list[str]) -> list[str]:
    """`--feedback +12 +40 -7` (the documented form) -> one value "+12 +40 -7": click would take the
    tokens after the first for arguments, and -7 for an option."""
    out, i = [], 0
    while i < len(argv):
        out.append(argv[i])
        if argv[i] == "--feedback":
            marks = []
            while i + 1 < len(argv) and argv[i + 1][:1] in "+-" and argv[i + 1][1:].isdigit():
                marks.append(argv[i + 1])
                i += 1
            if marks:  # else the value follows as usual (e.g. quoted: --feedback "+12 -7")
                out.append(" ".join(marks))
        i += 1
    return out


def main() -> None:
    code = 0
    try:
        app(args=join_feedback(sys.argv[1:]))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if isinstance(e.code, str):
            err.print(e.code)
    except Exception:  # a bug, not a user error: keep the whole traceback
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        _shutdown()
    # Skip C++ static destructors: pyarrow's and faiss's thread pools abort ("terminate called
    # without an active exception") in about 1 of 40 exits here. Everything is written and fsynced.
    os._exit(code)


if __name__ == "__main__":
    main()
