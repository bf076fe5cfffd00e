"""Fetching and unpacking the dataset's archives: resumable downloads with retries, zip checks
(size, SHA-256, integrity, zip bombs) and a one-time extraction, for preprocess_flickr8k.py. No
torch here, so preprocessing starts fast. Example:

    python -c "from helpers import download; download.extract('downloads/Flickr8k_text.zip', 'raw')"
"""

import hashlib
import json
import os
import re
import shutil
import sys
import time
import zipfile
import zlib
from pathlib import Path

import requests
from tqdm import tqdm

from helpers.atomic import atomic_write

TRIES = 4  # download attempts per archive
BACKOFF_S = 2.0  # wait before the first retry, doubled each time (tests set it to 0)
TIMEOUT_S = (10, 60)  # connect, and longest silence mid-download before a retry
# Archive limits, far above Flickr8K's (~16,000 members with the __MACOSX ones; JPEGs do not
# compress): more members or a higher unpacked/packed ratio than this is not our dataset.
MAX_MEMBERS = 100_000
MAX_RATIO = 100


class TransientError(Exception):
    """A download failure worth another try: a 5xx answer or a connection that closed early."""


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(obj, path):
    with atomic_write(path) as f:
        json.dump(obj, f)


def _discard(path):
    if os.path.exists(path):
        os.remove(path)


def download(url, dest):
    """Stream url to dest through dest.part, resuming a partial file; retry transient errors.

    dest.part.json records the url, total size and validator (ETag or Last-Modified) of the file
    that dest.part is a prefix of. A resume sends them back (If-Range), and a partial file is kept
    only while the server vouches for the same file; otherwise the download starts over.
    """
    part, meta, name = dest + ".part", dest + ".part.json", os.path.basename(dest)
    for attempt in range(TRIES):
        try:
            _fetch(url, part, meta, name)
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                TransientError) as e:
            if attempt == TRIES - 1:
                kept = f"; {part} is kept and the next run resumes it" if os.path.exists(part) else ""
                raise SystemExit(f"error: downloading {url} failed after {TRIES} tries: {e}{kept}")
            wait = BACKOFF_S * 2 ** attempt
            print(f"{name}: {e}; retrying in {wait:g} s", file=sys.stderr)
            time.sleep(wait)
    os.replace(part, dest)  # not atomic_path: a failed download keeps its .part to resume it
    _discard(meta)


def _fetch(url, part, meta, name):
    """One attempt: bring part up to the whole file, resuming it if the server vouches for it.

    Returns once part is whole; raises TransientError for a failure worth another try.
    """
    have = os.path.getsize(part) if os.path.exists(part) else 0
    known = _read_json(meta) if have else None
    if have and (not known or known.get("url") != url or not known.get("total")):
        have = 0  # a partial file nobody can vouch for: start over
    # identity encoding: byte offsets for Range must count file bytes, not gzip bytes
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if known.get("validator"):
            headers["If-Range"] = known["validator"]  # the server sends all of it if the file changed
    with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as r:
        if r.status_code == 416:  # nothing past byte `have`: complete if the totals agree
            server_total = r.headers.get("Content-Range", "").rpartition("/")[2]
            if have and server_total == str(have) == str(known["total"]):
                return
            _discard(part)
            raise TransientError("partial file does not match the server's; starting over")
        _refuse_bad_answer(r, url, part, have)
        length = r.headers.get("Content-Length")
        if r.status_code == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", r.headers.get("Content-Range", ""))
            if not (have and m and int(m[1]) == have and int(m[2]) == known["total"]):
                _discard(part)
                raise TransientError("the server's file differs from the partial one; starting over")
            total = known["total"]
        else:  # 200: the whole file, because it is new, changed, or the server ignores Range
            have = 0
            total = int(length) if length is not None else None
            _write_json({"url": url, "total": total,
                         "validator": r.headers.get("ETag") or r.headers.get("Last-Modified")}, meta)
        if total is not None:
            free = shutil.disk_usage(os.path.dirname(os.path.abspath(part))).free
            if total - have > free:
                raise SystemExit(f"error: {name} needs {(total - have) / 1e9:.2f} GB more but only "
                                 f"{free / 1e9:.2f} GB are free there; free some space and run again")
        with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=name) as bar:
            for chunk in r.iter_content(1 << 16):  # small: a cut loses at most 64 KiB
                f.write(chunk)
                bar.update(len(chunk))
    if total is not None and os.path.getsize(part) < total:
        raise TransientError("connection closed early")


def _refuse_bad_answer(r, url, part, have):
    """Raise for an answer that carries no part of the archive: retry a server error, stop on others."""
    if r.status_code >= 500 or r.status_code == 429:
        raise TransientError(f"HTTP {r.status_code}")
    if r.status_code >= 400:
        raise SystemExit(f"error: {url} answered HTTP {r.status_code}")
    if r.headers.get("Content-Type", "").startswith("text/html"):
        # a login, error or rate-limit page: never let it overwrite a good partial file
        raise SystemExit(f"error: {url} is an HTML page (an error or login page?), not the archive; "
                         "check --url_base and your connection, then run again"
                         + (f" ({part} is kept and resumes)" if have else ""))


def sha256sum(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_zip(path, expected_size=None, remove=False, expected_sha256=None):
    """Exit with a clear message if path is not a whole zip; remove it if it was our download."""
    size, problem = os.path.getsize(path), None
    if expected_size and size != expected_size:
        problem = f"has {size:,} bytes, expected {expected_size:,}"
    elif expected_sha256 and sha256sum(path) != expected_sha256:
        problem = f"does not have the expected SHA-256 {expected_sha256[:16]}... (damaged or another file)"
    elif not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(200).lower()
        html = b"<html" in head or b"<!doctype" in head
        problem = "is an HTML page (an error or login page?), not a zip" if html else "is not a zip archive"
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                members = zf.infolist()
                # Declared sizes are safe to trust: zipfile stops a member at its declared size.
                unpacked = sum(m.file_size for m in members)
                if len(members) > MAX_MEMBERS:
                    problem = f"has {len(members):,} members, more than {MAX_MEMBERS:,}: not a Flickr8K archive"
                elif unpacked > MAX_RATIO * max(size, 1 << 20):
                    problem = f"would unpack {size:,} bytes into {unpacked:,} (a zip bomb?)"
                else:
                    bad = zf.testzip()
                    problem = f"has a corrupt member {bad}" if bad else None
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            problem = f"is damaged ({e})"
    if problem:
        if remove:
            os.remove(path)
        raise SystemExit(f"error: {path} {problem}" + ("; removed it, run again" if remove else ""))


def extract(zip_path, out_dir, expected_size=None, remove_bad=False, expected_sha256=None):
    """Check zip_path and extract it into out_dir, once: a marker file makes later runs skip it."""
    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, f".{os.path.basename(zip_path)}.done")
    size = str(os.path.getsize(zip_path))
    if os.path.exists(marker) and Path(marker).read_text() == size:
        return
    check_zip(zip_path, expected_size, remove_bad, expected_sha256)
    root = os.path.realpath(out_dir)
    with zipfile.ZipFile(zip_path) as zf:
        members = zf.infolist()
        unpacked, free = sum(m.file_size for m in members), shutil.disk_usage(root).free
        if unpacked > free:
            raise SystemExit(f"error: {zip_path} unpacks to {unpacked / 1e9:.2f} GB but only {free / 1e9:.2f} GB "
                             f"are free in {out_dir}; free some space and run again")
        for m in members:  # refuse the whole archive before writing anything ("zip slip")
            target = os.path.realpath(os.path.join(root, m.filename))
            is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
            if is_link or os.path.isabs(m.filename) or os.path.commonpath([root, target]) != root:
                what = "is a symlink" if is_link else "would land outside " + out_dir
                raise SystemExit(f"error: refusing to extract {zip_path}: member {m.filename!r} {what}")
        for m in tqdm(members, desc=f"extract {os.path.basename(zip_path)}", unit="file"):
            if not m.filename.startswith("__MACOSX/"):  # macOS resource forks, not data
                zf.extract(m, root)
    Path(marker).write_text(size)
