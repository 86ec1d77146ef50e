"""Where the embedding stages run: in this process, or as Ray Data `map_batches` stages on a cluster.

Both yield the embedded batches in catalogue order. The choice (choose_engine) is the cluster's: a Ray address
or several GPUs mean Ray; on one machine, Ray for catalogues big enough to repay its start-up. Ray takes seconds
to start (the instance, then the model actors) and then outruns the in-process engine, because each actor is a
whole single-threaded pipeline (decode, then forward) and the actors overlap one another's decoding, where the
in-process engine leaves a core idle while it decodes between multi-threaded forwards: over a run of about a
thousand images the two are even (README Performance, `python -m benchmarks.bench_embed --engines local,ray`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from services.common.config import Settings
from services.common.errors import InvalidInput
from services.common.rayinit import start_ray
from services.embedder.spec import resolve_spec
from services.embedder.stages import Batch, DecodeEmbedStage, EmbedStage, decode_batch, fetch_batch

PREFETCH = 2  # batches whose bytes are fetched ahead of the model (in-process engine)
ENGINES = ("auto", "local", "ray")


@dataclass(frozen=True)
class Engine:
    name: str  # local | ray
    why: str  # said in the run's first line


def choose_engine(n: int, settings: Settings, engine: str = "auto", gpus: int | None = None) -> Engine:
    """n: images to embed; gpus: CUDA devices on this machine (None: ask torch)."""
    if engine not in ENGINES:
        raise InvalidInput(f"engine must be auto, local or ray, not {engine!r}")
    if engine != "auto":
        return Engine(engine, "as asked (--engine)")
    if settings.ray_address:
        return Engine("ray", f"the Ray cluster at {settings.ray_address}")
    if gpus is None:
        gpus = local_gpus(settings)
    if gpus > 1:
        return Engine("ray", f"{gpus} GPUs on this machine: one model actor each")
    if n >= settings.ray_min_images:
        return Engine("ray", f"one machine, {n} images >= IMSEARCH_RAY_MIN_IMAGES ({settings.ray_min_images}): "
                             "parallel model actors repay Ray's start-up")
    return Engine("local", f"one machine, {n} images < IMSEARCH_RAY_MIN_IMAGES ({settings.ray_min_images}): "
                           "Ray's start-up would cost more than it saves")


def local_gpus(settings: Settings) -> int:
    """CUDA devices here; none where torch is not installed (the torch-free install embeds on the CPU)."""
    if settings.device == "cpu":
        return 0
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count()


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def run_local(uris: list[str], model: str, weights: str | None, settings: Settings,
              before_model: Callable[[Batch], None] | None = None) -> Iterator[Batch]:
    size = resolve_spec(model, weights).image_size
    stage = EmbedStage(model, weights, settings)
    # Threads fetch the next batches' bytes (I/O: S3 latency hides behind the model). Under an inference runtime
    # they decode them too, beside the model (both release the GIL): the pipeline kept up with the faster forward
    # only so (README Performance, bench_embed's pipeline rows). Under torch decoding stays here, between
    # forwards: decoding beside torch's own threads measured slower (every intra-op barrier waits for the core a
    # decode thread took).
    beside = stage.embedder.runtime != "torch"

    def prepare(batch: Batch) -> Batch:
        fetched = fetch_batch(batch, settings)
        return decode_batch(fetched, size, settings, defer_jpeg=stage.on_gpu) if beside else fetched

    with ThreadPoolExecutor(max_workers=PREFETCH) as pool:  # one thread per batch in flight
        batches = [{"uri": np.array(c, dtype=object)} for c in _chunks(uris, settings.batch_size)]
        futures = [pool.submit(prepare, b) for b in batches[:PREFETCH]]
        for i in range(len(batches)):
            batch = futures[i].result()
            if i + PREFETCH < len(batches):
                futures.append(pool.submit(prepare, batches[i + PREFETCH]))
            futures[i] = None  # free the bytes
            if not beside:
                batch = decode_batch(batch, size, settings, defer_jpeg=stage.on_gpu)
            if before_model:
                before_model(batch)
            yield stage(batch)


def model_actors(settings: Settings, gpus: bool) -> int:
    """IMSEARCH_RAY_ACTORS, or: on GPUs one actor per GPU, decoding in CPU tasks before it (the Ray docs'
    shape); on CPUs one single-threaded actor per CPU of the cluster, each decoding its own batches."""
    import ray

    return settings.ray_actors or max(1, int(ray.cluster_resources().get("GPU" if gpus else "CPU", 1)))


def run_ray(uris: list[str], model: str, weights: str | None, settings: Settings,
            before_model: Callable[[Batch], None] | None = None) -> Iterator[Batch]:
    """before_model is not called: the stages run in other processes. Duplicates are still dropped
    when written (PartWriter.add), after the actors embedded them. Each batch carries a `node` column (the
    Ray node that embedded it)."""
    import ray

    start_ray(settings)
    size = resolve_spec(model, weights).image_size
    if on_gpus(settings, ray.cluster_resources().get("GPU", 0)):
        yield from _ray_data_gpu(uris, model, weights, settings, size)
    else:
        yield from _ray_actors_cpu(uris, model, weights, settings, size)


def on_gpus(settings: Settings, cluster_gpus: float) -> bool:
    """The cluster's GPUs decide, not the driver's device: on KubeRay the driver runs on a CPU-only head."""
    if settings.device == "cuda" and not cluster_gpus:
        raise InvalidInput("IMSEARCH_DEVICE=cuda but the Ray cluster has no GPU")
    return settings.device != "cpu" and cluster_gpus > 0


class _PipelineActor(DecodeEmbedStage):
    """A Ray actor that is a whole single-threaded pipeline (fetch, decode, model) on one CPU."""

    def run(self, batch: Batch) -> Batch:
        import ray

        out = self(batch)
        out["node"] = np.full(len(out["uri"]), ray.get_runtime_context().get_node_id(), dtype=object)
        return out


def _ray_actors_cpu(uris: list[str], model: str, weights: str | None, settings: Settings,
                    size: int) -> Iterator[Batch]:
    """Batches of uris to an ActorPool, results in submission order, 2 batches in flight per actor.

    Ray core actors rather than Ray Data's map_batches here: with every CPU held by a model actor there is
    nothing for Ray Data's separate tasks to run on, and its actor pool prints an error line on every run
    (constructor arguments in the object store with restarts on: ray-project/ray#57733) unless given
    `max_restarts=0` through its deprecated **ray_remote_args. A core actor has no restarts (Ray's default):
    a lost actor fails the run, and the rerun resumes from the finished parts. SPREAD puts the actors on
    every node of a cluster."""
    import ray
    from ray.util import ActorPool

    actor = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")(_PipelineActor)
    n = model_actors(settings, gpus=False)
    pool = ActorPool([actor.remote(model, weights, 1, size, settings) for _ in range(n)])
    batches = [{"uri": np.array(c, dtype=object)} for c in _chunks(uris, settings.batch_size)]
    ahead = 2 * n
    for b in batches[:ahead]:
        pool.submit(lambda a, v: a.run.remote(v), b)
    for i in range(len(batches)):
        yield pool.get_next(timeout=None)  # in submission order: catalogue order
        if i + ahead < len(batches):
            pool.submit(lambda a, v: a.run.remote(v), batches[i + ahead])


def _ray_data_gpu(uris: list[str], model: str, weights: str | None, settings: Settings,
                  size: int) -> Iterator[Batch]:
    """The Ray docs' shape: decode in CPU tasks (JPEGs left for the GPU's decoder), one model actor per GPU."""
    import ray

    ds = ray.data.from_items([{"uri": u} for u in uris])
    ds = ds.map_batches(decode_batch, batch_size=settings.batch_size, batch_format="numpy",
                        fn_kwargs={"size": size, "settings": settings, "defer_jpeg": True}, num_cpus=1)
    ds = ds.map_batches(EmbedStage, batch_size=settings.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"model": model, "weights": weights, "settings": settings},
                        compute=ray.data.ActorPoolStrategy(size=model_actors(settings, gpus=True)),
                        num_gpus=1, num_cpus=0)
    for batch in ds.iter_batches(batch_size=settings.batch_size, batch_format="numpy"):
        batch["node"] = np.full(len(batch["uri"]), "", dtype=object)
        yield batch
