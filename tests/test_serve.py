"""serve.py's API over a live server on 127.0.0.1: search (the same as search.py --json), more like
this, search by an uploaded photo, thumbnails, refusals, and indexing while it serves."""

import http.client
import io
import json
import os
import re
import socket
import threading
from urllib.parse import quote

import pytest
from PIL import Image
from tiny import make_checkpoint, photo

import search
import serve
from helpers import library as library_module

NAMES = ["a.jpg", "b.png", "sub/c.webp", os.fsdecode(b"\xff.jpg")]  # the last is not UTF-8


def start(tmp_path, photos, ckpt):
    args = serve.get_args(["--checkpoint", ckpt, "--images_dir", str(photos), "--index_dir", str(tmp_path),
                           "--device", "cpu", "--port", "0"])
    server, library = serve.make_server(args)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, library


@pytest.fixture(scope="module")
def served(tiny_data, tmp_path_factory):
    """A server over 4 small photos, a large one, and a link to a photo outside the folder."""
    tmp = tmp_path_factory.mktemp("serve")
    ckpt = make_checkpoint(tmp / "m" / "best.pt", os.path.join(tiny_data, "text_encoder"), 0)
    photos = tmp / "photos"
    for i, name in enumerate(NAMES):
        photo(os.path.join(photos, name), i)
    photo(photos / "large.jpg", 7, size=(600, 400))
    os.symlink(photo(tmp / "secret.jpg", 8), photos / "link.jpg")
    server, library = start(tmp, photos, ckpt)
    library.indexing.join()
    yield server, library, ckpt, photos, tmp
    server.shutdown()
    server.server_close()


def request(server, method, url, body=None, headers=None):
    """(status, headers, body bytes) of one request to the server."""
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.request(method, url, body=body, headers=headers or {})
    r = conn.getresponse()
    out = r.status, dict(r.getheaders()), r.read()
    conn.close()
    return out


def get_json(server, url, method="GET", body=None, status=200):
    code, headers, data = request(server, method, url, body)
    assert code == status and headers["Content-Type"].startswith("application/json"), (url, code, data[:200])
    return json.loads(data.decode("utf-8"))  # strict UTF-8: valid JSON for any file name


def row_of(library, name):
    return library.ix.paths.index(name)


def test_server_listens_on_loopback_only(served):
    server, library, *_ = served
    assert server.server_address[0] == "127.0.0.1" and serve.get_args([]).host == "127.0.0.1"
    assert sorted(library.ix.paths) == sorted([*NAMES, "large.jpg", "link.jpg"])


def test_requests_to_another_host_name_are_refused(served):
    # DNS rebinding: a page at evil.example whose name now points at 127.0.0.1 sends Host: evil.example.
    server, *_ = served
    port = server.server_address[1]
    for host in ("evil.example", f"evil.example:{port}", f"127.0.0.1:{port + 1}", ""):
        code, _, data = request(server, "GET", "/api/search?q=a%20dog", headers={"Host": host})
        assert code == 403 and "127.0.0.1" in json.loads(data)["error"], host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):
        assert request(server, "GET", "/api/status", headers={"Host": host})[0] == 200


def test_search_gives_search_py_json(served, capsys):
    server, library, ckpt, photos, tmp = served
    for q in ("a red circle", "犬が走る"):
        api = get_json(server, f"/api/search?k=50&q={quote(q)}")
        capsys.readouterr()
        assert search.main(["--checkpoint", ckpt, "--images_dir", str(photos), "--index_dir", str(tmp),
                            "--query", q, "--top_k", "50", "--json", "--device", "cpu", "--num_workers", "0"]) == 0
        cli = json.loads(capsys.readouterr().out)
        assert len(cli) == 6 and [{k: v for k, v in r.items() if k != "id"} for r in api["results"]] == cli
        assert [r["rank"] for r in cli] == [1, 2, 3, 4, 5, 6]
    # b"\xff.jpg": each undecodable byte is U+FFFD; its row number still fetches the photo
    odd = next(r for r in api["results"] if r["path"] == os.path.join(str(photos), "\ufffd.jpg"))
    assert library.ix.paths[odd["id"]] == NAMES[3] and request(server, "GET", f"/thumb/{odd['id']}")[0] == 200
    assert (api["indexed"], api["total"], api["indexing"]) == (6, 6, False)


def test_more_like_this_and_search_by_upload(served):
    server, library, _, photos, _ = served
    row = row_of(library, "sub/c.webp")
    hits = get_json(server, f"/api/like?id={row}&k=3")["results"]
    assert len(hits) == 3 and hits[0]["id"] == row and hits[0]["score"] > 0.99
    hits = get_json(server, "/api/image?k=2", "POST", (photos / "b.png").read_bytes())["results"]
    assert len(hits) == 2 and hits[0]["id"] == row_of(library, "b.png") and hits[0]["score"] > 0.99
    assert hits[0]["query"] == "upload"


def test_thumbnails_are_small_and_cached_and_originals_only_when_asked(served):
    server, library, _, photos, _ = served
    row = row_of(library, "large.jpg")
    code, headers, data = request(server, "GET", f"/thumb/{row}")
    assert code == 200 and headers["Content-Type"] == "image/jpeg"
    assert Image.open(io.BytesIO(data)).size == (256, 171)  # 600x400 within 256 px
    assert request(server, "GET", f"/thumb/{row}")[2] == data and len(library.thumbs) >= 1
    big = Image.open(io.BytesIO(request(server, "GET", f"/thumb/{row}?size=large")[2]))
    assert big.size == (600, 400)  # never enlarged
    code, headers, data = request(server, "GET", f"/photo/{row}")
    assert code == 200 and data == (photos / "large.jpg").read_bytes()
    assert request(server, "GET", f"/thumb/{row}?size=huge")[0] == 400


def test_only_indexed_photos_and_page_assets_are_served(served):
    server, library, *_ = served
    code, headers, page = request(server, "GET", "/?q=a%20dog")
    assert code == 200 and b'<script src="/app.js">' in page and headers["Content-Type"].startswith("text/html")
    assert request(server, "GET", "/app.js")[0] == request(server, "GET", "/style.css")[0] == 200
    link = row_of(library, "link.jpg")  # indexed, but leads out of the folder
    for url in ("/serve.py", "/web/app.js", "/../serve.py", "/%2e%2e/serve.py", "/app.js/../serve.py",
                "/thumb/../../etc/passwd", "/thumb/..%2f..%2fserve.py", "/photo/%2Fetc%2Fpasswd",
                "/photo//etc/passwd", "/thumb/-1", "/thumb/99999", "/thumb/1.0", "/thumb/", f"/thumb/{link}",
                f"/photo/{link}", "/index.html", "/api/nothing", "//etc/passwd"):
        code, _, data = request(server, "GET", url)
        assert code == 404 and "error" in json.loads(data), url


def test_odd_requests_get_a_json_4xx_and_the_server_goes_on(served, monkeypatch):
    server, library, _, photos, _ = served
    for url, code in (("/api/search?q=", 400), ("/api/search?q=%20%20", 400), ("/api/search", 400),
                      (f"/api/search?q={'x' * 10_000}", 400), ("/api/search?q=a&k=0", 400),
                      ("/api/search?q=a&k=abc", 400), ("/api/search?q=a&k=100000", 400),
                      ("/api/like?id=abc", 404), ("/api/like?id=99999", 404), ("/api/like", 404)):
        assert "error" in get_json(server, url, status=code), url
    assert "not a readable photo" in get_json(server, "/api/image", "POST", b"not a photo", 400)["error"]
    assert "empty upload" in get_json(server, "/api/image", "POST", b"", 400)["error"]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)  # large.jpg's 240,000 pixels: a bomb now
    assert "DecompressionBomb" in get_json(server, "/api/image", "POST", (photos / "large.jpg").read_bytes(),
                                           413)["error"]
    conn = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    conn.putrequest("POST", "/api/image")
    conn.putheader("Content-Length", str(serve.MAX_UPLOAD + 1))  # refused before a byte is read
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "too large" in json.loads(r.read())["error"]
    conn.close()
    assert get_json(server, "/api/search?q=a%20red%20circle&k=2")["results"][0]["rank"] == 1


def test_indexing_in_steps_while_searching(tiny_data, tmp_path, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "m" / "best.pt", os.path.join(tiny_data, "text_encoder"), 0)
    photos = tmp_path / "photos"
    photo(photos / "first.jpg", 0)
    monkeypatch.setattr(library_module, "STEP", 2)
    server, library = start(tmp_path, photos, ckpt)
    try:
        library.indexing.join()
        for i in range(5):
            photo(photos / f"new{i}.jpg", i + 1)
        sizes, real = [], library.gallery.update
        # The indexing waits, its first step published, until the clients are done.
        published, searched = threading.Event(), threading.Event()

        def update(ix, files):
            if sizes:
                published.set()
                assert searched.wait(60)
            sizes.append(len(files))
            return real(ix, files)
        monkeypatch.setattr(library.gallery, "update", update)
        assert get_json(server, "/api/rescan", "POST", status=202)["started"] is True
        errors, seen = [], []

        def client():
            for _ in range(5):
                code, _, data = request(server, "GET", "/api/search?q=a%20photo&k=3")
                answer = json.loads(data)
                if code != 200 or not answer["results"]:
                    errors.append((code, data))
                seen.append((answer.get("indexed"), answer.get("indexing")))
        assert published.wait(60)
        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        searched.set()
        library.indexing.join()
        assert errors == [] and sizes == [3, 5, 6]  # published after every 2 new photos
        assert seen == [(3, True)] * 20  # every search answered from the growing index
        status = get_json(server, "/api/status")
        assert (status["indexed"], status["total"], status["indexing"]) == (6, 6, False)
        assert get_json(server, "/api/rescan", "POST", status=202)["started"] is True  # nothing new: quick
        library.indexing.join()
        assert sizes[-1] == 6 and len(library.ix) == 6
        assert os.path.exists(library.gallery.path)  # saved for the next start and for search.py
    finally:
        server.shutdown()
        server.server_close()


def test_main_prints_the_address_and_refuses_a_busy_port(tiny_data, tmp_path, capsys, monkeypatch):
    ckpt = make_checkpoint(tmp_path / "m" / "best.pt", os.path.join(tiny_data, "text_encoder"), 0)
    photo(tmp_path / "photos" / "a.jpg", 0)
    common = ["--checkpoint", ckpt, "--images_dir", str(tmp_path / "photos"), "--index_dir", str(tmp_path),
              "--device", "cpu"]

    def ctrl_c(server):
        raise KeyboardInterrupt
    monkeypatch.setattr(serve.ThreadingHTTPServer, "serve_forever", ctrl_c)
    capsys.readouterr()
    assert serve.main([*common, "--port", "0"]) == 0
    out = capsys.readouterr()
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+\n", out.out) and "WARNING" not in out.err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(SystemExit, match="cannot listen on 127.0.0.1"):
            serve.main([*common, "--port", str(busy.getsockname()[1])])
