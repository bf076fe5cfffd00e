"""Other search settings (lists visited, candidates re-ranked) on a gallery and approximate index
that `bench_index.py --keep` left in --work_dir: the same queries and exact truth as its run, no
rebuild.

    python benchmarks/bench_index_sweep.py --photos 10000000 --work_dir W --nprobe 32 64 128 --rerank 256 512 \
        --json sweep.json
"""

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_index as b  # noqa: E402


def main(argv=None):
    args = b.get_args(argv)
    n, work = args.photos[0], args.work_dir
    gen = b.Clustered(args.dim, max(10, n // 1000), args.seed)  # as bench_index.run makes them
    q = gen.text_queries(args.queries)
    emb = np.load(os.path.join(work, f"gallery_{n}.npy"), mmap_mode="r")
    with open(os.path.join(work, f"built_{n}.json")) as f:  # what bench_index.py --keep records of the build
        built = json.load(f)
    truth, _ = b.exact_rows(n, args.dim, emb, q, None, 1, False)
    rows = b.ann_rows(args, n, emb, q, None, truth, os.path.join(work, f"gallery_{n}.ann"), built)
    for row in rows:
        print(f"{row['kind']:40} p50 {row['p50_ms']:8.2f} ms  recall@10 {row['recall_at_10']:.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"),
                       "load_average_end": os.getloadavg()[0], "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
