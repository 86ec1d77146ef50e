"""Resumable part writing: chunks, done markers, duplicates across runs, user ids and metadata."""

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from services.common.errors import Corrupt
from services.common.store import LocalStore
from services.embedder.embeddings import PartWriter, plan_chunks, read_embeddings, resume_state
from services.embedder.spec import ModelSpec

DIM = 4


def spec(tmp_path) -> ModelSpec:
    w = tmp_path / "w.bin"
    w.write_bytes(b"w")
    return ModelSpec("fake", "none", str(w), DIM)


def batch(uris, shas, errors=None):
    n = len(uris)
    vec = np.array([[int(s, 16) % 97, 1, 2, 3] for s in shas], np.float32)
    return {"uri": np.array(uris, dtype=object), "sha256": np.array(shas, dtype=object),
            "width": np.full(n, 8), "height": np.full(n, 8),
            "error": np.array(errors or [""] * n, dtype=object), "vector": vec}


def sha(i: int) -> str:
    return f"{i + 1:016x}" * 4


def test_a_rerun_skips_finished_chunks_and_the_result_is_whole(tmp_path):
    store = LocalStore(tmp_path / "out")
    uris = [f"img/{i:03d}.jpg" for i in range(10)]
    shas = [sha(i) for i in range(9)] + [sha(2)]  # the last image repeats an early one
    chunks = plan_chunks(uris, 3)
    first = PartWriter(store, spec(tmp_path), 3, plan=chunks, done={})
    first.add(batch(uris[:7], shas[:7]))  # two chunks written, the third in flight: then "kill -9"
    done = resume_state(store, chunks).done
    assert sorted(done) == [0, 1]

    pending = [c for c in chunks if c.number not in done]
    second = PartWriter(store, spec(tmp_path), 3, plan=pending, done=done)
    assert second.rows == 6  # counted from the markers: progress starts where the last run stopped
    second.add(batch(uris[6:], shas[6:]))
    meta = second.close("test")
    assert meta["rows"] == 10 and meta["embedded"] == 9 and meta["resumed_parts"] == 2
    assert meta["duplicates"] == 1 and meta["reasons"] == {"duplicate": 1}
    emb = read_embeddings(store)
    assert len(emb.ids) == len(set(emb.ids.tolist())) == 9
    assert emb.uris == uris[:9]
    errors = pq.read_table(io.BytesIO(store.get_bytes("errors.parquet"))).to_pylist()
    assert errors == [{"uri": "img/009.jpg", "error": "duplicate: same content as img/002.jpg"}]


def test_manifest_ids_and_metadata_are_kept_and_duplicates_only_counted(tmp_path):
    store = LocalStore(tmp_path / "out")
    uris = ["a.jpg", "b.jpg", "c.jpg"]
    meta = [json.dumps({"sku": "x1"}), None, json.dumps({"sku": "x3"})]
    chunks = plan_chunks(uris, 2, ids=[101, 102, 103], metadata=meta)
    w = PartWriter(store, spec(tmp_path), 2, plan=chunks, done={})
    w.add(batch(uris, [sha(1), sha(1), sha(3)]))  # b is the same picture as a, under another product id
    out = w.close("manifest")
    assert out["duplicates"] == 1 and out["embedded"] == 3
    emb = read_embeddings(store)
    assert emb.ids.tolist() == [101, 102, 103]
    table = pq.read_table(io.BytesIO(store.get_bytes(out["parts"][0]["key"])))
    assert table["metadata"].to_pylist() == meta[:2]


def test_rows_out_of_catalogue_order_are_refused(tmp_path):
    store = LocalStore(tmp_path / "out")
    w = PartWriter(store, spec(tmp_path), 2, plan=plan_chunks(["a", "b"], 2), done={})
    with pytest.raises(Corrupt, match="returned b where a was due"):
        w.add(batch(["b", "a"], [sha(1), sha(2)]))


def test_close_refuses_when_chunks_are_missing(tmp_path):
    store = LocalStore(tmp_path / "out")
    w = PartWriter(store, spec(tmp_path), 2, plan=plan_chunks(["a", "b", "c"], 2), done={})
    w.add(batch(["a", "b"], [sha(1), sha(2)]))
    with pytest.raises(Corrupt, match="1 chunk"):
        w.close("x")


def test_chunk_names_change_when_the_catalogue_changes():
    a = plan_chunks(["x", "y", "z"], 2)
    b = plan_chunks(["x", "y", "w"], 2)
    assert a[0].name == b[0].name and a[1].name != b[1].name
    assert plan_chunks(["x"], 2, ids=[1])[0].name != plan_chunks(["x"], 2, ids=[2])[0].name


def test_a_killed_run_of_another_model_is_not_resumed(tmp_path):
    from services.common.errors import Incompatible
    from services.embedder.pipeline import _check_same_model

    store = LocalStore(tmp_path / "out")
    chunks = plan_chunks(["a", "b", "c"], 2)
    first = spec(tmp_path)
    PartWriter(store, first, 2, plan=chunks, done={}).add(batch(["a", "b"], [sha(1), sha(2)]))  # then killed
    done = resume_state(store, chunks).done
    assert done[0].markers[0]["model"] == first.fingerprint
    _check_same_model(store, first, done)  # the same model resumes
    other_weights = tmp_path / "other.bin"
    other_weights.write_bytes(b"other")
    other = ModelSpec("fake", "none", str(other_weights), DIM)
    with pytest.raises(Incompatible, match="another model"):
        _check_same_model(store, other, done)


def test_duplicates_are_marked_before_the_model_with_content_ids(tmp_path):
    store = LocalStore(tmp_path / "out")
    uris = [f"img/{i}.jpg" for i in range(4)]
    w = PartWriter(store, spec(tmp_path), 10, plan=plan_chunks(uris, 10), done={})
    first = batch(uris[:2], [sha(0), sha(1)])
    w.mark_duplicates(first)
    w.add(first)
    second = batch(uris[2:], [sha(1), sha(5)])  # img/2 repeats img/1 from the earlier batch
    w.mark_duplicates(second)
    assert second["error"].tolist() == ["duplicate: same content as img/1.jpg", ""]
    w.add(second)
    out = w.close("test")
    assert out["duplicates"] == 1 and out["embedded"] == 3  # counted once, not again by add()


def test_duplicates_within_one_batch_and_user_ids(tmp_path):
    uris = ["a.jpg", "b.jpg", "c.jpg"]
    w = PartWriter(LocalStore(tmp_path / "o1"), spec(tmp_path), 10, plan=plan_chunks(uris, 10), done={})
    b = batch(uris, [sha(1), sha(1), sha(2)], errors=["", "", "not an image"])
    w.mark_duplicates(b)
    assert b["error"].tolist() == ["", "duplicate: same content as a.jpg", "not an image"]
    # user ids: both rows stay (two products may share a picture), so the model embeds both
    w = PartWriter(LocalStore(tmp_path / "o2"), spec(tmp_path), 10, plan=plan_chunks(uris, 10, ids=[1, 2, 3]),
                   done={})
    b = batch(uris, [sha(1), sha(1), sha(2)])
    w.mark_duplicates(b)
    assert b["error"].tolist() == ["", "", ""]


@pytest.mark.parametrize("damage", ["marker garbage", "marker edited", "part edited", "part missing"])
def test_a_damaged_or_missing_chunk_of_an_earlier_run_is_embedded_again(tmp_path, damage):
    store = LocalStore(tmp_path / "out")
    uris = [f"img/{i:03d}.jpg" for i in range(6)]
    chunks = plan_chunks(uris, 3)
    PartWriter(store, spec(tmp_path), 3, plan=chunks, done={}).add(batch(uris[:6], [sha(i) for i in range(6)]))
    marker, part = f"done/{chunks[1].name}.json", f"parts/{chunks[1].name}.parquet"
    if damage == "marker garbage":
        store.put_bytes(marker, b"{not json")
    elif damage == "marker edited":  # still JSON, but not what was written: its own checksum fails
        store.put_bytes(marker, store.get_bytes(marker).replace(b'"rows": 3', b'"rows": 30'))
    elif damage == "part edited":
        store.put_bytes(part, store.get_bytes(part)[:-20] + b"x" * 20)
    else:
        store.delete(part)
    resume = resume_state(store, chunks)
    assert sorted(resume.done) == [0]  # the sound chunk is kept
    assert len(resume.redo) == 1 and chunks[1].name in resume.redo[0]

    again = PartWriter(store, spec(tmp_path), 3, plan=[chunks[1]], done=resume.done)
    again.add(batch(uris[3:], [sha(i) for i in range(3, 6)]))
    again.close("test")
    emb = read_embeddings(store)
    assert emb.uris == uris and len(set(emb.ids.tolist())) == 6  # every image exactly once


def test_a_slow_chunk_is_written_in_pieces_and_a_rerun_continues_after_the_last_one(tmp_path):
    store = LocalStore(tmp_path / "out")
    uris = [f"img/{i:03d}.jpg" for i in range(8)]
    chunks = plan_chunks(uris, 5)  # rows 0-4 and 5-7
    patient = PartWriter(store, spec(tmp_path), 5, plan=chunks, done={})  # part_seconds: never
    patient.add(batch(uris[:2], [sha(i) for i in range(2)]))
    assert store.list("parts") == []  # without a time limit a chunk is written whole, as before

    run = PartWriter(store, spec(tmp_path), 5, plan=chunks, done={}, part_seconds=0.0)  # a piece per batch
    run.add(batch(uris[:2], [sha(i) for i in range(2)]))
    run.add(batch(uris[2:4], [sha(i) for i in range(2, 4)]))  # then kill -9, inside chunk 0
    resume = resume_state(store, chunks)
    assert resume.written(chunks[0]) == 4 and resume.written(chunks[1]) == 0 and resume.redo == []
    assert len(resume.done[0].markers) == 2  # rows 0-1 and 2-3

    rerun = PartWriter(store, spec(tmp_path), 5, plan=chunks, done=resume.done, part_seconds=0.0)
    assert rerun.rows == 4
    rerun.add(batch(uris[4:], [sha(i) for i in range(4, 8)]))  # chunk 0 goes on at row 4, then chunk 1
    meta = rerun.close("test")
    assert [p["key"].split("/")[1] for p in meta["parts"]] == [
        f"{chunks[0].name}.parquet", f"{chunks[0].name}-at-000002.parquet", f"{chunks[0].name}-at-000004.parquet",
        f"{chunks[1].name}.parquet"]
    emb = read_embeddings(store)
    assert emb.uris == uris and len(set(emb.ids.tolist())) == 8  # in catalogue order, each once


def test_a_damaged_piece_is_embedded_again_from_its_first_row_and_the_pieces_before_it_are_kept(tmp_path):
    store = LocalStore(tmp_path / "out")
    uris = [f"img/{i:03d}.jpg" for i in range(6)]
    chunks = plan_chunks(uris, 6)
    run = PartWriter(store, spec(tmp_path), 6, plan=chunks, done={}, part_seconds=0.0)
    for i in range(0, 6, 2):
        run.add(batch(uris[i:i + 2], [sha(j) for j in range(i, i + 2)]))
    middle = f"parts/{chunks[0].name}-at-000002.parquet"
    store.put_bytes(middle, store.get_bytes(middle)[:-20] + b"x" * 20)
    resume = resume_state(store, chunks)
    assert resume.written(chunks[0]) == 2  # the piece after the damaged one is not trusted either
    assert len(resume.redo) == 1 and "-at-000002" in resume.redo[0] and "checksum" in resume.redo[0]
    again = PartWriter(store, spec(tmp_path), 6, plan=chunks, done=resume.done, part_seconds=0.0)
    again.add(batch(uris[2:], [sha(j) for j in range(2, 6)]))
    again.close("test")
    assert read_embeddings(store).uris == uris
