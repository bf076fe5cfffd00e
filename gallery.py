"""A checkpoint's gallery: which photos it searches (a folder, recursively, a list file, or
Flickr8K's), the index file that holds their embeddings and, for a big gallery, the approximate
index (helpers/ann.py) beside it, how a query is encoded and ranked, and the JSON rows of a result. What
search.py and serve.py share. Example:

    python -c "import gallery; print(gallery.slug('a dog running through snow'))"
"""

import calendar
import csv
import hashlib
import os
import re
import stat
import sys
import threading
from typing import NamedTuple

import numpy as np

from helpers.atomic import read_keyed, write_keyed
from helpers.cli import non_negative_int, positive_int
from index import GalleryIndex, querybank_bias, scan_folder

# Exact search below this many photos, the approximate index from there on (or at any size with
# --ann): past it a query waits longer for exact search than the approximate index costs to build
# once and lose in recall (benchmarks/README.md, "Where the approximate index starts").
ANN_FROM = 100_000
LISTED_MISSING = 5  # missing files of a list named in the warning
SCORE_DECIMALS = 6  # scores as reported (and as --min_score compares them): float32's precision


def log(msg):
    """Progress and warnings go to stderr, so stdout holds only results (and stays valid JSON)."""
    print(msg, file=sys.stderr)


def slug(text, limit=60):
    """A file-name-safe form of text; a short hash keeps texts apart when non-ASCII is dropped or it is cut."""
    s = "_".join("".join(c if c.isascii() and c.isalnum() else " " for c in text.lower()).split())
    if not s or len(s) > limit or not text.isascii():
        s = f"{s[:limit].strip('_')}_{hashlib.sha1(text.encode(errors='surrogateescape')).hexdigest()[:8]}".lstrip("_")
    return s


def readable(text):
    """`text` as valid Unicode: a file name's bytes that are not UTF-8 reach Python as lone
    surrogates (PEP 383), which no JSON parser need accept; each becomes U+FFFD."""
    return "".join("\ufffd" if "\ud800" <= c <= "\udfff" else c for c in text)


def gallery_images(data_dir, use_test_set, cache=None):
    """Sorted image names: the test split's, or every image the dataset lists (read with the csv
    module: search needs neither pandas nor dataset.py's PyTorch). cache: a file that keeps them
    for the next call, until captions.csv changes (its path, inode, size, modification and change
    times: a rewrite that restores the modification time still changes the last): parsing 40,000
    captions took most of a cold query's scan of Flickr8K."""
    path = os.path.join(data_dir, "captions.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; pass --data_dir, or --images_dir to search your own photos.")
    st = os.stat(path)
    key = (f"names 1:{os.path.realpath(path)}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:"
           f"test={bool(use_test_set)}")
    kept = read_keyed(cache, key) if cache else None
    if kept is not None:
        return kept["names"].tobytes().decode("utf-8").split("\0")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = csv.reader(f)  # not DictReader: a dict per caption would be most of a cold query's parsing
            header = next(rows, [])
            image, split = header.index("image"), header.index("split")
            rows = [(r[image], r[split]) for r in rows if r]
        names = {name for name, s in rows if not use_test_set or s == "test"}
    except (UnicodeDecodeError, csv.Error, ValueError, IndexError) as e:
        raise SystemExit(f"error: {path} is not the UTF-8 CSV that preprocess_flickr8k.py writes "
                         f"({type(e).__name__}: {e}); rerun preprocess_flickr8k.py.")
    if not rows:
        raise SystemExit(f"error: {path} holds no captions; rerun preprocess_flickr8k.py.")
    names = sorted(names)
    if cache and names:
        write_keyed(cache, key, names=np.frombuffer("\0".join(names).encode("utf-8"), np.uint8))
    return names


def flickr_files(root, names):
    """{name: (size, mtime_ns)} of the listed photos that exist under root."""
    files = {}
    for name in names:
        try:
            st = os.stat(os.path.join(root, name))
            files[name] = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
    if len(files) < len(names):
        log(f"warning: {len(names) - len(files)} of {len(names)} photos listed in captions.csv are missing from {root}")
    return files


def list_files(path):
    """{path: (size, mtime_ns)} of the photos a list file names, one per line (UTF-8; blank lines
    and lines starting with # skipped; a relative path is relative to the list's folder). A photo
    under the list's folder is keyed by its path relative to that folder, as a folder's photos are
    (the index's root); one elsewhere by its absolute path. No folder is walked: each listed file
    is looked up once; missing ones are left out with a warning, as captions.csv's are."""
    try:
        with open(path, encoding="utf-8-sig", errors="surrogateescape") as f:
            lines = [line.strip() for line in f]
    except OSError as e:
        raise SystemExit(f"error: cannot read --images_list {path}: {e.strerror}.")
    root = os.path.dirname(os.path.realpath(path))
    listed = [line for line in lines if line and not line.startswith("#")]
    files, missing = {}, []
    for line in listed:
        full = os.path.normpath(os.path.join(root, os.path.expanduser(line)))
        rel = os.path.relpath(full, root)
        key = (full if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel).replace(os.sep, "/")
        try:
            st = os.stat(full)
        except OSError:
            st = None
        if st is None or not stat.S_ISREG(st.st_mode):
            missing.append(line)
            continue
        files[key] = (st.st_size, st.st_mtime_ns)
    if missing:
        log(f"warning: {len(missing)} of {len(listed)} photos listed in {path} are missing or not files: "
            + ", ".join(missing[:LISTED_MISSING]) + (" ..." if len(missing) > LISTED_MISSING else ""))
    return files


def add_gallery_args(p, batch_size, num_workers):
    """The flags that choose a gallery, its index and the model, for search.py and serve.py."""
    # gallery
    source = p.add_mutually_exclusive_group()
    source.add_argument("--images_dir", default=None,
                        help="search this folder of photos (recursively) instead of Flickr8K")
    source.add_argument("--images_list", default=None,
                        help="search the photos this file lists, one path per line (relative: to the file's "
                             "folder), instead of Flickr8K; no folder is walked")
    p.add_argument("--ann", action="store_true",
                   help=f"search through the approximate FAISS index at any size (default: from {ANN_FROM:,} "
                        "photos on; needs faiss-cpu)")
    p.add_argument("--use_test_set", action="store_true", help="search only the test split's photos")
    p.add_argument("--data_dir", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--index_dir", default=None, help="where gallery indexes are kept (default: beside the checkpoint)")
    p.add_argument("--batch_size", type=positive_int, default=batch_size,
                   help="photos per encoding batch while indexing")
    p.add_argument("--num_workers", type=non_negative_int, default=num_workers,
                   help="threads decoding photos while indexing")
    # model
    p.add_argument("--checkpoint", default="models/best.pt", help="trained checkpoint")
    p.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"],
                   help="onnx: the checkpoint's export on onnxruntime; torch: PyTorch; auto: the export when "
                        "it is current, else PyTorch")
    p.add_argument("--int8", action="store_true", help="text queries on the export's int8 text graph (export.py "
                   "--int8): warm queries quicker, a little less accurate (RESULTS.md)")
    p.add_argument("--device", default="auto",
                   help="PyTorch's device: auto (cuda, then mps, then cpu), cuda, mps or cpu")


def check_gallery_args(p, args):
    if (args.images_dir or args.images_list) and args.use_test_set:
        p.error("--use_test_set picks Flickr8K's test photos; it does not apply to --images_dir or --images_list")
    if args.images_dir and not os.path.isdir(args.images_dir):
        p.error(f"--images_dir {args.images_dir} is not a folder")
    if args.images_list and not os.path.isfile(args.images_list):
        p.error(f"--images_list {args.images_list} is not a file")


def ann_key(ix):
    """What an approximate index must match to search `ix`: the checkpoint and the rows' generation."""
    return f"{ix.fingerprint}:{ix.generation}"


class Gallery:
    """The photos a checkpoint searches (args.images_dir, recursively, args.images_list's, or
    Flickr8K's) and their index file: `ix` is the index as stored, `scan()` lists the photos now,
    `update()` brings an index up to date with them and `save()` keeps it; `approximate()` keeps
    the approximate index (`ann`) in step with it, and `hits()` searches through whichever applies.
    args: search.py's and serve.py's flags; encoder: encoder.py's, which embeds the photos and
    queries."""

    def __init__(self, args, encoder):
        self.encoder, self.args = encoder, args
        self.image_size, self.flip = encoder.image_size, encoder.flip
        self.encode_files = None  # index.encode_image_files, or helpers/shard.py's stand-in under torchrun
        if args.images_list:
            # The list's folder is the root: its photos keep relative paths, others absolute ones.
            self.listing = os.path.realpath(args.images_list)
            self.shown_root, self.root = os.path.dirname(args.images_list), os.path.dirname(self.listing)
            name = f"list-{slug(os.path.splitext(os.path.basename(self.listing))[0], 30)}-" \
                   f"{hashlib.sha1(self.listing.encode(errors='surrogateescape')).hexdigest()[:8]}"
        elif args.images_dir:
            self.shown_root = args.images_dir
            self.root = os.path.realpath(args.images_dir)
            # The folder's name for people, a hash of its full path for uniqueness (two "photos" folders).
            name = f"{slug(os.path.basename(self.root) or 'root', 30)}-" \
                   f"{hashlib.sha1(self.root.encode(errors='surrogateescape')).hexdigest()[:8]}"
        else:
            self.data_dir = args.data_dir or encoder.args["data_dir"]
            self.shown_root = os.path.join(self.data_dir, "images")
            self.root = os.path.realpath(self.shown_root)
            name = "test" if args.use_test_set else "all"
        # Beside the checkpoint, not in the photo folder: that may be read-only, synced or shared.
        self.index_dir = args.index_dir or os.path.dirname(os.path.abspath(args.checkpoint))
        stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
        self.path = os.path.join(self.index_dir, f"index_{stem}_{name}.npz")
        self.names_path = os.path.join(self.index_dir, f"names_{stem}_{name}.npz")  # Flickr8K's listing, kept
        # Which querybank the photos' biases come from ("": none, rank by cosine similarity).
        self.bank_dir = args.data_dir or encoder.args.get("data_dir") or ""
        self.bank_key = encoder.querybank_key(self.bank_dir) if encoder.args.get("querybank") else ""
        self.bank_cache = os.path.join(self.index_dir, f"querybank_{stem}.npy")
        self.ix = GalleryIndex.open(self.path, encoder.fingerprint, self.root, encoder.dim,
                                    os.path.abspath(args.checkpoint), log)
        self.bias_fn = None
        self.ann_path = os.path.splitext(self.path)[0] + ".ann"
        self.ann, self.ann_dirty = None, False  # ann.AnnIndex, and whether it changed since saved
        # Held while the approximate index is searched, changed or saved (FAISS's adds and removes
        # must not meet a search: serve.py searches while it indexes).
        self.ann_lock = threading.Lock()

    def make_bias_fn(self):
        """For GalleryIndex.update: gives photos their querybank bias; reads the caption bank once."""
        if self.bias_fn is None:
            bank = self.encoder.caption_bank(self.bank_dir, self.bank_cache, self.bank_key)
            scale = self.encoder.logit_scale
            self.bias_fn = lambda emb: querybank_bias(emb, bank, scale)
        return self.bias_fn

    def scan(self):
        """{relative path: (size, mtime_ns)} of the gallery's photos as they are now."""
        if self.args.images_list:
            return list_files(self.listing)
        if self.args.images_dir:
            return scan_folder(self.root)
        return flickr_files(self.root, gallery_images(self.data_dir, self.args.use_test_set, self.names_path))

    def update(self, ix, files):
        return ix.update(files, self.encoder, self.args.batch_size, self.args.num_workers,
                         self.make_bias_fn if self.bank_key else None, self.bank_key, self.encode_files)

    def save(self, ix):
        """Keep the index (and the approximate index, if it is ix's): written atomically."""
        try:
            os.makedirs(self.index_dir, exist_ok=True)
            ix.save(self.path)
        except OSError as e:
            log(f"warning: could not save the index to {self.path} ({e.strerror}); "
                "pass --index_dir with a writable folder to keep it between runs.")
        self.save_ann(ix)

    def save_ann(self, ix):
        with self.ann_lock:
            if self.ann is None or not self.ann_dirty or self.ann.fingerprint != ann_key(ix):
                return
            try:
                self.ann.save(self.ann_path)
                self.ann_dirty = False
            except OSError as e:
                log(f"warning: could not save the approximate index to {self.ann_path} ({e.strerror}); "
                    "it is built again next time.")

    def uses_ann(self, ix):
        return self.args.ann or len(ix) >= ANN_FROM

    def approximate(self, ix, report, before, build=True):
        """Bring the approximate index to `ix` after an update (`report`: GalleryIndex.update's) of
        the index whose ann_key was `before`: the one in memory or on disk that matches `before`
        drops the rows removed and takes the rows added (helpers/ann.py's remove and add); one that
        matches neither, a rebias, or a gallery grown past what it was built for (needs_rebuild)
        gets it built anew, unless not `build`. Returns it, or None when ix is searched exactly
        (fewer than ANN_FROM photos without --ann, FAISS not installed without --ann, or none built).
        Not saved: save_ann()."""
        if not self.uses_ann(ix):
            return None
        try:
            from helpers import ann
        except ImportError as e:
            if self.args.ann:
                raise SystemExit(f"error: {e}")
            log(f"note: {len(ix):,} photos are searched exactly; {e} for faster searches")
            return None
        key, cur = ann_key(ix), self.ann
        if cur is None or cur.fingerprint not in (key, before):
            cur = ann.load(self.ann_path, before, log) if os.path.exists(self.ann_path) else None
        if cur is not None and cur.fingerprint != key:
            why = ("the querybank biases changed" if report["rebiased"]
                   else "the biases are new or gone" if cur.has_bias != (ix.bias is not None) else "")
            if not why:
                kept = np.asarray(report["kept"], np.int64)
                with self.ann_lock:  # in place: a search meanwhile waits
                    cur.remove(np.setdiff1d(np.arange(len(cur)), kept))
                    cur.add(ix.emb[len(kept):], None if ix.bias is None else ix.bias[len(kept):])
                    cur.fingerprint = key
                why = f"it was built for {cur.n_built:,} photos and holds {len(cur):,}" if cur.needs_rebuild else ""
            if why:
                log(f"rebuilding the approximate index {self.ann_path}: {why}")
                cur = None
        if cur is None and not build:
            return None
        if cur is None:
            from tqdm import tqdm
            with tqdm(total=len(ix), desc="approximate index", unit="photo") as bar:
                cur = ann.build(ix.emb, ix.bias, key, progress=bar.update)
        with self.ann_lock:
            self.ann_dirty = self.ann_dirty or cur is not self.ann or key != before
            self.ann = cur
        return cur

    def hits(self, ix, q_emb, k, text, min_score=None, allowed=None):
        """top_hits over ix, through the approximate index when it is ix's (else exactly)."""
        with self.ann_lock:
            ann = self.ann if self.ann is not None and self.ann.fingerprint == ann_key(ix) else None
            return top_hits(ix, q_emb, k, text, min_score, allowed, ann)


# A + or - with space (or the query's start) on both sides starts a term: "t-shirt" stays words.
TERM_SIGN = re.compile(r"(?<!\S)([+-])(?!\S)")
# "2:sunset", "0.5:dog.jpg"; not "10:30", a time, nor "C:/photo.jpg", a drive.
TERM_WEIGHT = re.compile(r"(\d+(?:\.\d+)?|\.\d+):(?!\d)(.+)", re.S)


class Term(NamedTuple):
    weight: float  # signed: a - term has a negative weight
    text: str  # as written (its weight prefix removed)
    photo: object  # None for words; else what photo_of(text) returned (a path, a row, ...)


def parse_query(query, photo_of):
    """The terms of a combined query such as "a beach + ~/dog.jpg - 2:people": each a text or a
    photo, signed and optionally weighted ("2:"). photo_of(text) -> None (the term is words) or
    what names the photo; a term that is not a photo's name stays words. Raises ValueError on an
    empty term."""
    parts = TERM_SIGN.split(query.strip())
    parts = parts[1:] if parts[0] == "" and len(parts) > 1 else ["+", *parts]
    terms = []
    for sign, text in zip(parts[0::2], parts[1::2]):
        m = TERM_WEIGHT.fullmatch(text.strip())
        weight, text = (float(m[1]), m[2].strip()) if m else (1.0, text.strip())
        if not text:
            raise ValueError(f"empty term in the query {query!r}: write words or a photo between + and -")
        terms.append(Term(-weight if sign == "-" else weight, text, photo_of(text)))
    return terms


def combine(weights, embs):
    """The unit vector along sum_i weights[i] * embs[i] ((T,) and (T, D)): the combined query.
    A single term of positive weight is its embedding, unchanged. Raises ValueError when the
    terms cancel out."""
    embs = np.asarray(embs, np.float32)
    if len(weights) == 1 and weights[0] > 0:
        return embs[0]
    v = (np.asarray(weights, np.float32)[:, None] * embs).sum(0)
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        raise ValueError("the query's terms cancel out: nothing is left to search for")
    return v / norm


def embed_queries(encoder, queries, photo_emb):
    """(Q, D) float32 combined embeddings of parsed queries (lists of Term) and, per query, whether
    it holds words (the querybank bias applies: top_hits). All the words of all the queries are
    encoded in one batch; photo_emb(term.photo) -> (D,) embeds a photo term."""
    texts = sorted({t.text for terms in queries for t in terms if t.photo is None})
    text_emb = dict(zip(texts, encoder.encode_texts(texts))) if texts else {}
    out = [combine([t.weight for t in terms],
                   [text_emb[t.text] if t.photo is None else photo_emb(t.photo) for t in terms])
           for terms in queries]
    return np.stack(out).astype(np.float32), [any(t.photo is None for t in terms) for terms in queries]


def taken_between(ix, after=None, before=None):
    """(N,) bool: which photos of the index were taken on or after the date `after` and before the
    date `before` (datetime.date, either may be None), by photos.taken_at; None when neither is given."""
    if after is None and before is None:
        return None
    taken, allowed = ix.dates(), np.ones(len(ix), bool)
    if after is not None:
        allowed &= taken >= calendar.timegm(after.timetuple())
    if before is not None:
        allowed &= taken < calendar.timegm(before.timetuple())
    return allowed


def top_hits(ix, q_emb, k, text, min_score=None, allowed=None, ann=None):
    """[(row, score), ...] best first, per query, at least min_score if given (as scores are
    reported: a copied score keeps its hit), among the rows `allowed` (taken_between) if given,
    exactly or through `ann` (ann.AnnIndex of ix's rows: the same exact scores, the rows chosen
    by the approximate index; with a date filter that leaves fewer than ANN_FROM photos, those
    are searched exactly). text: per query (or one for all), whether it holds words.
    The querybank bias corrects queries with words only: it measures how close a photo is to
    captions, the hubs that words' scores favour; a photo query meets no such hubs. A combined
    query with any words gets it (its words pull it towards the captions); one of photos alone
    ranks as --image does."""
    text = [text] * len(q_emb) if isinstance(text, bool) else list(text)
    hits = [None] * len(q_emb)
    for flag in (True, False):
        qs = [i for i, t in enumerate(text) if t == flag]
        if not qs:
            continue
        bias, q = ix.bias if flag else None, np.asarray(q_emb)[qs]
        scores, rows = (ix.top_k(q, k, bias=bias, allowed=allowed) if ann is None
                        else ann.search(q, k, ix.emb, bias, allowed, exact_below=ANN_FROM))
        for i, rr, ss in zip(qs, rows.tolist(), scores.tolist()):
            hits[i] = [(r, s) for r, s in zip(rr, ss)
                       if min_score is None or round(s, SCORE_DECIMALS) >= min_score]
    return hits


def result_rows(labels, results):
    """The JSON of search results ([[(path, score), ...] per label]): one row per hit, with
    readable() strings so that any file name gives valid JSON."""
    return [{"query": readable(label), "rank": r, "path": readable(p), "score": round(s, SCORE_DECIMALS)}
            for label, hits in zip(labels, results) for r, (p, s) in enumerate(hits, 1)]
