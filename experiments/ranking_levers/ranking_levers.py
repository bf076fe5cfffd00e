"""Measure ranking-time levers on a trained checkpoint, on val, from one encoding of val and train:
the querybank's dynamic variant, late interaction between caption tokens and photo regions
(FILIP-style max-similarity) re-ranking the top candidates, with and without a trained head, and
photos expanded with their nearest training captions. RESULTS.md has the table and what it means.

    python benchmarks/ranking_levers.py --checkpoint models/fast/best.pt --features feats.pt
    python benchmarks/ranking_levers.py --checkpoint models/fast/best.pt --features feats.pt --late_epochs 3

--features caches the encoding (2.3 GB for Flickr8K: photo regions are 64 x 1280 floats at 256 px);
a second run with the same file only ranks. Needs an EfficientNet-Lite image tower (its regions).
"""

import argparse
import math
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from checkpoint import eval_image_size, load_model  # noqa: E402
from dataset import EvalSplit, tokenize  # noqa: E402
from device import autocast, pick_device  # noqa: E402
from helpers.cli import non_negative_int, positive_int  # noqa: E402
from model import mean_pool  # noqa: E402
from retrieval import querybank_bias, rank_summary, recall_metrics, t2i_ranks  # noqa: E402

ROWS = 250  # captions re-ranked at once: their candidates' regions take 250 x k x 64 x 512 floats


@torch.no_grad()
def encode_split(model, tokenizer, data_dir, split, image_size, device, batch_size=64):
    """Everything the levers need of one split: photo embeddings averaged with their mirror image
    (as evaluate.py), each photo's region features (B, h*w, 1280) before pooling, caption
    embeddings, and their last-layer token states (Q, L, H) with the attention mask."""
    if not hasattr(model.image_tower, "top_map"):
        raise SystemExit("error: ranking_levers.py needs an EfficientNet-Lite image tower (its region features).")
    data = EvalSplit(data_dir, split, image_size)
    img, regions = [], []
    for images in tqdm(DataLoader(data.image_dataset, batch_size=batch_size, num_workers=1),
                       desc=f"encoding {split} photos", leave=False):
        images = images.to(device)
        x = model._normalise(images)
        with autocast(x.device, "image", model.amp):
            fmap = model.image_tower.top_map(model.image_tower.trunk(x, 0), 0).float()
        own = F.normalize(model.image_proj(fmap.mean((2, 3))), dim=-1)  # == model.encode_images(images)
        img.append(F.normalize(own + model._encode_images(images.flip(-1)), dim=-1).cpu())
        regions.append(fmap.flatten(2).transpose(1, 2).half().cpu())
    tokens = tokenize(tokenizer, data.captions)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    states = torch.zeros(*ids.shape, model.text_tower.config.hidden_size, dtype=torch.half)
    txt = torch.zeros(len(ids), model.text_proj.out_features)
    lengths = mask.sum(1)
    for idx in tqdm(torch.argsort(lengths).split(256), desc=f"encoding {split} captions", leave=False):
        n = int(lengths[idx].max())
        with autocast(device, "text", model.amp):
            hidden = model.text_tower(input_ids=ids[idx, :n].to(device),
                                      attention_mask=mask[idx, :n].to(device)).last_hidden_state.float().cpu()
        txt[idx] = F.normalize(model.text_proj(mean_pool(hidden, mask[idx, :n])), dim=-1)
        states[idx, :n] = hidden.half()
    return {"img": torch.cat(img), "regions": torch.cat(regions), "txt": txt, "states": states, "mask": mask,
            "caption_image": data.caption_image}


def active_photos(gallery, bank, chunk=4096):
    """(N,) bool: the photos that are the top-1 of at least one bank query (the querybank's
    activation set, Bogolin et al. 2022)."""
    active = torch.zeros(len(gallery), dtype=torch.bool)
    for b in bank.split(chunk):
        active[(b @ gallery.T).argmax(1)] = True
    return active


def dynamic_querybank(sims, bias, active):
    """The dynamic inverted softmax: a query whose top-1 photo (by plain similarity) is in the
    activation set is ranked with the querybank bias subtracted, any other by plain similarity."""
    use = active[sims.argmax(1)]
    return torch.where(use[:, None], sims - bias[None, :], sims)


def late_interaction(tokens, token_mask, regions):
    """FILIP's text->image score: each caption token's best-matching region, averaged over the
    caption's tokens. tokens (Q, L, d) and regions (Q, C, P, d) L2-normalised, token_mask (Q, L):
    caption q against its C candidates. Returns (Q, C)."""
    best = torch.einsum("qld,qcpd->qclp", tokens, regions).amax(-1)  # (Q, C, L)
    m = token_mask.to(best.dtype)[:, None, :]
    return (best * m).sum(-1) / m.sum(-1).clamp(min=1)


def word_mask(mask):
    """The attention mask without [CLS] and [SEP]: late interaction matches words."""
    m = mask.clone()
    m[:, 0] = 0
    m[torch.arange(len(m)), (mask.sum(1) - 1).clamp(min=0)] = 0
    return m


def rerank(base, k, score_fn):
    """Re-rank each row's top k of base (Q, N) by score_fn(rows, candidates (q, k)) -> (q, k);
    the rest keep base's order below them. Returns the new scores (Q, N)."""
    top = base.topk(k, dim=1).indices
    out = base.clone()
    for lo in range(0, len(base), ROWS):
        rows = slice(lo, lo + ROWS)
        new = score_fn(rows, top[rows])
        # Shifted above every other score, in their own order.
        out[rows] = out[rows].scatter(1, top[rows], new - new.min() + base.max() + 1)
    return out


class LateHead(nn.Module):
    """A trained late-interaction head: caption tokens and photo regions projected to d, scored
    as late_interaction, added to the global similarity with learned weights."""

    def __init__(self, token_dim, region_dim, d, global_scale):
        super().__init__()
        self.tokens, self.regions = nn.Linear(token_dim, d), nn.Linear(region_dim, d)
        self.log_w_global = nn.Parameter(torch.tensor(math.log(global_scale)))
        self.log_w_late = nn.Parameter(torch.tensor(math.log(10.0)))

    def project(self, states, regions):
        """(Q, L, H) token states and (N, P, C) regions -> both projected and L2-normalised."""
        return F.normalize(self.tokens(states.float()), dim=-1), F.normalize(self.regions(regions.float()), dim=-1)

    def forward(self, tokens, mask, regions, global_sims):
        """Projected tokens (Q, L, d), regions of each caption's candidates (Q, C, P, d) and their
        global similarities (Q, C) -> the combined scores (Q, C)."""
        return self.log_w_global.exp() * global_sims + self.log_w_late.exp() * late_interaction(tokens, mask, regions)


def train_late_head(train, scale, d=128, epochs=3, batch=128, negatives=31, pool=64, lr=1e-3, seed=0):
    """Train a LateHead on the train split: each caption against its photo and `negatives` of its
    `pool` nearest other photos by global similarity (the candidates a re-ranker sees)."""
    torch.manual_seed(seed)
    head = LateHead(train["states"].shape[-1], train["regions"].shape[-1], d, scale)
    ci, mask = train["caption_image"], word_mask(train["mask"])
    near = torch.cat([(b @ train["img"].T).topk(pool + 1, dim=1).indices for b in train["txt"].split(4096)])
    steps = epochs * len(ci) // batch
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps, pct_start=0.05)
    for _ in tqdm(range(steps), desc="training the late-interaction head", leave=False):
        q = torch.randint(len(ci), (batch,))
        cand = near[q].gather(1, torch.rand(batch, pool + 1).argsort(1))  # shuffled neighbours
        others = torch.stack([row[row != own][:negatives] for row, own in zip(cand, ci[q])])
        cand = torch.cat([ci[q, None], others], 1)  # the photo itself first
        n = int(train["mask"][q].sum(1).max())
        uniq, inv = cand.unique(return_inverse=True)
        tokens, regions = head.project(train["states"][q, :n], train["regions"][uniq])
        logits = head(tokens, mask[q, :n], regions[inv], (train["txt"][q, None, :] * train["img"][cand]).sum(-1))
        loss = F.cross_entropy(logits, torch.zeros(batch, dtype=torch.long))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return head.eval()


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="models/best.pt")
    p.add_argument("--data_dir", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--features", default=None, help="cache of the encoding (written once, then read)")
    p.add_argument("--rerank_k", type=positive_int, default=20, help="candidates re-ranked per caption")
    p.add_argument("--late_epochs", type=non_negative_int, default=0,
                   help="also train a late-interaction head for this many epochs (0: only the untrained one)")
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


@torch.no_grad()
def main(argv=None):
    args = get_args(argv)
    device = pick_device(args.device)
    model, tokenizer, ckpt = load_model(args.checkpoint, device)
    data_dir = args.data_dir or ckpt["args"]["data_dir"]
    if args.features and os.path.exists(args.features):
        feats = torch.load(args.features, weights_only=True)
    else:
        size = eval_image_size(ckpt["args"])
        feats = {split: encode_split(model, tokenizer, data_dir, split, size, device) for split in ("val", "train")}
        if args.features:
            torch.save(feats, args.features)
    val, train = feats["val"], feats["train"]
    scale = model.logit_scale.exp().item()
    ci = val["caption_image"]
    sims = val["txt"] @ val["img"].T
    bias = querybank_bias(val["img"], train["txt"], scale)
    active = active_photos(val["img"], train["txt"])
    rows = {"cosine": sims, "querybank": sims - bias[None, :],
            f"dynamic querybank ({int(active.sum())} of {len(active)} photos active)":
                dynamic_querybank(sims, bias, active)}
    base = rows["querybank"]

    # Untrained late interaction: tokens and regions through the trained projections (the global
    # embeddings are their means), weight picked on the even-numbered captions.
    img_proj, txt_proj = model.image_proj.cpu().float(), model.text_proj.cpu().float()
    regions = F.normalize(img_proj(val["regions"].float()), dim=-1)
    words = word_mask(val["mask"])

    def untrained_late(r, cand):
        n = int(val["mask"][r].sum(1).max())
        toks = F.normalize(txt_proj(val["states"][r, :n].float()), dim=-1)
        return late_interaction(toks, words[r, :n], regions[cand])

    top = base.topk(args.rerank_k, dim=1).indices
    late = torch.cat([untrained_late(slice(lo, lo + ROWS), top[lo:lo + ROWS]) for lo in range(0, len(base), ROWS)])
    even = torch.arange(len(ci)) % 2 == 0

    def with_weight(w):
        return rerank(base, args.rerank_k, lambda r, cand: base[r].gather(1, cand) + w * late[r])

    weights = (0.0, 0.1, 0.2, 0.3, 0.5, 1.0)
    best_w = max(weights, key=lambda w: rank_summary(t2i_ranks(with_weight(w)[even], ci[even]))["R@1"])
    rows[f"querybank + untrained late interaction, top {args.rerank_k}, weight {best_w} (picked on even captions)"] = \
        with_weight(best_w)

    if args.late_epochs:
        with torch.enable_grad():
            head = train_late_head(train, scale, epochs=args.late_epochs)
        _, val_regions = head.project(val["states"][:1], val["regions"])

        def trained(r, cand):
            n = int(val["mask"][r].sum(1).max())
            tokens, _ = head.project(val["states"][r, :n], val["regions"][:0])
            return head(tokens, words[r, :n], val_regions[cand], base[r].gather(1, cand))

        rows[f"querybank + trained late-interaction head, top {args.rerank_k}"] = rerank(base, args.rerank_k, trained)

    # Photos expanded with their 20 nearest training captions (softmax-weighted), weight 0.5.
    near, idx = (val["img"] @ train["txt"].T).topk(20, dim=1)
    pseudo = F.normalize((torch.softmax(scale * near, 1)[..., None] * train["txt"][idx]).sum(1), dim=-1)
    expanded = F.normalize(val["img"] + 0.5 * pseudo, dim=-1)
    rows["querybank, photos + 0.5 x their 20 nearest train captions"] = \
        val["txt"] @ expanded.T - querybank_bias(expanded, train["txt"], scale)[None, :]

    i2t = recall_metrics(val["img"], val["txt"], ci)["i2t"]["R@1"]
    print(f"{args.checkpoint} on {data_dir} [val], text->image (image->text R@1 {i2t:.1f} by cosine):")
    print(f"{'ranking':100}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'med':>6}{'R@1 odd':>9}")
    for name, scores in rows.items():
        m, odd = rank_summary(t2i_ranks(scores, ci)), rank_summary(t2i_ranks(scores[~even], ci[~even]))
        print(f"{name:100}{m['R@1']:7.2f}{m['R@5']:7.2f}{m['R@10']:7.2f}{m['median_rank']:6.0f}{odd['R@1']:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
