"""Can the text graph alone be int8? Dynamic quantisation settings for the export's fp32 text graph
against the graph itself, on a split's captions, with the photos encoded by the fp32 image graph.

    python experiments/int8_text/int8_text.py --checkpoint models/heads/best.pt --data_dir data/flickr8k

Per variant: size on disk, min / mean cosine of the caption embeddings to fp32, text->image
Recall@1/5/10 ranked as search.py ranks (the export's querybank), the session's start and one warm
query (medians). Needs the full install and a checkpoint with its export (export.py).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import encoder  # noqa: E402
import export  # noqa: E402
from dataset import EvalSplit  # noqa: E402
from device import cpu_has_native_bf16  # noqa: E402
from index import querybank_bias  # noqa: E402
from photos import read_image  # noqa: E402
from retrieval import recall_metrics  # noqa: E402

# name -> quantize_dynamic's settings: operators quantised (unnamed: all it can, the embedding
# table's Gather too), per-channel weights, the 7-bit range onnxruntime advises for CPUs without
# VNNI, such as AVX2 ones
VARIANTS = {
    "int8, onnxruntime's defaults": {},
    "int8 per channel, reduced range, embeddings fp32 (export.py --int8)": export.INT8_QUANTISATION,
    "int8 per channel, reduced range, embeddings int8": {"per_channel": True, "reduce_range": True},
}


def measure(enc, path, split, img, bias, ref=None, runs=50):
    """The figures of one text graph (enc's text session is replaced by it)."""
    starts = []
    for _ in range(3):
        t = time.perf_counter()
        enc.text = encoder.session(path)
        starts.append(time.perf_counter() - t)
    txt = enc.encode_texts(split.captions)
    times = []
    for i in range(runs):
        t = time.perf_counter()
        enc.encode_texts([f"a dog number {i} running through snow"])
        times.append((time.perf_counter() - t) * 1000)
    r = recall_metrics(torch.from_numpy(img), torch.from_numpy(txt), split.caption_image,
                       img_bias=torch.from_numpy(bias))["t2i"]
    cos = (txt * (txt if ref is None else ref)).sum(1)
    size = sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.isfile(p))
    return txt, {"MB": size / 1e6, "min_cos": float(cos.min()), "mean_cos": float(cos.mean()),
                 "R@1": r["R@1"], "R@5": r["R@5"], "R@10": r["R@10"],
                 "session_s": statistics.median(starts), "query_ms": statistics.median(times)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trained checkpoint with an export (export.py)")
    p.add_argument("--data_dir", default="data/flickr8k", help="prepared Flickr8K (preprocess_flickr8k.py)")
    p.add_argument("--split", default="val")
    args = p.parse_args(argv)
    enc = encoder.OnnxEncoder(args.checkpoint)
    split = EvalSplit(args.data_dir, args.split, enc.image_size)
    photos = [os.path.join(args.data_dir, "images", name) for name in split.images]
    img = np.concatenate([enc.encode_images(np.stack([read_image(f, enc.image_size) for f in photos[i:i + 32]]))
                          for i in range(0, len(photos), 32)])
    bank = enc.caption_bank(None, None, None) if enc.meta["querybank"] else np.zeros((1, enc.dim), np.float32)
    bias = querybank_bias(img, bank, enc.logit_scale)
    fp32 = os.path.join(enc.folder, "text.onnx")
    ref, row = measure(enc, fp32, split, img, bias)
    print(f"{'fp32 (the export)':70s} {fmt(row)}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, settings in VARIANTS.items():
            path = os.path.join(tmp, "text.int8.onnx")
            export.quantise_dynamic(fp32, path, **settings)
            print(f"{name:70s} {fmt(measure(enc, path, split, img, bias, ref)[1])}", flush=True)
    print(f"{len(split.captions)} {args.split} captions, {len(photos)} photos; torch {torch.__version__}, "
          f"native bf16 {cpu_has_native_bf16()}, load average {os.getloadavg()[0]:.1f}, "
          f"{time.strftime('%Y-%m-%d')}")


def fmt(r):
    return (f"{r['MB']:8.3f} MB  cos min {r['min_cos']:.6f} mean {r['mean_cos']:.6f}  t2i R@1/5/10 "
            f"{r['R@1']:.1f} / {r['R@5']:.1f} / {r['R@10']:.1f}  session {r['session_s']:.2f} s  "
            f"query {r['query_ms']:.1f} ms")


if __name__ == "__main__":
    main()
