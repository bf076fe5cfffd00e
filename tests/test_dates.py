"""--after / --before: photos filtered by when they were taken (EXIF DateTimeOriginal, else the
file's modification time), from dates stored in the index, in search.py and serve.py's API."""

import calendar
import json
import os
import time
from datetime import date

import numpy as np
import pillow_heif
import pytest
from PIL import ExifTags, Image
from test_serve import get_json, start
from tiny import make_checkpoint

import gallery
import index
import search
from index import GalleryIndex
from photos import taken_at


def exif_photo(path, seed, taken=None):
    """A JPEG with DateTimeOriginal `taken` ("YYYY:MM:DD HH:MM:SS") in its EXIF, or none."""
    arr = np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    exif = Image.Exif()
    if taken is not None:
        exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = taken
        exif[ExifTags.Base.DateTime] = "1999:01:01 00:00:00"  # when it was edited: not when it was taken
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, exif=exif)
    return str(path)


def wall(y, mo, d, h=0, mi=0, s=0):
    return calendar.timegm((y, mo, d, h, mi, s))


# name: (EXIF DateTimeOriginal, or None: the file's mtime, set to this local time)
PHOTOS = {
    "new_year.jpg": ("2021:01:01 00:00:00", None),      # the first second of 2021
    "eve.jpg": ("2020:12:31 23:59:59", None),          # the last second of 2020
    "summer.jpg": ("2021:07:14 12:00:00", None),
    "no_exif.jpg": (None, (2021, 3, 5, 8, 30, 0)),    # taken when it was written, by its mtime
    "zeros.jpg": ("0000:00:00 00:00:00", (2019, 6, 1, 9, 0, 0)),  # a camera with no clock set: mtime
}


@pytest.fixture(scope="module")
def dated(tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dates")
    ck = make_checkpoint(tmp / "m" / "best.pt", os.path.join(tiny_data, "text_encoder"), 3)
    folder = tmp / "photos"
    for i, (name, (exif, mtime)) in enumerate(PHOTOS.items()):
        path = exif_photo(folder / name, i, exif)
        if mtime is not None:
            stamp = time.mktime((*mtime, 0, 0, -1))  # that wall-clock time in this machine's zone
            os.utime(path, (stamp, stamp))
    return ck, folder, tmp


def test_taken_at_reads_date_time_original_else_the_local_mtime(dated):
    _, folder, _ = dated
    for name, (exif, mtime) in PHOTOS.items():
        path = folder / name
        want = wall(*mtime) if mtime is not None else wall(*map(int, exif.replace(":", " ").split()))
        assert taken_at(path, os.stat(path).st_mtime_ns) == want, name


def paths(dated, capsys, *argv, index_dir=None):
    ck, folder, tmp = dated
    capsys.readouterr()
    assert search.main(["--checkpoint", ck, "--images_dir", str(folder), "--index_dir", str(index_dir or tmp),
                        "--device", "cpu", "--num_workers", "0", "--top_k", "50", "--json", "--query", "a photo",
                        *argv]) == 0
    return sorted(os.path.basename(r["path"]) for r in json.loads(capsys.readouterr().out))


def test_after_and_before_keep_the_photos_taken_in_range(dated, capsys, monkeypatch):
    assert paths(dated, capsys) == sorted(PHOTOS)
    # Stored in the index: searching with dates reads no photo's date again.
    monkeypatch.setattr(index, "taken_at", lambda *a: pytest.fail("a photo's date was read again"))
    assert paths(dated, capsys, "--after", "2021-01-01") == ["new_year.jpg", "no_exif.jpg", "summer.jpg"]
    assert paths(dated, capsys, "--before", "2021-01-01") == ["eve.jpg", "zeros.jpg"]
    assert paths(dated, capsys, "--after", "2021-01-01", "--before", "2021-07-14") == ["new_year.jpg", "no_exif.jpg"]
    assert paths(dated, capsys, "--after", "2021-07-14", "--before", "2021-07-15") == ["summer.jpg"]
    assert paths(dated, capsys, "--after", "2030-01-01") == []


def test_bad_dates_are_usage_errors(dated, capsys):
    ck, folder, _ = dated
    for bad in (["--after", "2021-13-01"], ["--before", "yesterday"],
                ["--after", "2021-05-01", "--before", "2021-05-01"]):
        with pytest.raises(SystemExit) as e:
            search.get_args(["--checkpoint", ck, "--images_dir", str(folder), "--query", "x", *bad])
        assert e.value.code == 2
    assert "YYYY-MM-DD" in capsys.readouterr().err


def test_top_k_among_allowed_rows_is_brute_force_over_them():
    rng = np.random.default_rng(0)
    ix = GalleryIndex("f", "/", 16)
    ix.emb = rng.standard_normal((300, 16)).astype(np.float16)
    ix.paths = [str(i) for i in range(300)]
    q = rng.standard_normal((3, 16)).astype(np.float32)
    bias = rng.standard_normal(300).astype(np.float32)
    for allowed in (rng.random(300) < 0.1, np.arange(300) < 4, np.zeros(300, bool)):
        scores, rows = ix.top_k(q, 10, chunk_rows=32, bias=bias, allowed=allowed)
        full = ix.emb.astype(np.float32) @ q.T - bias[:, None]  # (N, Q)
        for j in range(3):
            want = [i for i in np.argsort(-full[:, j], kind="stable") if allowed[i]][:10]
            assert rows[j].tolist() == want
            np.testing.assert_allclose(scores[j], full[want, j], rtol=1e-5)


def test_an_index_without_dates_gets_them_without_encoding_a_photo(dated, capsys, tmp_path):
    ck, folder, _ = dated
    assert paths(dated, capsys, index_dir=tmp_path) == sorted(PHOTOS)
    path = next(tmp_path.glob("index_*.npz"))
    with np.load(path) as data:  # as the previous version wrote it: no dates
        arrays = {k: data[k] for k in data.files if k != "taken"}
    meta = json.loads(arrays["meta"].tobytes())
    arrays["embeddings"] = np.load(path.parent / meta["embeddings"])  # version 4 kept them in the .npz
    arrays["meta"] = np.frombuffer(json.dumps({**meta, "version": 4}).encode(), np.uint8)
    np.savez(path, **arrays)
    old = GalleryIndex.load(path)
    assert old is not None and old.taken is None

    class NoEncoder:
        dim, image_size = old.emb.shape[1], 32

        def encode_images(self, images):
            raise AssertionError("a photo was encoded again")
    files = index.scan_folder(str(folder))
    report = old.update(files, NoEncoder())
    assert report["changed"] and len(old) == len(PHOTOS)
    old.save(path)
    again = GalleryIndex.load(path)
    assert again.taken.tolist() == [index.taken_at(folder / p, files[p][1]) for p in again.paths]
    assert paths(dated, capsys, "--before", "2021-01-01", index_dir=tmp_path) == ["eve.jpg", "zeros.jpg"]


def test_the_server_filters_by_date(dated):
    ck, folder, tmp = dated
    server, library = start(tmp / "s", folder, ck)
    try:
        library.indexing.join()
        api = get_json(server, "/api/search?k=50&q=a%20photo&after=2021-01-01&before=2021-07-14")
        assert sorted(os.path.basename(r["path"]) for r in api["results"]) == ["new_year.jpg", "no_exif.jpg"]
        row = library.ix.paths.index("eve.jpg")
        like = get_json(server, f"/api/like?k=50&id={row}&before=2021-01-01")
        assert [os.path.basename(r["path"]) for r in like["results"]] == ["eve.jpg", "zeros.jpg"]
        for bad in ("after=2021-02-30", "before=soon"):
            assert "YYYY-MM-DD" in get_json(server, f"/api/search?q=x&{bad}", status=400)["error"]
    finally:
        server.shutdown()
        server.server_close()


def test_taken_between_counts_whole_days():
    ix = GalleryIndex("f", "/", 2)
    ix.paths = ["a", "b", "c"]
    ix.taken = np.array([wall(2021, 5, 1), wall(2021, 5, 1, 23, 59, 59), wall(2021, 5, 2)], np.int64)
    assert gallery.taken_between(ix) is None
    assert gallery.taken_between(ix, after=date(2021, 5, 1)).tolist() == [True, True, True]
    assert gallery.taken_between(ix, before=date(2021, 5, 2)).tolist() == [True, True, False]
    assert gallery.taken_between(ix, date(2021, 5, 2), date(2021, 5, 3)).tolist() == [False, False, True]


@pytest.mark.parametrize("suffix", [".heic", ".avif"])
def test_phone_formats_give_their_exif_date(tmp_path, suffix):
    pillow_heif.register_heif_opener()  # to write the HEIC; taken_at registers it itself
    exif = Image.Exif()
    exif.get_ifd(ExifTags.IFD.Exif)[ExifTags.Base.DateTimeOriginal] = "2022:02:03 04:05:06"
    path = tmp_path / f"IMG_0001{suffix}"
    Image.fromarray(np.full((40, 48, 3), 90, np.uint8)).save(path, exif=exif.tobytes())
    assert taken_at(path, 0) == wall(2022, 2, 3, 4, 5, 6)
