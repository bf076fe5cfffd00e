"""A quickly trained checkpoint of the offline recipe's shape, for measuring what does not need the
full recipe (the ONNX export's faithfulness and speed, int8's loss): the pretrained towers frozen
(EfficientNet-Lite0, all-MiniLM-L6-v2 with mean pooling), their outputs on the training photos and
captions computed once, and only the projection heads and temperature trained on them.

    python benchmarks/heads_only.py --data_dir data/flickr8k --model_dir models/heads

Minutes on a CPU where configs/fast.txt takes half an hour; its recall is lower (RESULTS.md).
The checkpoint ranks as the recipes do: 256 px photos averaged with their mirror image, querybank.
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoint import save_checkpoint  # noqa: E402
from dataset import PairDataset, tokenize  # noqa: E402
from model import DualEncoder, info_nce, load_tokenizer, mean_pool  # noqa: E402

ARGS = {"image_encoder": "efficientnet_lite0", "text_encoder": "all-minilm-l6-v2", "embedding_dim": 512,
        "text_pooling": "mean", "temperature": 0.07, "fixed_temperature": False, "image_size": 224,
        "eval_image_size": 256, "eval_flip": True, "querybank": True}


@torch.no_grad()
def features(model, pairs, batch=64):
    """Pooled tower outputs: photos (N, 1280) in photo order, captions (Q, 384) in pair order."""
    img = []
    for lo in range(0, len(pairs.images), batch):
        images = torch.stack([pairs.store[i] for i in range(lo, min(lo + batch, len(pairs.images)))])
        img.append(model.image_tower(model._normalise(images)))
    img = torch.cat(img)
    txt = []
    for lo in range(0, len(pairs.captions), 256):
        tok = tokenize(model.tokenizer, pairs.captions[lo:lo + 256])
        hidden = model.text_tower(**tok).last_hidden_state
        txt.append(mean_pool(hidden, tok["attention_mask"]))
    return img, torch.cat(txt)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="data/flickr8k")
    p.add_argument("--model_dir", default="models/heads")
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = DualEncoder("efficientnet_lite0", "all-minilm-l6-v2", 512, "mean").eval()
    model.tokenizer = load_tokenizer("all-minilm-l6-v2")
    pairs = PairDataset(args.data_dir, "train", 224, augment=False)
    img, txt = features(model, pairs)
    ids = torch.tensor(pairs.image_ids)
    heads = [model.image_proj.weight, model.image_proj.bias, model.text_proj.weight, model.text_proj.bias,
             model.logit_scale]
    opt = torch.optim.AdamW(heads, lr=1e-3, weight_decay=1e-4)
    for epoch in range(args.epochs):
        order = torch.randperm(len(ids))
        for batch in order.split(512):
            b = ids[batch]
            loss = info_nce(F.normalize(model.image_proj(img[b]), dim=-1),
                            F.normalize(model.text_proj(txt[batch]), dim=-1), model.logit_scale.exp(),
                            b[:, None] == b[None, :])
            opt.zero_grad()
            loss.backward()
            opt.step()
            model.clamp_logit_scale()
        print(f"epoch {epoch + 1} | loss {loss.item():.3f}", flush=True)
    os.makedirs(args.model_dir, exist_ok=True)
    model.tokenizer.save_pretrained(os.path.join(args.model_dir, "tokenizer"))
    run_args = {**ARGS, "data_dir": args.data_dir}
    save_checkpoint(os.path.join(args.model_dir, "best.pt"), model, run_args, epoch=args.epochs, metrics={})
    print(f"saved {args.model_dir}/best.pt; measure it with benchmarks/onnx_search.py")


if __name__ == "__main__":
    main()
