"""The CLI as a user runs it (subprocesses): good and bad images, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.helpers import (
    DEFAULT_MODEL,
    encode,
    jpeg_with_orientation,
    pattern,
    random_unit_vectors,
    write_fake_embeddings,
)

ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, env_home: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "IMSEARCH_HOME": str(env_home), **env_vars}
    return subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], proc.stderr  # progress lines may come before
    for w in words:
        assert w in errors[0], errors[0]


def write_awkward_catalogue(folder: Path) -> dict[str, int]:
    """Good images of every awkward kind plus broken ones; returns expected counts."""
    folder.mkdir(parents=True)
    for i in range(6):
        (folder / f"good-{i}.png").write_bytes(encode(pattern(120, 90, seed=i)))
    (folder / "cmyk.jpg").write_bytes(encode(pattern(seed=10).convert("CMYK"), "JPEG"))
    sixteen = (np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)
    (folder / "sixteen.png").write_bytes(encode(Image.fromarray(sixteen)))
    (folder / "palette.png").write_bytes(encode(pattern(seed=11).convert("P"), "PNG", transparency=0))
    frames = [pattern(seed=s) for s in (12, 13)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    (folder / "rotated.jpg").write_bytes(jpeg_with_orientation(pattern(seed=14), 6))
    (folder / "alpha.png").write_bytes(encode(pattern(seed=15).convert("RGBA")))
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "text.jpg").write_bytes(b"hello, I am not a picture" * 20)
    full = encode(pattern(300, 300, seed=16), "JPEG")
    (folder / "truncated.jpg").write_bytes(full[: len(full) // 3])
    (folder / "bomb.png").write_bytes(encode(Image.new("1", (12_000, 12_000)), optimize=True))
    (folder / "zz-copy-of-good-0.png").write_bytes((folder / "good-0.png").read_bytes())
    return {"total": 17, "embedded": 12, "skipped": 5}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    expected = write_awkward_catalogue(tmp / "photos")
    embed = run("embed", str(tmp / "photos"), "--out", str(tmp / "emb"), env_home=tmp / "home")
    index = run("index", "build", str(tmp / "emb"), "--shards", "2", "--out", str(tmp / "idx"), env_home=tmp / "home")
    return tmp, expected, embed, index


def test_embed_reports_every_bad_image_and_goes_on(built):
    tmp, expected, embed, _ = built
    assert embed.returncode == 0, embed.stderr
    assert f"{expected['embedded']} embedded, {expected['skipped']} skipped" in embed.stdout
    for reason in ("empty file", "not an image", "decompression bomb", "truncated", "duplicate"):
        assert reason in embed.stdout
    rows = pq.read_table(tmp / "emb" / "parts").to_pylist()
    assert len(rows) == expected["total"]
    errors = {Path(r["uri"]).name: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"zero.jpg", "text.jpg", "truncated.jpg", "bomb.png", "zz-copy-of-good-0.png"}
    rotated = next(r for r in rows if r["uri"].endswith("rotated.jpg"))
    assert (rotated["width"], rotated["height"]) == (48, 64)  # EXIF orientation applied


def test_index_info_and_search(built):
    tmp, expected, _, index = built
    assert index.returncode == 0, index.stderr
    assert "indexed 12 vectors into 2 shard(s)" in index.stdout
    home = tmp / "home"
    info = run("info", str(tmp / "idx"), "--verify", env_home=home)
    assert info.returncode == 0, info.stderr
    for word in (DEFAULT_MODEL, "dim=1280", "shard 0", "shard 1", "checksums verified"):
        assert word in info.stdout
    meta = json.loads(run("info", str(tmp / "idx"), "--json", env_home=home).stdout)
    assert meta["count"] == 12 and sum(s["count"] for s in meta["shards"]) == 12

    # A rescaled copy. (Not a JPEG q40 one: on these synthetic block images Lite1 finds the one other JPEG of
    # the catalogue closer than the original — JPEG robustness is measured on real photos, README "Quality".)
    query = tmp / "query.png"
    query.write_bytes(encode(pattern(120, 90, seed=3).resize((100, 75))))
    res = run("search", str(tmp / "idx"), str(query), "-k", "3", "--json", env_home=home)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [set(r) for r in out["results"]] == [{"id", "uri", "score", "shard"}] * 3
    assert out["results"][0]["uri"].endswith("good-3.png")
    scores = [r["score"] for r in out["results"]]
    assert scores == sorted(scores, reverse=True)


def test_bad_queries_get_one_line_errors(built):
    tmp, _, _, _ = built
    home = tmp / "home"
    bad = tmp / "bad-query.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    good = next((tmp / "photos").glob("good-1.png"))
    assert_one_line_error(run("search", str(tmp / "idx"), str(bad), env_home=home), "corrupt image")
    assert_one_line_error(run("search", str(tmp / "idx"), str(good), "-k", "0", env_home=home), "k must be")
    assert_one_line_error(run("search", str(tmp / "idx"), str(good), "-k", "100000", env_home=home), "k must be")
    assert_one_line_error(run("search", str(tmp / "idx"), str(tmp / "nope.jpg"), env_home=home), "not found")
    assert_one_line_error(run("search", str(tmp / "no-index"), str(good), env_home=home), "no index")


def test_search_with_relevance_feedback(built):
    tmp, _, _, _ = built
    home = tmp / "home"
    query = str(next((tmp / "photos").glob("good-1.png")))
    plain = json.loads(run("search", str(tmp / "idx"), query, "-k", "12", "--json", env_home=home).stdout)["results"]
    liked, disliked = plain[-1], plain[1]  # the last hit marked relevant, the second not
    before = [r["id"] for r in plain]

    def results(*feedback: str) -> list[dict]:
        proc = run("search", str(tmp / "idx"), query, "-k", "12", "--json", "--feedback", *feedback, env_home=home)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)["results"]

    def behind_best(hits: list[dict], image: dict) -> float:
        return hits[0]["score"] - next(h["score"] for h in hits if h["id"] == image["id"])

    # One kind of feedback per search: each alone moves its image against every other (Rocchio); together
    # the liked image's pull may lift a disliked one that looks like it.
    assert [r["id"] for r in results(f"+{liked['id']}")].index(liked["id"]) < before.index(liked["id"])  # moved up
    # γ = 0.15 may not cost the disliked image a rank, but it always falls further behind the best hit
    # (q - γd loses γ(1 - d·x) more on d than on any x)
    assert behind_best(results(f"-{disliked['id']}"), disliked) > behind_best(plain, disliked) + 0.01
    assert_one_line_error(run("search", str(tmp / "idx"), query, "--feedback", "+999", env_home=home),
                          "unknown catalogue id")
    assert_one_line_error(run("search", str(tmp / "idx"), query, "--feedback", "12", env_home=home), "+ID")


def test_damaged_shard_is_named(built, tmp_path):
    tmp, _, _, _ = built
    import shutil

    idx = tmp_path / "idx"
    shutil.copytree(tmp / "idx", idx)
    shard = next(idx.glob("versions/*/shard-00001.faiss"))
    shard.write_bytes(shard.read_bytes()[:-10])
    proc = run("search", str(idx), str(tmp / "photos" / "good-1.png"), env_home=tmp / "home")
    assert_one_line_error(proc, "shard-00001.faiss", "checksum")


def test_index_of_another_model_refuses_the_query(tmp_path):
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(30, 8), name="lite0-gem")
    built = run("index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), env_home=tmp_path)
    assert built.returncode == 0, built.stderr
    query = tmp_path / "q.png"
    query.write_bytes(encode(pattern()))
    assert_one_line_error(run("search", str(tmp_path / "idx"), str(query), env_home=tmp_path), "fingerprint")


def test_nothing_embedded_exits_non_zero(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"")
    (tmp_path / "bad" / "b.png").write_bytes(b"nope")
    proc = run("embed", str(tmp_path / "bad"), "--out", str(tmp_path / "emb"), env_home=tmp_path)
    assert proc.returncode == 1 and "0 embedded, 2 skipped" in proc.stdout
    (tmp_path / "empty").mkdir()
    assert_one_line_error(run("embed", str(tmp_path / "empty"), "--out", str(tmp_path / "e2"), env_home=tmp_path),
                          "no images found")
    proc = run("index", "build", str(tmp_path / "emb"), "--out", str(tmp_path / "idx"), env_home=tmp_path)
    assert_one_line_error(proc, "no embedded images")


def test_invalid_settings_stop_the_start(tmp_path):
    proc = run("info", str(tmp_path), env_home=tmp_path, IMSEARCH_BATCH_SIZE="0", IMSEARCH_DEVICE="tpu")
    assert_one_line_error(proc, "invalid settings", "IMSEARCH_BATCH_SIZE", "IMSEARCH_DEVICE")


def test_every_line_says_what_happened_in_this_run(built):
    tmp, expected, embed, index = built
    home = tmp / "home"
    # info counts the duplicate embed reported (1x duplicate), not 0
    assert "1× duplicate" in embed.stdout
    assert "duplicates dropped=1" in run("info", str(tmp / "idx"), env_home=home).stdout
    # a Flat index trains nothing, and says so
    assert "nothing to train" in index.stderr and "training Flat" not in index.stderr
    # a rerun over a finished folder embeds nothing, and says so
    again = run("embed", str(tmp / "photos"), "--out", str(tmp / "emb"), env_home=home)
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"nothing to embed: all {expected['total']} images were done by an earlier run "
                                   f"({expected['embedded']} embedded, {expected['skipped']} skipped)"), again.stdout
    # a missing path is named as missing
    assert_one_line_error(run("embed", str(tmp / "no" / "such" / "dir"), "--out", str(tmp / "e3"), env_home=home),
                          "does not exist")
    # search says what it waits for while it loads
    query = tmp / "query.jpg"
    query.write_bytes(encode(pattern(120, 90, seed=3), "JPEG"))
    res = run("search", str(tmp / "idx"), str(query), "-k", "1", env_home=home)
    assert res.returncode == 0 and "loading the index" in res.stderr and f"loading model {DEFAULT_MODEL}" in res.stderr


def test_index_versions_lists_oldest_first_with_time_size_and_state(tmp_path):
    write_fake_embeddings(tmp_path / "emb", random_unit_vectors(50, 8, seed=1))
    home, idx = tmp_path / "home", tmp_path / "idx"
    for args in (("--version", "vA"), ("--version", "vB"), ("--out", f"{idx}/v2")):
        out = args if args[0] == "--out" else ("--out", str(idx), *args)
        assert run("index", "build", str(tmp_path / "emb"), *out, env_home=home).returncode == 0
    lines = [line for line in run("index", "versions", str(idx), env_home=home).stdout.splitlines() if line.strip()]
    assert [line[2:].split()[0] for line in lines] == ["vA", "vB", "v2"]  # by creation, not by name
    assert lines[0].endswith("earlier (rollback 1)") and lines[1].startswith("* vB") and lines[2].endswith("staged")
    assert all("50 vectors" in line and "1 shard(s)" in line and "Flat" in line for line in lines)


def test_search_where_finds_only_rows_of_the_filter_declared_at_build(built):
    tmp, _, _, _ = built
    home = tmp / "home"
    photos = sorted((tmp / "photos").glob("good-*.png"))
    pq.write_table(pa.table({"uri": [p.name for p in photos],  # relative to the folder given beside it
                             "category": ["a" if int(p.stem[-1]) < 3 else "b" for p in photos],
                             "price": [10.0 * int(p.stem[-1]) for p in photos]}), tmp / "items.parquet")
    embed = run("embed", str(tmp / "photos"), "--manifest", str(tmp / "items.parquet"), "--out",
                str(tmp / "emb-items"), env_home=home)  # the spelling: images folder + manifest
    assert embed.returncode == 0, embed.stderr
    wrong = run("index", "build", str(tmp / "emb-items"), "--out", str(tmp / "idx-x"), "--filterable", "colour",
                env_home=home)
    assert_one_line_error(wrong, "--filterable colour", "no column 'colour'", "category, price")
    index = run("index", "build", str(tmp / "emb-items"), "--out", str(tmp / "idx-items"), "--shards", "2",
                "--filterable", "category,price", env_home=home)
    assert index.returncode == 0, index.stderr
    assert "category (str), price (float)" in run("info", str(tmp / "idx-items"), env_home=home).stdout

    query = tmp / "query-b.png"
    query.write_bytes(encode(pattern(120, 90, seed=3).resize((100, 75))))  # good-3: category b
    res = run("search", str(tmp / "idx-items"), str(query), "-k", "3", "--json", "--where", 'category == "a"',
              env_home=home)
    assert res.returncode == 0, res.stderr
    found = [Path(r["uri"]).name for r in json.loads(res.stdout)["results"]]
    assert sorted(found) == ["good-0.png", "good-1.png", "good-2.png"]  # k hits, none of category b
    res = run("search", str(tmp / "idx-items"), str(query), "-k", "3", "--json", "--where",
              '{"category": "b", "price": {"gte": 40}}', env_home=home)
    assert [Path(r["uri"]).name for r in json.loads(res.stdout)["results"]] == ["good-4.png", "good-5.png"]
    bad = run("search", str(tmp / "idx-items"), str(query), "--where", "colour == 'red'", env_home=home)
    assert_one_line_error(bad, "unknown field 'colour'", "filterable: category, price")
