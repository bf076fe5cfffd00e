"""Prepare Flickr8K once: photos in <data_dir>/images/, one row per caption in <data_dir>/captions.csv.

Example:
    python preprocess_flickr8k.py --download --data_dir data/flickr8k

Other sources: --source DIR (a folder with Flickr8k_Dataset.zip and Flickr8k_text.zip, their
extracted folders, or the Kaggle layout Images/ + captions.txt), --captions FILE --images DIR (your
own photos and an image,caption CSV), or --demo (synthetic shapes, see helpers/synthetic.py).
captions.csv has columns image,caption,split with split in train/val/test (the official "dev"
split is called val). Bad lines and photos are skipped and reported; running again skips finished
work (downloads, extraction, photos already in images/).
"""

import argparse
import csv
import errno
import math
import os
import random
import shutil
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

from PIL import Image
from tqdm import tqdm

from helpers.atomic import atomic_path
from helpers.download import download, extract

# Where --download fetches the archives from, and their sizes (bytes) and SHA-256 digests there.
# None: not yet verified against the server (a wrong figure would reject a good 1 GB download);
# the zip integrity check still catches truncated or corrupt files. Fill them in once measured.
DOWNLOAD = {
    "url_base": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/",
    "sizes": {"Flickr8k_Dataset.zip": None, "Flickr8k_text.zip": None},
    "sha256": {"Flickr8k_Dataset.zip": None, "Flickr8k_text.zip": None},
}
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")  # the official archive misspells it


def find(roots, names, want_dir, depth=3):
    """First file (or folder) named one of names under roots, at most depth levels down."""
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__MACOSX")
            for n in names:
                if n in (dirnames if want_dir else filenames):
                    return os.path.join(dirpath, n)
            rel = os.path.relpath(dirpath, root)
            if (0 if rel == "." else rel.count(os.sep) + 1) >= depth - 1:
                dirnames[:] = []  # what lies in these folders' subfolders is too deep
    return None


NOT_UTF8 = "caption line not UTF-8 (save the file as UTF-8)"


def open_text(path, newline=None):
    """A captions file as text: UTF-8 with or without BOM, or UTF-16 with BOM (Excel's "Unicode
    text"). Other bytes become U+FFFD, and the readers skip and report the lines holding them."""
    with open(path, "rb") as f:
        utf16 = f.read(2) in (b"\xff\xfe", b"\xfe\xff")
    return open(path, encoding="utf-16" if utf16 else "utf-8-sig", errors="replace", newline=newline)


def clean(text):
    """Tabs, line breaks and runs of spaces inside a caption become one space."""
    return " ".join(text.split())


def read_token_file(path, skipped):
    """Lines 'IMAGE.jpg#N<TAB>caption' -> {image: [captions]}; bad lines go to skipped."""
    captions = defaultdict(list)
    with open_text(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            key, tab, caption = line.partition("\t")
            image, hash_, n = key.strip().rpartition("#")
            if "\ufffd" in line:
                skipped[NOT_UTF8].append((f"line {i}: {line.strip()[:50]!r}", 1))
            elif not tab or not hash_ or not image or not n.isdigit():
                skipped["malformed caption line (want IMAGE.jpg#N<TAB>caption)"].append(
                    (f"line {i}: {line.strip()[:50]!r}", 1))
            elif not caption.strip():
                skipped["empty caption"].append((f"line {i}: {image}", 1))
            else:
                captions[image].append(clean(caption))
    return captions


def read_caption_csv(path, skipped):
    """A CSV with header image,caption (any case and order, more columns allowed) -> {image: [captions]};
    bad rows go to skipped."""
    captions = defaultdict(list)
    with open_text(path, newline="") as f:
        reader = csv.DictReader(f)
        try:
            reader.fieldnames = [(n or "").strip().lower() for n in reader.fieldnames or []]
        except csv.Error as e:  # e.g. a binary file passed as the CSV
            raise SystemExit(f"error: {path} is not CSV: {e}") from None
        if not {"image", "caption"} <= set(reader.fieldnames):
            raise SystemExit(f"error: {path} needs a header with columns image,caption, "
                             f"found {str(reader.fieldnames)[:60]}")
        try:
            for row in reader:
                # an unquoted comma in a caption spills into extra fields: glue them back on
                caption = clean(",".join([row["caption"] or "", *row.get(None, [])]))
                image = (row["image"] or "").strip()
                if "\ufffd" in caption + image:
                    skipped[NOT_UTF8].append((f"line {reader.line_num}: {image}", 1))
                elif not image:
                    skipped["malformed caption line (no image name)"].append((f"line {reader.line_num}", 1))
                elif not caption:
                    skipped["empty caption"].append((f"line {reader.line_num}: {image}", 1))
                else:
                    captions[image].append(caption)
        except csv.Error as e:  # e.g. a binary file passed as the CSV
            raise SystemExit(f"error: {path} line {reader.line_num} is not CSV: {e}") from None
    return captions


def read_split_files(text_dir):
    """{image: split} from the official split lists in text_dir, or None if there are none."""
    splits = {}
    for split, fname in SPLIT_FILES.items():
        path = os.path.join(text_dir, fname)
        if os.path.exists(path):
            with open(path, encoding="utf-8-sig") as f:
                splits.update((line.strip(), split) for line in f if line.strip())
    return splits or None


def split_by_image(images, ratios, seed):
    """{image: split}, shuffled by image with a fixed seed, so no photo lands in two splits."""
    images = sorted(images)
    random.Random(seed).shuffle(images)
    cuts = [sum(ratios[:k + 1]) / sum(ratios) * len(images) for k in range(2)]
    cuts = [int(c + 0.5) for c in cuts]
    return {im: "train" if i < cuts[0] else "val" if i < cuts[1] else "test" for i, im in enumerate(images)}


def load_source(args, skipped):
    """Find the captions, the splits (None: make them) and the photo folder of the chosen source."""
    if args.captions:
        if not os.path.isfile(args.captions) or not os.path.isdir(args.images):
            raise SystemExit(f"error: --captions {args.captions} must be a file and "
                             f"--images {args.images} a folder")
        return read_caption_csv(args.captions, skipped), None, args.images
    roots = []
    if args.download:
        archives = []
        for name, size in DOWNLOAD["sizes"].items():
            dest = os.path.join(args.data_dir, "downloads", name)
            if not os.path.exists(dest):
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                download(args.url_base.rstrip("/") + "/" + name, dest)
            # the figures we know are those of the default server's files; a mirror may differ
            default = args.url_base == DOWNLOAD["url_base"]
            archives.append((dest, size if default else None, DOWNLOAD["sha256"][name] if default else None))
    else:
        if not os.path.exists(args.source):
            raise SystemExit(f"error: --source {args.source} does not exist")
        found = [os.path.join(args.source, n) for n in DOWNLOAD["sizes"]]
        archives = [(p, None, None) for p in ([args.source] if os.path.isfile(args.source) else found)
                    if os.path.isfile(p)]
        if os.path.isdir(args.source):
            roots.append(args.source)
    raw = os.path.join(args.data_dir, "raw")
    for path, size, digest in archives:
        extract(path, raw, size, remove_bad=args.download, expected_sha256=digest)
    roots = ([raw] if archives else []) + roots
    token = find(roots, ["Flickr8k.token.txt"], want_dir=False)
    if token:
        image_dir = find(roots, IMAGE_DIRS, want_dir=True)
        if not image_dir:
            raise SystemExit(f"error: found {token} but no {IMAGE_DIRS[0]}/ photo folder near it")
        return read_token_file(token, skipped), read_split_files(os.path.dirname(token)), image_dir
    kaggle = find(roots, ["captions.txt"], want_dir=False)  # Kaggle: captions.txt next to Images/
    folders = [os.path.join(os.path.dirname(kaggle), d) for d in ("Images", "images")] if kaggle else []
    image_dir = next((d for d in folders if os.path.isdir(d)), None)
    if not image_dir:
        raise SystemExit(f"error: no dataset under {', '.join(roots) or args.source}: expected "
                         "Flickr8k.token.txt + Flicker8k_Dataset/ or captions.txt + Images/")
    return read_caption_csv(kaggle, skipped), None, image_dir


def verify_image(path):
    """None if PIL can decode the whole file, else why not."""
    try:
        with Image.open(path) as im:  # reads the header only; PIL refuses 2x MAX_IMAGE_PIXELS here
            w, h = im.size
            if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:  # PIL would only warn
                return f"too large ({w}x{h} pixels; a decompression bomb?)"
            im.load()
    except Image.UnidentifiedImageError:
        return "not an image PIL can read"
    except Image.DecompressionBombError:
        return "too large (a decompression bomb?)"
    except Exception as e:  # PIL raises many types for broken files; every one means unusable
        return f"{type(e).__name__}: {e}"[:80]
    return None


def link_or_copy(src, dst):
    """Hard-link src to dst (no extra disk space), or copy it across filesystems."""
    with atomic_path(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # another filesystem, or a tmp left by a crash: copyfile overwrites it
            shutil.copyfile(src, tmp)


def is_dataset_image(image):
    """Whether an image name from a captions file may enter the dataset: a plain file name (no folder)
    with one of dataset.DATASET_EXTENSIONS."""
    from dataset import DATASET_EXTENSIONS  # lazy: dataset.py pulls in torch, which downloads do not need
    return os.path.basename(image) == image and "\\" not in image and image.lower().endswith(DATASET_EXTENSIONS)


def collect(captions, splits, image_dir, data_dir, skipped, num_workers):
    """Keep photos that have a split and load in PIL, put them in images/; return caption rows."""
    out_dir = os.path.join(data_dir, "images")
    os.makedirs(out_dir, exist_ok=True)
    sizes = {e.name: e.stat().st_size for e in os.scandir(image_dir) if e.is_file()}
    done = {e.name: e.stat().st_size for e in os.scandir(out_dir) if e.is_file()}
    keep, todo = [], []
    for image, caps in captions.items():
        if not is_dataset_image(image):
            skipped["bad photo name (not a plain .jpg/.png file name)"].append((image, len(caps)))
        elif image not in sizes:
            skipped["missing photo"].append((f"{image} ({splits.get(image, 'no split')})", len(caps)))
        elif image not in splits:
            skipped["photo in no split"].append((image, len(caps)))
        else:
            keep.append(image)
            if done.get(image) != sizes[image]:  # photos already in images/ were verified before
                todo.append(image)
    with ThreadPoolExecutor(num_workers) as pool:  # PIL decodes without holding the GIL
        paths = [os.path.join(image_dir, im) for im in todo]
        try:
            errors = list(tqdm(pool.map(verify_image, paths), total=len(paths), desc="verify", unit="photo"))
        except KeyboardInterrupt:  # else leaving the `with` would wait for every queued photo
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    bad = set()
    for image, err in zip(todo, errors):
        if err:
            skipped["unreadable photo"].append((f"{image} ({err})", len(captions[image])))
            bad.add(image)
        else:
            link_or_copy(os.path.join(image_dir, image), os.path.join(out_dir, image))
    return [(im, c, splits[im]) for im in keep if im not in bad for c in captions[im]]


def print_summary(rows, skipped):
    print(f"photos: {len({r[0] for r in rows}):,} | captions: {len(rows):,}")
    for split in ("train", "val", "test"):
        part = [r for r in rows if r[2] == split]
        print(f"  {split:5s}: {len({r[0] for r in part}):,} photos, {len(part):,} captions")
    for reason, items in skipped.items():
        examples = ", ".join(item for item, _ in items[:3])
        lost = sum(n for _, n in items)
        print(f"skipped, {reason}: {len(items):,} ({lost:,} captions), e.g. {examples}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # source: pick one
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--download", action="store_true", help="download the Flickr8K archives, prepare them")
    src.add_argument("--source", help="folder with the archives, their extracted folders, or Kaggle layout")
    src.add_argument("--captions", help="your own CSV with columns image,caption (needs --images)")
    src.add_argument("--demo", action="store_true", help="generate the synthetic shapes demo set instead")
    parser.add_argument("--images", help="folder of the photos named in --captions")
    parser.add_argument("--url_base", default=DOWNLOAD["url_base"], help="download from this mirror instead")
    # output
    parser.add_argument("--data_dir", default="data/flickr8k", help="output folder (images/, captions.csv)")
    parser.add_argument("--cache_size", type=int, default=224, help="side of the uint8 image cache (0: none)")
    # split
    parser.add_argument("--seed", type=int, default=0, help="seed of the split by image (and of --demo)")
    parser.add_argument("--split_ratio", type=float, nargs=3, default=[0.8, 0.1, 0.1],
                        help="train val test fractions, when there are no split files")
    parser.add_argument("--num_workers", type=int, default=8, help="threads that verify photos")
    args = parser.parse_args(argv)
    if bool(args.captions) != bool(args.images):
        parser.error("--captions and --images go together")
    if not all(0 <= r < math.inf for r in args.split_ratio) or sum(args.split_ratio) <= 0:
        parser.error("--split_ratio needs three non-negative numbers with a positive sum")
    if args.num_workers < 1:
        parser.error("--num_workers must be at least 1")
    try:
        prepare(args)
    except OSError as e:  # anything else is a bug, and its traceback says where
        if e.errno not in DISK_FULL:
            raise
        raise SystemExit(f"error: no space left on the device ({e.filename or args.data_dir}); free some space "
                         "and run again: finished downloads, extraction and photos are kept") from None


def prepare(args):
    skipped = defaultdict(list)  # reason -> [(example, captions lost)]
    if args.demo:
        from helpers.synthetic import make_demo_dataset, save_tiny_text_encoder  # lazy: torch, only --demo needs it

        rows = make_demo_dataset(args.data_dir, seed=args.seed)
        # the tokenizer vocabulary is learned from train captions only
        train_captions = [c for _, c, s in rows if s == "train"]
        save_tiny_text_encoder(os.path.join(args.data_dir, "text_encoder"), train_captions)
    else:
        captions, splits, image_dir = load_source(args, skipped)
        if splits is None:  # split the photos we have, so missing ones do not skew the ratios
            present = set(os.listdir(image_dir))
            names = [im for im in captions if im in present and is_dataset_image(im)]
            splits = split_by_image(names, args.split_ratio, args.seed)
        rows = collect(captions, splits, image_dir, args.data_dir, skipped, args.num_workers)
        if rows:
            from dataset import write_captions  # lazy: dataset.py pulls in torch
            write_captions(args.data_dir, rows)
    print_summary(rows, skipped)
    if not rows:
        raise SystemExit("error: nothing usable left: no photo has a readable file, a split and a caption")
    if args.cache_size > 0:
        from dataset import build_image_cache  # lazy: dataset.py pulls in torch
        for split in sorted({r[2] for r in rows}):
            print(f"cache {split}: {build_image_cache(args.data_dir, split, args.cache_size)}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to continue: finished downloads, extraction and "
              "photos are kept", file=sys.stderr)
        sys.exit(130)
