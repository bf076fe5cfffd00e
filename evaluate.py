"""Evaluate a checkpoint: Recall@1/5/10, mean and median rank, text->image and image->text.

    python evaluate.py                                   # models/best.pt on the test split
    python evaluate.py --checkpoint models/best.pt --split val --output_json results/val.json
    python evaluate.py --checkpoint models/best.pt --split val --no_querybank   # plain cosine
    python evaluate.py --checkpoint models/best.pt --split val --eval_image_size 256 --no_eval_flip

The inference options (--eval_image_size, --eval_flip, --querybank) default to those the
checkpoint was trained with (train.py's flags of the same names); given here, they override them.

Text->image uses every caption as a query (5,000 over 1,000 photos on Flickr8K); image->text
counts a photo as found at the best rank of any of its captions. Recalls are in percent.
"""

import argparse
import hashlib
import json
import os
import sys

import torch

from checkpoint import eval_image_size, load_model
from device import keep_freed_memory, pick_device, precision_summary
from encoder import file_sha256
from helpers.atomic import atomic_write
from helpers.cli import non_negative_int, positive_int
from retrieval import chance_recall, evaluate_split, format_metrics


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/best.pt", help="checkpoint to evaluate")
    p.add_argument("--data_dir", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="split to evaluate")
    p.add_argument("--batch_size", type=positive_int, default=64, help="images per encoding batch")
    p.add_argument("--num_workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    # inference options; default: the checkpoint's, as search.py uses them (train.py's flags)
    p.add_argument("--eval_image_size", type=non_negative_int, default=0,
                   help="photo side in pixels (0: the checkpoint's)")
    flip = p.add_mutually_exclusive_group()
    flip.add_argument("--eval_flip", action="store_true", default=None,
                      help="embed each photo and its mirror image, averaged")
    flip.add_argument("--no_eval_flip", dest="eval_flip", action="store_false", help="embed each photo as it is")
    qb = p.add_mutually_exclusive_group()
    qb.add_argument("--querybank", action="store_true", default=None,
                    help="rank with querybank normalisation against the train split (see RESULTS.md)")
    qb.add_argument("--no_querybank", dest="querybank", action="store_false", help="rank by cosine similarity")
    p.add_argument("--output_json", default=None, help="also write the metrics to this JSON file")
    return p.parse_args(argv)


# The code whose change changes the embeddings: kept ones are not reused across an edit of these.
ENCODING_CODE = ("checkpoint.py", "dataset.py", "device.py", "model.py", "photos.py", "retrieval.py")


def kept_embeddings(checkpoint, data_dir, options, device, amp):
    """keep for retrieval.evaluate_split: where evaluate.py keeps a split's embeddings (and the
    querybank's: the train split's 30,000 captions and 6,000 photos on Flickr8K, minutes to encode
    on a CPU) beside the checkpoint, and the key that ties them to the checkpoint file, the
    captions file, the split's photo files, how they were encoded and the code that encodes."""
    code = "".join(file_sha256(os.path.join(os.path.dirname(os.path.abspath(__file__)), name))
                   for name in ENCODING_CODE)
    base = (f"{file_sha256(checkpoint)}:{os.path.realpath(data_dir)}:{options['eval_image_size']}:"
            f"{options['eval_flip']}:{device.type}:{amp}:{torch.__version__}:{code}")
    stem = os.path.join(os.path.dirname(os.path.abspath(checkpoint)),
                        f"eval_{os.path.splitext(os.path.basename(checkpoint))[0]}")

    def keep(split, images):
        files = hashlib.sha256()
        for name in ["captions.csv", *(os.path.join("images", image) for image in images)]:
            try:
                st = os.stat(os.path.join(data_dir, name))
                files.update(f"{name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            except OSError:
                files.update(f"{name}:missing\n".encode())
        return f"{stem}_{split}.npz", f"{base}:{split}:{files.hexdigest()}"
    return keep


def main(argv=None):
    args = get_args(argv)
    keep_freed_memory()
    device = pick_device(args.device)
    model, tokenizer, ckpt = load_model(args.checkpoint, device)
    print(precision_summary(device, model.amp), file=sys.stderr)
    data_dir = args.data_dir or ckpt["args"].get("data_dir")
    if not data_dir:
        raise SystemExit(f"error: {args.checkpoint} does not say which dataset it was trained on; pass --data_dir.")
    trained = ckpt["args"]
    options = {"eval_image_size": args.eval_image_size or eval_image_size(trained),
               "eval_flip": trained.get("eval_flip", False) if args.eval_flip is None else args.eval_flip,
               "querybank": trained.get("querybank", False) if args.querybank is None else args.querybank}
    keep = kept_embeddings(args.checkpoint, data_dir, options, device, model.amp)
    metrics = evaluate_split(model, tokenizer, data_dir, args.split, options, args.batch_size, args.num_workers,
                             keep=keep)
    n_images = metrics["n_images"]
    print(f"{args.checkpoint} (epoch {ckpt.get('epoch')}) on {data_dir} [{args.split}]: "
          f"{n_images} photos, {metrics['n_queries']} captions; photos at {options['eval_image_size']} px"
          f"{', averaged with their mirror images' if options['eval_flip'] else ''}"
          f"{', querybank-normalised (train split)' if options['querybank'] else ''}")
    print(format_metrics(metrics))
    print(f"chance: R@1 {chance_recall(n_images, 1):.2f}, R@10 {chance_recall(n_images, 10):.2f}")
    if args.output_json:
        os.makedirs(os.path.dirname(os.path.abspath(args.output_json)), exist_ok=True)
        with atomic_write(args.output_json) as f:
            json.dump({**metrics, "checkpoint": args.checkpoint, "split": args.split, **options}, f, indent=2)
        print(f"wrote {args.output_json}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; nothing was written", file=sys.stderr)
        sys.exit(130)
