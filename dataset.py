"""Flickr8K-style data: splits, image loading and caching, augmentation, each training epoch's
order of pairs, tokenization, collate.

Reads what preprocess_flickr8k.py writes: `<data_dir>/images/` and `<data_dir>/captions.csv`
(columns image,caption,split). Example:

    python -c "import dataset; print(len(dataset.PairDataset('data/flickr8k', 'train', 224)))"

Images travel as uint8 tensors (3, H, W) all the way to the model, which normalises them on its
device: a uint8 batch is 4x smaller to copy, and the normalisation is one fused op there.
"""

import csv
import errno
import json
import os

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

import photos
from helpers.atomic import atomic_path, atomic_write
from photos import IMAGE_EXTENSIONS

# What preprocess_flickr8k.py admits into a dataset: no GIF or TIFF, since a training set is still
# photos (an animation's first frame, a scan) while a personal folder holds whatever it holds.
DATASET_EXTENSIONS = tuple(e for e in IMAGE_EXTENSIONS if e not in (".gif", ".tif", ".tiff"))


def read_captions(data_dir, split=None):
    """Rows of captions.csv for one split (None: every split), sorted by image then caption order."""
    path = os.path.join(data_dir, "captions.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; run preprocess_flickr8k.py first "
                         "(see README, 'Data').")
    # Imported here: pandas takes 0.3 s to import, which a cold search.py over a folder of photos
    # (whose index is cached) never needs.
    import pandas as pd
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise SystemExit(f"error: {path} is not the UTF-8 CSV that preprocess_flickr8k.py writes "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:120]}); rerun preprocess_flickr8k.py.")
    missing = {"image", "caption", "split"} - set(df.columns)
    if missing:
        raise SystemExit(f"error: {path} lacks column(s) {sorted(missing)}; rerun preprocess_flickr8k.py.")
    if df.empty:
        raise SystemExit(f"error: {path} holds no captions; rerun preprocess_flickr8k.py.")
    if split is not None:
        df = df[df["split"] == split]
        if df.empty:
            raise SystemExit(f"error: split '{split}' has no captions in {path}; rerun preprocess_flickr8k.py "
                             "(it writes train, val and test) or pick another split.")
    # A stable sort keeps the five captions of a photo in file order.
    return df.sort_values("image", kind="stable").reset_index(drop=True)


def write_captions(data_dir, rows):
    """Write <data_dir>/captions.csv from (image, caption, split) rows, atomically."""
    with atomic_write(os.path.join(data_dir, "captions.csv"), newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "split"])
        writer.writerows(rows)


def read_image(path, size):
    """Decode one image file to a (3, size, size) uint8 tensor (photos.read_image): the one decoder
    of model inputs, so a photo has the same pixels, and the same embedding, whichever way it
    comes in."""
    return torch.from_numpy(photos.read_image(path, size))


def _cache_paths(data_dir, split, size):
    stem = os.path.join(data_dir, "cache", f"{split}_{size}")
    return stem + ".npy", stem + ".json"


def build_image_cache(data_dir, split, size):
    """Decode every photo of `split` once into one uint8 array (N, size, size, 3).

    Reading a cached photo costs microseconds where decoding a JPEG costs milliseconds; on a GPU
    the decode, not the model, would set the pace. Idempotent: a cache whose image list matches
    is kept. Returns the .npy path.
    """
    npy, meta = _cache_paths(data_dir, split, size)
    images = sorted(read_captions(data_dir, split)["image"].unique())
    if os.path.isfile(npy) and os.path.isfile(meta):
        with open(meta) as f:
            if json.load(f) == images:
                return npy
    os.makedirs(os.path.dirname(npy), exist_ok=True)
    # Array first, image list second: the list is the commit mark, so an interrupted run
    # never leaves a list that vouches for a half-written array.
    with atomic_path(npy) as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(images), size, size, 3))
        _reserve(tmp)
        for i, name in enumerate(tqdm(images, desc=f"caching {split} images", unit="img")):
            arr[i] = read_image(os.path.join(data_dir, "images", name), size).permute(1, 2, 0).numpy()  # (S, S, 3)
        arr.flush()
        del arr
    with atomic_write(meta) as f:
        json.dump(images, f)
    return npy


def _reserve(path):
    """Claim the disk blocks of a sparse file now: writing into a memory map on a full disk kills the
    process with SIGBUS, while posix_fallocate reports ENOSPC as an ordinary OSError."""
    if not hasattr(os, "posix_fallocate"):  # macOS, Windows
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.path.getsize(path))
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # and build_image_cache's atomic_path removes the file
        # EOPNOTSUPP and kin: a filesystem that cannot preallocate; write as before
    finally:
        os.close(fd)


class ImageStore:
    """Photos of one split by index: from the uint8 cache when it matches, else from the files."""

    def __init__(self, data_dir, images, size, split=None):
        self.paths = [os.path.join(data_dir, "images", name) for name in images]
        self.size = size
        self.cache = None
        if split is not None:
            npy, meta = _cache_paths(data_dir, split, size)
            if os.path.isfile(npy) and os.path.isfile(meta):
                with open(meta) as f:
                    if json.load(f) == list(images):
                        self.cache = np.load(npy, mmap_mode="r")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        """(3, size, size) uint8 tensor."""
        if self.cache is None:
            return read_image(self.paths[i], self.size)
        return torch.from_numpy(np.array(self.cache[i])).permute(2, 0, 1)  # a copy: the cache is read-only


def random_resized_crop_flip(img, size, generator, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3)):
    """Train-time augmentation on a (3, H, W) uint8 tensor, driven by an explicit generator.

    An explicit generator (seeded per epoch and item) makes augmentation identical whatever the
    number of workers, so a run resumed at an epoch boundary sees the same crops as one that
    never stopped.
    """
    _, h, w = img.shape
    u = torch.rand(4, generator=generator).tolist()
    area = h * w * (scale[0] + (scale[1] - scale[0]) * u[0])
    log_r = np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * u[1]
    aspect = float(np.exp(log_r))
    cw = min(w, max(1, round((area * aspect) ** 0.5)))
    ch = min(h, max(1, round((area / aspect) ** 0.5)))
    top = int(u[2] * (h - ch + 1))
    left = int(u[3] * (w - cw + 1))
    crop = img[:, top:top + ch, left:left + cw].unsqueeze(0).float()
    out = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear",
                                          align_corners=False, antialias=True)
    out = out.squeeze(0).round_().clamp_(0, 255).to(torch.uint8)
    if torch.rand(1, generator=generator).item() < 0.5:
        out = out.flip(-1)
    return out


class PairDataset(Dataset):
    """(image, caption) pairs of one split: every caption of every photo.

    Item: (uint8 image (3, S, S), caption str, image index within the split); with
    with_images=False the image is None (train.py then takes the photo from its feature cache).
    """

    def __init__(self, data_dir, split, image_size, augment=True, seed=0, with_images=True):
        df = read_captions(data_dir, split)
        self.images = sorted(df["image"].unique())
        index = {name: i for i, name in enumerate(self.images)}
        self.captions = df["caption"].tolist()
        self.image_ids = [index[name] for name in df["image"]]
        self.store = ImageStore(data_dir, self.images, image_size, split)
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.with_images = with_images
        self.epoch = 0

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        image_id = self.image_ids[i]
        if not self.with_images:
            return None, self.captions[i], image_id
        img = self.store[image_id]
        if self.augment:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i)
            img = random_resized_crop_flip(img, self.image_size, g)
        return img, self.captions[i], image_id


def epoch_order(image_ids, seed, epoch, captions_per_image=0):
    """Indices of the epoch's pairs in training order, a pure function of (seed, epoch), so
    resuming replays it. captions_per_image k > 0 keeps k random captions of each photo (all of
    a photo that has fewer): with k = 1 an epoch shows every photo once."""
    g = torch.Generator().manual_seed(seed + epoch)
    ids = torch.as_tensor(image_ids)
    keep = torch.arange(len(ids))
    if captions_per_image:
        # Order the pairs by photo, and within a photo at random; keep the first k of each.
        by_priority = torch.argsort(torch.rand(len(ids), generator=g))
        order = by_priority[torch.argsort(ids[by_priority], stable=True)]
        sorted_ids = ids[order].contiguous()
        rank = torch.arange(len(ids)) - torch.searchsorted(sorted_ids, sorted_ids)  # 0, 1, ... per photo
        keep = order[rank < captions_per_image]
    return keep[torch.randperm(len(keep), generator=g)].tolist()


def shard_order(order, batch_size, rank=0, world=1):
    """This process's part of the epoch's order under torchrun, in whole batches. Process r takes
    the r-th B of every N*B, so step s of all N processes together trains on
    order[s*N*B:(s+1)*N*B], gathered in that order: N processes at batch B see the batches of one
    process at batch N*B."""
    steps = len(order) // (world * batch_size)
    blocks = torch.tensor(order[:steps * world * batch_size]).view(steps, world, batch_size)
    return blocks[:, rank].flatten().tolist()


class AugmentedImages(Dataset):
    """One view of every photo of a PairDataset, in photo order. View 0 is the photo as
    evaluation sees it (with one view nothing a caption mentions is cropped away); view v > 0
    is a random crop and flip, the same whatever the number of workers or the run."""

    def __init__(self, pairs, view):
        self.pairs = pairs
        self.view = view

    def __len__(self):
        return len(self.pairs.images)

    def __getitem__(self, i):
        if self.view == 0:
            return self.pairs.store[i]
        g = torch.Generator().manual_seed((self.pairs.seed * 1_000_003 + self.view) * 1_000_003 + i)
        return random_resized_crop_flip(self.pairs.store[i], self.pairs.image_size, g)


class ImageDataset(Dataset):
    """The unique photos of a split in a fixed (sorted) order, for encoding a gallery."""

    def __init__(self, data_dir, images, image_size, split=None):
        self.images = list(images)
        self.store = ImageStore(data_dir, self.images, image_size, split)

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        return self.store[i]


class EvalSplit:
    """The evaluation view of a split: unique photos, and every caption with its photo's index."""

    def __init__(self, data_dir, split, image_size):
        df = read_captions(data_dir, split)
        self.images = sorted(df["image"].unique())
        index = {name: i for i, name in enumerate(self.images)}
        self.captions = df["caption"].tolist()
        self.caption_image = torch.tensor([index[name] for name in df["image"]])  # (Q,)
        self.image_dataset = ImageDataset(data_dir, self.images, image_size, split)


class Collate:
    """Stack images and tokenize a batch of captions, padded to the batch's longest caption.

    Returns images (B, 3, S, S) uint8 (None for a PairDataset without images), input_ids and
    attention_mask (B, L), and image_ids (B,), from which train.batch_loss builds the same-photo mask
    (of the global batch, under torchrun).
    """

    def __init__(self, tokenizer, max_length=64):
        self.tokenizer = tokenizer
        self.max_length = max_length

    def __call__(self, batch):
        images, captions, image_ids = zip(*batch)
        tokens = tokenize(self.tokenizer, list(captions), self.max_length)
        return {
            "images": torch.stack(images) if images[0] is not None else None,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "image_ids": torch.tensor(image_ids),
        }


def tokenize(tokenizer, texts, max_length=64):
    """Tokenize a list of texts, padded to the longest of them (not to max_length)."""
    return tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                     return_tensors="pt")
