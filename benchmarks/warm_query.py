"""Time warm queries as serve.py answers them: one text query encoded and ranked over the whole
index (querybank bias and all), in one process that has loaded the model and the index already.
The HTTP around it is benchmarks/load_serve.py's.

    python benchmarks/warm_query.py --checkpoint models/fast/best.pt
    python benchmarks/warm_query.py --checkpoint M/best.pt --runtime onnx --int8 -- --images_dir ~/Pictures

Each round times --queries distinct queries (a new text each: no cache can answer one), the
encoding and the ranking apart; prints p50 / p95 over all rounds. Flags after `--` go to
search.py's parser (which gallery, --data_dir, ...); the index is brought up to date first.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cold_search import split_at_dashes  # noqa: E402  (beside this file)

import encoder  # noqa: E402
import search  # noqa: E402
from gallery import Gallery  # noqa: E402


def main(argv=None):
    argv, extra = split_at_dashes(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (best.pt)")
    p.add_argument("--runtime", default="auto", choices=["auto", "onnx", "torch"])
    p.add_argument("--int8", action="store_true", help="the export's int8 text graph")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--queries", type=int, default=30, help="queries per round")
    p.add_argument("--top_k", type=int, default=9)
    args = p.parse_args(argv)
    sargs = search.get_args(["--checkpoint", args.checkpoint, "--query", "x", "--runtime", args.runtime,
                             *(["--int8"] if args.int8 else []), *extra])
    model = encoder.load(args.checkpoint, args.runtime, sargs.device, args.int8)
    gallery = Gallery(sargs, model)
    ix, _ = search.index_gallery(gallery)
    enc_ms, rank_ms, total_ms = [], [], []
    for r in range(-1, args.rounds):  # round -1: warm-up, not counted
        for i in range(args.queries):
            t0 = time.perf_counter()
            q = model.encode_texts([f"a dog {r * args.queries + i} running through the snow"])
            t1 = time.perf_counter()
            gallery.hits(ix, q, args.top_k, True)
            t2 = time.perf_counter()
            if r >= 0:
                enc_ms.append((t1 - t0) * 1e3)
                rank_ms.append((t2 - t1) * 1e3)
                total_ms.append((t2 - t0) * 1e3)
    p95 = np.percentile(total_ms, 95, method="higher")  # nearest rank: a measured time
    print(f"warm query on {model.runtime}{' (int8 text graph)' if args.int8 else ''}, {len(ix):,} photos, "
          f"{len(total_ms)} queries: p50 {statistics.median(total_ms):.2f} ms, p95 {p95:.2f} ms "
          f"(encoding p50 {statistics.median(enc_ms):.2f} ms, ranking p50 {statistics.median(rank_ms):.2f} ms); "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
