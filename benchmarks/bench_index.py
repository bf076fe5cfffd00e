"""Latency and memory of a top-k query over a big gallery index (random unit vectors).

    python benchmarks/bench_index.py                      # 1,000,000 x 512, top 9, 50 queries
    python benchmarks/bench_index.py --n 100000 --top_k 25 --batch 16

Times GalleryIndex.top_k alone, after one warm-up query: the text or image encoding of the
query comes on top (one forward pass). Bytes per photo counts the float16 embeddings, the
(size, mtime_ns) pair and the Python string of a typical relative path.
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from index import GalleryIndex  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000, help="photos in the gallery")
    p.add_argument("--dim", type=int, default=512, help="embedding size")
    p.add_argument("--top_k", type=int, default=9, help="results per query")
    p.add_argument("--queries", type=int, default=50, help="timed queries")
    p.add_argument("--batch", type=int, default=1, help="queries answered per top_k call")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return p.parse_args(argv)


def rss_bytes():
    """Resident memory of this process (Linux), or 0 where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def random_index(n, dim, seed=0):
    """An index of n random unit vectors, made in slices so float32 never holds all of them."""
    g = torch.Generator().manual_seed(seed)
    ix = GalleryIndex("bench", "/photos", dim)
    ix.emb = torch.empty(n, dim, dtype=torch.float16)
    for lo in range(0, n, 65536):
        x = torch.randn(min(65536, n - lo), dim, generator=g)
        ix.emb[lo:lo + len(x)] = torch.nn.functional.normalize(x, dim=-1)
    ix.paths = [f"{2000 + i % 25}/{i % 12 + 1:02d}/IMG_{i:07d}.jpg" for i in range(n)]
    ix.stats = torch.stack([torch.full((n,), 3_000_000), torch.arange(n) + 1_700_000_000_000_000_000], 1)
    return ix


def measure(n, dim=512, top_k=9, queries=50, batch=1):
    """{"p50_ms", "p95_ms", "min_ms", "bytes_per_photo", "rss_bytes_per_photo"} of top_k calls."""
    before = rss_bytes()
    ix = random_index(n, dim)
    rss = rss_bytes() - before
    counted = (ix.emb.nbytes + ix.stats.nbytes + sum(sys.getsizeof(p) + 8 for p in ix.paths)) / n
    g = torch.Generator().manual_seed(1)
    q = torch.nn.functional.normalize(torch.randn(queries + 1, batch, dim, generator=g), dim=-1)
    ix.top_k(q[0], top_k)  # warm-up: first touch of the pages, thread start-up
    times = []
    for qq in q[1:]:
        t = time.perf_counter()
        ix.top_k(qq, top_k)
        times.append(1000 * (time.perf_counter() - t))
    p50, p95 = np.percentile(times, [50, 95])
    return {"p50_ms": p50, "p95_ms": p95, "min_ms": min(times), "bytes_per_photo": counted,
            "rss_bytes_per_photo": rss / n}


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = measure(args.n, args.dim, args.top_k, args.queries, args.batch)
    print(f"gallery {args.n:,} x {args.dim} float16, top {args.top_k}, {args.batch} query(ies) per call, "
          f"{torch.get_num_threads()} threads, {args.queries} calls")
    print(f"latency per call: p50 {r['p50_ms']:.1f} ms | p95 {r['p95_ms']:.1f} ms | min {r['min_ms']:.1f} ms"
          f" | per query p50 {r['p50_ms'] / args.batch:.1f} ms")
    print(f"memory per photo: {r['bytes_per_photo']:.0f} bytes counted (embeddings {2 * args.dim}), "
          f"{r['rss_bytes_per_photo']:.0f} bytes resident")
    return 0


if __name__ == "__main__":
    sys.exit(main())
