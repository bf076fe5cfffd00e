"""The gallery index: image embeddings of a folder of photos, kept up to date incrementally, and
exact top-k search over them, in NumPy (no PyTorch: search runs on the ONNX export). Example:

    python -c "import index; ix = index.GalleryIndex.load('models/index_best_all.npz'); print(len(ix))"

Embeddings are stored as float16, 1 KB a photo at D=512, in a .npy file beside the index's .npz
(index_X.npz names index_X.<generation>.npy), memory-mapped when loaded: a search reads the rows
from the page cache and a gallery of millions need not fit in RAM (an update that changes rows
holds them in RAM until saved). They are searched exhaustively in chunks (no approximation); the
top candidates of each chunk are rescored in float32. Searched a second time (serve.py), rows up
to F32_BYTES are kept as a float32 copy in RAM for the next queries: NumPy converts float16
without SIMD, so the conversion would otherwise cost each query more than the product itself
(benchmarks/README.md); a one-shot search.py converts chunk by chunk and keeps nothing. The index
records a fingerprint of the checkpoint that made it (encoder.index_key), so embeddings of two
models never mix. For a model trained with --querybank it also keeps each photo's querybank bias,
which text queries' scores are lowered by (querybank_bias).

gallery.py builds on it: the photos and index file of a checkpoint's gallery, and its queries.
"""

import copy
import hashlib
import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from helpers.atomic import atomic_path
from photos import IMAGE_EXTENSIONS, read_or_blank, taken_at

INDEX_VERSION = 6  # 3: NumPy arrays in a .npz file, tied to the checkpoint file; 4: content fingerprints;
# 5: when each photo was taken (a version 4 index is read, and its photos' dates added at its next update);
# 6: the embeddings in a memory-mapped .npy beside it, and a generation token (4 and 5 are read, and
# written as 6 at their next change)
FINGERPRINT_BYTES = 64 << 10  # read from each end of a new or changed file to recognise a moved or copied photo
NO_FINGERPRINT = bytes(16)  # of a file that could not be read: matches nothing
CHUNK_ROWS = 16384  # 32 MB of float32 at D=512 per chunk: few enough chunks, small enough to stay in cache
RESCORE_EXTRA = 16  # candidates kept beyond k for the float32 rescoring: room for float16 rounding
F32_BYTES = 256 << 20  # the largest float32 copy exact search keeps: 131,072 photos at D=512


def new_generation():
    """A token that names one state of an index's rows."""
    return os.urandom(8).hex()


def querybank_bias(gallery, bank, scale, chunk=2048):
    """Querybank normalisation (Bogolin et al., CVPR 2022, with the inverted softmax of Smith et
    al., ICLR 2017): for each gallery embedding (N, D), the log-sum-exp of `scale` times its
    similarity to a bank of training queries (M, D), over `scale`. Subtracted from every query's
    similarity, it demotes hubs, items close to many queries that otherwise crowd the top of
    many rankings. Uses training data only. Returns (N,) float32."""
    bank = np.asarray(bank, dtype=np.float32)
    out = [np.empty(0, np.float32)]
    for lo in range(0, len(gallery), chunk):
        s = scale * (bank @ np.asarray(gallery[lo:lo + chunk], dtype=np.float32).T)  # (M, c)
        top = s.max(0)
        out.append((top + np.log(np.exp(s - top).sum(0))) / scale)
    return np.concatenate(out).astype(np.float32)


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


def content_fingerprint(path, size):
    """16 bytes that tell photos apart by content, not name: BLAKE2b of the size and the first and
    last FINGERPRINT_BYTES (a smaller file: all of it), so a photo moved, renamed or copied is
    recognised without reading whole files. NO_FINGERPRINT for a file that cannot be read."""
    h = hashlib.blake2b(str(size).encode(), digest_size=16)
    try:
        with open(path, "rb") as f:
            h.update(f.read(FINGERPRINT_BYTES))
            if size > 2 * FINGERPRINT_BYTES:
                f.seek(-FINGERPRINT_BYTES, os.SEEK_END)
            h.update(f.read(FINGERPRINT_BYTES))
    except OSError:
        return NO_FINGERPRINT
    return h.digest()


def encode_image_files(encoder, paths, image_size, batch_size=32, num_workers=0, progress=True):
    """Encode image files in order with encoder.encode_images, decoding them in `num_workers`
    threads (Pillow decodes without the GIL) a batch or two ahead. Returns (emb (M, D) float16 of
    the readable ones, errors: one string per file done, '' where it was read), and stops early on
    Ctrl-C, so len(errors) < len(paths) means interrupted. progress: show a progress bar."""
    from tqdm import tqdm  # here: a search over an indexed gallery need not import it
    embs, errors = [np.empty((0, encoder.dim), np.float16)], []
    batches = iter([paths[i:i + batch_size] for i in range(0, len(paths), batch_size)])
    pool = ThreadPoolExecutor(max(1, num_workers))
    ahead = deque()

    def submit():
        batch = next(batches, None)
        if batch is not None:
            ahead.append([pool.submit(read_or_blank, p, image_size) for p in batch])
    try:
        with tqdm(total=len(paths), desc="indexing photos", unit="photo", disable=not progress) as bar:
            for _ in range(2):
                submit()
            while ahead:
                decoded = [f.result() for f in ahead.popleft()]
                submit()
                errs = [e for _, e in decoded]
                ok = [img for img, e in decoded if not e]
                if ok:
                    embs.append(encoder.encode_images(np.stack(ok)).astype(np.float16))
                errors += errs
                bar.update(len(errs))
    except KeyboardInterrupt:
        pass  # keep the photos encoded so far: the caller saves them, the next run goes on
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return np.concatenate(embs), errors


class GalleryIndex:
    """Float16 embeddings (N, D) of the photos under `root`, each with its relative path and
    (size, mtime_ns), so that an update re-encodes only new or changed files."""

    def __init__(self, fingerprint, root, dim, checkpoint=""):
        self.fingerprint = fingerprint
        self.root = root  # absolute: a different folder is a different index
        self.checkpoint = checkpoint  # which checkpoint made it, for messages
        self.emb = np.empty((0, dim), np.float16)  # (N, D)
        self.paths = []  # (N,) relative, '/'-separated
        self.stats = np.empty((0, 2), np.int64)  # (N, 2): size, mtime_ns
        self.fps = np.empty((0, 16), np.uint8)  # (N, 16): content_fingerprint of each photo
        self.taken = np.empty(0, np.int64)  # (N,): photos.taken_at, for --after / --before; None: not read yet
        # Embeddings of photos dropped from the index, {fingerprint: (D,)}, in memory only: a photo
        # moved to a path that a later update (serve.py's steps) adds is not encoded again.
        self.spare = {}
        self.bias = None  # (N,) float32 querybank bias, subtracted from text queries' scores
        self.bank_key = ""  # which caption bank the biases come from ("": none)
        self.failed = {}  # unreadable files, {path: [size, mtime_ns, reason]}: retried once they change
        # Changes whenever the rows do (update): what an approximate index (gallery.py) is tied to.
        self.generation = new_generation()
        self.version = INDEX_VERSION  # of the file it was read from: an older one is written anew at its update
        self.emb_file = None  # the .npy that emb maps, once loaded or saved
        self._f32 = (None, None)  # (emb searched last, its float32 copy or None): see float32()

    def __len__(self):
        return len(self.paths)

    @classmethod
    def load(cls, path):
        """The index stored at `path`, or None when there is none or it cannot be read."""
        try:
            with np.load(path, allow_pickle=False) as data:  # arrays only: a file cannot run code
                meta = json.loads(data["meta"].tobytes())
                if meta.get("version") not in (4, 5, INDEX_VERSION):
                    return None
                if meta["version"] == INDEX_VERSION:
                    emb_file = os.path.join(os.path.dirname(os.path.abspath(path)), meta["embeddings"])
                    emb = np.load(emb_file, mmap_mode="r", allow_pickle=False)  # read as searches touch it
                    if emb.dtype != np.float16 or emb.ndim != 2:
                        return None
                else:
                    emb_file, emb = None, data["embeddings"]
                ix = cls(meta["fingerprint"], meta["root"], emb.shape[1], meta["checkpoint"])
                ix.version, ix.generation, ix.emb_file = meta["version"], meta.get("generation", ""), emb_file
                ix.emb, ix.stats, ix.fps = emb, data["stats"], data["fingerprints"]
                ix.taken = data["taken"] if "taken" in data else None
                ix.bias = data["bias"] if "bias" in data else None
                # One NUL-joined string, not a list: a million small strings would be slow to store.
                text = data["paths"].tobytes().decode("utf-8", "surrogateescape")
        except Exception:
            return None  # missing, damaged or foreign: rebuilt either way
        ix.failed, ix.bank_key, ix.paths = meta["failed"], meta["bank_key"], text.split("\0") if text else []
        if not (len(ix.paths) == len(ix.emb) == len(ix.stats) == len(ix.fps)
                and all(a is None or len(a) == len(ix.emb) for a in (ix.bias, ix.taken))):
            return None
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
        """A copy to update while searches go on reading this one: update() replaces the arrays
        rather than writing into them, so only the path list and the failures are copied."""
        new = copy.copy(self)
        new.paths, new.failed, new.spare = list(self.paths), dict(self.failed), dict(self.spare)
        return new

    def save(self, path):
        """Write atomically: the embeddings to a .npy named by the generation, then the .npz that
        names it, so a crash at any point leaves the previous index whole (at worst a .npy that
        nothing names). The previous generation's .npy is then removed, and emb maps the new one."""
        folder = os.path.dirname(os.path.abspath(path))
        name = f"{os.path.splitext(os.path.basename(path))[0]}.{self.generation}.npy"
        emb_file = os.path.join(folder, name)
        if emb_file != self.emb_file or not os.path.exists(emb_file):
            with atomic_path(emb_file) as tmp, open(tmp, "wb") as f:
                np.save(f, np.asarray(self.emb, np.float16))  # a memory map is copied page by page
        meta = {"version": INDEX_VERSION, "fingerprint": self.fingerprint, "root": self.root,
                "checkpoint": self.checkpoint, "failed": self.failed, "bank_key": self.bank_key,
                "generation": self.generation, "embeddings": name}
        arrays = {"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8),
                  "stats": self.stats, "fingerprints": self.fps, "taken": self.dates(),
                  "paths": np.frombuffer("\0".join(self.paths).encode("utf-8", "surrogateescape"), np.uint8)}
        if self.bias is not None:
            arrays["bias"] = self.bias
        with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez would add .npz to a name
            np.savez(f, **arrays)
        if self.emb_file not in (None, emb_file):
            try:
                os.remove(self.emb_file)  # a search still mapping it keeps reading it (POSIX)
            except OSError:
                pass  # gone already, or mapped on Windows: it stays behind, unused
        self.emb_file, self.version = emb_file, INDEX_VERSION
        held = self._f32[0] is self.emb
        self.emb = np.load(emb_file, mmap_mode="r")  # the same values, out of RAM
        if held:  # so is the float32 copy: it serves the map too
            self._f32 = (self.emb, self._f32[1])

    def update(self, files, encoder, batch_size=32, num_workers=0, make_bias_fn=None, bank_key="",
               encode_files=None):
        """Match the index to `files` ({relative path: (size, mtime_ns)} under root): drop photos
        that are gone, embed new and changed ones: a photo whose content the index holds (moved,
        renamed, copied: content_fingerprint) takes its embedding, exact duplicates are encoded
        once, the rest with `encoder` (encoder.py). make_bias_fn() -> bias_fn, where
        bias_fn(emb (M, D)) -> (M,) gives photos their querybank bias from the caption bank named
        `bank_key`; it is called before the encoding, so that a Ctrl-C while it prepares (encodes
        the caption bank) loses no photo encoded. Biases of another bank (or none) are computed
        again from the stored embeddings: no photo is decoded for that. encode_files:
        encode_image_files (the default) or what stands in for it (helpers/shard.py's, which spreads the
        files over processes). Returns counts and the unreadable files: {"added", "updated",
        "removed", "reused", "failed": [(path, reason)], "interrupted", "changed", "kept",
        "rebiased"}."""
        old_stats, n_failed, old_emb = self.stats.tolist(), len(self.failed), self.emb
        keep = [i for i, p in enumerate(self.paths) if list(files.get(p, ())) == old_stats[i]]
        self.failed = {p: v for p, v in self.failed.items() if list(files.get(p, ())) == v[:2]}
        known = {self.paths[i] for i in keep} | set(self.failed)
        todo = sorted(p for p in files if p not in known)
        seen = set(self.paths)
        removed = sum(p not in files for p in self.paths)
        held = self._held(keep) if todo else {}
        undated = self.taken is None
        self.taken = self.dates()
        if len(keep) < len(self.paths):
            self.emb, self.stats, self.fps = self.emb[keep], self.stats[keep], self.fps[keep]
            self.bias = None if self.bias is None else self.bias[keep]
            self.taken, self.paths = self.taken[keep], [self.paths[i] for i in keep]
        interrupted, rebiased = False, bank_key != self.bank_key
        bias_fn = make_bias_fn() if make_bias_fn is not None and (todo or rebiased) else None
        if rebiased:
            self.bias = bias_fn(self.emb) if bias_fn is not None else None
            self.bank_key = bank_key if bias_fn is not None else ""
        done, reused = [], 0
        if todo:
            done, emb, fps, errors, interrupted, reused = self._embed(todo, files, held, encoder, batch_size,
                                                                      num_workers, encode_files or encode_image_files)
            if bias_fn is not None:  # before anything changes: rows, paths and biases stay aligned
                old = np.empty(0, np.float32) if self.bias is None else self.bias
                self.bias = np.concatenate([old, bias_fn(emb)])
            self.emb, self.fps = np.concatenate([self.emb, emb]), np.concatenate([self.fps, fps])
            stats = np.array([files[p] for p in done], np.int64).reshape(-1, 2)
            taken = [taken_at(os.path.join(self.root, p), mtime) for p, (_, mtime) in zip(done, stats.tolist())]
            self.stats = np.concatenate([self.stats, stats])
            self.taken = np.concatenate([self.taken, np.array(taken, np.int64)])
            self.paths += done
            self.failed.update({p: [*files[p], e] for p, e in errors.items()})
        report = {"added": sum(p not in seen for p in done), "updated": sum(p in seen for p in done),
                  "removed": removed, "reused": reused, "interrupted": interrupted}
        report["failed"] = sorted((p, v[2]) for p, v in self.failed.items())
        report["changed"] = (bool(todo) or rebiased or undated or len(keep) < len(old_stats)
                             or len(self.failed) < n_failed or self.version < INDEX_VERSION)
        # How the rows moved, for an approximate index to follow: the old rows `kept` (in order) are
        # rows 0.., the new ones follow; `rebiased`: every row's bias changed.
        report["kept"], report["rebiased"] = keep, rebiased
        if self.emb is not old_emb:
            self._f32 = (None, None)  # the copy of the rows before: not kept alive until the next search
        if report["changed"]:
            self.generation = new_generation()
        return report

    def dates(self):
        """(N,) int64 photos.taken_at of every photo; read from the files for an index that has none
        (one made by an older version): their headers only, once."""
        if self.taken is None:
            self.taken = np.array([taken_at(os.path.join(self.root, p), int(mtime))
                                   for p, mtime in zip(self.paths, self.stats[:, 1])], np.int64).reshape(-1)
        return self.taken

    def _held(self, keep):
        """{fingerprint: embedding (D,)} the index holds: its rows, those about to be dropped (moved
        photos, which join spare) and spare ones."""
        kept = set(keep)
        for i, fp in enumerate(map(bytes, self.fps)):
            if i not in kept:
                self.spare[fp] = self.emb[i]
        held = {**self.spare, **{bytes(self.fps[i]): self.emb[i] for i in keep}}
        held.pop(NO_FINGERPRINT, None)
        return held

    def _embed(self, todo, files, held, encoder, batch_size, num_workers, encode_files):
        """Embed the files `todo`: from `held` by content fingerprint, else encoded, each content
        once. Returns (paths done, their emb (M, D) float16 and fingerprints (M, 16), {path: why
        unreadable}, interrupted, how many were not encoded: reused or duplicates)."""
        fps = [content_fingerprint(os.path.join(self.root, p), files[p][0]) for p in todo]
        keys = [fp if fp != NO_FINGERPRINT else p for p, fp in zip(todo, fps)]  # an unreadable file is its own
        first = {}
        for p, key in zip(todo, keys):
            first.setdefault(key, p)
        encode = [key for key in first if key not in held]
        emb, errors = encode_files(encoder, [os.path.join(self.root, first[k]) for k in encode],
                                   encoder.image_size, batch_size, num_workers)
        got = dict(zip([k for k, e in zip(encode, errors) if not e], emb))
        why = {k: e for k, e in zip(encode, errors) if e}
        done, rows, reused, failed = [], [], 0, {}
        for p, key, fp in zip(todo, keys, fps):
            if key in held or key in got:
                done.append((p, fp))
                rows.append(held[key] if key in held else got[key])
                reused += key in held or first[key] != p
            elif key in why:
                failed[p] = why[key]
        out = np.stack(rows).astype(np.float16) if rows else np.empty((0, encoder.dim), np.float16)
        out_fps = np.frombuffer(b"".join(fp for _, fp in done), np.uint8).reshape(-1, 16)
        return [p for p, _ in done], out, out_fps, failed, len(errors) < len(encode), reused

    def float32(self, emb):
        """A float32 copy of `emb` (this index's rows) for top_k, made at the second search of these
        rows and kept for the next ones; None at the first (a one-shot search.py converts chunk by
        chunk, holding 32 MB instead of a whole copy) and past F32_BYTES. Tied to the array
        itself: update() replaces emb and drops the copy."""
        src, copy32 = self._f32
        if src is not emb:
            self._f32, copy32 = (emb, None), None
        elif copy32 is None and emb.size * 4 <= F32_BYTES:
            copy32 = np.asarray(emb, dtype=np.float32)
            self._f32 = (emb, copy32)
        return copy32

    def top_k(self, query_emb, k, chunk_rows=CHUNK_ROWS, bias=None, allowed=None):
        """Exact top-k by cosine similarity for L2-normalised queries (Q, D), less the photos'
        bias (N,) if given (querybank normalisation), among the rows where `allowed` (N,) bool is
        True if given (a date filter).

        Returns scores (Q, k') float32 and row indices (Q, k') int64, best first, k' = min(k, N,
        allowed rows).
        Each chunk of rows is read from the float32 copy (float32()), or where there is none
        converted in one reused buffer, scored and keeps its best k + RESCORE_EXTRA; those candidates are
        then rescored against the stored vectors in float32 with one product per query, so the
        scores and order do not depend on the chunking.
        """
        q = np.asarray(query_emb, dtype=np.float32)
        n, k = len(self), min(k, len(self) if allowed is None else int(np.count_nonzero(allowed)))
        if k == 0:
            return np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64)
        keep = min(k + RESCORE_EXTRA, n)
        emb = self.emb  # once: serve.py's updates replace it meanwhile
        emb32 = self.float32(emb)
        buf = np.empty((min(chunk_rows, n), emb.shape[1]), np.float32) if emb32 is None else None
        cand = []
        for lo in range(0, n, chunk_rows):
            if emb32 is not None:
                block = emb32[lo:lo + chunk_rows]
            else:
                block = buf[:min(chunk_rows, n - lo)]
                np.copyto(block, emb[lo:lo + len(block)])
            s = block @ q.T  # (C, Q)
            if bias is not None:
                s -= bias[lo:lo + len(block), None]
            if allowed is not None:
                s[~allowed[lo:lo + len(block)]] = -np.inf
            c = min(keep, len(block))
            top = np.argpartition(-s, c - 1, axis=0)[:c] if c < len(block) else np.arange(len(block))[:, None]
            cand.append(np.broadcast_to(top, (c, len(q))) + lo)
        cand = np.concatenate(cand).T  # (Q, M) candidate rows
        exact = np.einsum("qmd,qd->qm", emb[cand].astype(np.float32), q)  # (Q, M) float32
        if bias is not None:
            exact -= bias[cand]
        if allowed is not None:  # a chunk with fewer than k allowed rows gave some others too
            exact[~allowed[cand]] = -np.inf
        # Best first; among equal scores the lower row first, as a stable sort of all rows would give.
        order = np.lexsort((cand, -exact), axis=1)[:, :k]
        return np.take_along_axis(exact, order, 1), np.take_along_axis(cand, order, 1)
