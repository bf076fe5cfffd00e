"""serve.py with bad clients on 127.0.0.1: stalled, cut-off and vanishing clients cost no traceback and
no search its answer; a stalled client is dropped after the read timeout; past the connection limit,
a 503 at once. Each wait is for an event (the server's count of open connections), with a deadline."""

import json
import os
import re
import socket
import struct
import threading

import numpy as np
import pytest
from PIL import Image
from test_search import make_checkpoint, photo
from test_serve import request, start

try:
    import resource
except ImportError:  # Windows, which has no limit on open files to raise
    resource = None

STALLERS = 200
WAIT = 60  # seconds before a wait for the server counts as failed: it should take well under one


@pytest.fixture(scope="module")
def served(tiny_data, tmp_path_factory):
    """A server over 3 small photos and a 12 MB one, too large for the sockets' buffers."""
    if resource:  # both ends of every connection are in this process; macOS allows 256 files by default
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * STALLERS + 200)), hard))
    tmp = tmp_path_factory.mktemp("clients")
    ckpt = make_checkpoint(tmp / "m" / "best.pt", os.path.join(tiny_data, "text_encoder"), 0)
    photos = tmp / "photos"
    for i in range(3):
        photo(photos / f"{i}.jpg", i)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (2000, 2000, 3), dtype=np.uint8)).save(photos / "large.bmp")
    server, library = start(tmp, photos, ckpt)
    library.indexing.join()
    yield server, library, photos
    server.shutdown()
    server.server_close()
    if resource:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def wait_for_connections(server, n):
    with server.changed:
        assert server.changed.wait_for(lambda: server.connections == n, WAIT), (server.connections, n)


def promise_upload(server, body=b""):
    """A client that sends the headers of a 50,000-byte upload, then `body`, then nothing."""
    s = socket.create_connection(server.server_address[:2], timeout=WAIT)
    port = server.server_address[1]
    s.sendall(f"POST /api/image HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 50000\r\n\r\n".encode() + body)
    return s


def reset(s):
    """Close with a TCP reset, as a client that crashes or loses its network does."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def response(s):
    """(status, JSON body) read from a raw socket until the server closes it."""
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def assert_quiet_log(err, most):
    """At most `most` lines, each one short line about a connection a client dropped; no traceback."""
    lines = err.splitlines()
    assert "Traceback" not in err and len(lines) <= most, err[-3000:]
    for line in lines:
        assert re.fullmatch(r"connection from 127\.0\.0\.1 dropped: (BrokenPipe|ConnectionReset)Error: .*", line), line
        assert len(line) <= 200, line


def test_bad_clients_cost_no_traceback_and_no_search_its_answer(served, capsys):
    server, library, photos = served
    upload = (photos / "0.jpg").read_bytes()
    row = library.ix.paths.index("large.bmp")
    capsys.readouterr()
    stallers = [promise_upload(server, upload[:i % 3 * 500]) for i in range(STALLERS)]  # nothing, or part
    wait_for_connections(server, STALLERS)  # every staller holds a thread: the searches come on top
    answers, errors = [], []

    def searcher(c):
        for j in range(5):
            code, _, data = request(server, "GET", f"/api/search?q=photo%20{c}%20{j}&k=2")
            (answers if code == 200 and len(json.loads(data)["results"]) == 2 else errors).append((code, data[:200]))
        code, _, data = request(server, "POST", "/api/image?k=1", upload)
        (answers if code == 200 and json.loads(data)["results"][0]["path"].endswith("0.jpg") else errors).append(code)
    searchers = [threading.Thread(target=searcher, args=(c,)) for c in range(4)]
    for t in searchers:
        t.start()
    cut_off = []
    for _ in range(10):
        s = promise_upload(server, upload[:1000])
        s.shutdown(socket.SHUT_WR)  # the client is done sending: 1,000 of the 50,000 bytes promised
        cut_off.append(response(s))
        s.close()
        s = socket.create_connection(server.server_address[:2], timeout=WAIT)
        s.sendall(f"GET /photo/{row} HTTP/1.1\r\nHost: 127.0.0.1:{server.server_address[1]}\r\n\r\n".encode())
        assert s.recv(12) == b"HTTP/1.0 200"  # the 12 MB answer has begun, and the client vanishes
        reset(s)
    for t in searchers:
        t.join()
    assert errors == [] and len(answers) == 4 * 6
    assert cut_off == [(400, {"error": "incomplete upload: 1000 of 50000 bytes"})] * 10
    for i, s in enumerate(stallers):
        reset(s) if i % 2 else s.close()
    wait_for_connections(server, 0)
    assert_quiet_log(capsys.readouterr().err, STALLERS + 10)


def test_a_stalled_upload_is_dropped_after_the_read_timeout(served, monkeypatch, capsys):
    server, *_ = served
    monkeypatch.setattr(server, "read_timeout", 0.2)  # read by each new connection
    capsys.readouterr()
    silent = socket.create_connection(server.server_address[:2], timeout=WAIT)  # not even a request line
    stalled = [promise_upload(server, b"x" * 100 * i) for i in range(3)]
    wait_for_connections(server, 0)  # the server let go by itself: no client closed anything
    assert silent.recv(100) == b""
    for s in stalled:
        code, body = response(s)
        assert code == 408 and body["error"].startswith("upload stalled")
        s.close()
    silent.close()
    assert_quiet_log(capsys.readouterr().err, 0)


def test_beyond_the_connection_limit_a_503_at_once(served, monkeypatch, capsys):
    server, *_ = served
    monkeypatch.setattr(server, "max_connections", 3)
    capsys.readouterr()
    held = [promise_upload(server) for _ in range(3)]
    wait_for_connections(server, 3)
    for _ in range(20):  # refused while the three are held, which they are until the test lets go
        code, headers, data = request(server, "GET", "/api/search?q=a%20dog&k=2")
        assert code == 503 and headers["Content-Type"].startswith("application/json")
        assert json.loads(data)["error"].startswith("busy")
    assert server.connections == 3
    for s in held:
        s.close()
    wait_for_connections(server, 0)
    assert request(server, "GET", "/api/search?q=a%20dog&k=2")[0] == 200
    assert_quiet_log(capsys.readouterr().err, 3)


def test_a_client_gone_before_its_request_costs_one_line(served, capsys):
    server, *_ = served
    # The server's thread for an earlier test's last request may not have ended yet: counting from
    # it, the waits below would return before this connection is even counted.
    wait_for_connections(server, 0)
    capsys.readouterr()
    s = socket.create_connection(server.server_address[:2], timeout=WAIT)
    s.sendall(b"GET /api/sta")  # half a request line, then a reset
    wait_for_connections(server, 1)
    reset(s)
    wait_for_connections(server, 0)
    err = capsys.readouterr().err
    assert_quiet_log(err, 1)
    assert err.startswith("connection from 127.0.0.1 dropped: ConnectionResetError")
