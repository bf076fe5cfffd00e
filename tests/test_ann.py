"""helpers/ann.py against brute force on a few thousand clustered vectors: recall, exact scores, the bias,
incremental add and remove, and the file's round trip and refusals."""

import zlib

import numpy as np
import pytest

pytest.importorskip("faiss")  # faiss-cpu (requirements.txt)
from helpers import ann  # noqa: E402

faiss = ann.faiss

D = 64


def clustered(n, seed=0, clusters=30):
    """n unit vectors (n, D) float16 around `clusters` centres, like photos of a few subjects."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, D))
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)


def queries(n, seed=1):
    """Text-like queries: a noisy blend of two stored photos, so no photo matches exactly."""
    emb = clustered(3000)
    rng = np.random.default_rng(seed)
    q = emb[rng.integers(0, len(emb), n)].astype(np.float32) + emb[rng.integers(0, len(emb), n)]
    q += 0.3 * rng.standard_normal(q.shape)
    return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


def brute_top(emb, q, k, bias=None):
    s = q @ emb.astype(np.float32).T  # (Q, N)
    if bias is not None:
        s = s - bias
    return np.argsort(-s, axis=1, kind="stable")[:, :k], s


def recall(rows, truth):
    return np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(rows, truth)])


def test_agrees_with_brute_force_and_scores_are_exact():
    emb, q = clustered(3000), queries(50)
    ix = ann.build(emb, fingerprint="fp")
    assert ann.lists_for(3000) > 1 and len(ix) == 3000  # the IVF-PQ path, not the exact one
    ix.rerank = 64  # few candidates of 3,000, as the default's are of millions
    scores, rows = ix.search(q, 10, emb)
    truth, s = brute_top(emb, q, 10)
    assert recall(rows, truth) >= 0.9
    np.testing.assert_allclose(scores, np.take_along_axis(s, rows, 1), rtol=0, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 0).all()
    # Lists probed holding fewer than k photos: it visits them all rather than return fewer.
    ix.nprobe = 1
    _, rows = ix.search(q[:2], 300, emb)
    assert rows.shape == (2, 300) and all(len(set(r)) == 300 for r in rows.tolist())
    ix.nprobe = ann.NPROBE
    # A query equal to a stored photo finds that photo first.
    pick = [0, 7, 1234, 2999]
    _, rows = ix.search(emb[pick].astype(np.float32), 1, emb)
    assert rows[:, 0].tolist() == pick


def test_bias_is_subtracted_as_in_exact_search():
    emb, q = clustered(3000), queries(50)
    bias = np.random.default_rng(2).uniform(0, 0.5, len(emb)).astype(np.float32)  # spread beyond the top's gaps
    ix = ann.build(emb, bias, fingerprint="fp")
    ix.rerank = 60  # few candidates, as at scale: they must be chosen by score less bias too
    scores, rows = ix.search(q, 10, emb, bias)
    truth, s = brute_top(emb, q, 10, bias)
    assert recall(rows, truth) >= 0.9
    np.testing.assert_allclose(scores, np.take_along_axis(s, rows, 1), rtol=0, atol=1e-5)
    # Image queries on the same index rank without the bias.
    scores, rows = ix.search(q, 10, emb)
    assert recall(rows, brute_top(emb, q, 10)[0]) >= 0.9
    with pytest.raises(ValueError):
        ann.build(emb, fingerprint="fp").search(q, 10, emb, bias)


def test_allowed_rows_exactly_when_few_else_through_the_id_filter():
    emb, q = clustered(3000), queries(50)
    bias = np.random.default_rng(2).uniform(0, 0.5, len(emb)).astype(np.float32)
    ix = ann.build(emb, bias, fingerprint="fp")
    allowed = np.random.default_rng(5).random(len(emb)) < 0.1  # a date filter keeping a tenth
    ok = np.flatnonzero(allowed)
    truth, s = brute_top(emb[ok], q, 10, bias[ok])
    truth, s = ok[truth], np.take_along_axis(s, truth, 1)
    # Fewer allowed rows than exact_below: all of them scored, the brute-force answer.
    scores, rows = ix.search(q, 10, emb, bias, allowed, exact_below=len(ok) + 1)
    assert rows.tolist() == truth.tolist()
    np.testing.assert_allclose(scores, s, rtol=0, atol=1e-5)
    # Through FAISS's filter, with few lists visited: only allowed rows, and more lists visited for
    # a filter that keeps few, so recall holds (4 of 64 lists would find about half of them).
    ix.nprobe = 4
    scores, rows = ix.search(q, 10, emb, bias, allowed)
    assert allowed[rows].all() and recall(rows, truth) >= 0.9
    np.testing.assert_allclose(scores, (q[:, None, :] @ emb[rows].astype(np.float32).transpose(0, 2, 1))[:, 0]
                               - bias[rows], rtol=0, atol=1e-5)
    # Fewer allowed rows than k: all of them, either way.
    few = np.zeros(len(emb), bool)
    few[[5, 77, 2999]] = True
    for exact_below in (0, 10):
        rows = ix.search(q[:2], 10, emb, None, few, exact_below=exact_below)[1]
        assert rows.shape == (2, 3) and all(sorted(r) == [5, 77, 2999] for r in rows.tolist())


def test_add_and_remove_keep_gallery_row_numbers():
    emb, q = clustered(3000), queries(30)
    ix = ann.build(emb[:2000], fingerprint="fp")
    ix.add(emb[2000:])
    assert len(ix) == 3000
    assert recall(ix.search(q, 10, emb)[1], brute_top(emb, q, 10)[0]) >= 0.9
    gone = [3, 500, 501, 1999, 2000, 2998]
    ix.remove(gone)
    kept = np.delete(emb, gone, axis=0)  # how the gallery compacts its rows
    assert len(ix) == len(kept) == 2994
    scores, rows = ix.search(q, 10, kept)
    assert recall(rows, brute_top(kept, q, 10)[0]) >= 0.9
    # Each kept photo is found under its new row number; a removed one is no longer there.
    new_rows = [0, 3, 498, 1996, 2991, 2993]
    _, top = ix.search(kept[new_rows].astype(np.float32), 1, kept)
    assert top[:, 0].tolist() == new_rows
    scores, _ = ix.search(emb[gone].astype(np.float32), 1, kept)
    assert (scores[:, 0] < 0.999).all()


def test_small_galleries_are_exact():
    emb, q = clustered(5), queries(3)
    ix = ann.build(emb, fingerprint="fp")
    scores, rows = ix.search(q, 10, emb)
    truth, s = brute_top(emb, q, 5)
    assert rows.tolist() == truth.tolist()
    empty = ann.build(emb[:0], fingerprint="fp")
    assert empty.search(q, 10, emb[:0])[1].shape == (3, 0)
    empty.add(emb)
    assert empty.search(q, 10, emb)[1].tolist() == truth.tolist()
    assert not empty.needs_rebuild
    empty.add(clustered(4 * ann.FLAT_BELOW, seed=3))
    assert empty.needs_rebuild  # built for 0 photos, holding 4005: lists too long


def test_save_load_round_trip(tmp_path):
    emb, q = clustered(3000), queries(20)
    bias = np.random.default_rng(2).uniform(0, 0.5, len(emb)).astype(np.float32)
    ix = ann.build(emb, bias, fingerprint="fp1")
    path = str(tmp_path / "g.ann")
    ix.save(path)
    back = ann.load(path, "fp1")
    assert back is not None and len(back) == 3000 and back.has_bias and back.n_built == 3000
    # One query's lists are split over the threads (FAISS does not save that setting: load sets it).
    assert faiss.extract_index_ivf(back.index).parallel_mode == 1
    for b in (None, bias):
        s1, r1 = ix.search(q, 10, emb, b)
        s2, r2 = back.search(q, 10, emb, b)
        assert (r1 == r2).all() and (s1 == s2).all()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The bytes of a saved index of fingerprint fp1."""
    path = str(tmp_path_factory.mktemp("ann") / "g.ann")
    ann.build(clustered(3000), fingerprint="fp1").save(path)
    return open(path, "rb").read()


@pytest.mark.parametrize("fault, says", [
    ("truncated", "truncated"), ("flipped", "damaged"), ("foreign", "not an approximate"),
    ("fingerprint", "another checkpoint"), ("unreadable", "cannot read"), ("missing", "cannot read")])
def test_refusals(tmp_path, saved, fault, says):
    path = str(tmp_path / "g.ann")
    data = bytearray(saved)
    if fault == "truncated":
        data = data[:len(data) // 2]
    elif fault == "flipped":
        data[len(data) // 2] ^= 0xFF
    elif fault == "foreign":
        data = b"PK\x03\x04 a zip or a checkpoint, not ours" + bytes(1000)
    elif fault == "unreadable":  # whole and checksummed, but FAISS cannot parse it (another version's format)
        blob = b"IwXX" + bytes(100)
        trailer = len(blob).to_bytes(8, "little") + zlib.crc32(blob).to_bytes(4, "little")
        data = data[:data.index(b"}") + 1] + blob + trailer
    if fault == "missing":
        path = str(tmp_path / "none.ann")
    else:
        open(path, "wb").write(bytes(data))
    said = []
    assert ann.load(path, "fp2" if fault == "fingerprint" else "fp1", log=said.append) is None
    assert len(said) == 1 and says in said[0], said
