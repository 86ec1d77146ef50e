"""The model on the inference runtimes: the same descriptors as torch on real photos (OpenVINO and ONNX Runtime),
the export cached, verified and rebuilt when damaged, the faster runtime timed once per machine and model, and
torch (saying why) when the runtimes or the export are missing."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

from services.common.errors import NotSupported
from services.common.images import decode_image
from services.embedder import runtime
from services.embedder.models import Embedder, torch_embedder
from services.embedder.runtime import (
    CPU_RUNTIMES,
    MEASURE,
    RUNNERS,
    choose,
    exported,
    load_embedder,
    model_path,
    verified,
)
from services.embedder.spec import resolve_spec
from services.eval.datasets import skimage_photos


@pytest.fixture(autouse=True)
def fresh_loads():
    load_embedder.cache_clear()
    yield
    load_embedder.cache_clear()


def photos(size: int) -> np.ndarray:
    """scikit-image's photos (astronaut, coffee, chelsea, ...) decoded as the pipeline decodes them."""
    return np.stack([decode_image(p.path.read_bytes(), size, 1 << 30, 1 << 30).pixels for p in skimage_photos()])


@pytest.mark.parametrize("name", CPU_RUNTIMES)
def test_each_runtime_gives_torchs_descriptors_on_real_photos_within_1e5(tmp_path, name):
    spec = resolve_spec("lite1-gem")  # the default model
    model = RUNNERS[name](spec, exported(spec, tmp_path))
    pixels = photos(spec.image_size)
    assert len(pixels) >= 8
    ours, theirs = model.embed(pixels), torch_embedder("lite1-gem", device="cpu").embed(pixels)
    assert ours.shape == theirs.shape == (len(pixels), 1280) and ours.dtype == np.float32
    assert np.abs(ours - theirs).max() <= 1e-5
    assert np.array_equal(model.embed(pixels[:3]), ours[:3])  # a later call does not overwrite an earlier answer
    assert model.embed(pixels[:0]).shape == (0, 1280)


def test_openvino_leaves_its_threads_unpinned_so_that_processes_sharing_a_machine_use_every_core(tmp_path):
    """Pinned, two single-threaded Ray actors ran on the same first core, each at half speed."""
    spec = resolve_spec("lite0-gem")
    model = RUNNERS["openvino"](spec, exported(spec, tmp_path), threads=1)
    assert model.compiled.get_property("ENABLE_CPU_PINNING") is False
    assert model.compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_concurrent_callers_each_get_their_own_descriptors(tmp_path):
    """A router embeds query images on several threads at once; an OpenVINO infer request serves one at a time."""
    from concurrent.futures import ThreadPoolExecutor

    spec = resolve_spec("lite0-gem")
    pixels = photos(spec.image_size)
    for name in CPU_RUNTIMES:
        model = RUNNERS[name](spec, exported(spec, tmp_path))
        alone = [model.embed(pixels[i:i + 1]) for i in range(len(pixels))]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda i: model.embed(pixels[i:i + 1]), list(range(len(pixels))) * 3))
        for i, v in enumerate(together):
            assert np.abs(v - alone[i % len(pixels)]).max() <= 1e-6, name


def test_another_architecture_from_a_weights_file_exports_too(tmp_path):
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), tmp_path / "r18.pth")
    spec = resolve_spec("timm:resnet18@size=128", tmp_path / "r18.pth")
    pixels = photos(128)
    theirs = Embedder(spec, device="cpu").embed(pixels)
    for name in CPU_RUNTIMES:
        ours = RUNNERS[name](spec, exported(spec, tmp_path / "models")).embed(pixels)
        assert np.abs(ours - theirs).max() <= 1e-5, name


def test_the_export_is_cached_verified_and_made_again_when_damaged(tmp_path, monkeypatch):
    spec = resolve_spec("lite0-gem")
    exports, export = [], runtime.export

    def counted(spec, path):
        exports.append(path)
        return export(spec, path)

    monkeypatch.setattr(runtime, "export", counted)
    path = exported(spec, tmp_path)
    assert path == model_path(spec, tmp_path) and verified(path)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == sorted([
        path.name, path.with_suffix(".json").name])  # written whole, nothing half-written left beside it
    assert exported(spec, tmp_path) == path and len(exports) == 1  # cached
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte in the weights
    path.write_bytes(bytes(data))
    assert not verified(path)
    assert exported(spec, tmp_path) == path and len(exports) == 2 and verified(path)  # made again
    path.with_suffix(".json").write_text("{")  # a damaged record is no proof either
    assert exported(spec, tmp_path) == path and len(exports) == 3


def test_without_the_runtimes_torch_runs_the_model_and_the_choice_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime, "installed_runtimes", lambda: ())
    choice = choose("auto", "cpu")
    assert choice.runtime == "torch" and "neither openvino nor onnxruntime is installed" in choice.why
    model = load_embedder("lite0-gem", None, "cpu", "auto", str(tmp_path))
    assert model.runtime == "torch" and not any(tmp_path.iterdir())
    for name in CPU_RUNTIMES:
        with pytest.raises(NotSupported, match="not installed"):
            choose(name, "cpu")
    assert choose("torch", "cpu").runtime == "torch"
    monkeypatch.setattr(runtime, "installed_runtimes", lambda: ("onnxruntime",))
    assert choose("auto", "cpu").runtime == "onnxruntime"
    load_embedder.cache_clear()
    assert load_embedder("lite0-gem", None, "cpu", "auto", str(tmp_path)).runtime == "onnxruntime"
    with pytest.raises(NotSupported, match="openvino is not installed"):
        choose("openvino", "cpu")


def test_the_faster_runtime_is_timed_once_per_machine_and_model_and_then_named_before_loading(tmp_path,
                                                                                             monkeypatch):
    timings = []

    def timed(spec, path, runtimes, threads=None):
        timings.append(runtimes)
        return {"openvino": 50.0, "onnxruntime": 80.0}  # this machine: ONNX Runtime the faster

    monkeypatch.setattr(runtime, "measure", timed)
    spec = resolve_spec("lite0-gem")
    first = choose("auto", "cpu", spec, tmp_path)
    assert first.runtime == MEASURE and "openvino or onnxruntime" in str(first)
    assert load_embedder("lite0-gem", None, "cpu", "auto", str(tmp_path)).runtime == "onnxruntime"
    assert timings == [("openvino", "onnxruntime")]
    load_embedder.cache_clear()  # another process of the machine
    assert load_embedder("lite0-gem", None, "cpu", "auto", str(tmp_path)).runtime == "onnxruntime"
    assert len(timings) == 1  # read back, not timed again
    said = choose("auto", "cpu", spec, tmp_path)
    assert said.runtime == "onnxruntime" and "openvino 50, onnxruntime 80 img/s" in str(said)
    assert choose("auto", "cpu", resolve_spec("lite1-gem"), tmp_path).runtime == MEASURE  # another model
    assert load_embedder("lite0-gem", None, "cpu", "openvino", str(tmp_path)).runtime == "openvino"  # as asked
    monkeypatch.setattr(runtime, "machine", lambda: "another CPU x64")
    assert choose("auto", "cpu", spec, tmp_path).runtime == MEASURE  # another machine sharing the cache


def test_the_real_timing_names_a_runtime_with_its_speed(tmp_path):
    spec = resolve_spec("lite0-gem")
    speeds = runtime.measure(spec, exported(spec, tmp_path), CPU_RUNTIMES, batch=2, rounds=1)
    assert set(speeds) == set(CPU_RUNTIMES) and all(v > 0 for v in speeds.values())


def test_a_model_that_does_not_export_runs_on_torch_under_auto_and_is_refused_when_onnx_is_demanded(tmp_path):
    """A multi-scale descriptor resizes with antialiasing, which the exporter lacks."""
    model = load_embedder("lite0-gem@ms", None, "cpu", "auto", str(tmp_path))
    assert model.runtime == "torch"
    for name in CPU_RUNTIMES:
        with pytest.raises(NotSupported, match="does not export to ONNX"):
            load_embedder("lite0-gem@ms", None, "cpu", name, str(tmp_path / "other"))
    assert choose("auto", "cpu").runtime in (*CPU_RUNTIMES, MEASURE)


def test_a_process_without_torch_embeds_with_the_exported_model(tmp_path):
    """The inference install: onnxruntime, Pillow, numpy — the model exported beforehand (`imsearch model export`)."""
    import subprocess
    import sys
    from pathlib import Path

    spec = resolve_spec("lite0-gem")
    exported(spec, tmp_path)
    code = (
        "import sys; sys.modules['torch'] = None  # as if torch were not installed: importing it fails\n"
        "import numpy as np\n"
        "from services.embedder.runtime import load_embedder\n"
        f"model = load_embedder('lite0-gem', None, 'auto', 'auto', {str(tmp_path)!r})\n"
        "vectors = model.embed(np.zeros((2, 224, 224, 3), np.uint8))\n"
        "print(model.runtime, vectors.shape, sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'timm', 'torchvision') and sys.modules[m] is not None))\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    name, shape = run.stdout.split(" ", 1)
    assert name in CPU_RUNTIMES and shape.strip() == "(2, 1280) []"


def test_a_process_without_torch_embeds_a_catalogue_and_indexes_it(tmp_path):
    """The torch-free install ingests too: `imsearch embed` (the engine chosen by itself, which asked torch how
    many GPUs there are) and `imsearch index build`, with the model exported beforehand."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from services.common.config import Settings
    from tests.helpers import write_photos

    write_photos(tmp_path / "photos", 3)
    exported(resolve_spec("lite0-gem"), Settings().model_cache())
    env = {**os.environ, "IMSEARCH_MODEL": "lite0-gem", "IMSEARCH_HOME": str(tmp_path / "home")}
    said = ""
    for argv in (["embed", str(tmp_path / "photos"), "--out", str(tmp_path / "emb")],
                 ["index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "idx")]):
        code = f"import sys; sys.modules['torch'] = None; sys.argv = {['imsearch', *argv]!r}\n" \
               "from services.cli import main; main()"
        run = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[3], env=env,
                             capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, (run.stdout + run.stderr)[-2000:]
        said += run.stdout
    assert "3 embedded" in said and "indexed 3 vectors" in said, said


def test_a_driver_without_a_gpu_that_asks_for_cuda_names_torch_for_its_gpu_workers():
    """A Ray driver on a CPU-only head (KubeRay) with IMSEARCH_DEVICE=cuda: its first line names torch on the GPU
    instead of failing the run because the driver itself has no CUDA device."""
    choice = choose("auto", "cuda")
    assert choice.runtime == "torch" and "GPU" in choice.why
    with pytest.raises(NotSupported, match="runs on the CPU here"):
        choose("onnxruntime", "cuda")
