"""A tiny, learnable dataset and text encoder for tests: 4 colours x 2 shapes, 64 px photos."""

import os

import numpy as np
import torch
from PIL import Image, ImageDraw

from checkpoint import save_checkpoint
from dataset import write_captions
from helpers.synthetic import save_tiny_text_encoder
from model import DualEncoder

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 40, 220), "yellow": (235, 220, 40)}
SHAPES = ("circle", "square")


def make_tiny_dataset(root, per_class_train=6, size=64, seed=0):
    """Write images/, captions.csv (train/val/test, one val and one test photo per class) and a
    tiny text encoder folder into `root`. Returns root."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    rows = []
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    splits = ["train"] * per_class_train + ["val", "test"]
    for k, split in enumerate(splits):
        for colour, shape in classes:
            name = f"{colour}_{shape}_{k}.jpg"
            img = Image.new("RGB", (size, size), (128, 128, 128))
            draw = ImageDraw.Draw(img)
            r = int(rng.integers(size // 4, size // 3))
            x, y = rng.integers(r, size - r, 2)
            box = [x - r, y - r, x + r, y + r]
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLOURS[colour])
            img.save(os.path.join(root, "images", name), quality=95)
            for t in (f"a {colour} {shape}", f"one {colour} {shape} on grey", f"the {shape} is {colour}",
                      f"a {shape} coloured {colour}", f"{colour} {shape}"):
                rows.append((name, t, split))
    write_captions(root, rows)
    save_tiny_text_encoder(os.path.join(root, "text_encoder"), [r[1] for r in rows if r[2] == "train"], dim=32)
    return root


def train_argv(data_dir, model_dir, *extra):
    """train.py flags for a fast CPU run on the tiny dataset (no ONNX export at the end: tests of
    it ask for one)."""
    return ["--data_dir", str(data_dir), "--model_dir", str(model_dir), "--text_encoder",
            os.path.join(data_dir, "text_encoder"), "--no_pretrained", "--image_size", "64",
            "--batch_size", "16", "--num_workers", "0", "--warmup_steps", "5", "--lr", "2e-3",
            "--embedding_dim", "32", "--device", "cpu", "--no_export", *extra]


def make_checkpoint(path, text_encoder, seed, image_encoder="mobilenet_v3_small", **args):
    """An untrained tiny model whose image embeddings still differ from photo to photo: batch norm
    statistics are measured on one batch (random init in eval mode maps every photo to one point).
    args: more of train.py's arguments (eval_flip, querybank, data_dir, text_pooling, ...)."""
    torch.manual_seed(seed)
    pooling = args.pop("text_pooling", "cls")
    m = DualEncoder(image_encoder, text_encoder=text_encoder, embedding_dim=32, pretrained=False, text_pooling=pooling)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # a plain average: one batch sets the statistics
    with torch.no_grad():
        m.encode_images(torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8))
    args = {"image_encoder": image_encoder, "text_encoder": text_encoder, "embedding_dim": 32,
            "text_pooling": pooling, "temperature": 0.07, "fixed_temperature": False, "image_size": 32,
            "no_pretrained": True, "data_dir": "unused", **args}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_checkpoint(str(path), m.eval(), args, epoch=1, metrics={})
    return str(path)


def photo(path, seed, size=(48, 40)):
    """A distinct random photo: noise and a coloured block."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2, : size[0] // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)
    return str(path)
