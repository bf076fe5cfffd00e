"""The photos people have, through search.py: HEIC and AVIF files index and find themselves, a JPEG
stored on its side is searched upright, and hidden files and macOS's AppleDouble `._*` files are
not photos of the collection. Files are written by the test; the HEIC without registering
pillow-heif's opener, so that only the code under test can make it readable."""

import json
import os
import subprocess
import sys

import numpy as np
import pillow_heif
import pytest
from PIL import Image
from tiny import make_checkpoint, photo

import photos
import search

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ckpt(tiny_data, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("formats") / "m" / "best.pt",
                           os.path.join(tiny_data, "text_encoder"), 0)


def search_image(capsys, ckpt, folder, image, index_dir):
    """search.py --image IMAGE --json over `folder`: ([(path relative to folder, score)] best first,
    stderr). --top_k beyond the folder's size: every indexed photo comes back."""
    capsys.readouterr()
    assert search.main(["--checkpoint", ckpt, "--images_dir", str(folder), "--image", str(image), "--json",
                        "--top_k", "100", "--index_dir", str(index_dir), "--device", "cpu", "--num_workers", "0"]) == 0
    out = capsys.readouterr()
    return [(os.path.relpath(r["path"], folder).replace(os.sep, "/"), r["score"]) for r in json.loads(out.out)], out.err


def others(folder):
    for i, name in enumerate(["a.jpg", "b.png", "sub/c.webp"]):
        photo(folder / name, i)


def test_heic_and_avif_are_indexed_and_found_like_jpeg(ckpt, tmp_path, capsys):
    folder = tmp_path / "photos"
    others(folder)
    heic, avif = Image.open(photo(tmp_path / "heic.png", 10)), Image.open(photo(tmp_path / "avif.png", 11))
    # Lossless (4:4:4, RGB, no YCbCr matrix): the HEIC holds exactly the PNG's pixels.
    pillow_heif.from_pillow(heic).save(folder / "IMG_0001.HEIC", quality=-1, chroma=444, matrix_coefficients=0)
    avif.save(folder / "sub" / "photo.avif", quality=100, subsampling="4:4:4")  # within 3 of each value
    for original, name in ((tmp_path / "heic.png", "IMG_0001.HEIC"), (tmp_path / "avif.png", "sub/photo.avif")):
        for query in (folder / name, original):  # the file itself, and the photo it was made from
            hits, err = search_image(capsys, ckpt, folder, query, tmp_path)
            assert "skipped" not in err, err
            assert sorted(p for p, _ in hits) == ["IMG_0001.HEIC", "a.jpg", "b.png", "sub/c.webp", "sub/photo.avif"]
            assert hits[0][0] == name and hits[0][1] >= 0.99, (query, hits[:2])


def test_a_heic_without_pillow_heif_is_reported_with_the_fix(ckpt, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "photos"
    others(folder)
    pillow_heif.from_pillow(Image.open(photo(tmp_path / "x.png", 10))).save(folder / "x.heic")
    monkeypatch.setitem(sys.modules, "pillow_heif", None)  # import pillow_heif now raises ImportError
    photos._heif_opener.cache_clear()
    try:
        hits, err = search_image(capsys, ckpt, folder, folder / "a.jpg", tmp_path)
    finally:
        monkeypatch.undo()
        photos._heif_opener.cache_clear()
    assert sorted(p for p, _ in hits) == ["a.jpg", "b.png", "sub/c.webp"]
    assert "skipped 1 unreadable file" in err and "x.heic" in err and "pip install pillow-heif" in err, err


def test_a_jpeg_stored_on_its_side_is_searched_upright(ckpt, tmp_path, capsys):
    folder = tmp_path / "photos"
    others(folder)
    upright = Image.open(photo(tmp_path / "upright.png", 20, size=(48, 40)))  # landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display", as a phone held upright writes
    turned = upright.transpose(Image.Transpose.ROTATE_90)  # 40x48, as the camera's sensor saw it
    turned.save(folder / "turned.jpg", quality=100, subsampling=0, exif=exif)
    stored = np.asarray(Image.open(folder / "turned.jpg"), dtype=int)  # (48, 40, 3): Pillow itself does not turn it
    shown = np.rot90(stored, k=-1)  # (40, 48, 3): turned clockwise by hand
    assert stored.shape == (48, 40, 3) and np.abs(shown - np.asarray(upright, dtype=int)).mean() < 2  # the original
    assert np.array_equal(np.asarray(photos.open_rgb(folder / "turned.jpg", 64)), shown)
    hits, _ = search_image(capsys, ckpt, folder, tmp_path / "upright.png", tmp_path)
    assert hits[0][0] == "turned.jpg" and hits[0][1] >= 0.99, hits[:2]


def test_hidden_files_and_appledouble_files_are_not_indexed(ckpt, tmp_path, capsys):
    folder = tmp_path / "photos"
    others(folder)
    # Each a readable JPEG, so that indexing one would show in the results. (A real `._x.jpg`,
    # which macOS writes beside x.jpg on other file systems, holds x.jpg's metadata, not a photo.)
    for i, name in enumerate(["._a.jpg", "sub/._c.webp", ".hidden.jpg", ".thumbnails/a.jpg", "sub/.git/d.png"]):
        photo(folder / name, 30 + i)
    hits, err = search_image(capsys, ckpt, folder, folder / "a.jpg", tmp_path)
    assert sorted(p for p, _ in hits) == ["a.jpg", "b.png", "sub/c.webp"] and "skipped" not in err


def test_pillow_heif_is_imported_only_for_a_photo_pillow_cannot_read(tmp_path):
    """JPEGs never import pillow-heif (the import costs as much as decoding a photo), yet a HEIC by
    another name, as a file or as an upload's bytes, still decodes to the pixels it holds. In a
    process of its own: the other tests have registered pillow-heif's opener in theirs."""
    jpeg, original = photo(tmp_path / "a.jpg", 1), photo(tmp_path / "h.png", 10)
    pillow_heif.from_pillow(Image.open(original)).save(tmp_path / "heic.jpg", quality=-1, chroma=444,
                                                      matrix_coefficients=0)
    code = f"""if True:
        import io, json, sys, photos
        photos.read_image({jpeg!r}, 32), photos.taken_at({jpeg!r}, 0)
        after_jpeg = "pillow_heif" in sys.modules
        by_name = photos.read_image({str(tmp_path / "heic.jpg")!r}, 40)
        upload = photos.read_image(io.BytesIO(open({str(tmp_path / "heic.jpg")!r}, "rb").read()), 40)
        print(json.dumps([after_jpeg, by_name.tolist(), upload.tolist()]))"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    after_jpeg, by_name, upload = json.loads(p.stdout)
    assert after_jpeg is False
    expected = photos.read_image(original, 40).tolist()  # the PNG the HEIC was made from, losslessly
    assert by_name == expected and upload == expected


def test_a_heic_still_decodes_when_another_thread_registers_pillow_heif_meanwhile(tmp_path):
    """Photos are decoded in several threads: when one registers pillow-heif's opener just after
    another failed to identify a HEIC without it, the second must try again with it, not record
    the photo as unreadable. The other thread is played by Image.open registering it as it fails."""
    original = photo(tmp_path / "h.png", 10)
    pillow_heif.from_pillow(Image.open(original)).save(tmp_path / "heic.jpg", quality=-1, chroma=444,
                                                      matrix_coefficients=0)
    code = f"""if True:
        import json, photos
        from PIL import Image
        real = Image.open
        def racing(path, *args, **kwargs):
            try:
                return real(path, *args, **kwargs)
            except Exception:
                photos._heif_opener()  # another thread, just now
                raise
        Image.open = racing
        print(json.dumps(photos.read_image({str(tmp_path / "heic.jpg")!r}, 40).tolist()))"""
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == photos.read_image(original, 40).tolist()
