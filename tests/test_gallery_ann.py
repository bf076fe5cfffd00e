"""search.py and serve.py through the approximate index (--ann): the same hits and scores as exact
search, kept in step with the gallery index across runs, rebuilt when its file does not match,
and the date filter and min_score on that path. A small gallery gets helpers/ann.py's one exact list, so
its rankings must equal exact search's exactly; helpers/ann.py's own tests cover the compressed codes."""

import json
import os
import time

import numpy as np
import pytest
from tiny import make_checkpoint, photo

pytest.importorskip("faiss")  # faiss-cpu (requirements.txt)
import gallery  # noqa: E402
import index  # noqa: E402
import search  # noqa: E402
from helpers import ann  # noqa: E402
from index import GalleryIndex  # noqa: E402


@pytest.fixture(scope="module")
def ckpt(tiny_data, tmp_path_factory):
    """A querybank checkpoint: text queries subtract each photo's bias, which the index stores too."""
    tmp = tmp_path_factory.mktemp("ann_ckpt")
    return make_checkpoint(tmp / "m" / "best.pt", os.path.join(tiny_data, "text_encoder"), 4,
                           querybank=True, data_dir=tiny_data)


@pytest.fixture
def folder(tmp_path):
    """12 photos, taken (by their mtime) on the 1st to the 12th of March 2021, local time."""
    d = tmp_path / "photos"
    for i in range(12):
        path = photo(d / f"p{i:02d}.jpg", 40 + i)
        stamp = time.mktime((2021, 3, i + 1, 12, 0, 0, 0, 0, -1))
        os.utime(path, (stamp, stamp))
    return d


@pytest.fixture
def builds(monkeypatch):
    """How many photos each ann.build call indexed."""
    calls, real = [], ann.build

    def counting(emb, *a, **k):
        calls.append(len(emb))
        return real(emb, *a, **k)
    monkeypatch.setattr(ann, "build", counting)
    return calls


def run(capsys, ckpt, folder, index_dir, *argv):
    """search.py --json's rows as (path, score), and its stderr."""
    capsys.readouterr()
    rc = search.main(["--checkpoint", ckpt, "--images_dir", str(folder), "--index_dir", str(index_dir),
                      "--device", "cpu", "--num_workers", "0", "--json", "--top_k", "20", *map(str, argv)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return [(r["path"], r["score"]) for r in json.loads(out.out)], out.err


def same(a, b):
    assert [p for p, _ in a] == [p for p, _ in b]
    assert [s for _, s in a] == pytest.approx([s for _, s in b], abs=2e-6)


def test_ann_gives_exact_search_hits_and_the_image_query_finds_itself(capsys, ckpt, folder, tmp_path, builds):
    exact, _ = run(capsys, ckpt, folder, tmp_path, "--query", "a red circle")
    assert not list(tmp_path.glob("*.ann"))  # 12 photos: exact search, no approximate index
    approx, _ = run(capsys, ckpt, folder, tmp_path, "--query", "a red circle", "--ann")
    assert len(exact) == 12 and builds == [12] and len(list(tmp_path.glob("*.ann"))) == 1
    same(approx, exact)
    target = folder / "p05.jpg"
    hits, _ = run(capsys, ckpt, folder, tmp_path, "--image", target, "--ann")
    assert hits[0][0] == str(target) and hits[0][1] == pytest.approx(1.0, abs=1e-3)
    same(hits, run(capsys, ckpt, folder, tmp_path, "--image", target)[0])
    assert builds == [12]  # the saved one served the later runs


def test_ann_follows_photos_added_changed_and_removed(capsys, ckpt, folder, tmp_path, builds):
    query = ("--query", "a blue square", "--ann")
    run(capsys, ckpt, folder, tmp_path / "kept", *query)
    photo(folder / "new.jpg", 70)  # added
    photo(folder / "p03.jpg", 71)  # changed
    os.utime(folder / "p03.jpg", ns=(1, 2))
    os.remove(folder / "p07.jpg")  # removed
    os.remove(folder / "p00.jpg")
    kept, err = run(capsys, ckpt, folder, tmp_path / "kept", *query)
    assert builds == [12] and "rebuilding" not in err  # followed with ann's add and remove, not built again
    fresh, _ = run(capsys, ckpt, folder, tmp_path / "fresh", *query)
    exact, _ = run(capsys, ckpt, folder, tmp_path / "exact", *query[:2])
    assert builds == [12, 11] and len(kept) == 11 and "new.jpg" in {os.path.basename(p) for p, _ in kept}
    same(kept, fresh)
    same(kept, exact)
    # The file on disk is the followed index: a run with nothing new reads it and builds nothing.
    again, _ = run(capsys, ckpt, folder, tmp_path / "kept", *query)
    same(again, exact)
    assert builds == [12, 11]


def test_stale_foreign_and_truncated_ann_files_are_rebuilt(capsys, ckpt, folder, tmp_path, builds):
    query = ("--query", "a green circle")
    run(capsys, ckpt, folder, tmp_path, *query, "--ann")
    ann_file = next(tmp_path.glob("*.ann"))
    # Stale: a run without --ann indexes a new photo; the approximate index stays as it was.
    photo(folder / "later.jpg", 80)
    exact, _ = run(capsys, ckpt, folder, tmp_path, *query)
    got, err = run(capsys, ckpt, folder, tmp_path, *query, "--ann")
    assert "another checkpoint or gallery" in err and builds == [12, 13]
    same(got, exact)
    good = ann_file.read_bytes()
    for fault, says in ((good[:len(good) // 2], "truncated"), (b"not an index at all" * 10, "not an approximate")):
        ann_file.write_bytes(fault)
        got, err = run(capsys, ckpt, folder, tmp_path, *query, "--ann")
        assert says in err, err
        same(got, exact)
    assert builds == [12, 13, 13, 13]
    assert ann_file.read_bytes()[:len(ann.MAGIC)] == ann.MAGIC  # written whole again


@pytest.mark.parametrize("ann_from", [gallery.ANN_FROM, 0])  # 0: through FAISS's ID filter, not exact fallback
def test_date_filter_and_min_score_through_ann_equal_exact(capsys, ckpt, folder, tmp_path, monkeypatch, ann_from):
    monkeypatch.setattr(gallery, "ANN_FROM", ann_from)
    cut = ("--after", "2021-03-03", "--before", "2021-03-10")  # the 3rd to the 9th: 7 photos
    for query in (("--query", "a yellow square"), ("--image", folder / "p04.jpg")):
        every, _ = run(capsys, ckpt, folder, tmp_path / "exact", *query)
        scores = sorted(s for _, s in every)
        floor = (scores[5] + scores[6]) / 2  # a min_score that keeps half, far from any score
        exact, _ = run(capsys, ckpt, folder, tmp_path / "exact", *query, *cut, "--min_score", floor)
        approx, _ = run(capsys, ckpt, folder, tmp_path / "ann", *query, *cut, "--min_score", floor, "--ann")
        same(approx, exact)
        # What the filters should leave, from the unfiltered ranking by hand.
        want = [(p, s) for p, s in every if 3 <= int(os.path.basename(p)[1:3]) + 1 <= 9 and s >= floor]
        same(approx, want)
        assert 0 < len(want) < 7


def test_serve_searches_through_ann_as_search_py(capsys, ckpt, folder, tmp_path):
    from test_serve import start
    server, library = start(tmp_path, folder, ckpt)
    library.gallery.args.ann = True
    try:
        library.indexing.join()
        library.rescan()  # the background indexing with --ann: follows, or builds, the approximate index
        library.indexing.join()
        assert library.gallery.ann is not None and len(library.gallery.ann) == 12
        got = library.search_text("a red square", 20)["results"]
    finally:
        server.shutdown()
        server.server_close()
    exact, _ = run(capsys, ckpt, folder, tmp_path / "exact", "--query", "a red square")
    same([(r["path"], r["score"]) for r in got], exact)
    assert os.path.exists(library.gallery.ann_path)


def test_an_index_of_the_previous_version_is_read_and_written_anew(capsys, ckpt, folder, tmp_path):
    first, _ = run(capsys, ckpt, folder, tmp_path, "--query", "a red circle")
    path = next(tmp_path.glob("index_*.npz"))
    with np.load(path) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(arrays["meta"].tobytes())
    npy = tmp_path / meta["embeddings"]
    arrays["embeddings"] = np.load(npy)  # version 5 kept the embeddings in the .npz
    arrays["meta"] = np.frombuffer(json.dumps({**meta, "version": 5}).encode(), np.uint8)
    np.savez(path, **arrays)
    os.remove(npy)
    old = GalleryIndex.load(path)
    assert old.version == 5 and len(old) == 12 and not isinstance(old.emb, np.memmap)
    again, _ = run(capsys, ckpt, folder, tmp_path, "--query", "a red circle")
    same(again, first)
    new = GalleryIndex.load(path)
    assert new.version == index.INDEX_VERSION and isinstance(new.emb, np.memmap)
    assert np.array_equal(new.emb, old.emb)
    photo(folder / "more.jpg", 99)  # a change: a new generation, whose .npy replaces the last one's
    run(capsys, ckpt, folder, tmp_path, "--query", "a red circle")
    newer = GalleryIndex.load(path)
    assert newer.generation != new.generation and len(newer) == 13
    assert [p.name for p in tmp_path.glob("index_*.npy")] == [os.path.basename(newer.emb_file)]
