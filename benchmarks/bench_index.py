"""Exact search against the approximate index (helpers/ann.py) on big synthetic galleries, in one run:
latency per query, recall@10 of the approximate index against exact search, memory per photo and
build time.

    python benchmarks/bench_index.py                                  # 1,000,000 photos x 512
    python benchmarks/bench_index.py --photos 10000000 --json results/bench_index_10m.json
    python benchmarks/bench_index.py --photos 100000 --bias --nprobe 8 16 32

The gallery: clustered unit vectors shaped like photo embeddings (topics, bursts of shots of one
scene, a decaying spectrum, a common mean direction; `Clustered`), written shard by shard to a
float16 .npy in --work_dir (the gallery file, removed at the end unless --keep) and never held in
RAM as a whole beyond --exact_in_ram photos. Queries are text-like: a scene's direction blurred by
much noise, off the photos' manifold, so their top scores sit close together (the printed
nearest-neighbour figures show the shape). --bias gives every photo a querybank bias
(retrieval.querybank_bias's formula against a bank of text-like queries) and ranks text queries
with it, as a model trained with --querybank does.

Exact: index.GalleryIndex.top_k, the project's search, on the float16 embeddings in RAM, or
memory-mapped from the gallery file past --exact_in_ram photos (then every query reads the whole
file: page cache or disk). Its answers are the truth for recall@10 (the share of exact search's top
10 found in the approximate top 10). The approximate index is built in a fresh process from the
memory-mapped file (peak RSS, anonymous memory apart from file pages mapped, sampled every 50 ms),
saved, loaded, and searched; it re-ranks from the memory-mapped gallery file. Latencies are single
queries after a warm-up, the query's encoding not included.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHARD = 100_000  # rows generated at a time: 200 MB of float32 at D=512
TRUTH_QUERIES = 25  # queries per exact pass for the truth


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photos", type=int, nargs="+", default=[1_000_000], help="gallery sizes, each its own run")
    p.add_argument("--dim", type=int, default=512, help="embedding size")
    p.add_argument("--queries", type=int, default=100, help="timed queries (each also counts for recall)")
    p.add_argument("--exact_queries", type=int, default=0,
                   help="of those, how many exact search times one by one (0: all in RAM, 5 memory-mapped)")
    p.add_argument("--exact_in_ram", type=int, default=2_000_000, help="largest gallery exact search holds in RAM")
    p.add_argument("--nprobe", type=int, nargs="+", default=None, help="lists visited (default ann.NPROBE)")
    p.add_argument("--rerank", type=int, nargs="+", default=None, help="candidates re-ranked (default ann.RERANK)")
    p.add_argument("--bias", action="store_true", help="querybank bias per photo, subtracted from text queries")
    p.add_argument("--threads", type=int, default=2, help="threads for FAISS (NumPy's BLAS: OPENBLAS_NUM_THREADS)")
    p.add_argument("--faiss_simd", default=None, choices=["AVX2", "AVX512", "AVX512_VPOPCNT"],
                   help="FAISS's kernels for the searches (AVX2: as on most laptops; default: the best this CPU has)")
    p.add_argument("--work_dir", default=None, help="where the gallery file goes (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the gallery and index files")
    p.add_argument("--reuse", action="store_true", help="use a gallery file that --keep left in --work_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the rows (one per gallery size and kind) here")
    return p.parse_args(argv)


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


class Clustered:
    """Synthetic photo embeddings, made shard by shard and deterministically: topics (a random
    cluster each, lognormal popularity and spread) around a common mean direction, scenes (bursts
    of about `burst` shots) around topics, photos around scenes; all noise with a spectrum falling
    as 1/sqrt(rank), as learned embeddings' does, in a random orientation. At 100,000 photos a photo's
    nearest other photo has cosine 0.91 (median), its 10th nearest 0.81, two random photos 0.18."""

    def __init__(self, dim, topics, seed=0, burst=3.0):
        rng = np.random.default_rng([seed, 0])
        rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        s = (np.arange(dim) + 1.0) ** -0.5
        self.axes = (rotation * (s / np.linalg.norm(s))).T.astype(np.float32)  # (D, D)
        mean = unit(rng.standard_normal(dim))
        self.topics = unit(0.55 * mean + rng.standard_normal((topics, dim)) @ self.axes).astype(np.float32)
        self.topic_p = rng.lognormal(0, 1.0, topics)
        self.topic_p /= self.topic_p.sum()
        self.topic_spread = (0.55 * rng.lognormal(0, 0.3, topics)).astype(np.float32)
        self.dim, self.seed, self.burst = dim, seed, burst

    def _noise(self, rng, n):
        return rng.standard_normal((n, self.dim), dtype=np.float32) @ self.axes

    def _scenes(self, rng, n):
        t = rng.choice(len(self.topics), n, p=self.topic_p)
        return unit(self.topics[t] + self.topic_spread[t, None] * self._noise(rng, n))

    def shard(self, i, rows):
        """Rows of shard i (rows, D) float32: the same for the same i, whatever else was made."""
        rng = np.random.default_rng([self.seed, 1, i])
        scenes = self._scenes(rng, max(1, round(rows / self.burst)))
        shot = np.sort(rng.integers(0, len(scenes), rows))
        return unit(scenes[shot] + 0.35 * self._noise(rng, rows)).astype(np.float32)

    def text_queries(self, n, stream=2):
        """(n, D) float32 like captions' embeddings: a scene's direction plus isotropic noise."""
        rng = np.random.default_rng([self.seed, stream])
        noise = rng.standard_normal((n, self.dim)).astype(np.float32) / np.sqrt(self.dim)
        return unit(self._scenes(rng, n) + 1.5 * noise).astype(np.float32)


def write_gallery(path, gen, n, bank=None, scale=30.0):
    """Write n rows of `gen` as a float16 .npy, shard by shard through a plain file (no mapping:
    the process's memory stays one shard). With `bank` (M, D), also return each photo's querybank
    bias (n,) float32: log-sum-exp of scale x similarity to the bank, over scale."""
    from tqdm import tqdm

    from helpers.atomic import atomic_path
    bias = np.empty(n, np.float32) if bank is not None else None
    bar = tqdm(total=n, desc="gallery", unit="photo", unit_scale=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f, bar:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f2", "fortran_order": False, "shape": (n, gen.dim)})
        for i, lo in enumerate(range(0, n, SHARD)):
            x = gen.shard(i, min(SHARD, n - lo))
            f.write(x.astype(np.float16).tobytes())
            if bank is not None:
                s = scale * (bank @ x.astype(np.float16).astype(np.float32).T)  # (M, rows)
                m = s.max(0)
                bias[lo:lo + len(x)] = (m + np.log(np.exp(s - m).sum(0))) / scale
            bar.update(len(x))
    return bias


class MemoryWatch:
    """Peak resident memory of this process while it runs: all of it (VmHWM) and the anonymous part
    (heap, FAISS's arrays), apart from file pages mapped (the page cache of a memory map)."""

    def __enter__(self):
        self.peak_anon, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.wait(0.05):
            self.peak_anon = max(self.peak_anon, status_kb("RssAnon") * 1024)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_anon = max(self.peak_anon, status_kb("RssAnon") * 1024)
        self.peak_rss = status_kb("VmHWM") * 1024


def status_kb(field):
    """A field of /proc/self/status in kB, or 0 where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def build_ann(gallery_path, bias_path, out_path, threads, queue):
    """In a fresh process: build the approximate index from the memory-mapped gallery, save it, and
    report build seconds and peak memory."""
    import faiss

    from helpers import ann
    faiss.omp_set_num_threads(threads)
    with MemoryWatch() as mem:
        t = time.perf_counter()
        emb = np.load(gallery_path, mmap_mode="r")
        bias = np.load(bias_path) if bias_path else None
        ix = ann.build(emb, bias, fingerprint="bench")
        build_s = time.perf_counter() - t
        ix.save(out_path)
    queue.put({"build_s": build_s, "peak_rss_bytes": mem.peak_rss, "peak_anon_bytes": mem.peak_anon,
               "lists": faiss.extract_index_ivf(ix.index).nlist})


def percentiles(times_s):
    p50, p95 = np.percentile(np.array(times_s) * 1000, [50, 95])
    return float(p50), float(p95)


def exact_rows(n, dim, emb, q, bias, timed, in_ram):
    """Exact top 10 of each query (the truth) and its row: time `timed` single queries."""
    from index import F32_BYTES, GalleryIndex
    ix = GalleryIndex("bench", "/photos", dim)
    t = time.perf_counter()
    ix.emb = np.array(emb) if in_ram else emb  # a read-only memory map: top_k only reads it
    load_s = time.perf_counter() - t
    ix.paths = [""] * n  # top_k takes the gallery's size from its paths
    ix.top_k(q[:1], 10, bias=bias)  # warm-up: threads, first touch of the pages
    times = []
    for i in range(timed):
        t = time.perf_counter()
        ix.top_k(q[i:i + 1], 10, bias=bias)
        times.append(time.perf_counter() - t)
    # TRUTH_QUERIES at a time: the rescoring gathers (queries, candidates, D) rows, 1.3 GB at 10M
    # photos and 25 queries, where all 100 at once would take 5 GB.
    truth = np.concatenate([ix.top_k(q[i:i + TRUTH_QUERIES], 10, bias=bias)[1]
                            for i in range(0, len(q), TRUTH_QUERIES)])
    p50, p95 = percentiles(times)
    copy32 = 4 * dim if n * dim * 4 <= F32_BYTES else 0  # the float32 copy warm searches keep (index.py)
    return truth, {"kind": "exact" if in_ram else "exact-mmap", "p50_ms": p50, "p95_ms": p95, "recall_at_10": 1.0,
                   "bytes_per_photo": (2 * dim if in_ram else 0) + copy32,
                   "disk_bytes_per_photo": 0 if in_ram else 2 * dim, "build_s": load_s, "timed_queries": timed}


def ann_rows(args, n, emb, q, bias, truth, ann_path, built):
    import faiss

    from helpers import ann
    faiss.omp_set_num_threads(args.threads)
    if args.faiss_simd:
        faiss.SIMDConfig.set_level(getattr(faiss, "SIMDLevel_" + args.faiss_simd))
    before = status_kb("RssAnon") * 1024
    ix = ann.load(ann_path, "bench")
    held = status_kb("RssAnon") * 1024 - before
    rows = []
    for nprobe, rerank in [(p, r) for p in args.nprobe or [ann.NPROBE] for r in args.rerank or [ann.RERANK]]:
        ix.nprobe, ix.rerank = nprobe, rerank
        ix.search(q[:1], 10, emb, bias)  # warm-up
        times, found = [], []
        for i in range(len(q)):
            t = time.perf_counter()
            _, r = ix.search(q[i:i + 1], 10, emb, bias)
            times.append(time.perf_counter() - t)
            found.append(len(set(r[0].tolist()) & set(truth[i].tolist())) / 10)
        p50, p95 = percentiles(times)
        rows.append({"kind": f"ivfpq lists={built['lists']} nprobe={nprobe} rerank={ix.rerank}",
                     "faiss_simd": faiss.SIMDConfig.get_level_name(),
                     "p50_ms": p50, "p95_ms": p95, "recall_at_10": float(np.mean(found)),
                     "bytes_per_photo": os.path.getsize(ann_path) / n, "rss_bytes_per_photo": held / n,
                     "disk_bytes_per_photo": 2 * args.dim + (4 if bias is not None else 0),
                     "build_s": built["build_s"], "build_peak_rss_bytes": built["peak_rss_bytes"],
                     "build_peak_anon_bytes": built["peak_anon_bytes"]})
    return rows


def nn_shape(emb, q, n_probe=200):
    """Nearest-neighbour scores that tell the data's shape: for photos, their nearest and 10th
    nearest other photo (median), over the first SHARD rows; for the queries, top-1 and top-10."""
    x = np.asarray(emb[:SHARD], np.float32)
    s = x[:n_probe] @ x.T
    s[np.arange(n_probe), np.arange(n_probe)] = -2
    s = -np.sort(-s, 1)
    t = -np.sort(-(q @ x.T), 1)
    return {"photo_nn1": float(np.median(s[:, 0])), "photo_nn10": float(np.median(s[:, 9])),
            "query_top1": float(np.median(t[:, 0])), "query_top10": float(np.median(t[:, 9]))}


def run(args, n, work):
    gen = Clustered(args.dim, max(10, n // 1000), args.seed)
    q = gen.text_queries(args.queries)
    gallery = os.path.join(work, f"gallery_{n}.npy")
    t = time.perf_counter()
    bias_path = os.path.join(work, f"bias_{n}.npy") if args.bias else None
    reused = args.reuse and os.path.exists(gallery) and (bias_path is None or os.path.exists(bias_path))
    if reused:
        bias = None if bias_path is None else np.load(bias_path)
    else:
        bias = write_gallery(gallery, gen, n, gen.text_queries(2048, stream=3) if args.bias else None)
        if bias is not None:
            np.save(bias_path, bias)
    gen_s = time.perf_counter() - t
    emb = np.load(gallery, mmap_mode="r")
    shape = nn_shape(emb, q)
    print(f"{n:,} photos {'reused' if reused else 'written'} ({gen_s:.0f} s) | medians: "
          f"photo's nearest {shape['photo_nn1']:.3f}, "
          f"10th {shape['photo_nn10']:.3f}; query's top-1 {shape['query_top1']:.3f}, top-10 {shape['query_top10']:.3f}"
          " (in the first 100,000 photos)", flush=True)

    ann_path = os.path.join(work, f"gallery_{n}.ann")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=build_ann, args=(gallery, bias_path, ann_path, args.threads, queue))
    proc.start()
    built = queue.get()
    proc.join()
    if args.keep:  # for bench_index_sweep.py, which searches the kept index with other settings
        with open(os.path.join(work, f"built_{n}.json"), "w") as f:
            json.dump(built, f)
    print(f"approximate index built in {built['build_s']:.0f} s, peak RSS {built['peak_rss_bytes'] / 2**30:.2f} GB"
          f" ({built['peak_anon_bytes'] / 2**30:.2f} GB anonymous)", flush=True)

    in_ram = n <= args.exact_in_ram
    timed = args.exact_queries or (args.queries if in_ram else 5)
    truth, exact = exact_rows(n, args.dim, emb, q, bias, min(timed, args.queries), in_ram)
    rows = [exact] + ann_rows(args, n, emb, q, bias, truth, ann_path, built)
    for r in rows:
        r.update({"photos": n, "dim": args.dim, "bias": bool(args.bias), "gen_s": gen_s, **shape})
    return rows


def main(argv=None):
    args = get_args(argv)
    import faiss
    print(f"faiss {faiss.__version__} ({faiss.get_compile_options().strip()}), numpy {np.__version__}, "
          f"{args.threads} threads, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_index_")
    os.makedirs(work, exist_ok=True)
    rows = []
    try:
        for n in args.photos:
            new = run(args, n, work)
            rows += new
            for r in new:
                print(f"{r['photos']:>11,} {r['kind']:<40} p50 {r['p50_ms']:8.2f} ms  p95 {r['p95_ms']:8.2f} ms  "
                      f"recall@10 {r['recall_at_10']:.3f}  RAM {r['bytes_per_photo']:6.0f} B/photo  "
                      f"disk {r['disk_bytes_per_photo']:5.0f} B/photo  build {r['build_s']:6.0f} s", flush=True)
    finally:
        if not args.keep:  # gigabytes each: never left behind, even after Ctrl-C
            for name in os.listdir(work):
                if name.startswith(("gallery_", "bias_")):
                    os.remove(os.path.join(work, name))
            if not args.work_dir:
                shutil.rmtree(work, ignore_errors=True)
    peak = status_kb("VmHWM") * 1024  # this process's, exact search's included; the build's is its own row field
    print(f"peak RSS of the benchmark process {peak / 2**30:.2f} GB", flush=True)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            command = "python benchmarks/bench_index.py " + " ".join(sys.argv[1:] if argv is None else argv)
            json.dump({"command": command,
                       "date": time.strftime("%Y-%m-%d %H:%M"), "faiss": faiss.__version__,
                       "faiss_compile": faiss.get_compile_options().strip(), "threads": args.threads,
                       "load_average_end": os.getloadavg()[0], "peak_rss_bytes": peak, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
