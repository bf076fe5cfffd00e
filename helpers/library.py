"""The photo library serve.py's page searches: a checkpoint's gallery (gallery.py) indexed in the
background a step at a time, each step published so searches see the photos indexed so far, and
searched by words, indexed photos and uploads combined (search.py's query syntax), with
thumbnails kept in memory. No HTTP here: serve.py turns requests into these calls. Example:

    python -c "from helpers import library; help(library.Library)"
"""

import io
import os
import threading
import time
from collections import OrderedDict

from PIL import Image

from gallery import Term, ann_key, embed_queries, log, parse_query, readable, result_rows, taken_between
from photos import IMAGE_EXTENSIONS, open_rgb, read_or_blank

MAX_QUERY_CHARS = 1000  # the text tower reads at most a few hundred tokens anyway
THUMB_CACHE = 4000  # thumbnails kept in memory (~10 KB each at 256 px)
STEP = 64  # photos encoded between two publications of the growing index
SAVE_EVERY = 30.0  # seconds: an interrupted server loses at most this much indexing


class BadRequest(Exception):
    """A request the server refuses: (HTTP status, message for the JSON error)."""


class Library:
    """The model and the gallery's index as the page sees it. `ix` is replaced, never changed, by
    the indexing thread, so a request reads one consistent index without a lock."""

    def __init__(self, gallery, model):
        self.gallery, self.model = gallery, model
        self.ix = gallery.ix
        self.total = None  # photos found by the last scan
        self.indexing = threading.Thread()  # not started: not indexing
        self.model_lock = threading.Lock()  # one query encoding at a time: the cores are few
        self.thumbs, self.thumb_lock = OrderedDict(), threading.Lock()
        self.closing = threading.Event()
        self.rescan_lock = threading.Lock()

    def status(self):
        ix = self.ix
        return {"indexed": len(ix), "total": self.total, "indexing": self.indexing.is_alive(),
                "failed": len(ix.failed), "root": readable(self.gallery.shown_root)}

    def rescan(self, files=None):
        """Start indexing `files` (default: a new scan) in the background unless it runs already.
        Returns whether it started."""
        with self.rescan_lock:
            if self.indexing.is_alive():
                return False
            self.indexing = threading.Thread(target=self._index, args=(files,), daemon=True)
            self.indexing.start()
            return True

    def _index(self, files):
        files = self.gallery.scan() if files is None else files
        self.total = len(files)
        ix = self.ix
        before = ann_key(ix)
        known = set(ix.paths) | set(ix.failed)
        base = {p: v for p, v in files.items() if p in known}
        new = sorted(p for p in files if p not in known)
        changed, saved = False, time.monotonic()
        # New photos a step at a time, each step published: searches see them as they come. The
        # first step also drops deleted photos and re-encodes changed ones.
        for i in range(0, max(len(new), 1), STEP):
            ix = ix.copy()
            report = self.gallery.update(ix, {**base, **{p: files[p] for p in new[:i + STEP]}})
            # The approximate index follows first; searches of the previous ix meanwhile run exactly.
            self.gallery.approximate(ix, report, before)
            self.ix, changed, before = ix, changed or report["changed"], ann_key(ix)
            if changed and (time.monotonic() - saved > SAVE_EVERY or i + STEP >= len(new)):
                self.gallery.save(ix)
                saved, changed = time.monotonic(), False
            if self.closing.is_set():
                break
        if changed or not os.path.exists(self.gallery.path):
            self.gallery.save(ix)
        self.gallery.save_ann(ix)
        log(f"index {self.gallery.path}: {len(ix)} photos, {len(ix.failed)} unreadable")

    def search(self, label, q_emb, k, text, ix=None, min_score=None, after=None, before=None):
        """The JSON answer: result_rows (as search.py --json prints them) with each photo's row
        number for /thumb and /photo, and the indexing progress. min_score, after, before: as
        search.py's flags (None: not given)."""
        ix = self.ix if ix is None else ix
        hits = self.gallery.hits(ix, q_emb, k, text, min_score, taken_between(ix, after, before))[0]
        rows = result_rows([label], [[(os.path.join(self.gallery.shown_root, ix.paths[r]), s) for r, s in hits]])
        for row, (r, _) in zip(rows, hits):
            row["id"] = r
        return {"results": rows, **self.status()}

    def photo_of(self, ix, text):
        """The stored embedding (D,) of the indexed photo a query term names by its path (relative
        to the folder, or under it as results show it), or None: the term is words."""
        if not text.lower().endswith(IMAGE_EXTENSIONS):
            return None
        for root in (self.gallery.shown_root, ix.root):
            if root and text.startswith(root.rstrip("/") + "/"):
                text = text[len(root.rstrip("/")) + 1:]
                break
        try:
            row = ix.paths.index(text)
        except ValueError:
            return None
        return ix.emb[row].astype("float32")

    def search_terms(self, q, k, upload=None, **cut):
        """Search a combined query (gallery.parse_query), with the uploaded photo's embedding (D,)
        as its first term if given."""
        if not q.strip() and upload is None:
            raise BadRequest(400, "empty query: type some words")
        if len(q) > MAX_QUERY_CHARS:
            raise BadRequest(400, f"query too long: {len(q)} characters, at most {MAX_QUERY_CHARS}")
        ix = self.ix
        try:
            terms = parse_query(q, lambda text: self.photo_of(ix, text)) if q.strip() else []
            terms = ([Term(1.0, "upload", upload)] if upload is not None else []) + terms
            with self.model_lock:
                q_emb, text = embed_queries(self.model, [terms], lambda emb: emb)
        except ValueError as e:
            raise BadRequest(400, str(e))
        label = "upload " + q.strip() if upload is not None else q
        return self.search(label.strip(), q_emb, k, text, ix, **cut)

    def search_text(self, q, k, **cut):
        return self.search_terms(q, k, **cut)

    def search_like(self, row, k, **cut):
        ix = self.ix
        if not 0 <= row < len(ix):
            raise BadRequest(404, f"no photo {row} in the index")
        return self.search(f"#{row}", ix.emb[row:row + 1].astype("float32"), k, False, ix, **cut)

    def search_image(self, data, k, q="", **cut):
        # Decoded exactly as indexing decodes a file, reported rather than raised on one it cannot
        # read: a bomb (over Pillow's MAX_IMAGE_PIXELS), a text file, ...
        image, err = read_or_blank(io.BytesIO(data), self.gallery.image_size)
        if err:
            raise BadRequest(413 if "DecompressionBomb" in err else 400, f"not a readable photo ({err})")
        with self.model_lock:
            upload = self.model.encode_images(image[None])[0]
        return self.search_terms(q, k, upload, **cut)

    def photo_path(self, row):
        """The real path of an indexed photo, or None: rows outside the index, and links that lead
        out of the folder, are refused (a list file's photos are where the list says)."""
        ix = self.ix
        if not 0 <= row < len(ix):
            return None
        path = os.path.realpath(os.path.join(ix.root, ix.paths[row]))
        outside = os.path.commonpath([path, ix.root]) != ix.root and not self.gallery.args.images_list
        if outside or not os.path.isfile(path):
            return None
        return path

    def thumbnail(self, path, size):
        """JPEG bytes of the photo at most `size` pixels a side, kept in a memory LRU."""
        st = os.stat(path)
        key = (path, size, st.st_size, st.st_mtime_ns)
        with self.thumb_lock:
            if key in self.thumbs:
                self.thumbs.move_to_end(key)
                return self.thumbs[key]
        img = open_rgb(path, size)
        img.thumbnail((size, size), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        with self.thumb_lock:
            self.thumbs[key] = buf.getvalue()
            while len(self.thumbs) > THUMB_CACHE:
                self.thumbs.popitem(last=False)
        return buf.getvalue()
