"""A checkpoint's gallery: which photos it searches (a folder, recursively, or Flickr8K's), the
index file that holds their embeddings, how a query is encoded and ranked, and the JSON rows of
a result. What search.py and serve.py share. Example:

    python -c "import gallery; print(gallery.slug('a dog running through snow'))"
"""

import calendar
import csv
import hashlib
import os
import re
import sys
from typing import NamedTuple

import numpy as np

from cli import non_negative_int, positive_int
from index import GalleryIndex, querybank_bias, scan_folder


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


def gallery_images(data_dir, use_test_set):
    """Sorted image names: the test split's, or every image the dataset lists (read with the csv
    module: search needs neither pandas nor dataset.py's PyTorch)."""
    path = os.path.join(data_dir, "captions.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; pass --data_dir, or --images_dir to search your own photos.")
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
    return sorted(names)


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


def add_gallery_args(p, batch_size, num_workers):
    """The flags that choose a gallery, its index and the model, for search.py and serve.py."""
    # gallery
    p.add_argument("--images_dir", default=None, help="search this folder of photos (recursively) instead of Flickr8K")
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
    p.add_argument("--device", default="auto",
                   help="PyTorch's device: auto (cuda, then mps, then cpu), cuda, mps or cpu")


def check_gallery_args(p, args):
    if args.images_dir and args.use_test_set:
        p.error("--use_test_set picks Flickr8K's test photos; it does not apply to --images_dir")
    if args.images_dir and not os.path.isdir(args.images_dir):
        p.error(f"--images_dir {args.images_dir} is not a folder")


class Gallery:
    """The photos a checkpoint searches (args.images_dir, recursively, or Flickr8K's) and their
    index file: `ix` is the index as stored, `scan()` lists the photos now, `update()` brings an
    index up to date with them and `save()` keeps it. args: search.py's and serve.py's flags;
    encoder: encoder.py's, which embeds the photos and queries."""

    def __init__(self, args, encoder):
        self.encoder, self.args = encoder, args
        self.image_size, self.flip = encoder.image_size, encoder.flip
        if args.images_dir:
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
        # Which querybank the photos' biases come from ("": none, rank by cosine similarity).
        self.bank_dir = args.data_dir or encoder.args.get("data_dir") or ""
        self.bank_key = encoder.querybank_key(self.bank_dir) if encoder.args.get("querybank") else ""
        self.bank_cache = os.path.join(self.index_dir, f"querybank_{stem}.npy")
        self.ix = GalleryIndex.open(self.path, encoder.fingerprint, self.root, encoder.dim,
                                    os.path.abspath(args.checkpoint), log)
        self.bias_fn = None

    def make_bias_fn(self):
        """For GalleryIndex.update: gives photos their querybank bias; reads the caption bank once."""
        if self.bias_fn is None:
            bank = self.encoder.caption_bank(self.bank_dir, self.bank_cache, self.bank_key)
            scale = self.encoder.logit_scale
            self.bias_fn = lambda emb: querybank_bias(emb, bank, scale)
        return self.bias_fn

    def scan(self):
        """{relative path: (size, mtime_ns)} of the gallery's photos as they are now."""
        if self.args.images_dir:
            return scan_folder(self.root)
        return flickr_files(self.root, gallery_images(self.data_dir, self.args.use_test_set))

    def update(self, ix, files):
        return ix.update(files, self.encoder, self.args.batch_size, self.args.num_workers,
                         self.make_bias_fn if self.bank_key else None, self.bank_key)

    def save(self, ix):
        try:
            os.makedirs(self.index_dir, exist_ok=True)
            ix.save(self.path)
        except OSError as e:
            log(f"warning: could not save the index to {self.path} ({e.strerror}); "
                "pass --index_dir with a writable folder to keep it between runs.")


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


def top_hits(ix, q_emb, k, text, min_score=None, allowed=None):
    """[(row, score), ...] best first, per query, at least min_score if given, among the rows
    `allowed` (taken_between) if given. text: per query (or one for all), whether it holds words.
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
        scores, rows = ix.top_k(np.asarray(q_emb)[qs], k, bias=ix.bias if flag else None, allowed=allowed)
        for i, rr, ss in zip(qs, rows.tolist(), scores.tolist()):
            hits[i] = [(r, s) for r, s in zip(rr, ss) if min_score is None or s >= min_score]
    return hits


def result_rows(labels, results):
    """The JSON of search results ([[(path, score), ...] per label]): one row per hit, with
    readable() strings so that any file name gives valid JSON."""
    return [{"query": readable(label), "rank": r, "path": readable(p), "score": round(s, 6)}
            for label, hits in zip(labels, results) for r, (p, s) in enumerate(hits, 1)]
