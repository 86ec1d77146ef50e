"""Which runtime computes the descriptors, and the model exported for it.

The model's forward pass is what users wait for (every catalogue image at ingestion, every query image), and
PyTorch's eager mode leaves most of a CPU unused. On a CPU the embedder runs the model through ONNX Runtime: the
whole of Embedder.forward — uint8 pixels in, normalisation, backbone, GeM or class token, multi-scale where it
exports, L2 — exported once per weights fingerprint and input size, the same descriptors to within float
rounding (the export is checked against torch before it is used, and a test checks it on real photos), several
times faster (README Performance, bench_embed's runtime rows). On a GPU torch keeps the model (cuDNN, the device's
own JPEG decoding feeding it).

IMSEARCH_RUNTIME: auto (ONNX Runtime on CPU when it is installed and the model exports, else torch, saying
why) | onnxruntime (refuse rather than fall back) | torch. The exported graph lives under IMSEARCH_HOME/models,
written atomically beside a record of its checksum, verified when loaded and exported again when damaged; several
processes of one machine (Ray actors) take turns exporting it under a file lock.

An index's model fingerprint is that of the weights whichever runtime embedded the vectors: a catalogue embedded
with one runtime is searched with queries embedded by another.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from services.common.checksums import file_sha256
from services.common.errors import InvalidInput, NotSupported
from services.common.store import atomic_write, file_lock
from services.embedder.spec import ModelSpec, resolve_spec

log = logging.getLogger(__name__)
RUNTIMES = ("auto", "onnxruntime", "torch")
OPSET = 17
PARITY = 1e-4  # an export whose descriptors differ from torch's by more than this on its check batch is not used
EXPORT_LOCK_S = 600.0  # another process exporting the same model may hold the lock this long


@dataclass(frozen=True)
class Choice:
    runtime: str  # onnxruntime | torch
    why: str


def runtime_installed() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cuda_wanted(device: str) -> bool:
    """Whether the model runs on a GPU: the one device check (models.pick_device) when torch is here."""
    if device == "cpu":
        return False
    try:
        import torch
    except ImportError:
        if device == "cuda":
            raise InvalidInput("IMSEARCH_DEVICE=cuda needs torch (the embed extra)") from None
        return False
    return device == "cuda" or torch.cuda.is_available()


def choose(runtime: str, device: str) -> Choice:
    """The runtime a process will use, before any model loads (the first step line says it)."""
    if runtime not in RUNTIMES:
        raise InvalidInput(f"IMSEARCH_RUNTIME must be one of {', '.join(RUNTIMES)}, not {runtime!r}")
    if runtime == "torch":
        return Choice("torch", "as asked (IMSEARCH_RUNTIME=torch)")
    if cuda_wanted(device):
        if runtime == "onnxruntime":
            raise NotSupported("IMSEARCH_RUNTIME=onnxruntime runs on the CPU here; the GPU runs torch "
                               "(IMSEARCH_DEVICE=cpu for ONNX Runtime)")
        return Choice("torch", "on the GPU, torch runs the model")
    if not runtime_installed():
        if runtime == "onnxruntime":
            raise NotSupported("IMSEARCH_RUNTIME=onnxruntime, but onnxruntime is not installed (the infer extra)")
        return Choice("torch", "onnxruntime is not installed (pip install 'imsearch[infer]' for ~3x the speed)")
    return Choice("onnxruntime", "fp32 on the CPU, the model exported once per weights")


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
    diff = float(np.abs(_session(data, None).run(None, {"pixels": probe})[0] - embedder.embed(probe)).max())
    if not diff <= PARITY:
        raise NotSupported(f"{spec.name} exported to ONNX gives other descriptors than torch (max difference "
                           f"{diff:.2g})")
    atomic_write(path, data)
    atomic_write(_record(path), json.dumps({"sha256": file_sha256(path), "model": spec.name,
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


def _session(model: bytes | str, threads: int | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings of the graph optimiser are not the run's business
    options.inter_op_num_threads = 1  # one model, one graph: parallelism is inside the operators
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


class RuntimeEmbedder:
    """uint8 NHWC pixels -> the descriptors Embedder computes, from the exported graph through ONNX Runtime."""

    runtime = "onnxruntime"
    on_gpu = False

    def __init__(self, spec: ModelSpec, path: Path, threads: int | None = None):
        self.spec, self.path = spec, path
        self.session = _session(str(path), threads)

    def label(self) -> str:
        """The runtime, precision and device, as a run's first line says them."""
        return "onnxruntime fp32 on the CPU"

    def embed(self, pixels: np.ndarray) -> np.ndarray:
        if pixels.ndim != 4 or pixels.shape[-1] != 3:
            raise InvalidInput(f"expected N x H x W x 3 pixels, got shape {pixels.shape}")
        if len(pixels) == 0:
            return np.zeros((0, self.spec.dim), np.float32)
        pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
        return self.session.run(None, {"pixels": pixels})[0].astype(np.float32, copy=False)


@lru_cache(maxsize=4)
def load_embedder(name: str, weights: str | None = None, device: str = "auto", runtime: str = "auto",
                  cache: str = ".imsearch/models", threads: int | None = None):
    """The model `name` on the runtime IMSEARCH_RUNTIME chooses (cached per process: loading costs seconds). A
    model that does not export falls back to torch under `auto`, logging why."""
    spec = resolve_spec(name, weights)
    choice = choose(runtime, device)
    if choice.runtime == "onnxruntime":
        try:
            return RuntimeEmbedder(spec, exported(spec, Path(cache)), threads)
        except NotSupported as e:
            if runtime == "onnxruntime":
                raise
            log.warning("%s: running torch instead", e)
    from services.embedder.models import set_threads, torch_embedder

    set_threads(threads)
    return torch_embedder(name, weights, device)


def embedder_for(name: str, weights: str | None, settings, threads: int | None = None):
    """load_embedder with this process's settings (device, IMSEARCH_RUNTIME, the export cache)."""
    return load_embedder(name, weights, settings.device, settings.runtime, str(settings.model_cache()), threads)
