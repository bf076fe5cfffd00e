"""The ONNX export against PyTorch on real data, in one run on one CPU: how faithful it is (min
cosine of Flickr8K val embeddings, val Recall@K ranked as search ranks), how fast it indexes
photos, and a warm text query. Needs the full install, a trained checkpoint and its export.

    python benchmarks/onnx_search.py --checkpoint models/fast/best.pt --data_dir data/flickr8k --json F

Variants: PyTorch fp32, PyTorch as evaluate.py and search.py run it (bf16 text tower on CPUs with
native bf16), the fp32 export and, if export.py --int8 wrote them, the int8 graphs. Recall@K:
text->image ranked with the checkpoint's querybank (the export's caption bank) as search.py
ranks, and by plain cosine; image->text by cosine.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import encoder  # noqa: E402
from dataset import EvalSplit  # noqa: E402
from index import encode_image_files, querybank_bias  # noqa: E402
from photos import read_image  # noqa: E402
from retrieval import recall_metrics  # noqa: E402


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="trained checkpoint with an export (export.py)")
    p.add_argument("--data_dir", default="data/flickr8k", help="prepared Flickr8K (preprocess_flickr8k.py)")
    p.add_argument("--split", default="val", help="split whose photos and captions are measured")
    p.add_argument("--photos", type=int, default=0,
                   help="measure on the split's first N photos and their captions (0: all)")
    p.add_argument("--index_photos", type=int, default=512, help="photo files indexed per runtime, for images/s")
    p.add_argument("--batch_size", type=int, default=32, help="photos per encoding batch, as search.py's default")
    p.add_argument("--num_workers", type=int, default=2, help="decoding threads, as search.py's default")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    return p.parse_args(argv)


def variants(checkpoint):
    fp32 = encoder.TorchEncoder(checkpoint, "cpu")
    fp32.model.amp = False
    out = {"pytorch fp32": fp32, "pytorch (default precision)": encoder.TorchEncoder(checkpoint, "cpu"),
           "onnx fp32": encoder.OnnxEncoder(checkpoint)}
    if out["onnx fp32"].meta["int8"]:
        out["onnx int8"] = encoder.OnnxEncoder(checkpoint, int8=True)
    return out


def embed(enc, images, captions, batch=64):
    img = np.concatenate([enc.encode_images(images[i:i + batch]) for i in range(0, len(images), batch)])
    return img, enc.encode_texts(captions)


def recalls(img, txt, caption_image, bias):
    t = torch.from_numpy
    qb = recall_metrics(t(img), t(txt), caption_image, img_bias=t(bias))
    cos = recall_metrics(t(img), t(txt), caption_image)
    return {"t2i_querybank": qb["t2i"], "t2i_cosine": cos["t2i"], "i2t_cosine": cos["i2t"]}


def warm_query_ms(enc, n=50):
    """Median ms of encoding one text query (the ranking over the index is benchmarks/bench_index.py's)."""
    enc.encode_texts(["warm up"])
    times = []
    for i in range(n):
        t = time.perf_counter()
        enc.encode_texts([f"a dog number {i} running through snow"])
        times.append((time.perf_counter() - t) * 1000)
    return statistics.median(times)


def index_speed(enc, paths, args):
    t = time.perf_counter()
    emb, errors = encode_image_files(enc, paths, enc.image_size, args.batch_size, args.num_workers)
    assert not any(errors) and len(emb) == len(paths)
    return len(paths) / (time.perf_counter() - t)


def main(argv=None):
    args = get_args(argv)
    encs = variants(args.checkpoint)
    ref = encs["onnx fp32"]
    split = EvalSplit(args.data_dir, args.split, ref.image_size)
    if args.photos:  # the first N photos, and the captions of those photos
        keep = split.caption_image < args.photos
        split.images, split.caption_image = split.images[:args.photos], split.caption_image[keep]
        split.captions = [c for c, k in zip(split.captions, keep.tolist()) if k]
    paths = [os.path.join(args.data_dir, "images", name) for name in split.images]
    images = np.stack([read_image(p, ref.image_size) for p in paths])  # (N, 3, S, S) uint8
    bank = ref.caption_bank(None, None, None) if ref.meta["querybank"] else np.zeros((1, ref.dim), np.float32)
    out = {"checkpoint": args.checkpoint, "split": args.split, "photos": len(paths), "captions": len(split.captions),
           "cpu_native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "variants": {}}
    embs = {}
    for name, enc in encs.items():
        embs[name] = embed(enc, images, split.captions)
        img, txt = embs[name]
        row = recalls(img, txt, split.caption_image, querybank_bias(img, bank, ref.logit_scale))
        row["min_cos_photos"] = float((img * embs["pytorch fp32"][0]).sum(1).min())
        row["min_cos_captions"] = float((txt * embs["pytorch fp32"][1]).sum(1).min())
        row["warm_text_query_ms"] = warm_query_ms(enc)
        row["index_images_per_s"] = index_speed(enc, paths[:args.index_photos], args)
        out["variants"][name] = row
        print(f"{name:28s} t2i R@1/5/10 {row['t2i_querybank']['R@1']:.1f} {row['t2i_querybank']['R@5']:.1f} "
              f"{row['t2i_querybank']['R@10']:.1f} (cosine {row['t2i_cosine']['R@1']:.1f}), i2t R@1 "
              f"{row['i2t_cosine']['R@1']:.1f}; min cos photos {row['min_cos_photos']:.6f} captions "
              f"{row['min_cos_captions']:.6f}; query {row['warm_text_query_ms']:.1f} ms; indexing "
              f"{row['index_images_per_s']:.1f} photos/s", flush=True)
    out["load_average"] = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
