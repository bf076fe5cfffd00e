"""Synthetic demo data: coloured shapes with compositional captions, so the whole pipeline runs on CPU.

Example (the preprocessing script calls make_demo_dataset and save_tiny_text_encoder):
    python preprocess_flickr8k.py --demo --data_dir data/demo

Each image holds one or two shapes (circle, square, triangle, star, cross) in one of eight colours
and two sizes, on a plain, noisy, striped or gradient background. Every caption names what tells
its image apart (shape, colour, size, background, which shape is above), so retrieval is learnable
far above chance. Relations are only above/below: training flips images left-right.
"""

import math
import os
import random
import re

import numpy as np
import torch
from PIL import Image, ImageDraw

from dataset import write_captions

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
SIZES = {"small": 0.10, "large": 0.20}  # radius as a fraction of the image side
BACKGROUNDS = {"plain": "plain {}", "noise": "noisy {}", "stripes": "striped {}", "gradient": "{} gradient"}
JPEG_QUALITY = 90  # fixed, so the same seed gives the same bytes


def _a(phrase):
    """The phrase with its indefinite article ('an orange star', 'a red circle')."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _second_colour(rgb):
    """A darker (or, for dark colours, lighter) tone of rgb for stripes and gradients."""
    c = np.array(rgb, dtype=np.float32)
    return c * 0.55 if c.sum() > 200 else c + (255 - c) * 0.4


def _background(kind, rgb, size, rng, nrng):
    """(size, size, 3) uint8 background of the given kind."""
    base = np.broadcast_to(np.array(rgb, dtype=np.float32), (size, size, 3))
    if kind == "noise":
        img = base + nrng.normal(0, 28, (size, size, 3))
    elif kind == "stripes":
        half = rng.choice([4, 6, 8])  # half a stripe period, in pixels
        rows = (np.arange(size) // half) % 2 == 1
        img = base.copy()
        img[rows] = _second_colour(rgb)
    elif kind == "gradient":
        t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]  # (size, 1, 1), top to bottom
        img = base * (1 - t) + _second_colour(rgb) * t
    else:
        img = base
    return np.clip(img, 0, 255).astype(np.uint8)


def _draw(draw, shape, cx, cy, r, rgb):
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
    elif shape == "square":
        s = r * 0.85  # a square of the same radius looks bigger than the circle
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=rgb)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx + r * 0.95, cy + r * 0.75), (cx - r * 0.95, cy + r * 0.75)], fill=rgb)
    elif shape == "star":
        pts = []
        for k in range(10):  # alternate outer and inner points of a five-pointed star
            rad = r if k % 2 == 0 else r * 0.45
            pts.append((cx + rad * math.sin(math.pi * k / 5), cy - rad * math.cos(math.pi * k / 5)))
        draw.polygon(pts, fill=rgb)
    else:  # cross
        w = r * 0.35
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=rgb)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=rgb)


def _captions(objs, bg_phrase, rng):
    """Five different captions for one image; objs are (shape, colour, size) from top to bottom."""
    full = [_a(f"{size} {colour} {shape}") for shape, colour, size in objs]
    short = [_a(f"{colour} {shape}") for shape, colour, _ in objs]
    bg = _a(f"{bg_phrase} background")
    if len(objs) == 1:
        (shape, colour, size), a, s = objs[0], full[0], short[0]
        # with one shape the background is what tells many images apart, so most captions name it
        pool = [a, f"{a} on {bg}", f"one shape: {a} on {bg}", f"{bg} with {a}",
                f"a single {size} {shape} coloured {colour} on {bg}", f"{s} on {bg}", f"{a} alone on {bg}"]
    else:
        (a, b), (sa, sb) = full, short
        pool = [f"{a} above {b}", f"{b} below {a}", f"two shapes: {a} above {b}", f"{sa} above {sb} on {bg}",
                f"{sb} under {sa} on {bg}", f"{a} at the top and {b} at the bottom",
                f"two shapes on {bg}: {sa} over {sb}"]
    return rng.sample(pool, 5)


def make_demo_dataset(out_dir, n_images=400, seed=0, size=128):
    """Write out_dir/images/*.jpg and out_dir/captions.csv (image,caption,split); return the rows."""
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)  # pixel noise only
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    order = list(range(n_images))
    rng.shuffle(order)  # split by image, 80/10/10
    n_train, n_val = round(0.8 * n_images), round(0.1 * n_images)
    split_of = {i: "train" if k < n_train else "val" if k < n_train + n_val else "test"
                for k, i in enumerate(order)}
    rows = []
    for i in range(n_images):
        bg_colour, kind = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
        img = Image.fromarray(_background(kind, COLOURS[bg_colour], size, rng, nrng))
        n_shapes, objs = rng.choice([1, 2]), []
        while len(objs) < n_shapes:
            colour = rng.choice([c for c in COLOURS if c != bg_colour])
            obj = (rng.choice(SHAPES), colour, rng.choice(list(SIZES)))
            if not objs or obj[:2] != objs[0][:2]:  # two shapes must differ in shape or colour
                objs.append(obj)
        draw = ImageDraw.Draw(img)
        for k, (shape, colour, sz) in enumerate(objs):
            r = SIZES[sz] * size * rng.uniform(0.9, 1.1)
            if len(objs) == 1:
                lo, hi = r + 2, size - r - 2
            elif k == 0:  # top shape stays in the upper half, bottom shape in the lower half
                lo, hi = r + 2, size / 2 - r
            else:
                lo, hi = size / 2 + r, size - r - 2
            cx, cy = rng.uniform(r + 2, size - r - 2), rng.uniform(lo, hi)
            _draw(draw, shape, cx, cy, r, COLOURS[colour])
        name = f"shape_{i:04d}.jpg"
        img.save(os.path.join(out_dir, "images", name), "JPEG", quality=JPEG_QUALITY)
        bg_phrase = BACKGROUNDS[kind].format(bg_colour)
        rows += [(name, caption, split_of[i]) for caption in _captions(objs, bg_phrase, rng)]
    write_captions(out_dir, rows)
    return rows


def save_tiny_text_encoder(folder, captions, dim=64, layers=2):
    """Write a random-init DistilBERT of width `dim` and a word-level tokenizer built from
    `captions` into `folder`, so the demo and the tests need no download."""
    from transformers import BertTokenizerFast, DistilBertConfig, DistilBertModel  # lazy: a slow import
    os.makedirs(folder, exist_ok=True)
    words = sorted({w for c in captions for w in re.findall(r"[a-z0-9]+|[^\sa-z0-9]", c.lower())})
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tokenizer = BertTokenizerFast(os.path.join(folder, "vocab.txt"), do_lower_case=True)
    tokenizer.save_pretrained(folder)
    config = DistilBertConfig(vocab_size=len(tokenizer), dim=dim, n_layers=layers, n_heads=2,
                              hidden_dim=4 * dim, max_position_embeddings=128, pad_token_id=0)
    torch.manual_seed(0)
    DistilBertModel(config).save_pretrained(folder)
    return folder
