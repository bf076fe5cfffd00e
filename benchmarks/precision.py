"""Which precision and memory layout is fastest on this CPU? The measurements behind the CPU
choices: bf16 autocast for the text tower (device.py), channels_last for the image tower.

    python benchmarks/precision.py
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/precision.py   # a CPU without native bf16

Times, on the offline towers at the offline recipe's shapes, the median of --rounds steps after a
warm-up: the top 4 MiniLM layers forward + backward (batch 128 x 24 tokens) in fp32 and under bf16
autocast; the trainable EfficientNet-Lite0 blocks 11-15 forward + backward on cached features
(batch 128) and the whole tower's forward (batch 64, 224 px), each contiguous and channels_last.
Prints the CPU's capability and the policy device.py picks here, then one JSON line.
"""

import argparse
import json
import os
import statistics
import sys
import time
from contextlib import nullcontext

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
from device import cpu_has_native_bf16, keep_freed_memory, precision_summary  # noqa: E402
from helpers.cli import non_negative_int, positive_int  # noqa: E402


def median_time(fn, rounds):
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=positive_int, default=5, help="timed steps per measurement (median reported)")
    p.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()
    cpu = torch.device("cpu")
    print(precision_summary(cpu))
    torch.manual_seed(0)
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_has_native_bf16(),
           "threads": torch.get_num_threads(), "torch": torch.__version__}

    # Text: the 4 tuned layers of the offline recipe, on hidden states from the 2 frozen ones.
    text = M.build_text_tower("all-minilm-l6-v2")
    layers = text.encoder.layer[2:]
    hidden = torch.randn(128, 24, text.config.hidden_size, requires_grad=True)
    mask = torch.zeros(128, 1, 1, 24)  # additive mask: every token real
    for name, dtype in (("text_fp32_s", None), ("text_bf16_s", torch.bfloat16)):
        def step(dtype=dtype):
            with torch.autocast("cpu", dtype=dtype) if dtype is not None else nullcontext():
                x = hidden
                for layer in layers:
                    x = layer(x, attention_mask=mask)
                    x = x[0] if isinstance(x, tuple) else x
            x.float().square().mean().backward()
        out[name] = median_time(step, args.rounds)

    # Image: the trainable top of Lite0 on cached block-11 inputs, and the whole tower's forward.
    tower, *_ = M.build_image_tower("efficientnet_lite0")
    with torch.no_grad():
        c, h, w = tower.trunk(torch.zeros(1, 3, 224, 224), 11).shape[1:]  # (112, 14, 14)
    feats = torch.randn(128, c, h, w)
    images = torch.randn(64, 3, 224, 224)
    for layout in ("contiguous", "channels_last"):
        fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
        tower.to(memory_format=fmt)
        f = feats.contiguous(memory_format=fmt)
        x = images.contiguous(memory_format=fmt)

        def top_step(f=f):
            tower.top(f, 11).square().mean().backward()

        @torch.no_grad()
        def encode(x=x):
            tower.eval()
            tower(x)
            tower.train()
        out[f"image_top_{layout}_s"] = median_time(top_step, args.rounds)
        out[f"image_encode_{layout}_s"] = median_time(encode, args.rounds)
    for k, v in out.items():
        print(f"{k:>28}: {v:.3f}" if isinstance(v, float) else f"{k:>28}: {v}")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
