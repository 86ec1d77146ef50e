import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.common.config import Settings
from services.common.errors import InvalidInput, NotFound, Unavailable
from services.embedder.engines import choose_engine, on_gpus
from services.embedder.pipeline import list_catalogue, list_images
from services.embedder.stages import decode_batch
from tests.helpers import encode, pattern


def test_list_images_keeps_image_extensions_only(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("a.jpg", "b.PNG", "sub/c.webp", "notes.txt", ".hidden/d.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    assert [u.split("/")[-1] for u in list_images(str(tmp_path))] == ["a.jpg", "b.PNG", "c.webp"]


def test_manifests_in_three_formats(tmp_path):
    uris = [str(tmp_path / f"{i}.jpg") for i in range(3)]
    (tmp_path / "m.txt").write_text("# my images\n" + "\n".join(uris) + "\n\n")
    (tmp_path / "m.csv").write_text("uri,label\n" + "\n".join(f"{u},x" for u in uris))
    pq.write_table(pa.table({"uri": uris, "id": [1, 2, 3]}), tmp_path / "m.parquet")
    for name in ("m.txt", "m.csv", "m.parquet"):
        assert list_images(str(tmp_path / name)) == uris


def test_manifest_ids_and_metadata_columns(tmp_path):
    pq.write_table(pa.table({"uri": ["a.jpg", None, "b.jpg"], "id": [7, 8, 9], "sku": ["x", "y", None],
                             "price": [1.5, 2.0, 3.25]}), tmp_path / "m.parquet")
    cat = list_catalogue(str(tmp_path / "m.parquet"))
    assert cat.uris == ["a.jpg", "b.jpg"] and cat.ids == [7, 9]  # rows without a uri are dropped
    assert [json.loads(m) for m in cat.metadata] == [{"price": 1.5, "sku": "x"}, {"price": 3.25, "sku": None}]
    assert list_catalogue(str(tmp_path / "m.parquet")).metadata == cat.metadata  # stable: resumes match


@pytest.mark.parametrize("ids, words", [([1, 1], "more than once"), ([1.5, 2.0], "must be integers"),
                                        ([-1, 2], "must be >= 0"), ([1, None], "must be integers")])
def test_bad_manifest_ids_are_refused(tmp_path, ids, words):
    pq.write_table(pa.table({"uri": ["a.jpg", "b.jpg"], "id": ids}), tmp_path / "m.parquet")
    with pytest.raises(InvalidInput, match=words):
        list_catalogue(str(tmp_path / "m.parquet"))


def test_bad_sources_are_clear(tmp_path):
    with pytest.raises(NotFound, match="no images"):
        list_images(str(tmp_path))
    pq.write_table(pa.table({"path": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(InvalidInput, match="no 'uri' column"):
        list_images(str(tmp_path / "bad.parquet"))
    with pytest.raises(NotFound):
        list_images(str(tmp_path / "missing.txt"))


def test_decode_batch_turns_failures_into_error_rows(tmp_path):
    (tmp_path / "ok.png").write_bytes(encode(pattern()))
    (tmp_path / "bad.jpg").write_bytes(b"")
    out = decode_batch({"uri": np.array([str(tmp_path / "ok.png"), str(tmp_path / "bad.jpg"),
                                         str(tmp_path / "gone.jpg")], dtype=object)}, 16, Settings())
    assert list(out["error"][:1]) == [""] and "empty" in out["error"][1] and "not found" in out["error"][2]
    assert out["pixels"].shape == (3, 16, 16, 3) and len(out["sha256"][0]) == 64
    assert (out["width"][0], out["height"][0]) == (64, 48)


def test_the_engine_is_the_clusters_choice_and_says_why():
    s = Settings(ray_min_images=100)
    one_machine = [choose_engine(n, s, gpus=0) for n in (99, 100)]
    assert [e.name for e in one_machine] == ["local", "ray"] and "one machine" in one_machine[0].why
    cluster = choose_engine(5, Settings(ray_address="ray://head:10001"), gpus=0)
    assert cluster.name == "ray" and "ray://head:10001" in cluster.why  # any size: the cluster is there
    assert choose_engine(5, s, gpus=2).name == "ray"  # two GPUs here: one actor each
    assert choose_engine(5, s, gpus=1).name == "local"
    assert choose_engine(10_000, s, "local", gpus=4).name == "local"  # asked for
    with pytest.raises(InvalidInput):
        choose_engine(1, s, "spark")


def test_ray_takes_the_gpu_path_when_the_cluster_has_gpus_whatever_the_driver_has():
    assert on_gpus(Settings(), 4) and not on_gpus(Settings(), 0)  # auto: the cluster's GPUs decide
    assert not on_gpus(Settings(device="cpu"), 4)
    with pytest.raises(InvalidInput, match="no GPU"):
        on_gpus(Settings(device="cuda"), 0)


def test_unreachable_storage_stops_the_run_instead_of_making_final_error_rows(tmp_path, monkeypatch):
    from services.embedder import stages

    def down(uri, settings=None):
        raise Unavailable("cannot reach S3 server")

    monkeypatch.setattr(stages, "read_uri", down)
    with pytest.raises(Unavailable):
        stages.fetch_batch({"uri": np.array(["s3://b/a.jpg"], dtype=object)}, Settings(home=tmp_path))
    monkeypatch.setattr(stages, "read_uri", lambda uri, settings=None: (_ for _ in ()).throw(NotFound("gone")))
    out = stages.fetch_batch({"uri": np.array(["a.jpg"], dtype=object)}, Settings(home=tmp_path))
    assert out["read_error"].tolist() == ["gone"]  # a missing file is that row's error


def test_a_manifest_beside_its_images_folder_names_them_relative_to_it(tmp_path):
    """`imsearch embed photos/ --manifest items.parquet`: the manifest's relative uris are under photos/."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from services.embedder.pipeline import list_catalogue

    pq.write_table(pa.table({"uri": ["a.jpg", "sub/b.jpg", "/abs/c.jpg", "s3://b/d.jpg"],
                             "category": ["x", "y", "x", "z"]}), tmp_path / "items.parquet")
    got = list_catalogue(str(tmp_path / "items.parquet"), images_root=str(tmp_path / "photos"))
    assert got.uris == [str(tmp_path / "photos" / "a.jpg"), str(tmp_path / "photos" / "sub" / "b.jpg"),
                        "/abs/c.jpg", "s3://b/d.jpg"]
    assert list_catalogue(str(tmp_path / "items.parquet"), images_root="s3://bucket/photos/").uris[:2] == \
        ["s3://bucket/photos/a.jpg", "s3://bucket/photos/sub/b.jpg"]
    assert list_catalogue(str(tmp_path / "items.parquet")).uris[0] == "a.jpg"  # without a root: as written


def test_the_runs_first_line_says_which_runtime_runs_the_model_and_the_vectors_match_torchs(tmp_path):
    from services.common.store import LocalStore
    from services.embedder.embeddings import read_embeddings
    from services.embedder.models import torch_embedder
    from services.embedder.pipeline import embed_catalogue
    from services.embedder.runtime import load_embedder

    for i in range(3):
        (tmp_path / "photos").mkdir(exist_ok=True)
        (tmp_path / "photos" / f"{i}.jpg").write_bytes(encode(pattern(300, 200, seed=i), "JPEG"))
    said = []
    cache = tmp_path / "models"  # not the run's shared one: this machine's first load of the model
    for runtime in ("auto", "torch"):
        load_embedder.cache_clear()
        settings = Settings(home=tmp_path / "home", runtime=runtime, device="cpu", model="lite0-gem",
                            model_cache_dir=cache)
        embed_catalogue(str(tmp_path / "photos"), str(tmp_path / f"emb-{runtime}"), settings=settings,
                        say=said.append)
    speeds = json.loads((cache / "runtimes.json").read_text())  # timed before the first line
    (faster, _), *_ = sorted(next(iter(speeds.values())).items(), key=lambda kv: -kv[1])
    assert f"runtime {faster} (fp32 on the CPU, the faster here: openvino " in said[0]
    assert "runtime torch (as asked (IMSEARCH_RUNTIME=torch))" in said[1]
    onnx, eager = (read_embeddings(LocalStore(tmp_path / f"emb-{r}")) for r in ("auto", "torch"))
    assert np.abs(onnx.vectors - eager.vectors).max() <= 1e-5  # one vector space: runtimes may be mixed
    assert torch_embedder("lite0-gem", device="cpu").spec.fingerprint == onnx.meta["model"]["fingerprint"]


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime", "torch"])
def test_in_process_embedding_decodes_beside_the_model_under_every_inference_runtime(tmp_path, monkeypatch, runtime):
    """Under an inference runtime the prefetch threads decode (the pipeline keeps up only so); under torch decoding
    stays between forwards. It had been decided by ONNX Runtime's name, so OpenVINO decoded between forwards."""
    import threading

    from services.embedder import engines
    from services.embedder.runtime import load_embedder

    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(encode(pattern(300, 200, seed=i), "JPEG"))
    decoded_on, decode = [], engines.decode_batch

    def recorded(*args, **kwargs):
        decoded_on.append(threading.current_thread() is threading.main_thread())
        return decode(*args, **kwargs)

    monkeypatch.setattr(engines, "decode_batch", recorded)
    load_embedder.cache_clear()
    settings = Settings(home=tmp_path / "home", runtime=runtime, device="cpu", batch_size=2)
    try:
        batches = list(engines.run_local(sorted(str(p) for p in tmp_path.glob("*.jpg")), "lite0-gem", None, settings))
    finally:
        load_embedder.cache_clear()
    assert sum(len(b["uri"]) for b in batches) == 3
    assert decoded_on == [runtime == "torch"] * 2
