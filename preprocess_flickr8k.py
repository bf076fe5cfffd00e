"""Prepare Flickr8K once: photos in <data_dir>/images/, one row per caption in <data_dir>/captions.csv.

Example:
    python preprocess_flickr8k.py --download --data_dir data/flickr8k

Other sources: --source DIR (a folder with Flickr8k_Dataset.zip and Flickr8k_text.zip, their
extracted folders, or the Kaggle layout Images/ + captions.txt), --captions FILE --images DIR (your
own photos and an image,caption CSV), or --demo (synthetic shapes, see synthetic.py).
captions.csv has columns image,caption,split with split in train/val/test (the official "dev"
split is called val). Bad lines and photos are skipped and reported; running again skips finished
work (downloads, extraction, photos already in images/).
"""

import argparse
import csv
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
import sys
import time
import zipfile
import zlib
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from PIL import Image
from tqdm import tqdm

from atomic import atomic_path, atomic_write

# Where --download fetches the archives from, and their sizes (bytes) and SHA-256 digests there.
# None: not yet verified against the server (a wrong figure would reject a good 1 GB download);
# the zip integrity check still catches truncated or corrupt files. Fill them in once measured.
DOWNLOAD = {
    "url_base": "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k/",
    "sizes": {"Flickr8k_Dataset.zip": None, "Flickr8k_text.zip": None},
    "sha256": {"Flickr8k_Dataset.zip": None, "Flickr8k_text.zip": None},
}
TRIES = 4  # download attempts per archive
BACKOFF_S = 2.0  # wait before the first retry, doubled each time (tests set it to 0)
TIMEOUT_S = (10, 60)  # connect, and longest silence mid-download before a retry
# Archive limits, far above Flickr8K's (~16,000 members with the __MACOSX ones; JPEGs do not
# compress): more members or a higher unpacked/packed ratio than this is not our dataset.
MAX_MEMBERS = 100_000
MAX_RATIO = 100
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
               "test": "Flickr_8k.testImages.txt"}
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset")  # the official archive misspells it


class TransientError(Exception):
    """A download failure worth another try: a 5xx answer or a connection that closed early."""


def _read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _write_json(obj, path):
    with atomic_write(path) as f:
        json.dump(obj, f)


def _discard(path):
    if os.path.exists(path):
        os.remove(path)


def download(url, dest):
    """Stream url to dest through dest.part, resuming a partial file; retry transient errors.

    dest.part.json records the url, total size and validator (ETag or Last-Modified) of the file
    that dest.part is a prefix of. A resume sends them back (If-Range), and a partial file is kept
    only while the server vouches for the same file; otherwise the download starts over.
    """
    part, meta, name = dest + ".part", dest + ".part.json", os.path.basename(dest)
    for attempt in range(TRIES):
        have = os.path.getsize(part) if os.path.exists(part) else 0
        known = _read_json(meta) if have else None
        if have and (not known or known.get("url") != url or not known.get("total")):
            have = 0  # a partial file nobody can vouch for: start over
        # identity encoding: byte offsets for Range must count file bytes, not gzip bytes
        headers = {"Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
            if known.get("validator"):
                headers["If-Range"] = known["validator"]  # the server sends all of it if the file changed
        try:
            with requests.get(url, headers=headers, stream=True, timeout=TIMEOUT_S) as r:
                if r.status_code == 416:  # nothing past byte `have`: complete if the totals agree
                    server_total = r.headers.get("Content-Range", "").rpartition("/")[2]
                    if have and server_total == str(have) == str(known["total"]):
                        break
                    _discard(part)
                    raise TransientError("partial file does not match the server's; starting over")
                if r.status_code >= 500 or r.status_code == 429:
                    raise TransientError(f"HTTP {r.status_code}")
                if r.status_code >= 400:
                    raise SystemExit(f"error: {url} answered HTTP {r.status_code}")
                if r.headers.get("Content-Type", "").startswith("text/html"):
                    # a login, error or rate-limit page: never let it overwrite a good partial file
                    raise SystemExit(f"error: {url} is an HTML page (an error or login page?), not the archive; "
                                     "check --url_base and your connection, then run again"
                                     + (f" ({part} is kept and resumes)" if have else ""))
                length = r.headers.get("Content-Length")
                if r.status_code == 206:
                    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", r.headers.get("Content-Range", ""))
                    if not (have and m and int(m[1]) == have and int(m[2]) == known["total"]):
                        _discard(part)
                        raise TransientError("the server's file differs from the partial one; starting over")
                    total = known["total"]
                else:  # 200: the whole file, because it is new, changed, or the server ignores Range
                    have = 0
                    total = int(length) if length is not None else None
                    _write_json({"url": url, "total": total,
                                 "validator": r.headers.get("ETag") or r.headers.get("Last-Modified")}, meta)
                if total is not None:
                    free = shutil.disk_usage(os.path.dirname(os.path.abspath(part))).free
                    if total - have > free:
                        raise SystemExit(f"error: {name} needs {(total - have) / 1e9:.2f} GB more but only "
                                         f"{free / 1e9:.2f} GB are free there; free some space and run again")
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, desc=name) as bar:
                    for chunk in r.iter_content(1 << 16):  # small: a cut loses at most 64 KiB
                        f.write(chunk)
                        bar.update(len(chunk))
            if total is not None and os.path.getsize(part) < total:
                raise TransientError("connection closed early")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                TransientError) as e:
            if attempt == TRIES - 1:
                kept = f"; {part} is kept and the next run resumes it" if os.path.exists(part) else ""
                raise SystemExit(f"error: downloading {url} failed after {TRIES} tries: {e}{kept}")
            wait = BACKOFF_S * 2 ** attempt
            print(f"{name}: {e}; retrying in {wait:g} s", file=sys.stderr)
            time.sleep(wait)
    os.replace(part, dest)  # not atomic_path: a failed download keeps its .part to resume it
    _discard(meta)


def sha256sum(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_zip(path, expected_size=None, remove=False, expected_sha256=None):
    """Exit with a clear message if path is not a whole zip; remove it if it was our download."""
    size, problem = os.path.getsize(path), None
    if expected_size and size != expected_size:
        problem = f"has {size:,} bytes, expected {expected_size:,}"
    elif expected_sha256 and sha256sum(path) != expected_sha256:
        problem = f"does not have the expected SHA-256 {expected_sha256[:16]}... (damaged or another file)"
    elif not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            head = f.read(200).lower()
        html = b"<html" in head or b"<!doctype" in head
        problem = "is an HTML page (an error or login page?), not a zip" if html else "is not a zip archive"
    else:
        try:
            with zipfile.ZipFile(path) as zf:
                members = zf.infolist()
                # Declared sizes are safe to trust: zipfile stops a member at its declared size.
                unpacked = sum(m.file_size for m in members)
                if len(members) > MAX_MEMBERS:
                    problem = f"has {len(members):,} members, more than {MAX_MEMBERS:,}: not a Flickr8K archive"
                elif unpacked > MAX_RATIO * max(size, 1 << 20):
                    problem = f"would unpack {size:,} bytes into {unpacked:,} (a zip bomb?)"
                else:
                    bad = zf.testzip()
                    problem = f"has a corrupt member {bad}" if bad else None
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            problem = f"is damaged ({e})"
    if problem:
        if remove:
            os.remove(path)
        raise SystemExit(f"error: {path} {problem}" + ("; removed it, run again" if remove else ""))


def extract(zip_path, out_dir, expected_size=None, remove_bad=False, expected_sha256=None):
    """Check zip_path and extract it into out_dir, once: a marker file makes later runs skip it."""
    os.makedirs(out_dir, exist_ok=True)
    marker = os.path.join(out_dir, f".{os.path.basename(zip_path)}.done")
    size = str(os.path.getsize(zip_path))
    if os.path.exists(marker) and Path(marker).read_text() == size:
        return
    check_zip(zip_path, expected_size, remove_bad, expected_sha256)
    root = os.path.realpath(out_dir)
    with zipfile.ZipFile(zip_path) as zf:
        members = zf.infolist()
        unpacked, free = sum(m.file_size for m in members), shutil.disk_usage(root).free
        if unpacked > free:
            raise SystemExit(f"error: {zip_path} unpacks to {unpacked / 1e9:.2f} GB but only {free / 1e9:.2f} GB "
                             f"are free in {out_dir}; free some space and run again")
        for m in members:  # refuse the whole archive before writing anything ("zip slip")
            target = os.path.realpath(os.path.join(root, m.filename))
            is_link = (m.external_attr >> 16) & 0o170000 == 0o120000
            if is_link or os.path.isabs(m.filename) or os.path.commonpath([root, target]) != root:
                what = "is a symlink" if is_link else "would land outside " + out_dir
                raise SystemExit(f"error: refusing to extract {zip_path}: member {m.filename!r} {what}")
        for m in tqdm(members, desc=f"extract {os.path.basename(zip_path)}", unit="file"):
            if not m.filename.startswith("__MACOSX/"):  # macOS resource forks, not data
                zf.extract(m, root)
    Path(marker).write_text(size)


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
        from synthetic import make_demo_dataset, save_tiny_text_encoder  # lazy: torch, only --demo needs it

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
