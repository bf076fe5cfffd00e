"""Time cold `python search.py --query ...` calls: process start, imports, model load, the cached
index, one query and the saved grid (or the JSON); everything a user waits for at the shell.

    python benchmarks/cold_search.py --checkpoint models/fast/best.pt -- --runtime onnx --json
    python benchmarks/cold_search.py --checkpoint models/fast/best.pt -- --runtime torch
    python benchmarks/cold_search.py --checkpoint M/best.pt --runs 7 -- --images_dir ~/Pictures

One untimed call first builds or refreshes the index, so the timed calls measure a cached index.
Prints the median wall and CPU seconds, and the slowest imports of one call (python -X importtime).
Flags after `--` go to search.py.
"""

import argparse
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def child_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd):
    """(wall s, CPU s) of one call; fails loudly if search.py does."""
    t, c = time.perf_counter(), child_cpu_s()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"error: {' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return time.perf_counter() - t, child_cpu_s() - c


def slowest_imports(cmd, n=8):
    """Top-level packages by cumulative import time (ms) in one call."""
    p = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    top = {}
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S+)$", line)  # unindented: a top-level import
        if m:
            top[m.group(2)] = top.get(m.group(2), 0) + int(m.group(1)) / 1000
    return sorted(top.items(), key=lambda kv: -kv[1])[:n]


def split_at_dashes(argv=None):
    """(the benchmark's own flags, the flags after `--` that go to search.py)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    return (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])


def main(argv=None):
    argv, extra = split_at_dashes(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trained checkpoint (best.pt)")
    p.add_argument("--query", default="a dog running through snow")
    p.add_argument("--runs", type=int, default=5, help="timed calls (median reported)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "search.py", "--checkpoint", args.checkpoint, "--query", args.query,
               "--output_dir", out, *extra]
        timed(cmd)  # builds or refreshes the index; not timed
        runs = [timed(cmd) for _ in range(args.runs)]
        imports = slowest_imports(cmd)
    wall, cpu = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
    print(f"cold search.py --query, {args.runs} calls: median {wall:.2f} s wall, {cpu:.2f} s CPU "
          f"(min {min(r[0] for r in runs):.2f} s wall); load average {os.getloadavg()[0]:.1f}")
    print("slowest top-level imports of one call (ms, cumulative):",
          ", ".join(f"{name} {ms:.0f}" for name, ms in imports))


if __name__ == "__main__":
    main()
