"""Search photos by text with a trained dual encoder, and save a grid of the best matches.

    python search.py --query "a dog running through snow"
    python search.py --query "two children on a beach" --top_k 16 --use_test_set --show

The gallery's image embeddings are computed once and stored beside the checkpoint
(index_<gallery>.pt); they are rebuilt only when the checkpoint or the set of photos changes,
so a query costs one text encoding and one matrix product.
"""

import argparse
import math
import os
import sys

import torch

from dataset import ImageDataset, read_captions
from model import load_model, pick_device
from retrieval import encode_image_dataset, encode_texts


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--query", required=True, help="what to look for, in words")
    p.add_argument("--top_k", type=int, default=9, help="how many photos to return")
    p.add_argument("--use_test_set", action="store_true", help="search only the test split's photos")
    p.add_argument("--output_dir", default="results", help="where the result grid is saved")
    p.add_argument("--show", action="store_true", help="open the grid in a window")
    p.add_argument("--checkpoint", default="models/best.pt", help="trained checkpoint")
    p.add_argument("--data_dir", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    args = p.parse_args(argv)
    if args.top_k < 1:
        p.error("--top_k must be at least 1")
    if not args.query.strip():
        p.error("--query is empty")
    return args


def gallery_images(data_dir, use_test_set):
    """Sorted photo names: the test split's, or every photo the dataset lists."""
    if use_test_set:
        return sorted(read_captions(data_dir, "test")["image"].unique())
    import pandas as pd
    return sorted(pd.read_csv(os.path.join(data_dir, "captions.csv"), dtype=str)["image"].unique())


def fingerprint(path):
    st = os.stat(path)
    return [os.path.basename(path), st.st_size, st.st_mtime_ns]


def load_or_build_index(model, ckpt_path, data_dir, images, image_size, device, name):
    """(N, D) embeddings of `images`, cached in <checkpoint dir>/index_<name>.pt."""
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt_path)), f"index_{name}.pt")
    key = {"checkpoint": fingerprint(ckpt_path), "data_dir": os.path.abspath(data_dir),
           "images": [fingerprint(os.path.join(data_dir, "images", n)) for n in images]}
    if os.path.exists(path):
        try:
            index = torch.load(path, weights_only=True)
            if index["key"] == key:
                return index["img_emb"]
        except Exception:
            pass  # an unreadable or old index is rebuilt below
    print(f"encoding {len(images)} photos into {path} (once per checkpoint and photo set)")
    split = "test" if name == "test" else None
    img_emb = encode_image_dataset(model, ImageDataset(data_dir, images, image_size, split), device)
    tmp = path + ".tmp"
    torch.save({"key": key, "img_emb": img_emb}, tmp)
    os.replace(tmp, path)
    return img_emb


def save_grid(paths, scores, query, out_path, show=False):
    import matplotlib
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image
    cols = min(len(paths), math.ceil(math.sqrt(len(paths))))
    rows = math.ceil(len(paths) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.3 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, (p, s) in enumerate(zip(paths, scores)):
        ax = axes.flat[i]
        with Image.open(p) as img:
            ax.imshow(img.convert("RGB"))
        ax.set_title(f"#{i + 1}  {s:.3f}\n{os.path.basename(p)[:28]}", fontsize=9)
    fig.suptitle(f'"{query}"', fontsize=13)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    if show:
        plt.show()
    plt.close(fig)


def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    model, tokenizer, ckpt = load_model(args.checkpoint, device)
    data_dir = args.data_dir or ckpt["args"]["data_dir"]
    images = gallery_images(data_dir, args.use_test_set)
    img_emb = load_or_build_index(model, args.checkpoint, data_dir, images, ckpt["args"]["image_size"],
                                  device, "test" if args.use_test_set else "all")
    txt_emb = encode_texts(model, tokenizer, [args.query], device)  # (1, D)
    scores = (txt_emb @ img_emb.float().T)[0]
    top = scores.topk(min(args.top_k, len(images)))
    paths = [os.path.join(data_dir, "images", images[i]) for i in top.indices.tolist()]
    print(f'top {len(paths)} of {len(images)} photos for "{args.query}":')
    for rank, (p, s) in enumerate(zip(paths, top.values.tolist()), 1):
        print(f"{rank:3d}  {s:.4f}  {p}")
    os.makedirs(args.output_dir, exist_ok=True)
    slug = "".join(c if c.isalnum() else "_" for c in args.query.lower())[:60].strip("_") or "query"
    out = os.path.join(args.output_dir, f"search_{slug}.png")
    save_grid(paths, top.values.tolist(), args.query, out, args.show)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
