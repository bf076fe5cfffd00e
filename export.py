"""Export a trained checkpoint to ONNX, for search with onnxruntime (no PyTorch at search time).

    python export.py --checkpoint models/fast/best.pt
    python export.py --checkpoint models/fast/best.pt --int8

Writes <checkpoint without .pt>_onnx/ beside it: the text and image graphs (fp32; with --int8 also
dynamically quantised ones), the tokenizer, the querybank of a checkpoint that ranks with it, and
export.json. search.py and serve.py use it while it is current for the checkpoint. train.py
exports best.pt when training ends.
"""

import argparse
import sys

from encoder import write_export


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/best.pt", help="trained checkpoint")
    p.add_argument("--int8", action="store_true", help="also write int8 graphs (dynamic quantisation; see RESULTS.md)")
    p.add_argument("--data_dir", default=None,
                   help="dataset whose training captions are the querybank (default: the checkpoint's)")
    return p.parse_args(argv)


def main(argv=None):
    args = get_args(argv)
    folder = write_export(args.checkpoint, args.int8, args.data_dir)
    print(f"exported {args.checkpoint} to {folder}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
