"""Search photos by text or by an example photo with a trained dual encoder; save a grid of the hits.

    python search.py --query "a dog running through snow"
    python search.py --query "two children on a beach" --top_k 16 --use_test_set --show
    python search.py --images_dir ~/Pictures --query "birthday cake with candles"
    python search.py --images_dir ~/Pictures --image ~/Pictures/beach.jpg
    python search.py --images_dir ~/Pictures --queries queries.txt --json > hits.json

The gallery is the checkpoint's Flickr8K photos or, with --images_dir, any folder of photos
(searched recursively). Its embeddings live in an index file beside the checkpoint
(index_<checkpoint>_<gallery>.pt, or in --index_dir); each run encodes only photos that are new
or changed since the last, so a query costs one text or image encoding and one pass over the index.
"""

import argparse
import hashlib
import json
import math
import os
import sys
import textwrap
import warnings

import torch

from cli import non_negative_int, positive_int
from dataset import IMAGE_EXTENSIONS, load_image, open_rgb
from index import GalleryIndex, model_fingerprint, scan_folder
from model import eval_image_size, load_model, pick_device
from retrieval import caption_bank, encode_texts, querybank_bias

MAX_LISTED = 20  # unreadable files printed in full; the rest go to a file beside the index


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # query: exactly one kind
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--query", help="what to look for, in words")
    q.add_argument("--image", help="find the photos most like this photo")
    q.add_argument("--queries", help="text file of queries, one per line ('-': standard input); saves no grids")
    p.add_argument("--top_k", type=positive_int, default=9, help="how many photos to return per query")
    p.add_argument("--json", action="store_true", help="print results as JSON (query, rank, path, score), no grid")
    # gallery
    p.add_argument("--images_dir", default=None, help="search this folder of photos (recursively) instead of Flickr8K")
    p.add_argument("--use_test_set", action="store_true", help="search only the test split's photos")
    p.add_argument("--data_dir", default=None, help="dataset folder (default: the checkpoint's)")
    p.add_argument("--index_dir", default=None, help="where gallery indexes are kept (default: beside the checkpoint)")
    p.add_argument("--batch_size", type=positive_int, default=32, help="photos per encoding batch while indexing")
    p.add_argument("--num_workers", type=non_negative_int, default=2, help="processes decoding photos while indexing")
    # model
    p.add_argument("--checkpoint", default="models/best.pt", help="trained checkpoint")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    # output
    p.add_argument("--output_dir", default="results", help="where the result grid is saved")
    p.add_argument("--show", action="store_true", help="open the grid in a window")
    args = p.parse_args(argv)
    if args.query is not None and not args.query.strip():
        p.error("--query is empty")
    if args.images_dir and args.use_test_set:
        p.error("--use_test_set picks Flickr8K's test photos; it does not apply to --images_dir")
    if args.images_dir and not os.path.isdir(args.images_dir):
        p.error(f"--images_dir {args.images_dir} is not a folder")
    if args.image and not os.path.isfile(args.image):
        p.error(f"--image {args.image} is not a file")
    return args


def read_queries(path):
    """Non-blank lines of a UTF-8 file (a byte-order mark is fine), or of stdin for '-'."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8-sig") as f:
                text = f.read()
    except OSError as e:
        raise SystemExit(f"error: cannot read --queries {path}: {e.strerror}.")
    except UnicodeDecodeError:
        raise SystemExit(f"error: --queries {path} is not UTF-8 text; save it as UTF-8, one query per line.")
    queries = [line.strip() for line in text.splitlines() if line.strip()]
    if not queries:
        raise SystemExit(f"error: --queries {path} holds no queries; write one per line.")
    return queries


def gallery_images(data_dir, use_test_set):
    """Sorted photo names: the test split's, or every photo the dataset lists."""
    from dataset import read_captions
    if use_test_set:
        return sorted(read_captions(data_dir, "test")["image"].unique())
    import pandas as pd
    path = os.path.join(data_dir, "captions.csv")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {path} not found; pass --data_dir, or --images_dir to search your own photos.")
    return sorted(pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")["image"].unique())


def flickr_files(root, names):
    """{name: (size, mtime_ns)} of the listed photos that exist under root."""
    files = {}
    for name in names:
        try:
            st = os.stat(os.path.join(root, name))
            files[name] = (st.st_size, st.st_mtime_ns)
        except OSError:
            pass
    if len(files) < len(names):
        log(f"warning: {len(names) - len(files)} of {len(names)} photos listed in captions.csv are missing from {root}")
    return files


def slug(text, limit=60):
    """A file-name-safe form of text; a short hash keeps texts apart when non-ASCII is dropped or it is cut."""
    s = "_".join("".join(c if c.isascii() and c.isalnum() else " " for c in text.lower()).split())
    if not s or len(s) > limit or not text.isascii():
        s = f"{s[:limit].strip('_')}_{hashlib.sha1(text.encode()).hexdigest()[:8]}".lstrip("_")
    return s


def log(msg):
    """Progress and warnings go to stderr, so stdout holds only results (and stays valid JSON)."""
    print(msg, file=sys.stderr)


def report_index(ix, report, path):
    changes = {k: report[k] for k in ("added", "updated", "removed") if report[k]}
    if changes:
        log(f"index {path}: {len(ix)} photos (" + ", ".join(f"{v} {k}" for k, v in changes.items()) + ")")
    failed = report["failed"]
    if failed:
        log(f"skipped {len(failed)} unreadable file{'s' * (len(failed) > 1)}:")
        for p, why in failed[:MAX_LISTED]:
            log(f"  {p}  ({why})")
        if len(failed) > MAX_LISTED:
            listing = f"{path}.skipped.txt"
            with open(listing, "w", encoding="utf-8") as f:
                f.writelines(f"{p}\t{why}\n" for p, why in failed)
            log(f"  ... and {len(failed) - MAX_LISTED} more, all listed in {listing}")


def save_grid(paths, scores, out_path, title, query_image=None, show=False):
    """The query photo (if any) then the hits with rank and score, in a near-square grid."""
    import matplotlib
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(query_image, "query", "tab:blue")] if query_image else []
    for i, (p, s) in enumerate(zip(paths, scores), 1):
        panels.append((p, f"#{i}  {s:.3f}\n{os.path.basename(p)[:28]}", "black"))
    cols = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / cols)
    height = 3.3 * rows + 1
    fig, axes = plt.subplots(rows, cols, figsize=(max(3 * cols, 6), height), squeeze=False)
    # Fixed margins, not layout="constrained": its solver took 0.33 s of a cold 5 s call.
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.95 / height, wspace=0.04, hspace=0.16)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (p, label, colour) in zip(axes.flat, panels):
        try:
            img = open_rgb(p, 300)
            img.thumbnail((300, 300))  # a 24 MP photo would otherwise cost ~70 MB per panel
            ax.imshow(img)
        except Exception:  # deleted or damaged since it was indexed: leave a labelled gap
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label, fontsize=9, color=colour, fontweight="bold" if colour != "black" else "normal")
    fig.suptitle("\n".join(textwrap.wrap(title, 70, max_lines=3, placeholder=" ...")), fontsize=13)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Glyph .* missing")  # e.g. CJK queries in the default font
        fig.savefig(out_path, dpi=100)
        if show:
            plt.show()
    plt.close(fig)


def querybank_source(args, ckpt):
    """The dataset whose training captions are the querybank of a checkpoint trained with
    --querybank, or None: rank by cosine similarity."""
    if not ckpt["args"].get("querybank"):
        return None
    data_dir = args.data_dir or ckpt["args"].get("data_dir") or ""
    if os.path.isfile(os.path.join(data_dir, "captions.csv")):
        return data_dir
    log(f"warning: {args.checkpoint} ranks with querybank normalisation, which needs its training "
        f"captions ({os.path.join(data_dir, 'captions.csv')}: not found); ranking by cosine similarity "
        "instead. Pass --data_dir to point at them.")
    return None


def bank_name(data_dir):
    """Names the caption bank of a dataset: its folder and its captions.csv's size and time."""
    st = os.stat(os.path.join(data_dir, "captions.csv"))
    return f"{os.path.realpath(data_dir)}:{st.st_size}:{st.st_mtime_ns}"


def stored_caption_bank(model, tokenizer, data_dir, device, path, fingerprint):
    """retrieval.caption_bank, kept in `path` (float16, 30 MB for Flickr8K's 30,000 captions): photos
    added to an index later need no second encoding of the bank (a minute or two on 2 cores).
    `fingerprint` (model_fingerprint with the bank's name) says which model and bank it is."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if data["key"] == fingerprint:
            return data["bank"].float()
    except Exception:
        pass  # missing, damaged or another model's: encode it
    bank = caption_bank(model, tokenizer, data_dir, device).half()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        torch.save({"key": fingerprint, "bank": bank}, path + ".tmp")
        os.replace(path + ".tmp", path)
    except OSError:
        pass  # a read-only folder: encode again next time
    return bank.float()  # the same float16-rounded bank whether just encoded or read back


def index_gallery(args, model, tokenizer, ckpt):
    """Bring the gallery's index up to date and save it. Returns (index, folder the paths are
    relative to as the user named it, whether Ctrl-C cut the indexing short)."""
    image_size = eval_image_size(ckpt["args"])
    if args.images_dir:
        shown_root = args.images_dir
        root = os.path.realpath(args.images_dir)
        # The folder's name for people, a hash of its full path for uniqueness (two "photos" folders).
        name = f"{slug(os.path.basename(root) or 'root', 30)}-{hashlib.sha1(root.encode()).hexdigest()[:8]}"
        files = scan_folder(root)
    else:
        data_dir = args.data_dir or ckpt["args"]["data_dir"]
        shown_root = os.path.join(data_dir, "images")
        root = os.path.realpath(shown_root)
        name = "test" if args.use_test_set else "all"
        files = flickr_files(root, gallery_images(data_dir, args.use_test_set))
    # Beside the checkpoint, not in the photo folder: that may be read-only, synced or shared.
    index_dir = args.index_dir or os.path.dirname(os.path.abspath(args.checkpoint))
    stem = os.path.splitext(os.path.basename(args.checkpoint))[0]
    path = os.path.join(index_dir, f"index_{stem}_{name}.pt")
    qb_dir = querybank_source(args, ckpt)
    fingerprint = model_fingerprint(model, image_size, bank_name(qb_dir) if qb_dir is not None else "")
    ix = GalleryIndex.open(path, fingerprint, root, model.image_proj.out_features, os.path.abspath(args.checkpoint),
                           log)
    device = next(model.parameters()).device
    make_bias_fn = None
    if qb_dir is not None:
        def make_bias_fn():  # called only when there are new photos to give a bias
            bank = stored_caption_bank(model, tokenizer, qb_dir, device,
                                       os.path.join(index_dir, f"querybank_{stem}.pt"), fingerprint)
            return lambda emb: querybank_bias(emb, bank, model.logit_scale.exp().item())
    report = ix.update(files, model, image_size, device, args.batch_size, args.num_workers, make_bias_fn)
    if report["changed"] or not os.path.exists(path):
        try:
            os.makedirs(index_dir, exist_ok=True)
            ix.save(path)
        except OSError as e:
            log(f"warning: could not save the index to {path} ({e.strerror}); "
                "pass --index_dir with a writable folder to keep it between runs.")
    report_index(ix, report, path)
    return ix, shown_root, report["interrupted"]


def print_results(labels, results, n, as_image, as_json):
    if as_json:
        print(json.dumps([{"query": label, "rank": rank, "path": p, "score": round(s, 6)}
                          for label, hits in zip(labels, results) for rank, (p, s) in enumerate(hits, 1)],
                         ensure_ascii=False, indent=1))
        return
    for i, (label, hits) in enumerate(zip(labels, results)):
        what = f"like {label}" if as_image else f'for "{label}"'
        print(("\n" if i else "") + f"top {len(hits)} of {n} photos {what}:")
        for rank, (p, s) in enumerate(hits, 1):
            print(f"{rank:3d}  {s:.4f}  {p}")


def main(argv=None):
    args = get_args(argv)
    labels = read_queries(args.queries) if args.queries else [args.query or args.image]
    device = pick_device(args.device)
    # plain_text: no transformers import for the text tower (2 of a cold call's 5.5 s on 2 cores).
    model, tokenizer, ckpt = load_model(args.checkpoint, device, plain_text=True)
    if args.image:  # read it before indexing, so a bad file fails at once
        try:
            query_img = torch.from_numpy(load_image(args.image, eval_image_size(ckpt["args"]))).permute(2, 0, 1)
        except Exception as e:
            raise SystemExit(f"error: cannot read --image {args.image} ({type(e).__name__}: {e}); "
                             "give a JPEG, PNG or WebP photo.")
    ix, shown_root, interrupted = index_gallery(args, model, tokenizer, ckpt)
    if interrupted:
        log(f"interrupted: {len(ix)} photos indexed and saved; run again to index the rest.")
        return 130
    if not len(ix):
        raise SystemExit(f"error: no readable photos in {shown_root} (searched recursively for "
                         f"{' '.join(IMAGE_EXTENSIONS)}).")

    with torch.no_grad():
        if args.image:
            q_emb = model.embed_photos(query_img[None].to(device)).cpu()  # (1, D)
        else:
            q_emb = encode_texts(model, tokenizer, labels, device, desc="encoding queries")  # (Q, D)
    # The querybank bias corrects text queries only: it measures how close a photo is to captions.
    scores, rows = ix.top_k(q_emb, args.top_k, bias=None if args.image else ix.bias)  # (Q, k) each
    results = [[(os.path.join(shown_root, ix.paths[r]), s) for r, s in zip(rr, ss)]
               for rr, ss in zip(rows.tolist(), scores.tolist())]
    print_results(labels, results, len(ix), bool(args.image), args.json)
    if args.json or args.queries:
        return 0
    os.makedirs(args.output_dir, exist_ok=True)
    if args.image:
        base = os.path.basename(args.image)
        out, title = f"search_image_{slug(os.path.splitext(base)[0])}.png", f"photos like {base}"
    else:
        out, title = f"search_{slug(args.query)}.png", f'"{args.query}"'
    out = os.path.join(args.output_dir, out)
    paths, hit_scores = zip(*results[0])
    save_grid(paths, hit_scores, out, title, args.image, args.show)
    log(f"saved {out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # e.g. while the caption bank is encoded: before anything is written
        print("\ninterrupted; the saved index and caption bank are complete (writes are atomic)", file=sys.stderr)
        sys.exit(130)
