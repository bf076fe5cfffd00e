"""Combined queries (words and photos added and subtracted), --min_score and --paths, in search.py
and serve.py's API: each combined vector checked against the weighted sum computed by hand."""

import json
import os
from urllib.parse import quote

import numpy as np
import pytest
from test_serve import get_json, start
from tiny import make_checkpoint, photo

import encoder
import gallery
import search
from gallery import Term, parse_query
from index import GalleryIndex
from photos import read_image

NAMES = ["a.jpg", "b.png", "sub/c.webp", "my photo.jpg", "été/ça.png"]


@pytest.fixture(scope="module")
def setup(tiny_data, tmp_path_factory):
    """A querybank checkpoint, a folder of photos (spaces and non-ASCII in names) and its index."""
    tmp = tmp_path_factory.mktemp("query")
    ck = make_checkpoint(tmp / "m" / "best.pt", os.path.join(tiny_data, "text_encoder"), 3,
                         querybank=True, data_dir=tiny_data)
    folder = tmp / "photos"
    for i, name in enumerate(NAMES):
        photo(folder / name, i)
    photo(tmp / "outside.jpg", 9)  # not in the gallery
    return ck, folder, tmp


def run(capsys, setup, *argv):
    """search.main's rows (--json) over the fixture's folder, and its stderr."""
    ck, folder, tmp = setup
    capsys.readouterr()
    rc = search.main(["--checkpoint", ck, "--images_dir", str(folder), "--index_dir", str(tmp), "--device", "cpu",
                      "--num_workers", "0", "--top_k", "50", "--json", *map(str, argv)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return json.loads(out.out), out.err


def by_hand(setup, terms):
    """Scores {path: score} of every photo for sum_i w_i * e_i / |.|, terms [(w, text or Path)],
    minus the querybank bias when a term is words."""
    ck, folder, tmp = setup
    enc = encoder.TorchEncoder(ck, "cpu")
    v = np.zeros(enc.dim, np.float64)
    for w, t in terms:
        e = enc.encode_texts([t]) if isinstance(t, str) else enc.encode_images(read_image(t, enc.image_size)[None])
        v += w * e[0]
    v /= np.linalg.norm(v)
    ix = GalleryIndex.load(next(tmp.glob("index_*.npz")))
    scores = ix.emb.astype(np.float64) @ v
    if any(isinstance(t, str) for _, t in terms):
        scores -= ix.bias
    return {os.path.join(str(folder), p): s for p, s in zip(ix.paths, scores)}


def test_parse_query_terms_signs_and_weights():
    def photo_of(text):
        return "P" if text.endswith(".jpg") else None
    assert parse_query("a beach + ~/dog.jpg - 2:people", photo_of) == [
        Term(1.0, "a beach", None), Term(1.0, "~/dog.jpg", "P"), Term(-2.0, "people", None)]
    # hyphens inside words, a time and a drive letter are not signs or weights
    assert parse_query("a t-shirt at 10:30", photo_of) == [Term(1.0, "a t-shirt at 10:30", None)]
    assert parse_query("C:/x.jpg", photo_of) == [Term(1.0, "C:/x.jpg", "P")]
    assert parse_query("- people + 0.5:sunset", photo_of) == [Term(-1.0, "people", None), Term(0.5, "sunset", None)]
    for bad in ("a +", "a + - b", "+"):
        with pytest.raises(ValueError, match="empty term"):
            parse_query(bad, photo_of)


def test_combine_is_the_normalised_weighted_sum():
    e = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    want = 2 * e[0] - e[1] + 0.5 * e[2]
    assert np.allclose(gallery.combine([2, -1, 0.5], e), want / np.linalg.norm(want), atol=1e-6)
    assert (gallery.combine([1.0], e[:1]) == e[0]).all()  # one term: its own embedding
    with pytest.raises(ValueError, match="cancel out"):
        gallery.combine([1, -1], [e[0], e[0]])


def test_combined_query_scores_are_the_hand_computed_sum(setup, capsys):
    ck, folder, tmp = setup
    query = f"a red circle + {folder / 'a.jpg'} - 2:a blue square"
    rows, _ = run(capsys, setup, "--query", query)
    want = by_hand(setup, [(1, "a red circle"), (1, folder / "a.jpg"), (-2, "a blue square")])
    assert len(rows) == len(NAMES) and rows[0]["query"] == query
    assert {r["path"]: r["score"] for r in rows} == pytest.approx(want, abs=2e-4)
    assert [r["path"] for r in rows] == sorted(want, key=lambda p: -want[p])
    # photos alone: no querybank bias, as --image
    rows, _ = run(capsys, setup, "--query", f"{folder / 'a.jpg'} + 0.5:{folder / 'b.png'}")
    want = by_hand(setup, [(1, folder / "a.jpg"), (0.5, folder / "b.png")])
    assert {r["path"]: r["score"] for r in rows} == pytest.approx(want, abs=2e-4)


def test_a_query_of_one_photo_path_is_image(setup, capsys):
    ck, folder, tmp = setup
    for path in (folder / "sub" / "c.webp", tmp / "outside.jpg"):
        by_image, _ = run(capsys, setup, "--image", path)
        by_query, _ = run(capsys, setup, "--query", path)
        assert [{**r, "query": ""} for r in by_query] == [{**r, "query": ""} for r in by_image]
        assert by_image[0]["score"] > 0.99 or path.name == "outside.jpg"


def test_a_path_that_is_no_file_stays_words(setup, capsys):
    ck, folder, tmp = setup
    rows, err = run(capsys, setup, "--query", "missing/dog.jpg")
    assert "missing/dog.jpg is not a file; searched as words" in err
    want = by_hand(setup, [(1, "missing/dog.jpg")])
    assert {r["path"]: r["score"] for r in rows} == pytest.approx(want, abs=2e-4)


def test_min_score_keeps_the_hits_at_least_that(setup, capsys):
    full, _ = run(capsys, setup, "--query", "a green square")
    cut = full[2]["score"]  # the 3rd hit's score, as JSON rounds it: hits 1-3 score at least it
    rows, _ = run(capsys, setup, "--query", "a green square", "--min_score", cut)
    assert rows == full[:3]
    rows, _ = run(capsys, setup, "--query", "a green square", "--min_score", 5)
    assert rows == []
    ix = GalleryIndex("f", "/", 2)  # scores exact in float16: a hit at exactly min_score stays
    ix.emb, ix.paths = np.array([[1, 0], [0.5, 0.5], [0, 1]], np.float16), ["a", "b", "c"]
    assert gallery.top_hits(ix, [[1.0, 0.0]], 3, False, min_score=0.5) == [[(0, 1.0), (1, 0.5)]]
    # a score just below the one the JSON shows (0.5 in float16 is exact: 0.4999996 is not) still
    # passes that shown score; one a reported step below does not
    ix.emb = np.array([[1, 0], [0.4999996, 0], [0, 1]], np.float32)
    assert gallery.top_hits(ix, [[1.0, 0.0]], 3, False, min_score=0.5)[0][1][0] == 1
    assert len(gallery.top_hits(ix, [[1.0, 0.0]], 3, False, min_score=0.500001)[0]) == 1


def test_paths_prints_only_paths(setup, capsysbinary):
    ck, folder, tmp = setup
    os.makedirs(folder / "odd", exist_ok=True)
    odd = os.path.join(os.fsencode(folder), b"odd", b"\xff.jpg")  # a name that is not UTF-8
    photo(os.fsdecode(odd), 12)
    try:
        capsysbinary.readouterr()
        assert search.main(["--checkpoint", ck, "--images_dir", str(folder), "--index_dir", str(tmp / "p"),
                            "--device", "cpu", "--num_workers", "0", "--query", "a red circle", "--paths",
                            "--top_k", "50", "--min_score", "-5"]) == 0
        lines = capsysbinary.readouterr().out.split(b"\n")
        assert lines[-1] == b"" and len(lines) == len(NAMES) + 2  # one path per line, nothing else
        want = {os.fsencode(folder / n) for n in NAMES} | {odd}
        assert set(lines[:-1]) == want and all(os.path.isfile(p) for p in lines[:-1])
    finally:
        os.remove(odd)


def test_server_combines_indexed_photos_words_and_uploads(setup, capsys):
    ck, folder, tmp = setup
    server, library = start(tmp / "s", folder, ck)
    try:
        library.indexing.join()
        api = get_json(server, f"/api/search?k=50&q={quote('a red circle + sub/c.webp - 2:a blue square')}")
        want = by_hand(setup, [(1, "a red circle"), (1, folder / "sub" / "c.webp"), (-2, "a blue square")])
        assert {r["path"]: r["score"] for r in api["results"]} == pytest.approx(want, abs=2e-3)
        # a path outside the folder is words: the server reads no file a page names
        outside = str(tmp / "outside.jpg")
        api = get_json(server, f"/api/search?k=50&q={quote(outside)}")
        assert {r["path"]: r["score"] for r in api["results"]} == pytest.approx(
            by_hand(setup, [(1, outside)]), abs=2e-3)
        # an upload and "- words"; min_score keeps the hits at least it
        up = get_json(server, f"/api/image?k=50&q={quote('- a blue square')}", "POST", (folder / "b.png").read_bytes())
        want = by_hand(setup, [(1, folder / "b.png"), (-1, "a blue square")])
        assert {r["path"]: r["score"] for r in up["results"]} == pytest.approx(want, abs=2e-3)
        cut = sorted(want.values())[-2] - 1e-3
        up = get_json(server, f"/api/image?k=50&min_score={cut}&q={quote('- a blue square')}", "POST",
                      (folder / "b.png").read_bytes())
        assert len(up["results"]) == 2 and up["results"][0]["query"] == "upload - a blue square"
        for bad in ("q=x&min_score=abc", "q=x&min_score=nan", "q=a%20%2B%20"):
            assert get_json(server, f"/api/search?{bad}", status=400)["error"]
    finally:
        server.shutdown()
        server.server_close()
