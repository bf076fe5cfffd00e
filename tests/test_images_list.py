"""--images_list: a gallery of the photos a file lists (relative paths from the list's folder, blank
lines and #comments skipped), no folder walked, missing and unreadable files reported, kept up to
date when the list changes, in search.py and serve.py."""

import json
import os

import pytest
from tiny import photo

import index
import search
import serve
from index import GalleryIndex


@pytest.fixture
def listed(tmp_path):
    """archive/list.txt naming 4 photos (one outside archive/), a missing file, a folder and a broken
    file; archive/ also holds a photo the list leaves out."""
    arch = tmp_path / "archive"
    photo(arch / "a.jpg", 1)
    photo(arch / "sub" / "b.jpg", 2)
    photo(arch / "sub" / "c.jpg", 3)
    photo(arch / "unlisted.jpg", 4)
    outside = photo(tmp_path / "elsewhere" / "d.jpg", 5)
    (arch / "broken.jpg").write_bytes(b"not a photo")
    lines = ["# holiday photos", "a.jpg", "", "  ./sub/b.jpg  ", "sub/../sub/c.jpg", outside, "missing.jpg",
             "sub", "broken.jpg", "a.jpg"]
    (arch / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return arch, outside


def run(capsys, tiny_ckpt, lst, index_dir, *argv):
    capsys.readouterr()
    rc = search.main(["--checkpoint", tiny_ckpt, "--images_list", str(lst), "--index_dir", str(index_dir),
                      "--device", "cpu", "--num_workers", "0", *map(str, argv)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_a_list_is_the_gallery_without_walking_a_folder(capsys, tiny_ckpt, listed, tmp_path, monkeypatch):
    arch, outside = listed

    def no_walk(*a, **k):
        raise AssertionError("a folder was walked")
    monkeypatch.setattr(os, "walk", no_walk)
    monkeypatch.chdir(tmp_path / "elsewhere")  # relative lines are relative to the list, not to here
    rc, out, err = run(capsys, tiny_ckpt, arch / "list.txt", tmp_path, "--query", "a red circle", "--json",
                       "--top_k", "50")
    assert rc == 0, err
    want = {str(arch / "a.jpg"), str(arch / "sub" / "b.jpg"), str(arch / "sub" / "c.jpg"), outside}
    assert {r["path"] for r in json.loads(out)} == want
    assert "warning: 2 of 8 photos listed in" in err and "missing.jpg, sub" in err
    assert "skipped 1 unreadable file" in err and "broken.jpg" in err
    ix = GalleryIndex.load(next(tmp_path.glob("index_best_list-list-*.npz")))
    assert ix.root == os.path.realpath(arch)
    assert sorted(ix.paths) == sorted(["a.jpg", "sub/b.jpg", "sub/c.jpg", outside])  # outside: absolute
    rc, out, err = run(capsys, tiny_ckpt, arch / "list.txt", tmp_path, "--image", outside, "--json", "--top_k", "1")
    assert json.loads(out)[0]["path"] == outside


def test_a_changed_list_updates_the_index(capsys, tiny_ckpt, listed, tmp_path, monkeypatch):
    arch, outside = listed
    calls, real = [], index.encode_image_files

    def counting(enc, paths, *a, **k):
        calls.append(len(paths))
        return real(enc, paths, *a, **k)
    monkeypatch.setattr(index, "encode_image_files", counting)
    lst = arch / "list.txt"
    assert run(capsys, tiny_ckpt, lst, tmp_path, "--index_only")[0] == 0
    lst.write_text("a.jpg\nunlisted.jpg\n" + outside + "\n")  # b and c dropped, one added
    rc, _, err = run(capsys, tiny_ckpt, lst, tmp_path, "--query", "x", "--paths", "--top_k", "50")
    assert rc == 0 and calls == [5, 1]  # the first run: 4 photos and the broken file
    assert "(1 added, 2 removed)" in err
    _, out, _ = run(capsys, tiny_ckpt, lst, tmp_path, "--query", "x", "--paths", "--top_k", "50")
    assert sorted(out.splitlines()) == sorted([str(arch / "a.jpg"), str(arch / "unlisted.jpg"), outside])


def test_list_flags_are_checked(capsys, tiny_ckpt, listed, tmp_path):
    arch, _ = listed
    with pytest.raises(SystemExit) as e:
        run(capsys, tiny_ckpt, arch / "list.txt", tmp_path, "--images_dir", arch, "--query", "x")
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run(capsys, tiny_ckpt, arch / "none.txt", tmp_path, "--query", "x")
    assert "none.txt is not a file" in capsys.readouterr().err


def test_serve_shows_listed_photos_outside_the_lists_folder(tiny_ckpt, listed, tmp_path):
    arch, outside = listed
    args = serve.get_args(["--checkpoint", tiny_ckpt, "--images_list", str(arch / "list.txt"), "--index_dir",
                           str(tmp_path), "--device", "cpu", "--port", "0"])
    server, library = serve.make_server(args)
    try:
        library.indexing.join()
        rows = {p: i for i, p in enumerate(library.ix.paths)}
        assert library.photo_path(rows[outside]) == os.path.realpath(outside)
        assert library.photo_path(rows["sub/b.jpg"]) == os.path.realpath(arch / "sub" / "b.jpg")
        hits = library.search_text("a red circle", 10)["results"]
        assert {h["path"] for h in hits} == {str(arch / "a.jpg"), str(arch / "sub" / "b.jpg"),
                                             str(arch / "sub" / "c.jpg"), outside}
    finally:
        server.server_close()
