"""serve.py's page in a real browser: headless Chromium (Debian's `chromium` package) driven over
the DevTools protocol types a query, finds the thumbnails, and clicks one for more like this.

Set SERVE_SCREENSHOT=docs/serve.png to keep the screenshot the README shows."""

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.request
from urllib.parse import quote

import pytest
from test_serve import get_json
from tiny import make_checkpoint

import serve

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no browser: install Debian's chromium package "
                                                         "(apt-get install chromium) to run the page test")


class DevTools:
    """The few lines of a WebSocket client (RFC 6455) that the DevTools protocol needs: the
    standard library has none, and this saves a test dependency."""

    def __init__(self, ws_url):
        host, port, path = re.fullmatch(r"ws://([^:/]+):(\d+)(/.*)", ws_url).groups()
        self.sock = socket.create_connection((host, int(port)), timeout=20)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                          f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        assert head.startswith(b"HTTP/1.1 101"), head
        self.next_id = 0

    def read(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the browser closed the connection"
            data += chunk
        return data

    def message(self):
        payload = b""
        while True:
            b0, b1 = self.read(2)
            n = b1 & 0x7F
            if n >= 126:
                n = struct.unpack(">H" if n == 126 else ">Q", self.read(2 if n == 126 else 8))[0]
            payload += self.read(n)
            if b0 & 0x80:  # the final fragment
                return json.loads(payload)

    def call(self, method, **params):
        """Send one command and return its result; events that arrive meanwhile are dropped."""
        self.next_id += 1
        data = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)  # clients must mask what they send
        n = len(data)
        head = struct.pack(">BB", 0x81, 0x80 | n) if n < 126 else struct.pack(">BBH", 0x81, 0xFE, n)
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
        while True:
            msg = self.message()
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expression):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def wait_for(self, expression, timeout=20):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {expression}")


@pytest.fixture
def browser(tmp_path):
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", "--hide-scrollbars", "--window-size=1100,760",
                             f"--user-data-dir={tmp_path / 'profile'}", "--remote-debugging-port=0",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:  # Chromium names its DevTools port on stderr
            m = re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line)
            if m:
                break
        else:
            pytest.fail("chromium exited without opening DevTools")
        threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep its pipe from filling
        with urllib.request.urlopen(f"http://127.0.0.1:{m[1]}/json/list", timeout=20) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        yield DevTools(page["webSocketDebuggerUrl"])
    finally:
        proc.kill()
        proc.wait()


def test_type_a_query_then_click_for_more_like_this(tiny_data, tmp_path, browser):
    ckpt = make_checkpoint(tmp_path / "m" / "best.pt", os.path.join(tiny_data, "text_encoder"), 0)
    args = serve.get_args(["--checkpoint", ckpt, "--images_dir", os.path.join(tiny_data, "images"),
                           "--index_dir", str(tmp_path), "--device", "cpu", "--port", "0"])
    server, library = serve.make_server(args)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        library.indexing.join()
        url = "http://{}:{}/".format(*server.server_address[:2])
        browser.call("Page.navigate", url=url)
        browser.wait_for("document.readyState === 'complete' && !!document.getElementById('q')")
        browser.js("document.getElementById('q').focus()")
        browser.call("Input.insertText", text="a red circle")
        for kind in ("keyDown", "keyUp"):
            browser.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13,
                         **({"text": "\r"} if kind == "keyDown" else {}))
        browser.wait_for("[...document.querySelectorAll('#results img')].filter("
                         "i => i.complete && i.naturalWidth > 0).length === 48")  # the page asks for 48
        assert browser.js("location.search") == "?q=a+red+circle"
        assert browser.js("document.querySelector('#results figure').title").startswith(args.images_dir)
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
        out = os.environ.get("SERVE_SCREENSHOT") or str(tmp_path / "serve.png")
        with open(out, "wb") as f:
            f.write(shot)

        # a real mouse click in the middle of the third thumbnail
        third = browser.js("(() => { const i = document.querySelectorAll('#results img')[2];"
                           " const r = i.getBoundingClientRect();"
                           " return [r.x + r.width / 2, r.y + r.height / 2, +i.dataset.id]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            browser.call("Input.dispatchMouseEvent", type=kind, x=third[0], y=third[1], button="left", clickCount=1)
        browser.wait_for(f"location.search === '?like={third[2]}' && "
                         f"document.querySelector('#results img')?.dataset.id === '{third[2]}'")
        assert browser.js("document.getElementById('message').textContent").startswith(f"Photos like #{third[2]}")

        # a combined query and its cut-offs from the URL: the API's hits at least min_score, the fields filled
        q = "a red circle - 2:a blue square"
        api = get_json(server, f"/api/search?k=48&q={quote(q)}")["results"]
        cut = api[2]["score"]
        browser.call("Page.navigate", url=f"{url}?q={quote(q)}&min_score={cut}")
        ids = [str(r["id"]) for r in api if r["score"] >= cut]
        browser.wait_for(f"JSON.stringify([...document.querySelectorAll('#results img')].map(i => i.dataset.id))"
                         f" === '{json.dumps(ids, separators=(',', ':'))}'")
        assert browser.js("[q.value, min_score.value]") == [q, str(cut)]
        # a date typed in the page's field goes into the URL and the search: no photo is from the future
        # (and the form submits with a min_score of any precision in its field)
        browser.js("after.value = '2100-01-01'; document.querySelector('#search button').click()")
        browser.wait_for("document.getElementById('message').textContent.includes(': 0 of ')")
        assert "after=2100-01-01" in browser.js("location.search")
    finally:
        server.shutdown()
        server.server_close()
