"""The gallery index: image embeddings of a folder of photos, kept up to date incrementally, and
exact top-k search over them. Example:

    python -c "import index; ix = index.GalleryIndex.load('models/index_best_all.pt'); print(len(ix))"

Embeddings are stored as float16, 1 KB a photo at D=512, and searched exhaustively in chunks
(no approximation); the top candidates of each chunk are rescored in float32. The index
records a fingerprint of the model that made it, so embeddings of two models never mix. For a
model trained with --querybank it also keeps each photo's querybank bias, which text queries'
scores are lowered by (retrieval.querybank_bias).

Gallery and the functions after it are what search.py and serve.py share: the photos and index
file of a checkpoint's gallery, the encoding and ranking of a query, and the JSON of a result.
"""

import copy
import hashlib
import os
import queue
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from dataset import IMAGE_EXTENSIONS, load_image, read_captions
from model import eval_image_size
from retrieval import caption_bank, encode_texts, querybank_bias

INDEX_VERSION = 2  # 2: a querybank bias per photo
CHUNK_ROWS = 16384  # 16 MB of float16 at D=512: few enough chunks, small enough to stay in cache
RESCORE_EXTRA = 16  # candidates kept beyond k for the float32 rescoring: room for float16 rounding


def model_fingerprint(model, image_size, querybank=""):
    """A hash of everything that maps a photo to its embedding (the image tower, the image
    projection, the input size and the mirror-image averaging) and, given `querybank` (a string
    naming the caption bank), to its bias (the text tower too). Copying a checkpoint keeps it;
    retraining changes it."""
    h = hashlib.sha256(f"image_size={image_size}{',flip' if model.eval_flip else ''}"
                       f"{',querybank=' + querybank if querybank else ''}".encode())
    for name, t in sorted(model.state_dict().items()):
        if querybank or name.startswith(("image_tower.", "image_proj.")):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def scan_folder(root):
    """{relative path: (size, mtime_ns)} of every photo under `root`, recursively.

    Hidden files and folders (.thumbnails, .git, ...) are skipped: they hold copies and caches,
    not photos of their own.
    """
    files = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            path = os.path.join(dirpath, name)
            try:
                st = os.stat(path)
            except OSError:  # a dangling link, or a file deleted while we walk
                continue
            files[os.path.relpath(path, root).replace(os.sep, "/")] = (st.st_size, st.st_mtime_ns)
    return files


class PhotoFiles(Dataset):
    """Photo files for encoding. Item: (uint8 (3, S, S), '' or why the file could not be read)."""

    def __init__(self, paths, image_size):
        self.paths = paths
        self.image_size = image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return torch.from_numpy(load_image(self.paths[i], self.image_size)).permute(2, 0, 1), ""
        except Exception as e:  # any undecodable file is reported and skipped, never a crash
            s = self.image_size
            return torch.zeros(3, s, s, dtype=torch.uint8), f"{type(e).__name__}: {e}"[:200]


@torch.no_grad()
def encode_photos(model, paths, image_size, device, batch_size=32, num_workers=0):
    """Encode photo files in order. Returns (emb (M, D) float16 of the readable ones,
    errors: one string per file done, '' where it was read), and stops early on Ctrl-C,
    so len(errors) < len(paths) means interrupted."""
    loader = DataLoader(PhotoFiles(paths, image_size), batch_size=batch_size, num_workers=num_workers)
    embs, errors = [torch.empty(0, model.image_proj.out_features, dtype=torch.float16)], []
    try:
        with tqdm(total=len(paths), desc="indexing photos", unit="photo") as bar:
            for images, errs in loader:
                ok = torch.tensor([not e for e in errs])
                if ok.any():
                    embs.append(model.embed_photos(images[ok].to(device)).cpu().half())
                errors += errs
                bar.update(len(errs))
    except KeyboardInterrupt:
        pass  # keep the photos encoded so far: the caller saves them, the next run goes on
    return torch.cat(embs), errors


class GalleryIndex:
    """Float16 embeddings (N, D) of the photos under `root`, each with its relative path and
    (size, mtime_ns), so that an update re-encodes only new or changed files."""

    def __init__(self, fingerprint, root, dim, checkpoint=""):
        self.fingerprint = fingerprint
        self.root = root  # absolute: a different folder is a different index
        self.checkpoint = checkpoint  # which checkpoint made it, for messages
        self.emb = torch.empty(0, dim, dtype=torch.float16)  # (N, D)
        self.paths = []  # (N,) relative, '/'-separated
        self.stats = torch.empty(0, 2, dtype=torch.int64)  # (N, 2): size, mtime_ns
        self.bias = None  # (N,) float32 querybank bias, subtracted from text queries' scores
        self.failed = {}  # unreadable files, {path: [size, mtime_ns, reason]}: retried once they change

    def __len__(self):
        return len(self.paths)

    @classmethod
    def load(cls, path):
        """The index stored at `path`, or None when there is none or it cannot be read."""
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            return None  # missing, damaged or foreign: rebuilt either way
        if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
            return None
        ix = cls(data["fingerprint"], data["root"], data["embeddings"].shape[1], data["checkpoint"])
        ix.emb, ix.stats, ix.failed, ix.bias = data["embeddings"], data["stats"], data["failed"], data["bias"]
        # One NUL-joined string, not a list: unpickling a million strings one by one is slow.
        ix.paths = data["paths"].split("\0") if data["paths"] else []
        return ix

    @classmethod
    def open(cls, path, fingerprint, root, dim, checkpoint, log=print):
        """The index at `path` if the same model made it for the same folder, else an empty one."""
        ix = cls.load(path)
        if ix is None and os.path.exists(path):
            log(f"{path} is damaged or from an older version; re-encoding every photo.")
        elif ix is not None and ix.fingerprint != fingerprint:
            log(f"{path} was made by another checkpoint ({ix.checkpoint}); re-encoding every photo with "
                f"{checkpoint} so that two embedding spaces never mix.")
            ix = None
        elif ix is not None and ix.root != root:
            log(f"{path} indexes another folder ({ix.root}); re-encoding every photo of {root}.")
            ix = None
        return ix if ix is not None else cls(fingerprint, root, dim, checkpoint)

    def copy(self):
        """A copy to update while searches go on reading this one: update() replaces the tensors
        rather than writing into them, so only the path list and the failures are copied."""
        new = copy.copy(self)
        new.paths, new.failed = list(self.paths), dict(self.failed)
        return new

    def save(self, path):
        """Write atomically: a crash mid-write leaves the previous index intact."""
        data = {"version": INDEX_VERSION, "fingerprint": self.fingerprint, "root": self.root,
                "checkpoint": self.checkpoint, "embeddings": self.emb, "paths": "\0".join(self.paths),
                "stats": self.stats, "failed": self.failed, "bias": self.bias}
        tmp = f"{path}.tmp"
        torch.save(data, tmp)
        os.replace(tmp, path)

    def update(self, files, model, image_size, device, batch_size=32, num_workers=0, make_bias_fn=None):
        """Match the index to `files` ({relative path: (size, mtime_ns)} under root): drop photos
        that are gone, encode new and changed ones. make_bias_fn() -> bias_fn, where bias_fn(emb
        (M, D)) -> (M,) gives new photos their querybank bias; it is called before the encoding,
        so that a Ctrl-C while it prepares (encodes the caption bank) loses no photo encoded.
        Returns counts and the unreadable files:
        {"added", "updated", "removed", "failed": [(path, reason)], "interrupted", "changed"}."""
        old_stats, n_failed = self.stats.tolist(), len(self.failed)
        keep = [i for i, p in enumerate(self.paths) if list(files.get(p, ())) == old_stats[i]]
        self.failed = {p: v for p, v in self.failed.items() if list(files.get(p, ())) == v[:2]}
        known = {self.paths[i] for i in keep} | set(self.failed)
        todo = sorted(p for p in files if p not in known)
        seen, done = set(self.paths), []
        removed = sum(p not in files for p in self.paths)
        if len(keep) < len(self.paths):
            self.emb, self.stats = self.emb[keep], self.stats[keep]
            self.bias = None if self.bias is None else self.bias[keep]
            self.paths = [self.paths[i] for i in keep]
        interrupted = False
        if todo:
            bias_fn = make_bias_fn() if make_bias_fn is not None else None
            emb, errors = encode_photos(model, [os.path.join(self.root, p) for p in todo], image_size,
                                        device, batch_size, num_workers)
            interrupted = len(errors) < len(todo)
            done = [p for p, e in zip(todo, errors) if not e]
            if bias_fn is not None:  # before anything changes: rows, paths and biases stay aligned
                old = torch.empty(0) if self.bias is None else self.bias
                self.bias = torch.cat([old, bias_fn(emb) if len(emb) else torch.empty(0)])
            self.emb = torch.cat([self.emb, emb])
            self.stats = torch.cat([self.stats, torch.tensor([files[p] for p in done], dtype=torch.int64).view(-1, 2)])
            self.paths += done
            for p, e in zip(todo, errors):
                if e:
                    self.failed[p] = [*files[p], e]
        report = {"added": sum(p not in seen for p in done), "updated": sum(p in seen for p in done),
                  "removed": removed, "interrupted": interrupted}
        report["failed"] = sorted((p, v[2]) for p, v in self.failed.items())
        report["changed"] = bool(todo) or len(keep) < len(old_stats) or len(self.failed) < n_failed
        return report

    @torch.no_grad()
    def top_k(self, query_emb, k, chunk_rows=CHUNK_ROWS, bias=None):
        """Exact top-k by cosine similarity for L2-normalised queries (Q, D) float32, less the
        photos' bias (N,) if given (querybank normalisation).

        Returns scores (Q, k') float32 and row indices (Q, k') int64, best first, k' = min(k, N).
        Each chunk of rows is scored straight from float16 storage (no float32 copy of the
        gallery) and keeps its best k + RESCORE_EXTRA; those candidates are then rescored in
        float32, so the scores and order are those of a float32 product with the stored vectors.
        """
        q = query_emb.float()
        n, k = len(self), min(k, len(self))
        if n == 0:
            return torch.empty(len(q), 0), torch.empty(len(q), 0, dtype=torch.int64)
        q16 = q.half()
        workers = max(1, torch.get_num_threads())
        buffers = queue.SimpleQueue()  # one float32 block per thread: fresh 16 MB tensors would page-fault
        for _ in range(workers if len(q) > 1 else 0):
            buffers.put(torch.empty(min(chunk_rows, n), self.emb.shape[1]))

        def scan(lo):
            block = self.emb[lo:lo + chunk_rows]  # (C, D) float16
            if len(q) == 1:
                s = torch.mv(block, q16[0])[:, None]  # (C, 1): a float16 gemv, as fast as memory allows
            else:
                buf = buffers.get()
                s = buf[:len(block)].copy_(block) @ q.T  # (C, Q): one conversion serves every query
                buffers.put(buf)
            if bias is not None:  # in float32: a float16 bias would add its own rounding
                s = s.float() - bias[lo:lo + len(block), None]
            top = s.topk(min(k + RESCORE_EXTRA, len(block)), dim=0)  # (c, Q)
            return top.values.float(), top.indices + lo

        # torch releases the GIL inside each product, so chunks run in parallel on the cores.
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(scan, range(0, n, chunk_rows)))
        approx, rows = torch.cat([v for v, _ in parts]), torch.cat([i for _, i in parts])  # (M, Q)
        best = approx.topk(min(k + RESCORE_EXTRA, len(approx)), dim=0).indices  # (c, Q)
        cand = rows.gather(0, best).T  # (Q, c) row numbers
        exact = (self.emb[cand].float() @ q[:, :, None])[..., 0]  # (Q, c) float32
        if bias is not None:
            exact = exact - bias.float()[cand]
        scores, j = exact.topk(k, dim=1)
        return scores, cand.gather(1, j)


# ---------------------------------------------------------------------------- a checkpoint's gallery
# What search.py and serve.py share: which photos, which index file, how a query is encoded and
# ranked, and the JSON rows of a result.

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
    """Sorted photo names: the test split's, or every photo the dataset lists."""
    if use_test_set:
        return sorted(read_captions(data_dir, "test")["image"].unique())
    import pandas as pd
    path = os.path.join(data_dir, "captions.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; pass --data_dir, or --images_dir to search your own photos.")
    return sorted(pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")["image"].unique())


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
        torch.save({"key": fingerprint, "bank": bank}, path + ".tmp")
        os.replace(path + ".tmp", path)
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
    p.add_argument("--batch_size", type=int, default=batch_size, help="photos per encoding batch while indexing")
    p.add_argument("--num_workers", type=int, default=num_workers, help="processes decoding photos while indexing")
    # model
    p.add_argument("--checkpoint", default="models/best.pt", help="trained checkpoint")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")


def check_gallery_args(p, args):
    if args.batch_size < 1 or args.num_workers < 0:
        p.error("--batch_size must be at least 1, --num_workers at least 0")
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
        fingerprint = model_fingerprint(model, self.image_size, bank_name(qb_dir) if qb_dir is not None else "")
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
                         self.args.num_workers, self.make_bias_fn if self.qb_dir is not None else None)

    def save(self, ix):
        try:
            os.makedirs(self.index_dir, exist_ok=True)
            ix.save(self.path)
        except OSError as e:
            log(f"warning: could not save the index to {self.path} ({e.strerror}); "
                "pass --index_dir with a writable folder to keep it between runs.")


@torch.no_grad()
def encode_query(model, tokenizer, texts=None, images=None):
    """(Q, D) float32 CPU embeddings of text queries, or of photo queries (Q, 3, S, S) uint8."""
    device = next(model.parameters()).device
    if images is not None:
        return model.embed_photos(images.to(device)).cpu()
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
