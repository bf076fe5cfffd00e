"""The gallery index: image embeddings of a folder of photos, kept up to date incrementally, and
exact top-k search over them. Example:

    python -c "import index; ix = index.GalleryIndex.load('models/index_best_all.pt'); print(len(ix))"

Embeddings are stored as float16, 1 KB a photo at D=512, and searched exhaustively in chunks
(no approximation); the top candidates of each chunk are rescored in float32. The index
records a fingerprint of the model that made it, so embeddings of two models never mix. For a
model trained with --querybank it also keeps each photo's querybank bias, which text queries'
scores are lowered by (retrieval.querybank_bias).

gallery.py builds on it: the photos and index file of a checkpoint's gallery, and its queries.
"""

import copy
import hashlib
import os
import queue
from concurrent.futures import ThreadPoolExecutor

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from atomic import atomic_path
from dataset import IMAGE_EXTENSIONS, read_image

INDEX_VERSION = 2  # 2: a querybank bias per photo
CHUNK_ROWS = 16384  # 16 MB of float16 at D=512: few enough chunks, small enough to stay in cache
RESCORE_EXTRA = 16  # candidates kept beyond k for the float32 rescoring: room for float16 rounding


def model_fingerprint(model, image_size, flip=False, querybank=""):
    """A hash of everything that maps a photo to its embedding (the image tower, the image
    projection, the input size and `flip`, the mirror-image averaging) and, given `querybank` (a
    string naming the caption bank), to its bias (the text tower too). Copying a checkpoint keeps
    it; retraining changes it."""
    h = hashlib.sha256(f"image_size={image_size}{',flip' if flip else ''}"
                       f"{',querybank=' + querybank if querybank else ''}".encode())
    for name, t in sorted(model.state_dict().items()):
        if querybank or name.startswith(("image_tower.", "image_proj.")):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # no copy
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


class ImageFiles(Dataset):
    """Image files for encoding. Item: (uint8 (3, S, S), '' or why the file could not be read)."""

    def __init__(self, paths, image_size):
        self.paths = paths
        self.image_size = image_size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return read_image(self.paths[i], self.image_size), ""
        except Exception as e:  # any undecodable file is reported and skipped, never a crash
            s = self.image_size
            return torch.zeros(3, s, s, dtype=torch.uint8), f"{type(e).__name__}: {e}"[:200]


@torch.no_grad()
def encode_image_files(model, paths, image_size, device, batch_size=32, num_workers=0, flip=False):
    """Encode image files in order (flip: as model.encode_images). Returns (emb (M, D) float16 of the readable ones,
    errors: one string per file done, '' where it was read), and stops early on Ctrl-C,
    so len(errors) < len(paths) means interrupted."""
    loader = DataLoader(ImageFiles(paths, image_size), batch_size=batch_size, num_workers=num_workers)
    embs, errors = [torch.empty(0, model.image_proj.out_features, dtype=torch.float16)], []
    try:
        with tqdm(total=len(paths), desc="indexing photos", unit="photo") as bar:
            for images, errs in loader:
                ok = torch.tensor([not e for e in errs])
                if ok.any():
                    embs.append(model.encode_images(images[ok].to(device), flip).cpu().half())
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
        with atomic_path(path) as tmp:
            torch.save(data, tmp)

    def update(self, files, model, image_size, device, batch_size=32, num_workers=0, make_bias_fn=None,
               flip=False):
        """Match the index to `files` ({relative path: (size, mtime_ns)} under root): drop photos
        that are gone, encode new and changed ones (flip: as model.encode_images). make_bias_fn()
        -> bias_fn, where bias_fn(emb (M, D)) -> (M,) gives new photos their querybank bias; it is
        called before the encoding, so that a Ctrl-C while it prepares (encodes the caption bank)
        loses no photo encoded.
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
            emb, errors = encode_image_files(model, [os.path.join(self.root, p) for p in todo], image_size,
                                             device, batch_size, num_workers, flip)
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
