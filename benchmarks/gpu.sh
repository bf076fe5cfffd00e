#!/usr/bin/env bash
# A few minutes on one CUDA card: training pairs/s at batch 512 (target on an
# H100-class card: at least 8,000, i.e. the data path keeps up), gallery encoding, query latency, memory.
#   bash benchmarks/gpu.sh                      # synthetic 500x375 JPEGs, no dataset needed
#   bash benchmarks/gpu.sh --data_dir data/flickr8k
# Writes results/bench_gpu.json; the card's name is its "device". Extra flags go to benchmarks/bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
# One worker per core keeps the uint8-cache augmentation ahead of the GPU; the naive pipeline gets the
# same workers, so its ratio shows what the decode of full-size JPEGs costs.
WORKERS=${WORKERS:-$("$PY" -c "import os; print(max(1, min(16, (os.cpu_count() or 2) - 1)))")}
"$PY" benchmarks/bench.py --device cuda --batch_size 512 --quick --steps 20 --warmup 3 --photos 256 \
  --encode_images 4096 --naive_encode_images 64 --num_workers "$WORKERS" --json results/bench_gpu.json "$@"
