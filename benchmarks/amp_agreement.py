"""Does the autocast policy change what a trained model retrieves? Evaluate one checkpoint with
device.autocast's policy and in fp32, on the same photos and captions, and compare.

    python benchmarks/amp_agreement.py --checkpoint models/best.pt --split val

Prints the recall of both, the cosine between each caption's two embeddings, and how often the
top-1 photo agrees.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from checkpoint import eval_image_size, load_model  # noqa: E402
from dataset import EvalSplit  # noqa: E402
from device import keep_freed_memory, pick_device  # noqa: E402
from retrieval import encode_image_dataset, encode_texts, format_metrics, recall_metrics  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/best.pt", help="trained checkpoint")
    p.add_argument("--data_dir", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--split", default="val", choices=["train", "val", "test"], help="split to compare on")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    args = p.parse_args(argv)
    keep_freed_memory()
    device = pick_device(args.device)
    model, tokenizer, ckpt = load_model(args.checkpoint, device)
    data = EvalSplit(args.data_dir or ckpt["args"]["data_dir"], args.split, eval_image_size(ckpt["args"]))
    emb = {}
    for name, amp in (("fp32", False), ("autocast", True)):
        model.amp = amp
        emb[name] = (encode_image_dataset(model, data.image_dataset, device, flip=ckpt["args"].get("eval_flip", False)),
                     encode_texts(model, tokenizer, data.captions, device))
    for name, (img, txt) in emb.items():
        print(f"{name}:\n{format_metrics(recall_metrics(img, txt, data.caption_image))}")
    (img32, txt32), (img16, txt16) = emb["fp32"], emb["autocast"]
    for what, a, b in (("caption", txt32, txt16), ("photo", img32, img16)):
        cos = (a * b).sum(1)  # both L2-normalised: (Q,) or (N,)
        print(f"{what} embedding cosine fp32 vs autocast: mean {cos.mean():.5f}, min {cos.min():.5f}")
    top32, top16 = (txt32 @ img32.T).argmax(1), (txt16 @ img16.T).argmax(1)
    print(f"top-1 photo agrees for {100 * (top32 == top16).double().mean():.1f}% of {len(top32)} captions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
