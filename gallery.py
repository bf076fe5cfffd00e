"""A checkpoint's gallery: which photos it searches (a folder, recursively, or Flickr8K's), the
index file that holds their embeddings, how a query is encoded and ranked, and the JSON rows of
a result. What search.py and serve.py share. Example:

    python -c "import gallery; print(gallery.slug('a dog running through snow'))"
"""

import hashlib
import os
import sys

import torch

from atomic import atomic_path
from checkpoint import eval_image_size
from cli import non_negative_int, positive_int
from dataset import read_captions
from index import GalleryIndex, model_fingerprint, scan_folder
from retrieval import caption_bank, encode_texts, querybank_bias


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
    """Sorted image names: the test split's, or every image the dataset lists."""
    path = os.path.join(data_dir, "captions.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; pass --data_dir, or --images_dir to search your own photos.")
    return sorted(read_captions(data_dir, "test" if use_test_set else None)["image"].unique())


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


def querybank_source(args, ckpt):
    """The dataset whose training captions are the querybank of a checkpoint trained with
    --querybank, or None: rank by cosine similarity."""
    if not ckpt["args"].get("querybank"):
        return None
    data_dir = args.data_dir or ckpt["args"].get("data_dir") or ""
    if os.path.isfile(os.path.join(data_dir, "captions.csv")):
        return data_dir
    log(f"warning: {args.checkpoint} ranks with querybank normalisation, which needs its training "
        f"captions ({os.path.join(data_dir, 'captions.csv')}: not found); ranking by cosine similarity "
        "instead. Pass --data_dir to point at them.")
    return None


def bank_name(data_dir):
    """Names the caption bank of a dataset: its folder and its captions.csv's size and time."""
    st = os.stat(os.path.join(data_dir, "captions.csv"))
    return f"{os.path.realpath(data_dir)}:{st.st_size}:{st.st_mtime_ns}"


def stored_caption_bank(model, tokenizer, data_dir, device, path, fingerprint):
    """retrieval.caption_bank, kept in `path` (float16, 30 MB for Flickr8K's 30,000 captions): photos
    added to an index later need no second encoding of the bank (a minute or two on 2 cores).
    `fingerprint` (model_fingerprint with the bank's name) says which model and bank it is."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data["key"] == fingerprint:
            return data["bank"].float()
    except Exception:
        pass  # missing, damaged or another model's: encode it
    bank = caption_bank(model, tokenizer, data_dir, device).half()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_path(path) as tmp:
            torch.save({"key": fingerprint, "bank": bank}, tmp)
    except OSError:
        pass  # a read-only folder: encode again next time
    return bank.float()  # the same float16-rounded bank whether just encoded or read back


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
                   help="processes decoding photos while indexing")
    # model
    p.add_argument("--checkpoint", default="models/best.pt", help="trained checkpoint")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")


def check_gallery_args(p, args):
    if args.images_dir and args.use_test_set:
        p.error("--use_test_set picks Flickr8K's test photos; it does not apply to --images_dir")
    if args.images_dir and not os.path.isdir(args.images_dir):
        p.error(f"--images_dir {args.images_dir} is not a folder")


class Gallery:
    """The photos a checkpoint searches (args.images_dir, recursively, or Flickr8K's) and their
    index file: `ix` is the index as stored, `scan()` lists the photos now, `update()` brings an
    index up to date with them and `save()` keeps it. args: search.py's and serve.py's flags."""

    def __init__(self, args, model, tokenizer, ckpt):
        self.model, self.args = model, args
        self.image_size = eval_image_size(ckpt["args"])
        self.flip = ckpt["args"].get("eval_flip", False)  # each photo averaged with its mirror image
        self.device = next(model.parameters()).device
        if args.images_dir:
            self.shown_root = args.images_dir
            self.root = os.path.realpath(args.images_dir)
            # The folder's name for people, a hash of its full path for uniqueness (two "photos" folders).
            name = f"{slug(os.path.basename(self.root) or 'root', 30)}-" \
                   f"{hashlib.sha1(self.root.encode(errors='surrogateescape')).hexdigest()[:8]}"
        else:
            self.data_dir = args.data_dir or ckpt["args"]["data_dir"]
            self.shown_root = os.path.join(self.data_dir, "images")
            self.root = os.path.realpath(self.shown_root)
            name = "test" if args.use_test_set else "all"
        # Beside the checkpoint, not in the photo folder: that may be read-only, synced or shared.
        self.index_dir = args.index_dir or os.path.dirname(os.path.abspath(args.checkpoint))
        stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
        self.path = os.path.join(self.index_dir, f"index_{stem}_{name}.pt")
        qb_dir = querybank_source(args, ckpt)
        bank = bank_name(qb_dir) if qb_dir is not None else ""
        fingerprint = model_fingerprint(model, self.image_size, self.flip, bank)
        self.ix = GalleryIndex.open(self.path, fingerprint, self.root, model.image_proj.out_features,
                                    os.path.abspath(args.checkpoint), log)
        self.fingerprint, self.qb_dir, self.tokenizer, self.stem = fingerprint, qb_dir, tokenizer, stem
        self.bias_fn = None

    def make_bias_fn(self):
        """For GalleryIndex.update: gives new photos their querybank bias; reads the caption bank once."""
        if self.bias_fn is None:
            bank = stored_caption_bank(self.model, self.tokenizer, self.qb_dir, self.device,
                                       os.path.join(self.index_dir, f"querybank_{self.stem}.pt"), self.fingerprint)
            scale = self.model.logit_scale.exp().item()
            self.bias_fn = lambda emb: querybank_bias(emb, bank, scale)
        return self.bias_fn

    def scan(self):
        """{relative path: (size, mtime_ns)} of the gallery's photos as they are now."""
        if self.args.images_dir:
            return scan_folder(self.root)
        return flickr_files(self.root, gallery_images(self.data_dir, self.args.use_test_set))

    def update(self, ix, files):
        return ix.update(files, self.model, self.image_size, self.device, self.args.batch_size,
                         self.args.num_workers, self.make_bias_fn if self.qb_dir is not None else None, self.flip)

    def save(self, ix):
        try:
            os.makedirs(self.index_dir, exist_ok=True)
            ix.save(self.path)
        except OSError as e:
            log(f"warning: could not save the index to {self.path} ({e.strerror}); "
                "pass --index_dir with a writable folder to keep it between runs.")


@torch.no_grad()
def encode_query(model, tokenizer, texts=None, images=None, flip=False):
    """(Q, D) float32 CPU embeddings of text queries, or of photo queries (Q, 3, S, S) uint8
    (flip: as model.encode_images, the checkpoint's eval_flip)."""
    device = next(model.parameters()).device
    if images is not None:
        return model.encode_images(images.to(device), flip).cpu()
    return encode_texts(model, tokenizer, texts, device, desc="encoding queries")


def top_hits(ix, q_emb, k, text):
    """[(row, score), ...] best first, per query. The querybank bias corrects text queries only:
    it measures how close a photo is to captions."""
    scores, rows = ix.top_k(q_emb, k, bias=ix.bias if text else None)  # (Q, k) each
    return [list(zip(rr, ss)) for rr, ss in zip(rows.tolist(), scores.tolist())]


def result_rows(labels, results):
    """The JSON of search results ([[(path, score), ...] per label]): one row per hit, with
    readable() strings so that any file name gives valid JSON."""
    return [{"query": readable(label), "rank": r, "path": readable(p), "score": round(s, 6)}
            for label, hits in zip(labels, results) for r, (p, s) in enumerate(hits, 1)]
