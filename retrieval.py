"""Encoding galleries and captions, and the retrieval metrics shared by train.py and evaluate.py;
the frozen image blocks' output on a split's photos, which train.py computes once, and its curves.

    python -c "import retrieval, torch; print(retrieval.recall_metrics(torch.eye(3), torch.eye(3), torch.arange(3)))"

Convention: a rank is 1-based, and a tie counts against the model (an item with the same score
as the target ranks above it), so duplicate photos never flatter the figures. Scores within TIE
of each other are tied: float32 rounding (which differs with a row's place in a matrix product and
with the CPU's kernels) must not decide between duplicates.
"""

import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

import index
from dataset import AugmentedImages, EvalSplit, read_captions, tokenize
from helpers.atomic import read_keyed, write_keyed
from helpers.interrupt import held, ignore_sigterm

KS = (1, 5, 10)
TIE = 1e-6  # about eight float32 steps at a score of 1; distinct items score further apart


@torch.no_grad()
def encode_image_dataset(model, dataset, device, batch_size=64, num_workers=0, desc="encoding images",
                         flip=False):
    """(N, D) float32 CPU embeddings (model.encode_images) of a dataset whose items are uint8
    (3, H, W) images. flip: average each with its mirror image's (train.py --eval_flip)."""
    if _reads_cache(dataset):
        # A cached photo is a memory copy away: worker processes would only add start-up and
        # inter-process copies (2-core CPU, 1,024 photos: 740 images/s without, 520 with 2 workers).
        num_workers = 0
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda")
    out = [model.encode_images(images.to(device, non_blocking=True), flip).cpu()
           for images in tqdm(loader, desc=desc, unit="batch", leave=False)]
    return torch.cat(out) if out else torch.empty(0, model.image_proj.out_features)


def _reads_cache(dataset):
    """Whether an ImageDataset (or a Subset of one) serves its photos from the uint8 cache."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    store = getattr(dataset, "store", None)
    return getattr(store, "cache", None) is not None


@torch.no_grad()
def encode_texts(model, tokenizer, texts, device, batch_size=256, desc="encoding captions"):
    """(Q, D) float32 CPU embeddings of a list of strings."""
    out = []
    for i in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False,
                  disable=len(texts) <= batch_size):
        tokens = tokenize(tokenizer, texts[i:i + batch_size])
        out.append(model.encode_texts(tokens["input_ids"].to(device),
                                      tokens["attention_mask"].to(device)).cpu())
    return torch.cat(out)


@torch.no_grad()
def cache_image_trunk(model, train_set, n_blocks, views, num_workers, device, batch_size=64):
    """(views, photos, C, h, w) float16 CPU: the frozen first n_blocks of the image tower on
    `views` augmented crops of every training photo, computed once (the frozen blocks hold most
    of the tower's compute, at full resolution)."""
    model.eval()
    cache = None
    for v in range(views):
        loader = DataLoader(AugmentedImages(train_set, v), batch_size=batch_size, num_workers=num_workers,
                            worker_init_fn=ignore_sigterm)
        start = 0
        for images in tqdm(held(loader), desc=f"caching image features, view {v + 1}/{views}", unit="batch",
                           total=len(loader)):
            feats = model.image_trunk(images.to(device), n_blocks).float().cpu()  # (B, C, h, w)
            if cache is None:
                cache = torch.empty((views, len(train_set.images), *feats.shape[1:]), dtype=torch.float16)
            cache[v, start:start + len(feats)] = feats
            start += len(feats)
    model.train()
    return cache


def cached_views(trunk_cache, image_ids, seed, step):
    """(B, C, h, w): for each pair of a training batch, one of its photo's views in
    cache_image_trunk's output, drawn as a function of the step (a resume draws the same)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return trunk_cache[torch.randint(len(trunk_cache), (len(image_ids),), generator=g), image_ids]


VAL_CACHE_BYTES = 1 << 30  # Flickr8K val, all 16 Lite0 blocks at 256 px with the mirror image: 0.16 GB


@torch.no_grad()
def cache_val_trunk(model, n_blocks, data_dir, image_size, flip, device, batch_size=64):
    """evaluate_split's image_embeddings for the val split, from the frozen image blocks' output on
    every val photo at the evaluation size (and on its mirror image with flip), computed here once:
    each epoch's validation then runs only the tuned top of the image tower, and gets exactly the
    embeddings evaluate.py does (frozen blocks are in eval mode). None if that output would take
    over VAL_CACHE_BYTES (early blocks' output is large: validation then encodes the photos)."""
    data = EvalSplit(data_dir, "val", image_size)
    was_training = model.training
    model.eval()
    one = model.image_trunk(torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8, device=device), n_blocks)
    views = None
    if one.numel() * 4 * len(data.images) * (1 + flip) <= VAL_CACHE_BYTES:
        loader = DataLoader(data.image_dataset, batch_size=batch_size)
        views = torch.stack([torch.cat([model.image_trunk((x.flip(-1) if mirror else x).to(device), n_blocks)
                                        .float().cpu() for x in tqdm(loader, desc="caching val photos",
                                                                     unit="batch", leave=False)])
                             for mirror in (False, True)[:1 + flip]])  # (views, photos, C, h, w) float32 CPU
    model.train(was_training)
    return None if views is None else lambda m: val_image_embeddings(m, views, n_blocks, device)


@torch.no_grad()
def val_image_embeddings(model, trunk, n_blocks, device, batch_size=64):
    """(photos, D): the val photos' embeddings from the frozen blocks' output `trunk` (averaged over
    the mirror image when it holds two views), as encode_images(photos, flip) gives them; the model
    must be in eval mode (the tuned blocks' BatchNorm), as evaluate_split puts it."""
    emb = sum(torch.cat([model.encode_image_trunk(f.to(device), n_blocks).cpu() for f in view.split(batch_size)])
              for view in trunk)
    return F.normalize(emb, dim=-1)


def rank_summary(ranks):
    """Recall@K (percent), mean and median rank of a tensor of 1-based ranks."""
    ranks = ranks.double()
    return {**{f"R@{k}": 100.0 * (ranks <= k).double().mean().item() for k in KS},
            "mean_rank": ranks.mean().item(), "median_rank": ranks.median().item()}


def querybank_bias(gallery, bank, scale, chunk=2048):
    """index.querybank_bias (the one implementation, shared with search) on tensors: (N,) float32."""
    return torch.from_numpy(index.querybank_bias(gallery.float().cpu().numpy(), bank.float().cpu().numpy(),
                                                 scale, chunk))


def t2i_ranks(scores, caption_image):
    """(Q,) rank of each caption's photo in its row of scores (Q, N): 1 + the number of other
    photos scoring at least as high, to within TIE (ties count against the model)."""
    target = scores[torch.arange(len(scores)), caption_image]
    return (scores >= target[:, None] - TIE).sum(1)


def recall_metrics(img_emb, txt_emb, caption_image, img_bias=None, txt_bias=None):
    """Recall@K, mean and median rank in both directions.

    img_emb (N, D), txt_emb (Q, D), caption_image (Q,): index of each caption's photo.
    Text->image: each caption's target is its photo. Image->text: a photo is found at the
    best rank of any of its captions. img_bias (N,) and txt_bias (Q,), if given, are subtracted
    from the similarities when ranking photos, and captions (querybank_bias).
    Returns {"t2i": {...}, "i2t": {...}, "rsum": float, "n_images": N, "n_queries": Q}.
    """
    sims = txt_emb.float() @ img_emb.float().T  # (Q, N)
    q = torch.arange(len(sims))
    t2i = t2i_ranks(sims if img_bias is None else sims - img_bias[None, :], caption_image)
    # Image -> text: the best-scoring own caption of each photo, then the other captions above it.
    i2t_sims = sims if txt_bias is None else sims - txt_bias[:, None]
    target = i2t_sims[q, caption_image]
    n = img_emb.shape[0]
    best_own = torch.full((n,), float("-inf")).scatter_reduce(0, caption_image, target, "amax")
    own = caption_image[None, :] == torch.arange(n)[:, None]  # (N, Q)
    i2t = ((i2t_sims.T >= best_own[:, None] - TIE) & ~own).sum(1) + 1
    metrics = {"t2i": rank_summary(t2i), "i2t": rank_summary(i2t)}
    metrics["rsum"] = sum(metrics[d][f"R@{k}"] for d in ("t2i", "i2t") for k in KS)
    metrics["n_images"], metrics["n_queries"] = n, len(sims)
    return metrics


def caption_bank(model, tokenizer, data_dir, device):
    """(M, D) embeddings of every training caption: the querybank of text->image ranking."""
    return encode_texts(model, tokenizer, read_captions(data_dir, "train")["caption"].tolist(), device,
                        desc="encoding the caption bank")


def kept_or_encoded(keep, encode, what):
    """encode()'s dict of (n, D) float32 CPU tensors, or the arrays that an earlier call kept under
    keep = (path, key); what is encoded is kept there. float32: a call that reads them gives the
    very figures of the one that encoded them."""
    kept = read_keyed(*keep) if keep else None
    if kept is not None:
        print(f"{what}: embeddings reused from {keep[0]} (same checkpoint, data, options and code)", file=sys.stderr)
        return {name: torch.from_numpy(array) for name, array in kept.items()}
    out = encode()
    if keep:
        write_keyed(*keep, **{name: t.numpy() for name, t in out.items()})
    return out


def evaluate_split(model, tokenizer, data_dir, split, options, batch_size=64, num_workers=0, image_embeddings=None,
                   keep=None):
    """Encode one split's photos and captions on the model's device and return its recall_metrics.
    options, train.py's inference flags: "eval_image_size" (photo side), "eval_flip" (embed each
    photo averaged with its mirror image) and "querybank" (rank with querybank normalisation, the
    banks being the train split's captions and photos), the last two off when absent.
    image_embeddings: a function of the model (in eval mode) giving the photos' embeddings in
    EvalSplit order, instead of encoding them (train.py: from the frozen blocks' cached output).
    keep: a function of a split's name ("querybank": the banks) and its photos giving the
    (path, key) under which their embeddings are kept for the next call (evaluate.py), or None."""
    image_size, flip = options["eval_image_size"], options.get("eval_flip", False)
    data, device = EvalSplit(data_dir, split, image_size), model.logit_scale.device
    was_training = model.training
    model.eval()

    def encode_split():
        photos = (image_embeddings(model) if image_embeddings is not None else
                  encode_image_dataset(model, data.image_dataset, device, batch_size, num_workers, flip=flip))
        return {"photos": photos, "captions": encode_texts(model, tokenizer, data.captions, device)}
    emb = kept_or_encoded(keep and keep(split, data.images), encode_split, f"the {split} split")
    img_bias = txt_bias = None
    if options.get("querybank", False):
        train = EvalSplit(data_dir, "train", image_size)

        def encode_banks():
            return {"captions": caption_bank(model, tokenizer, data_dir, device),
                    "photos": encode_image_dataset(model, train.image_dataset, device, batch_size, num_workers,
                                                   desc="encoding the photo bank", flip=flip)}
        banks = kept_or_encoded(keep and keep("querybank", train.images), encode_banks, "the querybank")
        scale = model.logit_scale.exp().item()
        img_bias = querybank_bias(emb["photos"], banks["captions"], scale)
        txt_bias = querybank_bias(emb["captions"], banks["photos"], scale)
    model.train(was_training)
    return recall_metrics(emb["photos"], emb["captions"], data.caption_image, img_bias, txt_bias)


def format_metrics(metrics):
    """A small plain-text table of recall_metrics' result."""
    lines = [f"{'':6}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'mean r':>9}{'med r':>8}"]
    for d, name in (("t2i", "t2i"), ("i2t", "i2t")):
        m = metrics[d]
        lines.append(f"{name:6}{m['R@1']:8.1f}{m['R@5']:8.1f}{m['R@10']:8.1f}"
                     f"{m['mean_rank']:9.1f}{m['median_rank']:8.1f}")
    lines.append(f"rsum  {metrics['rsum']:8.1f}")
    return "\n".join(lines)


def plot_curves(history, path):
    """train.py's training curves: the loss and the validation recall of each epoch in `history`
    (metrics.jsonl's records), as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker="o")
    a.set(xlabel="epoch", ylabel="training loss", title="InfoNCE loss")
    validated = [h for h in history if h["val"] is not None]
    epochs = [h["epoch"] for h in validated]
    for d, label in (("t2i", "text→image"), ("i2t", "image→text")):
        b.plot(epochs, [h["val"][d]["R@1"] for h in validated], marker="o", label=f"{label} R@1")
        b.plot(epochs, [h["val"][d]["R@10"] for h in validated], marker=".", ls="--", label=f"{label} R@10")
    b.set(xlabel="epoch", ylabel="recall (%)", title="validation recall")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def chance_recall(n_images, k):
    """Expected text->image Recall@K (percent) of a random ranking over n_images photos."""
    return 100.0 * min(k, n_images) / n_images if n_images else float(np.nan)
