"""Search photos from a local web page: type words, drop a photo, or click one for more like it.

    python serve.py --checkpoint models/offline/best.pt --images_dir ~/Pictures   # prints http://127.0.0.1:8000
    python serve.py                                                               # Flickr8K gallery of models/best.pt

The page runs over search.py's index and ranking (gallery.py), so a query gets the same photos and
scores as `search.py --json`. The index is brought up to date in the background at start and on
"Rescan": searches meanwhile see the photos indexed so far. The same JSON serves scripts:

    GET  /api/search?q=QUERY&k=N  a query as search.py --query takes it: words, indexed photos' paths,
                                  combined with + and - ("a beach + 2020/dog.jpg - 2:people")
    GET  /api/like?id=ROW&k=N     photos like photo   GET /api/status   indexing progress
    POST /api/image?k=N[&q=TERMS] photos like the photo file in the request body [with "+ ..." "- ..." terms]
    POST /api/rescan              index new and changed photos
    ...&min_score=S               on a search: only the hits scoring at least S
    ...&after=DATE&before=DATE    on a search: only photos taken on or after / before YYYY-MM-DD
    GET  /thumb/ROW[?size=large]  a JPEG thumbnail    GET /photo/ROW    the original file

Only indexed photos (by row number, inside the folder) and the page's own files are ever served;
a photo in a query is an indexed one, by its path in the folder (its stored embedding: no file is
read for it), or the upload.
"""

import argparse
import datetime
import json
import math
import mimetypes
import os
import re
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import encoder
from gallery import (
    Gallery,
    add_gallery_args,
    check_gallery_args,
    log,
    readable,
)
from helpers.cli import non_negative_int
from helpers.library import BadRequest, Library

WEB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")
ASSETS = {"/": "index.html", "/app.js": "app.js", "/style.css": "style.css"}
MAX_K = 200
MAX_UPLOAD = 32 << 20  # bytes: a large camera photo fits
READ_TIMEOUT = 20.0  # seconds a socket read or write may wait: a stalled client frees its thread
MAX_CONNECTIONS = 256  # connections served at once, a thread each; beyond, a new one gets 503 at once
THUMB_SIZES = {"small": 256, "large": 1024}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_gallery_args(p, batch_size=16, num_workers=0)
    # server
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; beyond loopback, others see your photos")
    p.add_argument("--port", type=non_negative_int, default=8000, help="port to listen on (0: any free port)")
    args = p.parse_args(argv)
    check_gallery_args(p, args)
    return args


def top_k(params):
    try:
        k = int(params.get("k", ["48"])[0])
    except ValueError:
        raise BadRequest(400, "k must be a whole number")
    if not 1 <= k <= MAX_K:
        raise BadRequest(400, f"k must be between 1 and {MAX_K}")
    return k


def min_score(params):
    """The min_score parameter (None: keep every hit)."""
    text = params.get("min_score", [""])[0]
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        raise BadRequest(400, "min_score must be a number")
    return value


def cutoffs(params):
    """A search's min_score, after and before parameters, as search.py's flags (None: not given)."""
    days = {}
    for name in ("after", "before"):
        text = params.get(name, [""])[0]
        try:
            days[name] = datetime.date.fromisoformat(text) if text else None
        except ValueError:
            raise BadRequest(400, f"{name} must be a date written YYYY-MM-DD")
    return {"min_score": min_score(params), **days}


def row_number(text):
    if not re.fullmatch(r"\d{1,9}", text or ""):
        raise BadRequest(404, "no such photo")
    return int(text)


# A client that hung up, reset the connection or stalled past READ_TIMEOUT: nothing to answer.
CLIENT_GONE = (ConnectionError, TimeoutError)
BUSY = json.dumps({"error": "busy: too many connections open; try again in a moment"}).encode()
BUSY_RESPONSE = (b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
                 b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s" % (len(BUSY), BUSY))


class Server(ThreadingHTTPServer):
    """A thread per connection, each bounded in time (read_timeout per socket read or write) and in
    number (max_connections; counted in `connections`, whose changes `changed` announces). Both
    are attributes, read at each new connection, so a test can lower them."""

    daemon_threads = True
    # Connections not yet accepted, which the kernel holds. socketserver's 5 overflows in a burst,
    # and each connection the kernel drops waits a second for the client to try again.
    request_queue_size = MAX_CONNECTIONS

    def __init__(self, address, handler):
        super().__init__(address, handler)
        self.read_timeout, self.max_connections = READ_TIMEOUT, MAX_CONNECTIONS
        self.connections, self.changed = 0, threading.Condition()

    def process_request(self, request, client_address):
        with self.changed:
            admitted = self.connections < self.max_connections
            self.connections += admitted
            self.changed.notify_all()
        if not admitted:
            # Answered here, in the accepting thread, without reading the request: the refusal
            # costs no thread, and a send of a few hundred bytes into a new socket does not block.
            try:
                request.setblocking(False)
                request.send(BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started (the system's limit): give the place back
            self.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.release()

    def release(self):
        with self.changed:
            self.connections -= 1
            self.changed.notify_all()

    def handle_error(self, request, client_address):
        # socketserver prints a traceback. Handler answers each request's own errors, so what
        # arrives here is the connection failing, mostly a client that hung up: one line says enough.
        e = sys.exc_info()[1]
        log(f"connection from {client_address[0]} dropped: {type(e).__name__}: {e}"[:200])


class Handler(BaseHTTPRequestHandler):
    library = None  # set by make_server
    server_version = "photo-search"

    def log_message(self, *args):
        pass  # a line per request would bury the indexing progress

    def setup(self):
        self.timeout = self.server.read_timeout  # StreamRequestHandler.setup sets it on the socket
        super().setup()

    def send(self, status, body, content_type, cache=False):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "max-age=3600" if cache else "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status, obj):
        self.send(status, json.dumps(obj, ensure_ascii=False).encode(), "application/json; charset=utf-8")

    def do_GET(self):
        self.answer(self.get)

    def do_POST(self):
        self.answer(self.post)

    def answer(self, route):
        try:
            self.check_host()
            route(urlsplit(self.path))
        except BadRequest as e:
            self.send_json(e.args[0], {"error": e.args[1]})
        except CLIENT_GONE:
            raise  # no one to answer: Server.handle_error logs it
        except Exception as e:  # a bug or a vanished file must not take the server down
            log(f"error on {self.command} {readable(self.path)[:200]}: {type(e).__name__}: {e}")
            self.send_json(500, {"error": f"{type(e).__name__}: {e}"})

    def check_host(self):
        """On 127.0.0.1, answer only requests addressed to this computer by name: a web page whose
        own host name an attacker points at 127.0.0.1 (DNS rebinding) must not read the photos."""
        bound, port = self.server.server_address[:2]
        if bound != "127.0.0.1":
            return  # --host chose to open the server; the warning at start said so
        if self.headers.get("Host", "") not in {f"{name}:{port}" for name in ("127.0.0.1", "localhost")}:
            raise BadRequest(403, "this server answers only requests to 127.0.0.1 or localhost")

    def get(self, url):
        params, lib = parse_qs(url.query), self.library
        if url.path in ASSETS:
            name = ASSETS[url.path]
            with open(os.path.join(WEB, name), "rb") as f:
                return self.send(200, f.read(), mimetypes.guess_type(name)[0] + "; charset=utf-8")
        if url.path == "/api/search":
            return self.send_json(200, lib.search_text(params.get("q", [""])[0], top_k(params), **cutoffs(params)))
        if url.path == "/api/like":
            return self.send_json(200, lib.search_like(row_number(params.get("id", [""])[0]), top_k(params),
                                                          **cutoffs(params)))
        if url.path == "/api/status":
            return self.send_json(200, lib.status())
        m = re.fullmatch(r"/(thumb|photo)/([^/]*)", url.path)
        if m is None:
            raise BadRequest(404, "not found")
        path = lib.photo_path(row_number(m[2]))
        if path is None:
            raise BadRequest(404, "no such photo")
        if m[1] == "photo":  # the original, asked for by name
            with open(path, "rb") as f:
                kind = mimetypes.guess_type(path)[0] or ""
                # Only an image type: a file named .html or .svg must not run as a page of this server.
                return self.send(200, f.read(), kind if kind.startswith("image/") and "svg" not in kind
                                 else "application/octet-stream")
        size = THUMB_SIZES.get(params.get("size", ["small"])[0])
        if size is None:
            raise BadRequest(400, f"size must be one of {', '.join(THUMB_SIZES)}")
        self.send(200, lib.thumbnail(path, size), "image/jpeg", cache=True)

    def post(self, url):
        if url.path == "/api/rescan":
            started = self.library.rescan()
            return self.send_json(202 if started else 200, {"started": started, **self.library.status()})
        if url.path != "/api/image":
            raise BadRequest(404, "not found")
        params = parse_qs(url.query)
        k, cut = top_k(params), cutoffs(params)
        try:
            n = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise BadRequest(411, "send the photo as the request body, with its Content-Length")
        if n > MAX_UPLOAD:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise BadRequest(413, f"photo too large: {n} bytes, at most {MAX_UPLOAD}")
        if n <= 0:
            raise BadRequest(400, "empty upload: choose a photo file")
        try:
            data = self.rfile.read(n)
        except TimeoutError:
            self.close_connection = True  # the stream stopped mid-body: it cannot carry another request
            raise BadRequest(408, f"upload stalled: nothing came for {self.timeout:g} s")
        if len(data) < n:  # the client closed its side early: a cut-off file is not the photo
            raise BadRequest(400, f"incomplete upload: {len(data)} of {n} bytes")
        self.send_json(200, self.library.search_image(data, k, params.get("q", [""])[0], **cut))


def make_server(args):
    """The server, listening, and its Library; the gallery's indexing has started."""
    model = encoder.load(args.checkpoint, args.runtime, args.device, args.int8)
    model.encode_texts(["a photo"])  # a text graph that cannot be read stops the start, not the first search
    library = Library(Gallery(args, model), model)
    handler = type("LibraryHandler", (Handler,), {"library": library})
    try:
        server = Server((args.host, args.port), handler)
    except OSError as e:
        raise SystemExit(f"error: cannot listen on {args.host}:{args.port} ({e.strerror}); pass another --port.")
    library.rescan(library.gallery.scan())  # scanned here, so that a missing folder or dataset stops the start
    return server, library


def main(argv=None):
    args = get_args(argv)
    server, library = make_server(args)
    host, port = server.server_address[:2]
    if host != "127.0.0.1":
        log(f"WARNING: listening on {host}:{port}, not only on this computer: anyone who can reach it "
            "can search and open the photos of this gallery.")
    print(f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        library.closing.set()
        library.indexing.join()  # the index so far is saved: the next start goes on from there
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
