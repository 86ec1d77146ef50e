"""Which runtime computes the descriptors, and the model exported for it.

The model's forward pass is what users wait for (every catalogue image at ingestion, every query image), and
PyTorch's eager mode leaves most of a CPU unused. On a CPU the embedder runs the model through an inference
runtime, OpenVINO or ONNX Runtime, whichever is faster on that machine: the whole of Embedder.forward — uint8
pixels in, normalisation, backbone, GeM or class token, multi-scale where it exports, L2 — exported once per
weights fingerprint and input size, the same descriptors to within float rounding (the export is checked against
torch with each runtime before it is used, and a test checks it on real photos), several times faster (README
Performance, bench_embed's runtime rows). On a GPU torch keeps the model (cuDNN, the device's own JPEG decoding
feeding it).

Both runtimes read the one exported ONNX graph. Which is faster depends on the CPU and the model (README
Performance, the runtime rows), so neither is preferred by name: where both are installed, the first load of a
model on a machine times each on a few batches and records the result under the model cache (runtimes.json); every
later process of that machine reads the choice from there, and the run's first line says it with its figures.
OpenVINO is held to fp32 (INFERENCE_PRECISION_HINT: on a CPU with bf16 it would otherwise compute in bf16: other
descriptors).

IMSEARCH_RUNTIME: auto (the faster installed runtime on the CPU when the model exports, else torch, saying why) |
openvino | onnxruntime (refuse rather than fall back) | torch. The exported graph lives under IMSEARCH_HOME/models,
written atomically beside a record of its checksum, verified when loaded and exported again when damaged; several
processes of one machine (Ray actors) take turns exporting it under a file lock.

An index's model fingerprint is that of the weights whichever runtime embedded the vectors: a catalogue embedded
with one runtime is searched with queries embedded by another.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import threading
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from services.common.checksums import file_sha256, sha256_bytes
from services.common.errors import InvalidInput, NotSupported
from services.common.store import atomic_write, file_lock
from services.embedder.spec import ModelSpec, resolve_spec

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "openvino", "onnxruntime", "torch")
CPU_RUNTIMES = ("openvino", "onnxruntime")  # both run the exported graph on the CPU
MEASURE = "measure"  # Choice.runtime until the faster CPU runtime has been measured on this machine
SPEEDS = "runtimes.json"  # beside the exported models: img/s of each CPU runtime, per machine and model
OPSET = 17
PARITY = 1e-4  # an export whose descriptors differ from torch's by more than this on its check batch is not used
EXPORT_LOCK_S = 600.0  # another process exporting the same model may hold the lock this long


@dataclass(frozen=True)
class Choice:
    runtime: str  # openvino | onnxruntime | torch | MEASURE (the faster of the CPU runtimes, once timed)
    why: str

    def __str__(self) -> str:
        name = " or ".join(CPU_RUNTIMES) if self.runtime == MEASURE else self.runtime
        return f"{name} ({self.why})"


def installed_runtimes() -> tuple[str, ...]:
    """The CPU runtimes this install has (the infer extra has both)."""
    return tuple(r for r in CPU_RUNTIMES if importlib.util.find_spec(r) is not None)


def cuda_wanted(device: str) -> bool:
    """Whether the model runs on a GPU: as asked (IMSEARCH_DEVICE=cuda — a Ray driver on a CPU-only head asks for
    its GPU workers), else the one device check (models.pick_device) when torch is here."""
    if device == "cpu":
        return False
    try:
        from services.embedder.models import pick_device
    except ImportError:  # no torch: the CPU
        if device == "cuda":
            raise InvalidInput("IMSEARCH_DEVICE=cuda needs torch (the embed extra)") from None
        return False
    return device == "cuda" or pick_device(device).type == "cuda"


def choose(runtime: str, device: str, spec: ModelSpec | None = None, cache: Path | None = None) -> Choice:
    """The runtime a process will use, before any model loads (the first step line says it). With the model and
    the cache, `auto` names the runtime measured faster for it on this machine, if it has been."""
    if runtime not in RUNTIMES:
        raise InvalidInput(f"IMSEARCH_RUNTIME must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "torch":
        return Choice("torch", "as asked (IMSEARCH_RUNTIME=torch)")
    if cuda_wanted(device):
        if runtime != "auto":
            raise NotSupported(f"IMSEARCH_RUNTIME={runtime} runs on the CPU here; the GPU runs torch "
                               f"(IMSEARCH_DEVICE=cpu for {runtime})")
        return Choice("torch", "on the GPU, torch runs the model")
    present = installed_runtimes()
    if runtime != "auto":
        if runtime not in present:
            raise NotSupported(f"IMSEARCH_RUNTIME={runtime}, but {runtime} is not installed (the infer extra)")
        return Choice(runtime, f"fp32 on the CPU, as asked (IMSEARCH_RUNTIME={runtime})")
    if not present:
        return Choice("torch", f"neither {' nor '.join(CPU_RUNTIMES)} is installed (pip install 'imsearch[infer]' "
                               f"for ~3x the speed)")
    if len(present) == 1:
        return Choice(present[0], "fp32 on the CPU, the one inference runtime installed")
    speeds = measured(spec, cache) if spec is not None and cache is not None else None
    if not speeds:
        return Choice(MEASURE, "fp32 on the CPU, the faster here, timed on this machine's first load of the model")
    best = max(present, key=lambda r: speeds.get(r, 0.0))
    return Choice(best, "fp32 on the CPU, the faster here: " + ", ".join(
        f"{r} {speeds[r]:.0f}" for r in present if r in speeds) + " img/s, timed on this machine")


def model_path(spec: ModelSpec, cache: Path) -> Path:
    """Where the exported graph of a model lives: named by what changes it (fingerprint, input size, opset)."""
    return cache / f"{spec.fingerprint}-{spec.image_size}px-opset{OPSET}.onnx"


def _record(path: Path) -> Path:
    return path.with_suffix(".json")


def verified(path: Path) -> bool:
    """The exported file is there and matches the checksum recorded when it was written."""
    try:
        record = json.loads(_record(path).read_text())
        return path.is_file() and file_sha256(path) == record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def export(spec: ModelSpec, path: Path) -> Path:
    """Export the model (torch, once) to `path`, checked against torch on a fixed batch, written atomically with
    its record. NotSupported (naming why) when it does not export, or exports other descriptors."""
    import torch

    from services.embedder.models import Embedder

    embedder = Embedder(spec, device="cpu")
    size = spec.image_size
    probe = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    tmp = path.parent / f".export-{os.getpid()}-{path.name}"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad():
            torch.onnx.export(embedder, (torch.from_numpy(probe),), str(tmp), input_names=["pixels"],
                              output_names=["vectors"], dynamic_axes={"pixels": {0: "n"}, "vectors": {0: "n"}},
                              opset_version=OPSET, dynamo=False)
        data = tmp.read_bytes()
    except Exception as e:  # noqa: BLE001 - an operator the exporter lacks: say which, and run torch
        raise NotSupported(f"{spec.name} does not export to ONNX ({type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})") from None
    finally:
        tmp.unlink(missing_ok=True)
    theirs, diff = embedder.embed(probe), 0.0
    atomic_write(tmp, data)
    try:
        for name in installed_runtimes():  # each runtime that will run it computes the same descriptors
            diff = max(diff, float(np.abs(RUNNERS[name](spec, tmp).embed(probe) - theirs).max()))
    finally:
        tmp.unlink(missing_ok=True)
    if not diff <= PARITY:
        raise NotSupported(f"{spec.name} exported to ONNX gives other descriptors than torch (max difference "
                           f"{diff:.2g})")
    atomic_write(path, data)
    atomic_write(_record(path), json.dumps({"sha256": sha256_bytes(data), "model": spec.name,
                                            "fingerprint": spec.fingerprint, "image_size": size, "opset": OPSET,
                                            "torch": torch.__version__, "max_abs_diff": diff}).encode())
    return path


def exported(spec: ModelSpec, cache: Path) -> Path:
    """The verified exported graph of a model: the cached one, else exported now (a damaged one again)."""
    path = model_path(spec, cache)
    if verified(path):
        return path
    with file_lock(path.parent / f".{path.name}.lock", timeout=EXPORT_LOCK_S):
        if verified(path):  # another process exported it while this one waited
            return path
        if path.exists():
            log.warning("the exported model %s does not match its record: exporting it again", path)
        return export(spec, path)


class ExportedEmbedder:
    """uint8 NHWC pixels -> the descriptors Embedder computes, from the exported graph on a CPU runtime."""

    runtime = ""
    on_gpu = False

    def __init__(self, spec: ModelSpec, path: Path):
        self.spec, self.path = spec, path

    def label(self) -> str:
        """The runtime, precision and device, as a run's first line says them."""
        return f"{self.runtime} fp32 on the CPU"

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise InvalidInput(f"expected N x H x W x 3 pixels, got shape {pixels.shape}")
        if len(pixels) == 0:
            return np.zeros((0, self.spec.dim), np.float32)
        return self._run(np.ascontiguousarray(pixels, dtype=np.uint8))

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class OnnxRuntimeEmbedder(ExportedEmbedder):
    runtime = "onnxruntime"

    def __init__(self, spec: ModelSpec, path: Path, threads: int | None = None):
        import onnxruntime as ort

        super().__init__(spec, path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # warnings of the graph optimiser are not the run's business
        options.inter_op_num_threads = 1  # one model, one graph: parallelism is inside the operators
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"pixels": pixels})[0].astype(np.float32, copy=False)


class OpenVinoEmbedder(ExportedEmbedder):
    runtime = "openvino"

    def __init__(self, spec: ModelSpec, path: Path, threads: int | None = None):
        import openvino as ov

        super().__init__(spec, path)
        # LATENCY: one request uses every thread (a throughput hint splits the CPU into streams that only
        # concurrent requests fill); f32: the same descriptors as torch on CPUs that have bf16 too; no pinning:
        # OpenVINO would pin each process's threads from the first core on, so two single-threaded Ray actors
        # shared one core (measured: 24 img/s each instead of 47).
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32", "ENABLE_CPU_PINNING": False}
        if threads:
            config["INFERENCE_NUM_THREADS"] = threads
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.requests = threading.local()  # an infer request serves one thread at a time (a router embeds
        # query images on several)

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        request = getattr(self.requests, "request", None)
        if request is None:
            request = self.requests.request = self.compiled.create_infer_request()
        # a copy: the request's output buffer is overwritten by its next inference
        return np.array(request.infer({0: pixels})[0], dtype=np.float32, copy=True)


RUNNERS = {"openvino": OpenVinoEmbedder, "onnxruntime": OnnxRuntimeEmbedder}


def machine() -> str:
    """What a runtime measurement holds for: the CPU's model name and how many cores this process may use."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} x{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()}"


def _speeds_key(spec: ModelSpec) -> str:
    return f"{machine()} | {spec.fingerprint}-{spec.image_size}px"


def measured(spec: ModelSpec, cache: Path) -> dict[str, float] | None:
    """img/s of each CPU runtime recorded for this model on this machine (None: not measured yet)."""
    try:
        return json.loads((cache / SPEEDS).read_text()).get(_speeds_key(spec))
    except (OSError, ValueError, AttributeError):
        return None


def measure(spec: ModelSpec, path: Path, runtimes: tuple[str, ...], threads: int | None = None,
            batch: int = 32, rounds: int = 3) -> dict[str, float]:
    """img/s of each runtime on the exported graph: a warm-up batch, then `rounds` batches, runtimes in turn.
    Batches of 32, the default IMSEARCH_BATCH_SIZE: runtimes rank differently on small batches (measured here:
    8 images put ONNX Runtime ahead, 32 OpenVINO; README Performance)."""
    pixels = np.random.default_rng(0).integers(0, 256, (batch, spec.image_size, spec.image_size, 3), np.uint8)
    runners = {r: RUNNERS[r](spec, path, threads) for r in runtimes}
    spent = dict.fromkeys(runtimes, 0.0)
    for runner in runners.values():
        runner.embed(pixels)
    for _ in range(rounds):  # alternating: a machine's slow moment costs both
        for name, runner in runners.items():
            start = time.perf_counter()
            runner.embed(pixels)
            spent[name] += time.perf_counter() - start
    return {r: round(batch * rounds / spent[r], 1) for r in runtimes}


def fastest(spec: ModelSpec, path: Path, cache: Path, threads: int | None = None) -> str:
    """The faster installed CPU runtime for the model on this machine: recorded, else timed now and recorded
    (one process at a time, so that the processes of one machine agree)."""
    present = installed_runtimes()
    with file_lock(cache / f".{SPEEDS}.lock", timeout=EXPORT_LOCK_S):
        speeds = measured(spec, cache)
        if not speeds or any(r not in speeds for r in present):
            speeds = measure(spec, path, present, threads)
            try:
                table = json.loads((cache / SPEEDS).read_text())
            except (OSError, ValueError):
                table = {}
            table[_speeds_key(spec)] = speeds
            atomic_write(cache / SPEEDS, json.dumps(table, indent=1, sort_keys=True).encode())
            log.info("CPU runtimes timed for %s on this machine: %s img/s", spec.name, speeds)
    return max(present, key=lambda r: speeds.get(r, 0.0))


def decide(runtime: str, device: str, spec: ModelSpec, cache: Path, threads: int | None = None) -> Choice:
    """choose(), with what is still to do for it done now — the export, and the timing of the CPU runtimes — so
    that a run's first line names the runtime its workers will load (and torch, with the reason, for a model that
    does not export)."""
    choice = choose(runtime, device, spec, cache)
    if choice.runtime == "torch" or runtime != "auto":  # torch, or a runtime demanded (refused at load if need be)
        return choice
    try:
        path = exported(spec, cache)
        if choice.runtime == MEASURE:
            fastest(spec, path, cache, threads)
    except NotSupported as e:
        return Choice("torch", str(e))
    return choose(runtime, device, spec, cache)


@lru_cache(maxsize=4)
def load_embedder(name: str, weights: str | None = None, device: str = "auto", runtime: str = "auto",
                  cache: str = ".imsearch/models", threads: int | None = None):
    """The model `name` on the runtime IMSEARCH_RUNTIME chooses (cached per process: loading costs seconds). A
    model that does not export falls back to torch under `auto`, logging why."""
    spec = resolve_spec(name, weights)
    model = _load(spec, name, weights, device, runtime, Path(cache), threads)
    log.info("model %s loaded: %s", spec.name, model.label())
    return model


def _load(spec: ModelSpec, name: str, weights: str | None, device: str, runtime: str, cache: Path,
          threads: int | None):
    choice = choose(runtime, device, spec, cache)
    if choice.runtime != "torch":
        try:
            path = exported(spec, cache)
            chosen = fastest(spec, path, cache, threads) if choice.runtime == MEASURE else choice.runtime
            return RUNNERS[chosen](spec, path, threads)
        except NotSupported as e:
            if runtime != "auto":
                raise
            log.warning("%s: running torch instead", e)
    from services.embedder.models import set_threads, torch_embedder

    set_threads(threads)
    return torch_embedder(name, weights, device)


def embedder_for(name: str, weights: str | None, settings, threads: int | None = None):
    """load_embedder with this process's settings (device, IMSEARCH_RUNTIME, the export cache)."""
    return load_embedder(name, weights, settings.device, settings.runtime, str(settings.model_cache()), threads)
