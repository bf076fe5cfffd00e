"""Search over your own photos: decoding odd files, the incremental index, exact top-k, the CLI."""

import json
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from tiny import make_checkpoint, photo

import dataset
import encoder
import gallery
import index
import photos as photos_module
import search
from dataset import read_image
from index import GalleryIndex, scan_folder
from model import DualEncoder


@pytest.fixture(scope="module")
def ckpts(tiny_data, tmp_path_factory):
    """Two checkpoints with different image weights, both named best.pt."""
    root = tmp_path_factory.mktemp("ckpts")
    enc = os.path.join(tiny_data, "text_encoder")
    return make_checkpoint(root / "a" / "best.pt", enc, 0), make_checkpoint(root / "b" / "best.pt", enc, 1)


@pytest.fixture
def photos(tmp_path):
    d = tmp_path / "photos"
    for i, name in enumerate(["a.jpg", "b.png", "sub/c.webp", "sub/deeper/d.JPG"]):
        photo(d / name, i)
    photo(d / ".thumbnails" / "x.jpg", 9)  # hidden: not a photo of the collection
    (d / "notes.txt").write_text("not a photo")
    return d


def run(capsys, *argv):
    """search.main's return code, stdout and stderr."""
    capsys.readouterr()
    rc = search.main([*map(str, argv), "--device", "cpu", "--num_workers", "0"])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture
def encoded(monkeypatch):
    """The number of photo files each indexing pass decodes."""
    calls = []
    real = index.encode_image_files

    def counting(enc, paths, *a, **k):
        calls.append(len(paths))
        return real(enc, paths, *a, **k)
    monkeypatch.setattr(index, "encode_image_files", counting)
    return calls


# ---------------------------------------------------------------------------- decoding

def pixels(path, size):
    """dataset.read_image as an int array (size, size, 3), to compare with RGB triples."""
    return read_image(path, size).permute(1, 2, 0).numpy().astype(int)


def test_odd_image_modes_decode_to_sensible_rgb(tmp_path):
    def load(name, img, **save):
        img.save(tmp_path / name, **save)
        return pixels(tmp_path / name, 16)
    assert (load("g.png", Image.new("L", (20, 20), 100)) == 100).all()
    # 16-bit greyscale: mid-grey must stay mid-grey, not clip to white
    g16 = Image.fromarray(np.full((20, 20), 128 * 257, dtype=np.uint16))
    assert (load("g16.png", g16) == 128).all()
    cyan = load("cmyk.jpg", Image.new("CMYK", (20, 20), (255, 0, 0, 0)), quality=95)
    assert np.abs(cyan - [0, 255, 255]).max() < 12
    # a palette image whose right half is transparent: that half shows white
    pal = Image.new("P", (20, 20), 0)
    pal.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    pal.paste(1, (10, 0, 20, 20))
    out = load("pal.png", pal, transparency=1)
    assert (out[:, :6] == [255, 0, 0]).all() and (out[:, 10:] == 255).all()
    assert (load("rgba.png", Image.new("RGBA", (20, 20), (0, 0, 0, 0))) == 255).all()
    frames = [Image.new("RGB", (20, 20), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    first = pixels(tmp_path / "anim.gif", 16)
    assert np.abs(first - [255, 0, 0]).max() < 10  # the first frame
    assert load("w.webp", Image.new("RGB", (30, 20), (10, 200, 10)), quality=95).shape == (16, 16, 3)


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (64, 32), (220, 20, 20))
    img.paste((20, 20, 220), (32, 0, 64, 32))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    img.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    img.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.jpg", quality=95)  # 32x64, red on top
    got = pixels(tmp_path / "rot.jpg", 32)
    assert np.abs(got - pixels(tmp_path / "upright.jpg", 32)).mean() < 6
    assert got[2, 16, 0] > 150 and got[-3, 16, 2] > 150  # red at the top, blue at the bottom


def test_every_way_in_decodes_the_same_pixels(tmp_path):
    """Datasets (from the files or the cache), the gallery index and --image all decode through
    dataset.read_image, which keeps what training saw: shorter side to size, centre crop, bilinear."""
    folder = tmp_path / "images"
    folder.mkdir()
    wide = Image.new("RGB", (64, 32), (220, 20, 20))
    wide.paste((20, 200, 20), (16, 0, 48, 32))  # red | green | red: the centre crop is green
    wide.save(folder / "wide.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 30, 3), dtype=np.uint8)).save(
        folder / "tall.jpg", quality=90)
    Image.new("CMYK", (30, 20), (255, 0, 0, 0)).save(folder / "cmyk.jpg", quality=95)
    pal = Image.new("P", (20, 30), 0)
    pal.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
    pal.paste(1, (10, 0, 20, 30))
    pal.save(folder / "pal.png", transparency=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    wide.save(folder / "rot.jpg", exif=exif, quality=95)
    names = sorted(os.listdir(folder))
    (tmp_path / "captions.csv").write_text("image,caption,split\n" + "".join(f"{n},a photo,val\n" for n in names))
    dataset.build_image_cache(str(tmp_path), "val", 16)
    cached = dataset.ImageStore(str(tmp_path), names, 16, "val")
    files = dataset.ImageStore(str(tmp_path), names, 16)
    assert cached.cache is not None and files.cache is None
    for i, n in enumerate(names):
        fit = ImageOps.fit(photos_module.open_rgb(folder / n, 16), (16, 16), Image.Resampling.BILINEAR)
        want = torch.from_numpy(np.array(fit)).permute(2, 0, 1)  # (3, 16, 16)
        got = read_image(folder / n, 16)
        indexed, err = photos_module.read_or_blank(str(folder / n), 16)  # the gallery index's and uploads' way
        assert got.dtype == torch.uint8 and torch.equal(got, want), n
        assert torch.equal(cached[i], want) and torch.equal(files[i], want), n
        assert indexed.dtype == np.uint8 and not err and (indexed == want.numpy()).all(), n
    assert (pixels(folder / "wide.png", 16)[:, 2:-2] == [20, 200, 20]).all()
    assert (pixels(folder / "pal.png", 16)[:, -4:] == 255).all()  # the transparent half, on white


def test_decompression_bomb_is_unreadable(tmp_path, monkeypatch):
    path = photo(tmp_path / "big.jpg", 0, size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 pixels: past the warning, below the error
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # Pillow's own, at open
        with pytest.raises(Image.DecompressionBombError):
            read_image(path, 16)
        img, err = photos_module.read_or_blank(path, 16)
    assert "DecompressionBomb" in err and img.shape == (3, 16, 16)


# ---------------------------------------------------------------------------- the index

def test_index_is_incremental(photos, ckpts, encoded, tmp_path):
    enc = encoder.TorchEncoder(ckpts[0], "cpu")
    fp = enc.fingerprint
    # The mirror-image averaging and the photo side change every embedding: another index.
    sha = enc.checkpoint_sha
    assert fp == encoder.index_key(sha, 32, False)
    assert len({fp, encoder.index_key(sha, 32, True), encoder.index_key(sha, 40, False)}) == 3
    ix = GalleryIndex(fp, str(photos), 32)

    def update():
        return ix.update(scan_folder(photos), enc)
    r = update()
    assert sorted(ix.paths) == ["a.jpg", "b.png", "sub/c.webp", "sub/deeper/d.JPG"]
    assert (r["added"], encoded) == (4, [4])
    assert not update()["changed"] and encoded == [4]  # nothing new: nothing decoded

    photo(photos / "new.jpg", 10)
    before = ix.emb[ix.paths.index("a.jpg")].copy()
    photo(photos / "a.jpg", 11)
    os.utime(photos / "a.jpg", ns=(1, 2))  # a changed file, whatever the clock's resolution
    os.remove(photos / "b.png")
    r = update()
    assert (r["added"], r["updated"], r["removed"], encoded[-1]) == (1, 1, 1, 2)
    assert sorted(ix.paths) == ["a.jpg", "new.jpg", "sub/c.webp", "sub/deeper/d.JPG"]
    assert not np.array_equal(ix.emb[ix.paths.index("a.jpg")], before)
    assert len(ix.emb) == len(ix.stats) == 4
    # Each row is its own photo's embedding, whatever the order the updates left the rows in.
    for p, row in zip(ix.paths, ix.emb):
        want = enc.encode_images(read_image(photos / p, 32).numpy()[None])[0]
        assert np.abs(row.astype(np.float32) - want).max() < 2e-3, p

    ix.save(tmp_path / "ix.npz")
    back = GalleryIndex.load(tmp_path / "ix.npz")
    assert back.paths == ix.paths and np.array_equal(back.emb, ix.emb) and back.fingerprint == fp
    assert back.emb.dtype == np.float16 and not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


def test_moved_renamed_and_duplicate_photos_are_not_encoded_again(photos, ckpts, encoded, tmp_path, capsys):
    argv = ("--checkpoint", ckpts[0], "--images_dir", photos, "--query", "x", "--index_dir", tmp_path, "--json")
    run(capsys, *argv)
    first = GalleryIndex.load(next(tmp_path.glob("index_*.npz")))
    os.rename(photos / "a.jpg", photos / "sub" / "moved.jpg")  # moved and renamed
    shutil.copy(photos / "b.png", photos / "b copy.png")  # a copy of an indexed photo
    photo(photos / "new.jpg", 30, size=(400, 300))  # larger than the fingerprint's two ends
    shutil.copy(photos / "new.jpg", photos / "new again.jpg")  # a new photo, twice
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and encoded == [4, 1]  # only the new photo, once
    assert "(4 added, 1 removed, 3 reused)" in err
    ix = GalleryIndex.load(next(tmp_path.glob("index_*.npz")))
    row = {p: e for p, e in zip(ix.paths, ix.emb)}
    assert np.array_equal(row["sub/moved.jpg"], first.emb[first.paths.index("a.jpg")])
    assert np.array_equal(row["b copy.png"], row["b.png"]) and np.array_equal(row["new again.jpg"], row["new.jpg"])
    enc = encoder.TorchEncoder(ckpts[0], "cpu")
    for p, e in row.items():  # each its own photo's embedding
        want = enc.encode_images(read_image(photos / p, 32).numpy()[None])[0]
        assert np.abs(e.astype(np.float32) - want).max() < 2e-3, p
    photo(photos / "new again.jpg", 31, size=(400, 300))  # the same size, other content: encoded
    os.utime(photos / "new again.jpg", ns=(1, 2))
    run(capsys, *argv)
    assert encoded == [4, 1, 1]


def test_damaged_or_foreign_index_files_are_not_read(tmp_path):
    ix = GalleryIndex("fp", "/photos", 8)
    ix.emb, ix.paths, ix.stats = np.ones((2, 8), np.float16), ["a.jpg", "b.jpg"], np.zeros((2, 2), np.int64)
    ix.fps, ix.taken = np.zeros((2, 16), np.uint8), np.zeros(2, np.int64)
    ix.save(tmp_path / "ix.npz")
    good = (tmp_path / "ix.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.npz").write_text("not an index")
    np.savez(tmp_path / "foreign.npz", embeddings=np.ones((2, 8), np.float16))  # an array file, not ours
    assert GalleryIndex.load(tmp_path / "ix.npz").paths == ["a.jpg", "b.jpg"]
    for name in ("cut.npz", "text.npz", "foreign.npz", "missing.npz"):
        assert GalleryIndex.load(tmp_path / name) is None, name
    logged = []
    fresh = GalleryIndex.open(str(tmp_path / "cut.npz"), "fp", "/photos", 8, "best.pt", logged.append)
    assert len(fresh) == 0 and "damaged" in logged[0]


def test_top_k_equals_brute_force_float32():
    rng = np.random.default_rng(0)

    def unit(n):
        x = rng.standard_normal((n, 64)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)
    x = unit(20_000)  # (N, D) float32
    ix = GalleryIndex("fp", "/", 64)
    ix.emb = x.astype(np.float16)
    ix.paths = [str(i) for i in range(len(x))]
    q = unit(3)
    stored = ix.emb.astype(np.float32)
    for queries in (q[:1], q):
        scores, rows = ix.top_k(queries, 10, chunk_rows=3001)  # a ragged last chunk, many merges
        ref = queries @ x.T  # (Q, N) over the float32 originals
        kth = np.sort(ref, axis=1)[:, -10:-9]
        assert rows.shape == (len(queries), 10) and all(len(set(r)) == 10 for r in rows.tolist())
        assert (np.take_along_axis(ref, rows, 1) >= kth - 1e-3).all()  # the true top 10, up to float16 ties
        assert np.allclose(scores, np.take_along_axis(ref, rows, 1), atol=1e-3)
        assert (scores[:, :-1] >= scores[:, 1:]).all()
        exact = queries @ stored.T  # float32 over the stored vectors
        want = np.argsort(-exact, axis=1, kind="stable")[:, :10]
        assert np.array_equal(rows, want) and np.allclose(scores, np.take_along_axis(exact, want, 1), atol=1e-6)
    scores, rows = ix.top_k(q, 50_000)
    assert rows.shape == (3, 20_000) and sorted(rows[0].tolist()) == list(range(20_000))  # the whole gallery

    # A querybank bias per photo is subtracted before ranking (large enough to reorder the top).
    bias = (0.3 * rng.random(len(x))).astype(np.float32)
    for queries in (q[:1], q):
        scores, rows = ix.top_k(queries, 10, chunk_rows=3001, bias=bias)
        exact = queries @ stored.T - bias
        want = np.argsort(-exact, axis=1, kind="stable")[:, :10]
        assert np.array_equal(rows, want) and np.allclose(scores, np.take_along_axis(exact, want, 1), atol=1e-6)
        assert not np.array_equal(rows, ix.top_k(queries, 10, chunk_rows=3001)[1])


def test_flickr8k_listing_is_kept_until_captions_csv_changes(tmp_path, monkeypatch):
    """The names captions.csv lists are kept beside the index under the file's path and stat:
    while it is unchanged they are read back without parsing; any rewrite (one that keeps the
    size and restores the modification time included) or another data folder parses again,
    and the test split is listed apart."""
    data, other, cache = tmp_path / "data", tmp_path / "other", tmp_path / "names_best_all.npz"
    for folder, name in ((data, "a.jpg"), (other, "o.jpg")):
        folder.mkdir()
        (folder / "captions.csv").write_text(f'image,caption,split\nb.jpg,"a dog, running",train\n{name},a cat,test\n')
    captions = data / "captions.csv"
    assert gallery.gallery_images(data, False, cache) == ["a.jpg", "b.jpg"] and cache.exists()
    assert gallery.gallery_images(data, True, cache) == ["a.jpg"]
    with monkeypatch.context() as m:
        m.setattr(gallery.csv, "reader", None)  # parsing now fails: only the kept names can answer
        assert gallery.gallery_images(data, True, cache) == ["a.jpg"]
    assert gallery.gallery_images(other, False, cache) == ["b.jpg", "o.jpg"]  # the same cache file
    assert gallery.gallery_images(data, False, cache) == ["a.jpg", "b.jpg"]
    st = captions.stat()
    captions.write_text(captions.read_text().replace("a.jpg", "x.jpg"))  # the same size
    os.utime(captions, ns=(st.st_atime_ns, st.st_mtime_ns))  # and time
    assert gallery.gallery_images(data, False, cache) == ["b.jpg", "x.jpg"]
    captions.write_text(captions.read_text() + "c.jpg,a bird,val\n")
    assert gallery.gallery_images(data, False, cache) == ["b.jpg", "c.jpg", "x.jpg"]


def test_top_k_searches_the_rows_as_they_are_now(monkeypatch):
    """Exact search keeps a float32 copy of the rows between queries: once an update replaces
    them (photos removed, or as many photos with other embeddings), no query may be answered
    from the copy of the rows before; past F32_BYTES the chunked conversion ranks alike."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    ix = GalleryIndex("fp", "/", 32)
    ix.emb, ix.paths = x.astype(np.float16), [str(i) for i in range(len(x))]
    q = x[[7, 300]]  # each query is a photo of the gallery: its own row comes first

    def brute(emb):
        s = q @ emb.astype(np.float32).T
        return np.argsort(-s, axis=1, kind="stable")[:, :5]

    def searched_thrice():  # the first search converts chunk by chunk, the next ones read the copy
        runs = [ix.top_k(q, 5) for _ in range(3)]
        assert all(np.array_equal(r[1], brute(ix.emb)) for r in runs)
        assert all(np.array_equal(r[0], runs[0][0]) for r in runs)
        return runs[-1]
    assert searched_thrice()[1][:, 0].tolist() == [7, 300] and ix.float32(ix.emb) is not None
    ix.emb, ix.paths = np.delete(ix.emb, [7, 300], axis=0), ix.paths[:-2]  # as update() drops rows
    searched_thrice()
    ix.emb = rng.permutation(ix.emb)  # the same shape, other rows in each place
    with_copy = searched_thrice()
    monkeypatch.setattr(index, "F32_BYTES", 0)  # no copy: every search converts chunk by chunk
    capped = GalleryIndex("fp", "/", 32)
    capped.emb, capped.paths = ix.emb, ix.paths
    for _ in range(2):
        chunked = capped.top_k(q, 5, chunk_rows=128)
        assert np.array_equal(chunked[1], with_copy[1]) and np.array_equal(chunked[0], with_copy[0])
    assert capped.float32(capped.emb) is None


# ---------------------------------------------------------------------------- the command line

def test_image_query_finds_itself_first_and_saves_a_grid(photos, ckpts, tmp_path, capsys):
    rc, out, err = run(capsys, "--checkpoint", ckpts[0], "--images_dir", photos, "--image", photos / "sub" / "c.webp",
                       "--top_k", "3", "--output_dir", tmp_path / "res")
    assert rc == 0
    first = out.splitlines()[1].split()
    assert first[2] == os.path.join(str(photos), "sub/c.webp") and float(first[1]) > 0.999
    assert len(out.splitlines()) == 4
    assert (tmp_path / "res" / "search_image_c.png").stat().st_size > 5_000
    ckpt_dir = os.path.dirname(ckpts[0])
    assert any(n.startswith("index_best_photos-") for n in os.listdir(ckpt_dir))  # beside the checkpoint


def test_the_grid_shows_each_photo_whole_and_in_rank_order(tmp_path):
    """The query photo, then the hits row by row in a near-square grid: each photo shrunk to fit
    its square (never stretched or enlarged), the photos of a row level with one another, and a
    gap where a hit's file is gone."""
    sizes = [(1200, 800), (600, 900), (500, 500), (2000, 300), (120, 90)]
    colours = [(230, 20, 20), (20, 200, 20), (20, 20, 230), (200, 200, 20), (200, 20, 200)]
    paths = [str(tmp_path / f"{i}.png") for i in range(len(sizes))]
    for path, size, colour in zip(paths, sizes, colours):
        Image.new("RGB", size, colour).save(path)
    out = tmp_path / "grid.png"
    search.save_grid(paths[1:] + [str(tmp_path / "gone.jpg")], [0.9, 0.8, 0.7, 0.6, 0.5], out, "a title", paths[0])
    grid = np.asarray(Image.open(out).convert("RGB")).astype(int)
    boxes = []  # (top, left, height, width) of each photo in the grid
    for (w, h), colour in zip(sizes, colours):
        ys, xs = np.nonzero(np.abs(grid - colour).sum(2) <= 6)
        box = (ys.min(), xs.min(), ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min())
        assert len(ys) == box[2] * box[3]  # one solid rectangle: the photo whole, nowhere else
        scale = min(1, search.GRID_PHOTO / max(w, h))
        assert abs(box[3] - w * scale) <= 1 and abs(box[2] - h * scale) <= 1, (colour, box)
        boxes.append(box)
    # 6 panels (the query, 5 hits): 3 columns, 2 rows; the gone photo is the last panel's gap
    first_row, second_row = boxes[:3], boxes[3:]
    assert len({b[0] for b in first_row}) == 1 and len({b[0] for b in second_row}) == 1
    assert second_row[0][0] > first_row[0][0] + max(b[2] for b in first_row)
    for row in (first_row, second_row):
        assert all(a[1] + a[3] < b[1] for a, b in zip(row, row[1:]))  # left to right, apart
    assert abs((second_row[0][1] + second_row[0][3] / 2) - (first_row[0][1] + first_row[0][3] / 2)) <= 1


def test_corrupt_files_are_skipped_listed_and_not_retried(photos, ckpts, tmp_path, capsys, encoded):
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (photos / "empty.png").write_bytes(b"")
    good = (photos / "a.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(good[: len(good) // 2])
    argv = ("--checkpoint", ckpts[0], "--images_dir", photos, "--query", "a red circle", "--index_dir", tmp_path,
            "--json")
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and "skipped 3 unreadable files" in err
    assert all(name in err for name in ("broken.jpg", "empty.png", "cut.jpg"))
    hits = {os.path.basename(r["path"]) for r in json.loads(out)}
    assert hits == {"a.jpg", "b.png", "c.webp", "d.JPG"}
    rc, out, err = run(capsys, *argv)
    assert encoded == [7] and "skipped 3 unreadable files" in err  # reported again, not decoded again
    photo(photos / "broken.jpg", 20)  # repaired: indexed on the next run
    rc, out, err = run(capsys, *argv)
    assert encoded == [7, 1] and "skipped 2" in err and len(json.loads(out)) == 5


def test_queries_file_json_shape(photos, ckpts, tmp_path, capsys):
    queries = tmp_path / "q.txt"
    queries.write_text("a red circle\n\n  犬が走る 🐕  \n" + "a very long query " * 300 + "\n", encoding="utf-8")
    rc, out, err = run(capsys, "--checkpoint", ckpts[0], "--images_dir", photos, "--queries", queries,
                       "--top_k", "50", "--json", "--output_dir", tmp_path / "res")
    records = json.loads(out)  # stdout is nothing but the JSON
    assert rc == 0 and len(records) == 3 * 4  # 3 queries, top 50 capped at the 4 photos
    assert all(set(r) == {"query", "rank", "path", "score"} for r in records)
    assert [r["query"] for r in records[4:8]] == ["犬が走る 🐕"] * 4
    for i in range(3):
        block = records[4 * i:4 * i + 4]
        assert [r["rank"] for r in block] == [1, 2, 3, 4]
        assert all(a["score"] >= b["score"] for a, b in zip(block, block[1:]))
        assert all(os.path.isfile(r["path"]) and isinstance(r["score"], float) for r in block)
    assert not (tmp_path / "res").exists()  # --queries and --json save no grids


def test_text_query_with_odd_text_saves_a_grid(photos, ckpts, tmp_path, capsys):
    for query, top_k in (("犬が走る", 1), ("a dog " * 200, 25)):
        rc, out, err = run(capsys, "--checkpoint", ckpts[0], "--images_dir", photos, "--query", query,
                           "--top_k", top_k, "--output_dir", tmp_path)
        assert rc == 0 and out.startswith(f"top {min(top_k, 4)} of 4 photos")
    grids = sorted(p.name for p in tmp_path.glob("search_*.png"))
    assert len(grids) == 2 and all(len(g) < 90 for g in grids), grids


@pytest.mark.parametrize("output", ["--json", "--paths"])
def test_a_reader_that_leaves_early_gets_no_traceback(photos, ckpts, tmp_path, output):
    """`search.py --json | head -1`: the pipe's reader gone before the results are written (here
    closed before the run starts, so the write always fails) is an exit of 141, without a traceback."""
    read, write = os.pipe()
    os.close(read)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "search.py", "--checkpoint", ckpts[0], "--images_dir", photos, "--query",
                        "a red circle", output, "--index_dir", tmp_path, "--device", "cpu"],
                       cwd=root, stdout=write, stderr=subprocess.PIPE, text=True, timeout=300,
                       env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})  # as most users run it
    os.close(write)
    assert p.returncode == 141 and "Traceback" not in p.stderr, p.stderr


def test_index_of_another_checkpoint_is_rebuilt(photos, ckpts, tmp_path, capsys, encoded):
    argv = ("--images_dir", photos, "--query", "x", "--index_dir", tmp_path, "--json")
    run(capsys, "--checkpoint", ckpts[0], *argv)
    path = next(tmp_path.glob("index_best_photos-*.npz"))
    copy = tmp_path / "copy" / "best.pt"
    os.makedirs(copy.parent)
    shutil.copy(ckpts[0], copy)
    rc, out, err = run(capsys, "--checkpoint", copy, *argv)
    assert encoded == [4] and "another checkpoint" not in err  # same weights, copied elsewhere: reused
    rc, out, err = run(capsys, "--checkpoint", ckpts[1], *argv)  # same name, other weights
    assert rc == 0 and "another checkpoint" in err and encoded == [4, 4]
    assert GalleryIndex.load(path).fingerprint == encoder.TorchEncoder(ckpts[1], "cpu").fingerprint


def test_bad_input_is_a_clear_error(photos, ckpts, tmp_path, capsys, encoded):
    common = ("--checkpoint", ckpts[0], "--images_dir", photos)
    for argv, code in ((("--query", "  "), 2), (("--query", "x", "--image", photos / "a.jpg"), 2), ((), 2),
                       (("--image", tmp_path / "missing.jpg"), 2), (("--query", "x", "--use_test_set"), 2)):
        with pytest.raises(SystemExit) as e:
            run(capsys, *common, *argv)
        assert e.value.code == code, argv
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    (tmp_path / "empty.txt").write_text("\n \n")
    os.makedirs(tmp_path / "nothing")
    for argv, msg in ((("--image", tmp_path / "bad.jpg"), "cannot read --image"),
                      (("--queries", tmp_path / "empty.txt"), "holds no queries"),
                      (("--queries", tmp_path / "missing.txt"), "cannot read --queries")):
        with pytest.raises(SystemExit, match=msg):
            run(capsys, *common, *argv)
    (tmp_path / "nothing" / "broken.jpg").write_bytes(b"nope")
    for _ in range(2):  # the broken file is remembered, not decoded again
        with pytest.raises(SystemExit, match="no readable photos"):
            run(capsys, "--checkpoint", ckpts[0], "--images_dir", tmp_path / "nothing", "--query", "x")
    assert encoded == [1]


def test_ctrl_c_while_indexing_keeps_the_photos_done(photos, ckpts, tmp_path, capsys, encoded, monkeypatch):
    real, calls = DualEncoder.encode_images, []

    def interrupt_second_batch(self, images, flip=False):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(self, images, flip)
    argv = ("--checkpoint", ckpts[0], "--images_dir", photos, "--query", "x", "--index_dir", tmp_path,
            "--batch_size", "2", "--json")
    with monkeypatch.context() as m:
        m.setattr(DualEncoder, "encode_images", interrupt_second_batch)
        rc, out, err = run(capsys, *argv)
    assert rc == 130 and "run again" in err and out == ""
    rc, out, err = run(capsys, *argv)
    assert rc == 0 and encoded == [4, 2] and len(json.loads(out)) == 4


def test_flickr8k_gallery_by_text_and_image(tiny_data, ckpts, tmp_path, capsys):
    common = ("--checkpoint", ckpts[0], "--data_dir", tiny_data, "--use_test_set", "--output_dir", tmp_path)
    rc, out, err = run(capsys, *common, "--query", "a red circle")  # top_k 9 of 8 test photos
    assert rc == 0 and out.startswith("top 8 of 8 photos") and (tmp_path / "search_a_red_circle.png").exists()
    assert os.path.exists(os.path.join(os.path.dirname(ckpts[0]), "index_best_test.npz"))
    assert os.path.exists(os.path.join(os.path.dirname(ckpts[0]), "names_best_test.npz"))  # its listing kept
    query = os.path.join(tiny_data, "images", "blue_square_7.jpg")
    rc, out, err = run(capsys, *common, "--image", query, "--top_k", "2")
    assert rc == 0 and out.splitlines()[1].split()[2] == query


def test_flickr8k_gallery_lists_every_split_or_the_test_split(tiny_data, tmp_path):
    every = gallery.gallery_images(tiny_data, use_test_set=False)
    assert len(every) == 64 and every == sorted(every) and "red_circle_0.jpg" in every  # 8 photos x 8 classes
    assert gallery.gallery_images(tiny_data, use_test_set=True) == sorted(n for n in every if n.endswith("_7.jpg"))
    with pytest.raises(SystemExit, match="captions.csv not found; pass --data_dir, or --images_dir"):
        gallery.gallery_images(str(tmp_path), use_test_set=True)
    (tmp_path / "captions.csv").write_text("image,caption,split\n")
    with pytest.raises(SystemExit, match="captions.csv holds no captions; rerun preprocess"):
        gallery.gallery_images(str(tmp_path), use_test_set=False)


def test_incremental_querybank_index_ranks_as_a_fresh_build(tiny_data, tmp_path, capsys, encoded):
    ck = make_checkpoint(tmp_path / "m" / "best.pt", os.path.join(tiny_data, "text_encoder"), 2,
                         querybank=True, data_dir=tiny_data)
    folder = tmp_path / "photos"
    for i in range(6):
        photo(folder / f"p{i}.jpg", i)
    query = ("--checkpoint", ck, "--images_dir", folder, "--query", "a red circle", "--json", "--top_k", "20")

    def ranking(index_dir):
        _, out, _ = run(capsys, *query, "--index_dir", index_dir)
        return [(r["path"], r["score"]) for r in json.loads(out)]
    ranking(tmp_path / "kept")
    photo(folder / "p6.jpg", 6)  # added
    photo(folder / "p1.jpg", 11)  # changed
    os.utime(folder / "p1.jpg", ns=(1, 2))
    os.remove(folder / "p3.jpg")  # removed
    incremental = ranking(tmp_path / "kept")
    assert encoded == [6, 2]  # only the new and the changed photo were encoded again
    fresh = ranking(tmp_path / "fresh")
    assert [p for p, _ in incremental] == [p for p, _ in fresh] and len(fresh) == 6
    assert [s for _, s in incremental] == pytest.approx([s for _, s in fresh], abs=1e-6)
    ix = GalleryIndex.load(next((tmp_path / "kept").glob("index_*.npz")))
    assert ix.bias is not None and len(ix.bias) == len(ix) == 6
    # Each photo's bias is the log-sum-exp of its similarities to the training captions, by hand.
    enc = encoder.TorchEncoder(ck, "cpu")
    captions = [line.split(",")[1] for line in open(os.path.join(tiny_data, "captions.csv")).read().splitlines()[1:]
                if line.endswith(",train")]
    bank = enc.encode_texts(captions).astype(np.float16).astype(np.float32)
    s = enc.logit_scale * ix.emb.astype(np.float32) @ bank.T  # (N, M)
    want = (np.log(np.exp(s - s.max(1, keepdims=True)).sum(1)) + s.max(1)) / enc.logit_scale
    assert np.allclose(ix.bias, want, atol=1e-4)
    # Another caption bank (the training captions changed): biases computed again, no photo decoded.
    csv_path = os.path.join(tiny_data, "captions.csv")
    stat = os.stat(csv_path)
    try:
        os.utime(csv_path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
        again = ranking(tmp_path / "kept")
        assert [p for p, _ in again] == [p for p, _ in incremental] and encoded == [6, 2, 6]
    finally:
        os.utime(csv_path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert GalleryIndex.load(next((tmp_path / "kept").glob("index_*.npz"))).bank_key != ix.bank_key
