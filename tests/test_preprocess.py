"""preprocess_flickr8k.py on tiny datasets built in tmp_path: layouts, bad input, splits, zip safety,
resumable downloads from a local HTTP server."""

import csv
import errno
import hashlib
import io
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import types
import zipfile
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

import dataset
import preprocess_flickr8k as pf
from helpers import download, synthetic

SCRIPT = Path(__file__).resolve().parents[1] / "preprocess_flickr8k.py"

# A tiny official layout: every kind of bad input appears once.
TOKEN = (
    "a.jpg#0\tA red square .\n"
    "a.jpg#1\t  padded caption  \n"
    "a.jpg#2\t   \n"  # empty caption
    "b.jpg#0\tA caption, with a comma\n"
    "b.jpg#1 no tab on this line\n"  # malformed
    "bogus.jpg\tno hash number\n"  # malformed
    "c.jpg#0\ttruncated photo\n"
    "d.jpg#0\tzero-byte photo\n"
    "e.jpg#0\tval photo\n"
    "e.jpg#1\tval photo two\n"
    "f.jpg#0\ttest photo that is missing\n"
    "nosplit.jpg#0\tin no split\n"
    "a.jpg.1#0\tthe stray entry\n"
)
SPLIT_LISTS = {"Flickr_8k.trainImages.txt": "a.jpg\nb.jpg\nc.jpg\nd.jpg\n",
               "Flickr_8k.devImages.txt": "e.jpg\n", "Flickr_8k.testImages.txt": "f.jpg\n"}
EXPECTED_CSV = (
    "image,caption,split\n"
    "a.jpg,A red square .,train\n"
    "a.jpg,padded caption,train\n"
    'b.jpg,"A caption, with a comma",train\n'
    "e.jpg,val photo,val\n"
    "e.jpg,val photo two,val\n"
)
EXPECTED_SUMMARY = [
    "photos: 3 | captions: 5",
    "  train: 2 photos, 3 captions",
    "  val  : 1 photos, 2 captions",
    "  test : 0 photos, 0 captions",
    "skipped, empty caption: 1 (1 captions), e.g. line 3: a.jpg",
    "skipped, malformed caption line (want IMAGE.jpg#N<TAB>caption): 2 (2 captions), "
    "e.g. line 5: 'b.jpg#1 no tab on this line', line 6: 'bogus.jpg\\tno hash number'",
    "skipped, missing photo: 1 (1 captions), e.g. f.jpg (test)",
    "skipped, photo in no split: 1 (1 captions), e.g. nosplit.jpg",
    "skipped, bad photo name (not a plain .jpg/.png file name): 1 (1 captions), e.g. a.jpg.1",
]


def jpeg_bytes(i, size=(24, 16)):
    buf = io.BytesIO()
    Image.new("RGB", size, (40 * i % 256, 90, 200 - 10 * i % 200)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def truncated_jpeg():
    """A JPEG whose header is intact (Image.open works) but whose pixel data stops halfway."""
    buf = io.BytesIO()
    Image.frombytes("RGB", (64, 64), random.Random(0).randbytes(64 * 64 * 3)).save(buf, "JPEG", quality=90)
    return buf.getvalue()[: len(buf.getvalue()) // 2]


def official_images():
    good = {name: jpeg_bytes(i) for i, name in enumerate(["a.jpg", "b.jpg", "e.jpg", "nosplit.jpg"])}
    return {**good, "c.jpg": truncated_jpeg(), "d.jpg": b""}


def official_archives(folder, padding=0):
    """Flickr8k_Dataset.zip and Flickr8k_text.zip as the official ones are laid out."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / "Flickr8k_Dataset.zip", "w") as zf:
        for name, data in official_images().items():
            zf.writestr(f"Flicker8k_Dataset/{name}", data)
        zf.writestr("__MACOSX/Flicker8k_Dataset/._a.jpg", b"resource fork")
        if padding:  # incompressible bytes, so a download takes several chunks
            zf.writestr("padding.bin", random.Random(0).randbytes(padding))
    with zipfile.ZipFile(folder / "Flickr8k_text.zip", "w") as zf:
        zf.writestr("Flickr8k.token.txt", TOKEN)
        for name, text in SPLIT_LISTS.items():
            zf.writestr(name, text)
    return folder


def official_folders(folder):
    """The same data already extracted, nested a level down and with the other spelling."""
    (folder / "Flickr8k_Dataset").mkdir(parents=True)
    for name, data in official_images().items():
        (folder / "Flickr8k_Dataset" / name).write_bytes(data)
    (folder / "text").mkdir()
    (folder / "text" / "Flickr8k.token.txt").write_text(TOKEN)
    for name, text in SPLIT_LISTS.items():
        (folder / "text" / name).write_text(text)
    return folder


def run(*args):
    pf.main([*map(str, args), "--cache_size", "0", "--num_workers", "2"])


def read_rows(data_dir):
    with open(data_dir / "captions.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("make", [official_archives, official_folders])
def test_official_layout(tmp_path, capsys, make):
    src, out = make(tmp_path / "src"), tmp_path / "out"
    run("--source", src, "--data_dir", out)
    assert (out / "captions.csv").read_text() == EXPECTED_CSV
    assert sorted(os.listdir(out / "images")) == ["a.jpg", "b.jpg", "e.jpg"]
    assert (out / "images" / "b.jpg").read_bytes() == official_images()["b.jpg"]
    lines = capsys.readouterr().out.splitlines()
    assert lines == [*EXPECTED_SUMMARY, "skipped, unreadable photo: 2 (2 captions), e.g. c.jpg (OSError: image "
                     "file is truncated (151 bytes not processed)), d.jpg (not an image PIL can read)"]
    if make is official_archives:
        assert not (out / "raw" / "__MACOSX").exists()


def test_second_run_skips_finished_work(tmp_path, capsys, monkeypatch):
    src, out = official_archives(tmp_path / "src"), tmp_path / "out"
    run("--source", src, "--data_dir", out)
    first = capsys.readouterr().out
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}

    verified = []
    monkeypatch.setattr(pf, "verify_image", lambda p: verified.append(os.path.basename(p)) or "still bad")

    def no_extraction(*args, **kwargs):
        raise AssertionError("archives extracted again")

    monkeypatch.setattr(download, "check_zip", no_extraction)
    run("--source", src, "--data_dir", out)
    assert sorted(verified) == ["c.jpg", "d.jpg"]  # only the photos that never made it to images/
    assert (out / "captions.csv").read_text() == EXPECTED_CSV
    assert {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()} == mtimes
    assert capsys.readouterr().out.splitlines()[:9] == first.splitlines()[:9]


def kaggle_folder(folder, n_images=20):
    (folder / "Images").mkdir(parents=True)
    lines = ["image,caption"]
    for i in range(n_images):
        (folder / "Images" / f"p{i:02d}.jpg").write_bytes(jpeg_bytes(i))
        lines += [f'p{i:02d}.jpg,"photo {i}, quoted"', f"p{i:02d}.jpg,photo {i}, unquoted comma"]
    lines += ["p00.jpg,", "missing.jpg,no such photo"]
    (folder / "captions.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_kaggle_layout_split_by_image(tmp_path, capsys):
    src = kaggle_folder(tmp_path / "kaggle" / "flickr8k")
    run("--source", tmp_path / "kaggle", "--data_dir", tmp_path / "a")
    rows = read_rows(tmp_path / "a")
    assert rows[:2] == [{"image": "p00.jpg", "caption": "photo 0, quoted", "split": rows[0]["split"]},
                        {"image": "p00.jpg", "caption": "photo 0, unquoted comma", "split": rows[0]["split"]}]
    split_of = {}
    for r in rows:
        assert split_of.setdefault(r["image"], r["split"]) == r["split"]  # never two splits per photo
    counts = {s: sum(v == s for v in split_of.values()) for s in ("train", "val", "test")}
    assert counts == {"train": 16, "val": 2, "test": 2} and len(rows) == 40
    out = capsys.readouterr().out
    assert "skipped, empty caption: 1 (1 captions), e.g. line 42: p00.jpg" in out
    assert "skipped, missing photo: 1 (1 captions), e.g. missing.jpg (" in out

    run("--source", src, "--data_dir", tmp_path / "b")  # same seed, same split
    assert read_rows(tmp_path / "b") == rows
    run("--source", src, "--data_dir", tmp_path / "c", "--seed", "1")
    assert read_rows(tmp_path / "c") != rows


def test_user_csv_and_split_ratio(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(10):
        (photos / f"x{i}.png").write_bytes(jpeg_bytes(i))  # the name decides nothing; PIL reads content
    (tmp_path / "mine.csv").write_text("caption,image\n" + "".join(f"thing {i},x{i}.png\n" for i in range(10))
                                       + "evil,../x0.png\n")
    run("--captions", tmp_path / "mine.csv", "--images", photos, "--data_dir", tmp_path / "out",
        "--split_ratio", "0.5", "0.5", "0")
    rows = read_rows(tmp_path / "out")
    assert sorted(r["image"] for r in rows) == [f"x{i}.png" for i in range(10)]
    assert sorted(r["split"] for r in rows) == ["train"] * 5 + ["val"] * 5
    assert not (tmp_path / "out" / "x0.png").exists()


def test_dataset_images_are_plain_names_without_gif_or_tiff():
    from dataset import DATASET_EXTENSIONS, IMAGE_EXTENSIONS
    names = ["a.JPG", "b.jpeg", "c.png", "d.webp", "e.bmp", "f.gif", "g.tiff", "h.jpg.1", "sub/i.jpg", "j\\k.jpg"]
    assert [n for n in names if pf.is_dataset_image(n)] == ["a.JPG", "b.jpeg", "c.png", "d.webp", "e.bmp"]
    assert set(IMAGE_EXTENSIONS) - set(DATASET_EXTENSIONS) == {".gif", ".tif", ".tiff"}  # search.py still takes them


def test_split_by_image_proportions():
    names = [f"{i}.jpg" for i in range(1000)]
    splits = pf.split_by_image(names, [0.8, 0.1, 0.1], seed=0)
    assert [sum(s == k for s in splits.values()) for k in ("train", "val", "test")] == [800, 100, 100]
    assert splits == pf.split_by_image(reversed(names), [8, 1, 1], seed=0)  # order of input irrelevant


@pytest.mark.parametrize("member", ["../x.txt", "/tmp/escaped_by_test_x.txt", "link"])
def test_zip_escaping_the_folder_is_refused(tmp_path, member):
    src = official_archives(tmp_path / "src")
    with zipfile.ZipFile(src / "Flickr8k_text.zip", "a") as zf:
        info = zipfile.ZipInfo(member)
        if member == "link":
            info.external_attr = 0o120777 << 16  # a symlink member pointing out of the folder
        zf.writestr(info, "/etc/passwd" if member == "link" else "pwned")
    res = subprocess.run([sys.executable, SCRIPT, "--source", src, "--data_dir", tmp_path / "out",
                          "--cache_size", "0"], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert err[-1].startswith(f"error: refusing to extract {src / 'Flickr8k_text.zip'}: member {member!r}")
    assert not (tmp_path / "out" / "x.txt").exists() and not (tmp_path / "out" / "raw" / "link").exists()
    assert not (tmp_path / "out" / "raw" / "Flickr8k.token.txt").exists()  # refused before writing


def test_not_a_dataset_and_nothing_usable(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="^error: no dataset under"):
        run("--source", tmp_path / "empty", "--data_dir", tmp_path / "out")
    src = official_folders(tmp_path / "src")
    for name in ("a.jpg", "b.jpg", "e.jpg"):
        (src / "Flickr8k_Dataset" / name).write_bytes(b"not a photo")
    with pytest.raises(SystemExit, match="^error: nothing usable left"):
        run("--source", src, "--data_dir", tmp_path / "out")
    assert not (tmp_path / "out" / "captions.csv").exists()


def test_cache_and_demo_call_the_repo_functions(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(dataset, "build_image_cache",
                        lambda data_dir, split, size: calls.append((data_dir, split, size)) or "x.npy")
    monkeypatch.setattr(synthetic, "save_tiny_text_encoder",
                        lambda folder, captions: calls.append((folder, len(captions))))
    src, out = official_folders(tmp_path / "src"), str(tmp_path / "out")
    pf.main(["--source", str(src), "--data_dir", out, "--cache_size", "32"])
    assert calls == [(out, "train", 32), (out, "val", 32)]
    calls.clear()
    demo = str(tmp_path / "demo")
    pf.main(["--demo", "--data_dir", demo, "--cache_size", "0"])
    n_train = sum(r["split"] == "train" for r in read_rows(tmp_path / "demo"))
    assert calls == [(os.path.join(demo, "text_encoder"), n_train)] and n_train == 1600


# --- downloads from a local server --------------------------------------------------------


def etag(data):
    return '"' + hashlib.sha1(data).hexdigest()[:16] + '"'


class Handler(BaseHTTPRequestHandler):
    """Serves server.files with Range and If-Range support (ETags unless server.etags is False);
    server.plan[name] lists a behaviour per request."""

    def do_GET(self):
        name, srv = self.path.lstrip("/"), self.server
        srv.log.append((name, self.headers.get("Range")))
        plan = srv.plan.get(name, [])
        how = plan.pop(0) if plan else "ok"
        if how == "503" or name not in srv.files:
            self.send_error(503 if how == "503" else 404)
            return
        if how in ("html", "html_octet"):  # an error page, labelled as such or as a binary file
            self.send_response(200)
            body = b"<!DOCTYPE html><html><body>Rate limit exceeded</body></html>"
            self.send_header("Content-Type", "text/html" if how == "html" else "application/octet-stream")
        else:
            data, start = srv.files[name], 0
            rng = self.headers.get("Range")
            if_range = self.headers.get("If-Range")
            if if_range and if_range != etag(data):  # the file changed: send all of it
                rng = None
            if how == "wrong_start":  # a broken server: 206, but from byte 0
                self.send_response(206)
                self.send_header("Content-Range", f"bytes 0-{len(data) - 1}/{len(data)}")
            elif rng and how != "ignore_range":
                start = int(rng.removeprefix("bytes=").rstrip("-"))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            if srv.etags:
                self.send_header("ETag", etag(data))
            if how == "stall":
                self.send_header("X-Stalls", "1")
            body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if how in ("cut", "stall"):  # half the promised bytes, then the connection drops or goes silent
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            if how == "stall":
                srv.stalled.release()  # all of it is sent: nothing more will come
                srv.release.wait(60)
            self.close_connection = True
            return
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # a proxy set in the environment must not see these requests
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.plan, srv.log, srv.etags = {}, {}, [], True
    srv.stalled, srv.release = threading.Semaphore(0), threading.Event()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.release.set()  # let stalled answers end
    srv.shutdown()
    srv.server_close()


def test_download_resumes_and_retries(tmp_path, server, capsys):
    archives = official_archives(tmp_path / "served", padding=300_000)
    server.files = {p.name: p.read_bytes() for p in archives.iterdir()}
    server.plan = {"Flickr8k_Dataset.zip": ["cut"], "Flickr8k_text.zip": ["503"]}
    out = tmp_path / "out"
    run("--download", "--url_base", server.url, "--data_dir", out)
    # the resumed request starts after the whole 64 KiB chunks written before the cut
    half = len(server.files["Flickr8k_Dataset.zip"]) // 2
    resume = f"bytes={half // 65536 * 65536}-"
    assert server.log == [("Flickr8k_Dataset.zip", None), ("Flickr8k_Dataset.zip", resume),
                          ("Flickr8k_text.zip", None), ("Flickr8k_text.zip", None)]
    for name, data in server.files.items():
        assert (out / "downloads" / name).read_bytes() == data
    assert sorted(os.listdir(out / "downloads")) == sorted(server.files)  # no .part left behind
    assert (out / "captions.csv").read_text() == EXPECTED_CSV
    assert capsys.readouterr().out.splitlines()[:9] == EXPECTED_SUMMARY
    server.log.clear()
    run("--download", "--url_base", server.url, "--data_dir", out)
    assert server.log == []  # finished downloads are not fetched again


def partial(folder, url, prefix, total, validator=None):
    """A partial download as download() leaves it: the prefix and the record of the file it is from."""
    (folder / "f.bin.part").write_bytes(prefix)
    (folder / "f.bin.part.json").write_text(json.dumps({"url": url, "total": total, "validator": validator}))


# case -> the Range header of each request: a partial file is resumed only while the server vouches
# that it is a prefix of the file it serves now; otherwise the download starts over.
PARTIAL_CASES = {
    "resume": ["bytes=1000-"],
    "complete": ["bytes=10240-"],  # 416: nothing left to fetch
    "longer": ["bytes=10245-", None],  # 416 with another total: start over
    "ignore_range": ["bytes=1000-"],  # the server answers 200 with the whole file
    "changed_etag": ["bytes=1000-"],  # If-Range: a changed file comes whole
    "changed_size": ["bytes=1000-", None],  # no ETags, but Content-Range names another total
    "wrong_start": ["bytes=1000-", None],  # 206 from another offset
    "unvouched": [None],  # no record of what the partial file belongs to
    "other_url": [None],
}


@pytest.mark.parametrize("case", PARTIAL_CASES)
def test_download_keeps_a_partial_file_only_when_it_is_a_valid_prefix(tmp_path, server, case):
    data = bytes(range(256)) * 40
    old = data[::-1]  # what the server held when the partial download began
    url = server.url + "f.bin"
    server.files = {"f.bin": data}
    server.plan = {"f.bin": [case]}
    if case in ("resume", "ignore_range", "wrong_start"):
        partial(tmp_path, url, data[:1000], len(data), etag(data))
    elif case in ("complete", "longer"):
        partial(tmp_path, url, data + b"extra"[: 5 * (case == "longer")], len(data) + 5 * (case == "longer"))
    elif case == "changed_etag":
        partial(tmp_path, url, old[:1000], len(old), etag(old))
    elif case == "changed_size":
        server.etags = False
        partial(tmp_path, url, old[:1000], len(old) + 1)
    elif case == "unvouched":
        (tmp_path / "f.bin.part").write_bytes(data[:1000])
    else:
        partial(tmp_path, server.url + "elsewhere.bin", data[:1000], len(data), etag(data))
    download.download(url, str(tmp_path / "f.bin"))
    assert [r for _, r in server.log] == PARTIAL_CASES[case]
    assert (tmp_path / "f.bin").read_bytes() == data
    assert not (tmp_path / "f.bin.part").exists() and not (tmp_path / "f.bin.part.json").exists()


def test_download_gives_up_with_a_clear_message(tmp_path, server):
    server.files = {"f.bin": b"x"}
    server.plan = {"f.bin": ["503"] * download.TRIES}
    with pytest.raises(SystemExit, match=f"failed after {download.TRIES} tries: HTTP 503"):
        download.download(server.url + "f.bin", str(tmp_path / "f.bin"))
    with pytest.raises(SystemExit, match="answered HTTP 404"):
        download.download(server.url + "nope.bin", str(tmp_path / "nope.bin"))
    assert len(server.log) == download.TRIES + 1  # a 404 is not retried


@pytest.mark.parametrize("how", ["html", "html_octet"])
def test_download_html_page_is_rejected(tmp_path, server, how):
    archives = official_archives(tmp_path / "served")
    server.files = {p.name: p.read_bytes() for p in archives.iterdir()}
    server.plan = {"Flickr8k_Dataset.zip": [how]}
    out = tmp_path / "out"
    # Labelled text/html, it is refused before a byte is written; labelled as binary, the zip check
    # finds the HTML after the download and removes the file.
    message = "is an HTML page .*not the archive" if how == "html" else "is an HTML page .*removed it"
    with pytest.raises(SystemExit, match=r"Flickr8k_Dataset.zip " + message):
        run("--download", "--url_base", server.url, "--data_dir", out)
    assert not (out / "downloads" / "Flickr8k_Dataset.zip").exists()
    run("--download", "--url_base", server.url, "--data_dir", out)  # the next run fetches it again
    assert (out / "captions.csv").read_text() == EXPECTED_CSV


def test_html_page_never_overwrites_a_partial_download(tmp_path, server):
    data = bytes(range(256)) * 40
    url = server.url + "f.bin"
    server.files = {"f.bin": data}
    server.plan = {"f.bin": ["html"]}
    partial(tmp_path, url, data[:1000], len(data), etag(data))
    with pytest.raises(SystemExit, match=r"is an HTML page .*f.bin.part is kept"):
        download.download(url, str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin.part").read_bytes() == data[:1000]
    download.download(url, str(tmp_path / "f.bin"))
    assert server.log[-1] == ("f.bin", "bytes=1000-") and (tmp_path / "f.bin").read_bytes() == data


def test_stalled_connection_times_out_retries_and_resumes(tmp_path, server, monkeypatch):
    # download() waits download.TIMEOUT_S of silence (a minute) before it gives up on a connection. Here
    # the wait is cut to 0.1 s on a stalled connection once the server has sent all it will send, so
    # the silence is certain and no healthy read can run into the timeout, however loaded the machine.
    real_get = download.requests.get

    def get(url, **kwargs):
        assert kwargs["timeout"] == download.TIMEOUT_S and math.isfinite(download.TIMEOUT_S[1])
        r = real_get(url, **kwargs)
        if r.headers.get("X-Stalls"):
            assert server.stalled.acquire(timeout=60)
            r.raw._fp.fp.raw._sock.settimeout(0.1)  # http.client's socket under requests and urllib3
        return r
    monkeypatch.setattr(download.requests, "get", get)
    data = random.Random(0).randbytes(300_000)
    url = server.url + "f.bin"
    server.files = {"f.bin": data}
    server.plan = {"f.bin": ["stall"]}
    download.download(url, str(tmp_path / "f.bin"))
    assert (tmp_path / "f.bin").read_bytes() == data
    assert [r for _, r in server.log] == [None, f"bytes={150_000 // 65536 * 65536}-"]
    monkeypatch.setattr(download, "TRIES", 2)
    server.plan = {"f.bin": ["stall"] * 2}
    with pytest.raises(SystemExit, match="failed after 2 tries: .*timed out.*f2.bin.part is kept"):
        download.download(url, str(tmp_path / "f2.bin"))


def test_full_disk_is_a_clear_error_and_keeps_the_partial_download(tmp_path, server, monkeypatch):
    archives = official_archives(tmp_path / "served", padding=300_000)
    server.files = {p.name: p.read_bytes() for p in archives.iterdir()}
    out = tmp_path / "out"
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=1000))
    with pytest.raises(SystemExit, match=r"Flickr8k_Dataset.zip needs 0.00 GB more but only 0.00 GB are free"):
        run("--download", "--url_base", server.url, "--data_dir", out)
    monkeypatch.undo()
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)

    class FullDisk(io.FileIO):  # the disk fills up after the first 64 KiB chunk
        def write(self, b):
            if self.tell() >= 65536:
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(b)

    real_open = open
    monkeypatch.setattr(download, "open", lambda f, mode="r", *a, **k: FullDisk(f, mode[0]) if str(f).endswith(".part")
                        else real_open(f, mode, *a, **k), raising=False)
    with pytest.raises(SystemExit, match=r"^error: no space left on the device .*run again"):
        run("--download", "--url_base", server.url, "--data_dir", out)
    part = out / "downloads" / "Flickr8k_Dataset.zip.part"
    assert part.read_bytes() == server.files["Flickr8k_Dataset.zip"][:65536]  # a valid prefix, kept
    monkeypatch.undo()
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)
    run("--download", "--url_base", server.url, "--data_dir", out)
    assert ("Flickr8k_Dataset.zip", "bytes=65536-") in server.log
    assert (out / "captions.csv").read_text() == EXPECTED_CSV


def test_checksum_mismatch_removes_the_download(tmp_path, server, monkeypatch):
    archives = official_archives(tmp_path / "served")
    server.files = {p.name: p.read_bytes() for p in archives.iterdir()}
    digests = {n: hashlib.sha256(d).hexdigest() for n, d in server.files.items()}
    monkeypatch.setitem(pf.DOWNLOAD, "url_base", server.url)  # known digests describe the default server
    monkeypatch.setitem(pf.DOWNLOAD, "sha256", {**digests, "Flickr8k_Dataset.zip": "0" * 64})
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"Flickr8k_Dataset.zip does not have the expected SHA-256 0000.*removed it"):
        run("--download", "--data_dir", out)
    assert not (out / "downloads" / "Flickr8k_Dataset.zip").exists()
    monkeypatch.setitem(pf.DOWNLOAD, "sha256", digests)
    run("--download", "--data_dir", out)
    assert (out / "captions.csv").read_text() == EXPECTED_CSV


# preprocess_flickr8k.py --download, signalled (its whole process group, as a terminal's Ctrl-C does)
# from inside the run once the first 64 KiB of the photo archive are on disk, so it lands mid-download
# on any machine.
SIGNAL_MID_DOWNLOAD = """import io, os, runpy, signal, sys
from helpers import download
# Ctrl-C raises as in a terminal's foreground job, even where pytest runs as a shell's background job
# (which starts with SIGINT ignored, and passes that on to what it runs).
signal.signal(signal.SIGINT, signal.default_int_handler)
class Part(io.FileIO):
    def write(self, b):
        n = super().write(b)
        if self.tell() >= 65536 and os.path.basename(self.name) == "Flickr8k_Dataset.zip.part":
            os.killpg(0, {sig})
        return n
download.open = lambda f, mode="r", *a, **k: Part(f, mode[0]) if str(f).endswith(".part") else open(f, mode, *a, **k)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_download_interrupted_by_a_signal_resumes(tmp_path, server, sig):
    archives = official_archives(tmp_path / "served", padding=300_000)
    server.files = {p.name: p.read_bytes() for p in archives.iterdir()}
    out = tmp_path / "out"
    part = out / "downloads" / "Flickr8k_Dataset.zip.part"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_MID_DOWNLOAD.format(sig=int(sig)), SCRIPT, "--download",
                           "--url_base", server.url, "--data_dir", out, "--cache_size", "0"],
                          capture_output=True, text=True, start_new_session=True, timeout=300)
    assert proc.returncode == (130 if sig == signal.SIGINT else -signal.SIGKILL)
    if sig == signal.SIGINT:
        assert "Traceback" not in proc.stderr
        assert proc.stderr.strip().splitlines()[-1].startswith("interrupted; run the same")
    have = part.stat().st_size
    assert have == 65536 and part.read_bytes() == server.files["Flickr8k_Dataset.zip"][:have]
    run("--download", "--url_base", server.url, "--data_dir", out)
    assert server.log[1] == ("Flickr8k_Dataset.zip", f"bytes={have}-")
    assert (out / "captions.csv").read_text() == EXPECTED_CSV


def test_expected_size_is_checked(tmp_path):
    path = official_archives(tmp_path) / "Flickr8k_text.zip"
    with pytest.raises(SystemExit, match="bytes, expected 5"):
        download.check_zip(str(path), expected_size=5)
    assert path.exists()  # not ours to delete


# --- archives, captions files, photos, flags, interruption ----------------------------------


def test_zip_with_too_many_members_or_a_bomb_is_refused(tmp_path, monkeypatch):
    src = official_archives(tmp_path / "src")
    monkeypatch.setattr(download, "MAX_MEMBERS", 5)  # the photo archive has 7
    with pytest.raises(SystemExit, match=r"Flickr8k_Dataset.zip has 7 members, more than 5"):
        download.extract(str(src / "Flickr8k_Dataset.zip"), str(tmp_path / "raw"))
    monkeypatch.undo()
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(101 << 20))  # 101 MiB of zeros pack into ~100 KiB
    with pytest.raises(SystemExit, match=r"bomb.zip would unpack .* into 105,906,176 \(a zip bomb\?\)"):
        download.extract(str(bomb), str(tmp_path / "raw"))
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=100))
    with pytest.raises(SystemExit, match=r"Flickr8k_text.zip unpacks to 0.00 GB but only 0.00 GB are free"):
        download.extract(str(src / "Flickr8k_text.zip"), str(tmp_path / "raw"))
    assert os.listdir(tmp_path / "raw") == [] and bomb.exists()  # nothing written, the user's files kept


def read_token(tmp_path, data):
    (tmp_path / "t.txt").write_bytes(data)
    skipped = defaultdict(list)
    return dict(pf.read_token_file(str(tmp_path / "t.txt"), skipped)), skipped


def test_token_file_with_bom_crlf_tabs_and_a_latin1_line(tmp_path):
    data = ("\ufeffa.jpg#0\tA dog\truns  fast\r\n"  # a tab inside the caption, CRLF line ends
            "a.jpg#1\textra\tcolumns\there\r\n").encode() + "b.jpg#0\tcaf\xe9 au lait\r\n".encode("latin-1")
    captions, skipped = read_token(tmp_path, data)
    assert captions == {"a.jpg": ["A dog runs fast", "extra columns here"]}
    assert [item for item, _ in skipped[pf.NOT_UTF8]] == ["line 3: 'b.jpg#0\\tcaf\ufffd au lait'"]


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16"])
def test_captions_csv_encodings_columns_and_line_ends(tmp_path, encoding):
    text = ("Caption , IMAGE,source\r\n"  # any case and order, spaces, an extra column
            '"two\tlines,\r\nof text",x.jpg,flickr\r\n'
            "caf\u00e9 cr\u00e8me,y.jpg,mine\r\n"
            "z.jpg\r\n")  # a short row: no caption
    (tmp_path / "c.csv").write_bytes(text.encode(encoding))
    skipped = defaultdict(list)
    captions = pf.read_caption_csv(str(tmp_path / "c.csv"), skipped)
    assert captions == {"x.jpg": ["two lines, of text"], "y.jpg": ["caf\u00e9 cr\u00e8me"]}
    assert list(skipped) == ["malformed caption line (no image name)"]  # z.jpg landed in the caption column


def test_captions_csv_in_latin1_or_missing_columns(tmp_path):
    (tmp_path / "c.csv").write_bytes("image,caption\nx.jpg,a plain one\ny.jpg,caf\xe9\n".encode("latin-1"))
    skipped = defaultdict(list)
    assert pf.read_caption_csv(str(tmp_path / "c.csv"), skipped) == {"x.jpg": ["a plain one"]}
    assert [item for item, _ in skipped[pf.NOT_UTF8]] == ["line 3: y.jpg"]
    (tmp_path / "c.csv").write_text("image;caption\nx.jpg;a semicolon file\n")
    with pytest.raises(SystemExit, match=r"needs a header with columns image,caption, found \['image;caption'\]"):
        pf.read_caption_csv(str(tmp_path / "c.csv"), skipped)
    (tmp_path / "c.csv").write_bytes(b"x" * 200_000)  # e.g. a binary file without line breaks
    with pytest.raises(SystemExit, match="is not CSV: field larger than field limit"):
        pf.read_caption_csv(str(tmp_path / "c.csv"), skipped)


def test_image_modes_are_accepted_and_huge_images_refused(tmp_path, monkeypatch):
    photos = {"i16.png": Image.new("I;16", (40, 30)), "cmyk.jpg": Image.new("CMYK", (40, 30), (0, 50, 90, 10)),
              "palette.png": Image.new("P", (40, 30)), "la.png": Image.new("LA", (40, 30))}
    for name, im in photos.items():
        im.save(tmp_path / name)
    frames = [Image.new("RGB", (40, 30), (80 * i, 0, 0)) for i in range(3)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    for name in [*photos, "anim.gif"]:
        assert pf.verify_image(str(tmp_path / name)) is None, name
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.warns(Image.DecompressionBombWarning):  # PIL only warns below 2x the limit
        assert pf.verify_image(str(tmp_path / "cmyk.jpg")) == "too large (40x30 pixels; a decompression bomb?)"
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")  # past 2x the limit PIL refuses it at open
    assert pf.verify_image(str(tmp_path / "bomb.png")) == "too large (a decompression bomb?)"


@pytest.mark.parametrize("argv", [["--bogus"], ["--demo", "--source", "x"], ["--demo", "--num_workers", "0"],
                                  ["--demo", "--split_ratio", "nan", "1", "1"], ["--demo", "--images", "x"]])
def test_bad_flags_get_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as e:
        pf.main(argv)
    assert e.value.code == 2 and "error:" in capsys.readouterr().err


def test_interrupted_preparation_resumes_where_it_stopped(tmp_path, monkeypatch):
    src, out = official_folders(tmp_path / "src"), tmp_path / "out"
    copied, real = [], pf.link_or_copy

    def interrupt_on_second(a, b):
        if copied:
            raise KeyboardInterrupt
        copied.append(os.path.basename(b))
        real(a, b)

    monkeypatch.setattr(pf, "link_or_copy", interrupt_on_second)
    with pytest.raises(KeyboardInterrupt):
        run("--source", src, "--data_dir", out)
    assert os.listdir(out / "images") == copied and not (out / "captions.csv").exists()
    monkeypatch.undo()
    verified, real_verify = [], pf.verify_image
    monkeypatch.setattr(pf, "verify_image", lambda p: verified.append(os.path.basename(p)) or real_verify(p))
    run("--source", src, "--data_dir", out)
    assert (out / "captions.csv").read_text() == EXPECTED_CSV
    assert copied[0] not in verified and len(verified) == 4  # finished photos are not checked again
