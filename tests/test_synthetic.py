"""helpers/synthetic.py: same seed, same bytes; split by image; captions that match the pixels."""

import csv
import hashlib
import re
from collections import defaultdict

import numpy as np
import pytest
from PIL import Image

from helpers.synthetic import COLOURS, make_demo_dataset


def file_hashes(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    return out, make_demo_dataset(str(out), n_images=60, seed=0, size=96)


def test_same_seed_same_bytes(tmp_path, demo):
    out, _ = demo
    make_demo_dataset(str(tmp_path / "again"), n_images=60, seed=0, size=96)
    make_demo_dataset(str(tmp_path / "other"), n_images=60, seed=1, size=96)
    first = file_hashes(out)
    assert len(first) == 61  # 60 photos and captions.csv
    assert file_hashes(tmp_path / "again") == first
    other = file_hashes(tmp_path / "other")
    assert other.keys() == first.keys()
    assert sum(other[k] != first[k] for k in first) == 61  # a new seed changes every file


def test_split_by_image_with_five_captions_each(demo):
    out, rows = demo
    with open(out / "captions.csv", newline="") as f:
        assert [tuple(r.values()) for r in csv.DictReader(f)] == rows
    captions, split_of = defaultdict(list), {}
    for image, caption, split in rows:
        captions[image].append(caption)
        assert split_of.setdefault(image, split) == split  # one split per photo
    assert all(len(c) == len(set(c)) == 5 for c in captions.values())
    assert [list(split_of.values()).count(s) for s in ("train", "val", "test")] == [48, 6, 6]
    assert not any(re.search(r"\b(left|right)\b", c) for _, c, _ in rows)  # training flips images
    with Image.open(out / "images" / rows[0][0]) as im:
        assert im.size == (96, 96) and im.mode == "RGB"


def test_above_and_below_match_the_pixels(demo):
    """'a X above a Y': pixels of X's colour sit higher in the image than pixels of Y's colour."""
    out, rows = demo
    pattern = re.compile(rf"an? (?:small |large )?({'|'.join(COLOURS)}) \w+ (above|below|under) "
                         rf"an? (?:small |large )?({'|'.join(COLOURS)}) \w+")
    checked = 0
    for image, caption, _ in rows:
        m = pattern.match(caption)
        if not m or m.group(1) == m.group(3):
            continue
        pixels = np.asarray(Image.open(out / "images" / image), dtype=np.int16)  # (H, W, 3)
        # row indices of the pixels within 40 of each named colour
        rows_of = [np.nonzero(np.abs(pixels - COLOURS[c]).max(-1) < 40)[0] for c in (m.group(1), m.group(3))]
        first_is_higher = rows_of[0].mean() < rows_of[1].mean()
        assert first_is_higher == (m.group(2) == "above"), caption
        checked += 1
    assert checked >= 20


def test_captions_tell_images_apart(demo):
    _, rows = demo
    images_of = defaultdict(set)
    for image, caption, _ in rows:
        images_of[caption].add(image)
    unique = sum(len(images_of[c]) == 1 for _, c, _ in rows) / len(rows)
    assert unique >= 0.9  # nearly every caption points at exactly one photo
