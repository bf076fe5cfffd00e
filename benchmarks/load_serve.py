"""Load test of serve.py on loopback: concurrent clients search while a folder is being indexed.

    python benchmarks/load_serve.py --checkpoint models/offline/best.pt
    python benchmarks/load_serve.py --checkpoint M/best.pt --photos 8091 --new 200 --clients 20 --queries 50

Writes --photos small generated JPEGs into a temporary folder and an index of all but --new of
them (random unit vectors: ranking costs the same, and encoding 8,091 photos would take most of
an hour on 2 cores), then starts serve.py over it, so the server indexes the --new photos while
--clients threads each send --queries text searches and fetch the first row of thumbnails, as
the page does. Reports errors and latency p50/p95 under that load; then, with every photo
indexed, the warm latency of one client alone: the JSON of a search, and the JSON plus the first
row of thumbnails (the first results on screen). --bad_clients N then sends N clients that promise
an upload, send a little of it and hang up, and counts the lines and tracebacks they leave in the
server's log (stderr).
"""

import argparse
import contextlib
import http.client
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import quote

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import encoder  # noqa: E402
import serve  # noqa: E402
from gallery import Gallery  # noqa: E402

QUERIES = ["a dog running through snow", "two children on a beach", "a man riding a bike", "people at a market",
           "a black and white dog", "a girl in a pink dress", "a boat on a lake", "a crowd at a concert"]
FIRST_ROW = 6  # thumbnails in the page's first row at 1,100 px


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trained checkpoint")
    p.add_argument("--photos", type=int, default=8091, help="generated photos to index (Flickr8K has 8,091)")
    p.add_argument("--new", type=int, default=200, help="of them, photos left for the server to index under load")
    p.add_argument("--clients", type=int, default=20, help="concurrent clients")
    p.add_argument("--queries", type=int, default=50, help="searches per client")
    p.add_argument("--warm_queries", type=int, default=50, help="searches of the lone client, once indexed")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds before a request counts as failed")
    p.add_argument("--bad_clients", type=int, default=0, help="then clients that promise an upload and hang up")
    return p.parse_args(argv)


def make_images(folder, n):
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = np.empty((96, 128, 3), dtype=np.uint8)
        arr[:] = rng.integers(0, 256, 3, dtype=np.uint8)
        arr[24:72, 32:96] = rng.integers(0, 256, 3, dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(folder, f"{i:05d}.jpg"), quality=85)


def prefill_index(serve_args, n_indexed):
    """Save an index of the first `n_indexed` photos, made of random unit vectors, where serve.py looks."""
    gallery = Gallery(serve_args, encoder.load(serve_args.checkpoint, serve_args.runtime, serve_args.device))
    files = gallery.scan()
    ix = gallery.ix
    ix.paths = sorted(files)[:n_indexed]
    emb = np.random.default_rng(0).standard_normal((n_indexed, ix.emb.shape[1])).astype(np.float32)
    ix.emb = (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float16)
    ix.stats = np.array([files[p] for p in ix.paths], np.int64).reshape(-1, 2)
    ix.fps, ix.taken = np.zeros((n_indexed, 16), np.uint8), None  # no content fingerprints; dates read at save
    ix.bias, ix.bank_key = (np.zeros(n_indexed, np.float32), gallery.bank_key) if gallery.bank_key else (None, "")
    gallery.save(ix)


def search(address, q, thumbs, timeout):
    """Seconds for one search and the first `thumbs` thumbnails, or raises on any non-200."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection(*address, timeout=timeout)
    conn.request("GET", f"/api/search?q={quote(q)}&k=48")
    r = conn.getresponse()
    body = r.read()
    if r.status != 200:
        raise RuntimeError(f"{r.status} {body[:200]!r}")
    for hit in json.loads(body)["results"][:thumbs]:
        conn.request("GET", f"/thumb/{hit['id']}")
        t = conn.getresponse()
        t.read()
        if t.status != 200:
            raise RuntimeError(f"thumbnail {hit['id']}: {t.status}")
    conn.close()
    return time.perf_counter() - start


def bad_clients(server, n, timeout):
    """(log lines, tracebacks) on stderr from `n` clients that each promise a 100 KB upload, send the
    first 1,000 bytes and close, one after another; counted once the server has let go of them all."""
    host, port = server.server_address[:2]
    head = f"POST /api/image HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 100000\r\n\r\n".encode()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        for _ in range(n):
            with socket.create_connection((host, port), timeout=timeout) as s:
                s.sendall(head + b"\xff\xd8\xff" + bytes(997))  # the start of a JPEG
        with server.changed:
            server.changed.wait_for(lambda: server.connections == 0, timeout)
    return len(err.getvalue().splitlines()), err.getvalue().count("Traceback")


def percentiles(times):
    ms = np.array(times) * 1000
    return f"p50 {np.percentile(ms, 50):.1f} ms, p95 {np.percentile(ms, 95):.1f} ms, max {ms.max():.1f} ms"


def main(argv=None):
    args = get_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        photos = os.path.join(tmp, "photos")
        os.makedirs(photos)
        make_images(photos, args.photos)
        serve_args = serve.get_args(["--checkpoint", args.checkpoint, "--images_dir", photos, "--index_dir", tmp,
                                     "--port", "0"])
        prefill_index(serve_args, args.photos - args.new)
        server, library = serve.make_server(serve_args)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        address = server.server_address[:2]
        times, errors, lock = [], [], threading.Lock()
        indexed_before = len(library.ix)

        def client(c):
            for j in range(args.queries):
                try:
                    t = search(address, QUERIES[(c + j) % len(QUERIES)], FIRST_ROW, args.timeout)
                    with lock:
                        times.append(t)
                except Exception as e:
                    with lock:
                        errors.append(f"{type(e).__name__}: {e}")
        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(client, range(args.clients)))
        wall = time.perf_counter() - start
        print(f"{args.clients} clients x {args.queries} searches (each with {FIRST_ROW} thumbnails) while indexing "
              f"({indexed_before} -> {len(library.ix)} of {args.photos} photos indexed): {len(times)} ok, "
              f"{len(errors)} errors, {wall:.1f} s, {len(times) / wall:.1f} searches/s; {percentiles(times)}")
        for e in errors[:5]:
            print(f"  error: {e}")
        library.indexing.join()
        for what, thumbs in (("search JSON", 0), (f"search JSON + first {FIRST_ROW} thumbnails", FIRST_ROW)):
            search(address, "warm-up", thumbs, args.timeout)
            lone = [search(address, QUERIES[j % len(QUERIES)], thumbs, args.timeout) for j in range(args.warm_queries)]
            print(f"warm, one client, {len(library.ix)} photos indexed, {what}: {percentiles(lone)}")
        if args.bad_clients:
            lines, tracebacks = bad_clients(server, args.bad_clients, args.timeout)
            print(f"{args.bad_clients} clients that promise an upload and hang up: {lines} lines in the log, "
                  f"{tracebacks} tracebacks")
        server.shutdown()
        server.server_close()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
