"""Approximate top-k search for galleries too big to scan on every query: a FAISS index that picks
candidates, re-ranked with the exact score from the gallery's own float16 embeddings. Example:

    from helpers import ann
    emb = np.load("gallery_emb.npy", mmap_mode="r")        # (N, D) float16, memory-mapped
    ix = ann.build(emb, fingerprint="3f2a...")             # or build(emb, bias, fingerprint=...)
    scores, rows = ix.search(q, 10, emb)                  # q (Q, D) float32, L2-normalised
    ix.save("gallery.ann"); ix = ann.load("gallery.ann", "3f2a...")

The kind: IVF-PQ behind a random rotation (FAISS's "RR{D},IVF{lists},PQ{D/8}", inner product:
8-bit codes of 8 dimensions each), then the best RERANK candidates rescored in float32 from the
embeddings. Why: at D=512 the codes take 64 bytes a photo and the list ids 8, so 10M photos hold
about 75 bytes each in RAM; the re-ranking reads a few hundred rows of the float16 embeddings
(memory-mapped: the gallery's own file, no second copy), so scores are exact cosines and the codes
only need to rank the true top 10 among the candidates. For that, 8-bit codes beat 4-bit
"fast-scan" codes of the same 64 bytes by far (50,000 clustered photos, text-like queries, every
list visited: the exact top 10 was 98.8% inside the codes' top 200, against 86.4%), which outweighs
fast-scan's faster scoring; OPQ's learned rotation with fast-scan codes came close (97.6%) but its
training is slow. The random rotation spreads a learned embedding's uneven per-dimension variance
over the sub-quantizers. HNSW was not chosen: its graph alone costs
2 x 32 links x 4 bytes = 256 bytes a photo at its usual M=32, over a budget of 100, and it cannot
drop deletions. Measured figures: benchmarks/README.md.

Rows: the index holds the gallery's rows 0..N-1 in the gallery's order. add() appends rows,
remove(rows) deletes rows and renumbers the rest as np.delete does (as the gallery compacts its
arrays), so search() returns gallery row numbers.

Querybank bias (a float32 per photo subtracted from text queries' scores): an index built with
`bias` stores it as an extra coordinate, so the query [q, -1] scores q.x - bias in the candidate
search too, and photos with a low bias are not lost before the re-ranking; queries without bias
(image queries) put 0 there.

Small galleries (fewer than FLAT_BELOW photos) get one list of uncompressed vectors, exact, so
that tests and `--ann` on a small folder work; the number of lists grows with the gallery at
build time. A gallery that has grown well past the size it was built for (`needs_rebuild`) should
be built again: its lists grow long and slow.

numpy and faiss only; imported only where the approximate index is used.
"""

import json
import zlib

import numpy as np

try:
    import faiss
except ImportError:  # a clear message instead of a traceback for users of exact search only
    raise ImportError("the approximate index (--ann) needs FAISS: pip install 'faiss-cpu>=1.9,<2'")

from helpers.atomic import atomic_path
from helpers.cli import usable_cores

faiss.omp_set_num_threads(usable_cores())  # FAISS's OpenMP would use every core of the machine

FORMAT = "gallery-ann-1"
MAGIC = b"GALLERY-ANN\n"
FLAT_BELOW = 1000  # fewer photos than this: one exact list (PQ and k-means need more points to train)
DIMS_PER_CODE = 8  # dimensions per 8-bit sub-quantizer: 64 bytes a photo at D=512
MAX_LISTS = 4096
NPROBE = 64  # lists visited per query (fewer lose recall@10 at 10M photos: benchmarks/README.md)
RERANK = 512  # candidates rescored exactly per query (fewer lose recall@10 at 10M photos, as above)
REBUILD_GROWTH = 4  # built for N photos, rebuild past 4 N: longer lists, a quantizer trained on too few
CHUNK = 65536  # rows converted to float32 at a time while adding: 128 MB at D=512
TRAIN_PER_LIST = 32  # k-means sample per list (FAISS's default asks for 39: 32 place lists well enough)
TRAIN_MAX = 131072  # sample rows: MAX_LISTS x 32, and 512 per code centroid


def lists_for(n):
    """Inverted lists for n photos: a power of two near 2 sqrt(n) (1M: 2048, 10M: 4096), at most
    MAX_LISTS because assigning each photo to a list compares it with every list's centroid (the
    build grows with the lists), and no more than the k-means sample can place."""
    if n < FLAT_BELOW:
        return 1
    want = 2 ** round(np.log2(2 * np.sqrt(n)))
    return int(min(want, MAX_LISTS, 2 ** int(np.log2(min(n, TRAIN_MAX) // TRAIN_PER_LIST))))


class AnnIndex:
    """A FAISS index over a gallery's rows (see the module docstring), its fingerprint and settings."""

    def __init__(self, index, dim, fingerprint, has_bias, n_built):
        self.index = index
        self.dim = dim  # D of the embeddings; the index's own dimension has padding and the bias
        self.fingerprint = fingerprint
        self.has_bias = has_bias
        self.n_built = n_built  # gallery size it was built for (needs_rebuild)
        self.nprobe = NPROBE
        self.rerank = RERANK
        # FAISS splits a batch of queries over its threads (parallel_mode 0), so the one query at a
        # time that search.py and the page send would scan its lists on one core; mode 1 splits the
        # lists one query visits over the threads instead (benchmarks/README.md, "10,000,000 photos").
        faiss.extract_index_ivf(index).parallel_mode = 1

    def __len__(self):
        return self.index.ntotal

    @property
    def needs_rebuild(self):
        return len(self) > REBUILD_GROWTH * max(self.n_built, FLAT_BELOW)

    def _rows(self, emb, bias):
        """(M, index dim) float32: the embeddings, the bias coordinate (-bias is what the query's
        -1 multiplies: +bias here), zero padding."""
        out = np.zeros((len(emb), self.index.d), np.float32)
        out[:, :self.dim] = emb
        if self.has_bias:
            out[:, self.dim] = bias
        return out

    def add(self, emb, bias=None):
        """Append rows len(self).. : emb (M, D) float16 or float32, bias (M,) if built with one."""
        if self.has_bias != (bias is not None):
            raise ValueError("bias must be given exactly when the index was built with one")
        for lo in range(0, len(emb), CHUNK):
            self.index.add(self._rows(emb[lo:lo + CHUNK], None if bias is None else bias[lo:lo + CHUNK]))

    def remove(self, rows):
        """Delete `rows` and renumber the rest as np.delete(gallery, rows) does."""
        rows = np.unique(np.asarray(rows, np.int64))
        if not len(rows):
            return
        self.index.remove_ids(rows)
        invlists = faiss.extract_index_ivf(self.index).invlists
        for lst in range(invlists.nlist):
            n = invlists.list_size(lst)
            if n:
                ptr = invlists.get_ids(lst)
                ids = faiss.rev_swig_ptr(ptr, n)  # a view of the list's ids: renumbered in place
                ids -= np.searchsorted(rows, ids)
                invlists.release_ids(lst, ptr)

    def search(self, q, k, emb, bias=None, allowed=None, exact_below=0):
        """Top k rows for queries q (Q, D) float32, L2-normalised: scores (Q, k') float32, rows
        (Q, k') int64, best first, k' = min(k, rows allowed). Scores are exact cosines with `emb`
        (N, D), the gallery's embeddings (float16 memory-mapped is fine), less `bias` (N,) if given,
        as the exact search computes them; only which rows are scored is approximate.

        allowed (N,) bool: only those rows (a date filter). Fewer than `exact_below` allowed rows
        are all scored exactly (as cheap as an exact search of a gallery that small: the caller's
        threshold for using this index at all). More are searched through the index with FAISS's
        IDSelectorBitmap, which skips other rows' codes, visiting nprobe x N / allowed lists (at
        most all), so the lists visited hold about as many allowed candidates as an unfiltered
        search finds."""
        if bias is not None and not self.has_bias:
            raise ValueError("this index was built without a bias: build it again with the gallery's bias")
        q = np.ascontiguousarray(q, np.float32)
        n_ok = len(self) if allowed is None else int(np.count_nonzero(allowed))
        k = min(k, n_ok)
        scores, rows = np.empty((len(q), k), np.float32), np.empty((len(q), k), np.int64)
        if k == 0:
            return scores, rows
        if allowed is not None and n_ok < exact_below:
            return self._exact(q, k, emb, bias, np.flatnonzero(allowed))
        qx = np.zeros((len(q), self.index.d), np.float32)
        qx[:, :self.dim] = q
        if bias is not None:
            qx[:, self.dim] = -1.0
        nlist = faiss.extract_index_ivf(self.index).nlist
        sel = None
        if allowed is not None:
            bitmap = np.packbits(np.asarray(allowed, bool), bitorder="little")  # a local: alive while FAISS reads it
            sel = faiss.IDSelectorBitmap(len(allowed), faiss.swig_ptr(bitmap))

        def candidates(x, nprobe):
            # Per-call parameters, not the index's own nprobe: searches from several threads do not meet.
            params = faiss.SearchParametersIVF(nprobe=min(nprobe, nlist))
            if sel is not None:
                params.sel = sel
            return self.index.search(x, max(self.rerank, k), params=params)[1]
        nprobe = self.nprobe if allowed is None else -(-self.nprobe * len(self) // n_ok)
        cand = candidates(qx, nprobe)
        for i in range(len(q)):
            c = np.sort(cand[i][cand[i] >= 0])  # sorted: the memory map reads forward
            if len(c) < k:  # the probed lists held fewer than k: visit them all
                c = np.sort(candidates(qx[i:i + 1], nlist)[0])
                c = c[c >= 0]
            s = np.asarray(emb[c], np.float32) @ q[i]  # (C,) float32, as the exact rescoring
            if bias is not None:
                s -= np.asarray(bias, np.float32)[c]
            best = np.argsort(-s, kind="stable")[:k]
            scores[i], rows[i] = s[best], c[best]
        return scores, rows

    @staticmethod
    def _exact(q, k, emb, bias, rows):
        """Exact top k among `rows` (sorted), CHUNK rows at a time; ties: the lower row first."""
        s = np.concatenate([np.asarray(emb[rows[lo:lo + CHUNK]], np.float32) @ q.T
                            for lo in range(0, len(rows), CHUNK)])  # (M, Q)
        if bias is not None:
            s -= np.asarray(bias, np.float32)[rows][:, None]
        best = np.argsort(-s, axis=0, kind="stable")[:k].T  # (Q, k)
        return np.take_along_axis(s.T, best, 1), rows[best]

    def save(self, path):
        """Write atomically: a JSON header (format, fingerprint, FAISS version, sizes), the FAISS
        index, then its length and CRC-32, so that load() can tell a truncated or altered file."""
        blob = faiss.serialize_index(self.index)  # (bytes,) uint8
        header = json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "faiss": faiss.__version__,
                             "dim": self.dim, "has_bias": self.has_bias, "n_built": self.n_built,
                             "ntotal": len(self)}).encode()
        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            f.write(MAGIC + len(header).to_bytes(8, "little") + header)
            f.write(memoryview(blob))
            f.write(len(blob).to_bytes(8, "little") + zlib.crc32(blob).to_bytes(4, "little"))


def load(path, fingerprint, log=print):
    """The index saved at `path` if it is whole, of this format and `fingerprint`, and readable by
    this FAISS; else None, after logging why (the caller rebuilds it or searches exactly)."""
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as e:
        log(f"cannot read the approximate index {path}: {e}")
        return None
    raw = data.tobytes()[:len(MAGIC) + 8]
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 8:
        log(f"{path} is not an approximate gallery index")
        return None
    start = len(MAGIC) + 8 + int.from_bytes(raw[len(MAGIC):], "little")
    try:
        header = json.loads(data[len(MAGIC) + 8:start].tobytes())
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        log(f"{path} is damaged or of another format than {FORMAT}")
        return None
    if header["fingerprint"] != fingerprint:
        log(f"{path} was made for another checkpoint or gallery ({header['fingerprint']}, not {fingerprint})")
        return None
    blob, trailer = data[start:-12], data[-12:].tobytes()
    if len(data) < start + 12 or int.from_bytes(trailer[:8], "little") != len(blob) \
            or int.from_bytes(trailer[8:], "little") != zlib.crc32(blob):
        log(f"{path} is truncated or damaged")
        return None
    try:
        index = faiss.deserialize_index(blob)
    except RuntimeError as e:
        log(f"{path} was written by FAISS {header['faiss']}, which FAISS {faiss.__version__} cannot read "
            f"({str(e).splitlines()[0][:120]})")
        return None
    if index.ntotal != header["ntotal"] or index.d < header["dim"]:
        log(f"{path} does not hold what its header says")
        return None
    ix = AnnIndex(index, header["dim"], fingerprint, header["has_bias"], header["n_built"])
    return ix


def build(emb, bias=None, fingerprint="", progress=None):
    """An AnnIndex over every row of emb (N, D) float16 or float32 (a memory map is read in chunks:
    no float32 copy of the gallery is ever made), with bias (N,) if text queries subtract one.
    Trains on a random sample of at most TRAIN_MAX rows, then adds CHUNK rows at a time.
    progress(rows_done) is called after each chunk (a tqdm bar's update, for instance)."""
    n, dim = emb.shape
    nlist = lists_for(n)
    width = -(-dim // DIMS_PER_CODE) * DIMS_PER_CODE  # padded to whole sub-quantizers
    d = width + (DIMS_PER_CODE if bias is not None else 0)  # and whole sub-quantizers for the bias
    if nlist == 1:
        index = faiss.index_factory(d, "IVF1,Flat", faiss.METRIC_INNER_PRODUCT)
        index.quantizer.add(np.zeros((1, d), np.float32))  # one list, no training: any size, even 0
        index.is_trained = True
    else:
        n_train = min(n, TRAIN_MAX)
        nbits = min(8, int(np.log2(n_train / 39)))  # fewer code centroids for a small sample to train
        index = faiss.index_factory(d, f"RR{d},IVF{nlist},PQ{d // DIMS_PER_CODE}x{nbits}", faiss.METRIC_INNER_PRODUCT)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))  # IndexIVFPQ, to reach its pq
        ivf.cp.niter = ivf.pq.cp.niter = 10  # of 25: enough to pick candidates, sooner
        ivf.cp.min_points_per_centroid = TRAIN_PER_LIST
        ivf.do_polysemous_training = False  # a code order for Hamming filters, unused here: 15x the training
    ix = AnnIndex(index, dim, fingerprint, bias is not None, n)
    if nlist > 1:
        rng = np.random.default_rng(0)
        pick = np.sort(rng.choice(n, n_train, replace=False))
        index.train(ix._rows(emb[pick], None if bias is None else bias[pick]))
    for lo in range(0, n, CHUNK):
        ix.add(emb[lo:lo + CHUNK], None if bias is None else bias[lo:lo + CHUNK])
        if progress is not None:
            progress(min(CHUNK, n - lo))
    return ix
