"""Search photos by text or by an example photo with a trained dual encoder; save a grid of the hits.

    python search.py --query "a dog running through snow"
    python search.py --query "two children on a beach" --top_k 16 --use_test_set --show
    python search.py --images_dir ~/Pictures --query "birthday cake with candles"
    python search.py --images_dir ~/Pictures --image ~/Pictures/beach.jpg
    python search.py --images_dir ~/Pictures --queries queries.txt --json > hits.json
    python search.py --images_dir ~/Pictures --query "a beach + ~/Pictures/dog.jpg - 2:people"
    python search.py --images_dir ~/Pictures --query cat --min_score 0.25 --paths | xargs -d '\n' cp -t ~/cats
    python search.py --images_list archive.txt --index_only          # index the photos a file lists
    torchrun --nproc_per_node 4 search.py --images_dir /archive --index_only   # encoding in 4 processes

The gallery is the checkpoint's Flickr8K photos or, with --images_dir, any folder of photos
(searched recursively), or with --images_list the photos a file lists. Its embeddings live in an
index file beside the checkpoint (index_<checkpoint>_<gallery>.npz and its .npy, or in
--index_dir); each run encodes only photos that are new or changed since the last, so a query costs
one text or image encoding and one pass over the index. From gallery.ANN_FROM photos on (or with
--ann) a FAISS index beside it (.ann) picks the candidates instead of that pass (gallery.py,
helpers/ann.py). The model runs from its ONNX export on onnxruntime when there is a current one
(export.py), else on PyTorch (encoder.py). Under torchrun (--index_only) the photos' encoding is
spread over the processes (helpers/shard.py).
"""

import argparse
import json
import math
import os
import sys
import textwrap
import warnings

import numpy as np

import encoder
from gallery import (
    Gallery,
    Term,
    add_gallery_args,
    ann_key,
    check_gallery_args,
    embed_queries,
    log,
    parse_query,
    readable,
    result_rows,
    slug,
    taken_between,
)
from helpers import shard
from helpers.cli import iso_date, positive_int
from photos import IMAGE_EXTENSIONS, open_rgb, read_image

MAX_LISTED = 20  # unreadable files printed in full; the rest go to a file beside the index
# The result grid, in pixels at GRID_DPI: each photo fits a GRID_PHOTO square, its two-line label
# above it, and each line of the title takes GRID_TITLE.
GRID_DPI, GRID_PHOTO, GRID_LABEL, GRID_GAP, GRID_TITLE = 100, 300, 34, 16, 22


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # query: exactly one kind
    q = p.add_mutually_exclusive_group(required=True)  # or --index_only: no query
    q.add_argument("--query", help="what to look for: words, a photo's path, or terms combined with + and - "
                                   "('a beach + dog.jpg - 2:people')")
    q.add_argument("--image", help="find the photos most like this photo")
    q.add_argument("--queries", help="text file of queries, one per line ('-': standard input); saves no grids")
    q.add_argument("--index_only", action="store_true",
                   help="bring the gallery's index up to date and exit, no query (under torchrun: the only mode)")
    p.add_argument("--top_k", type=positive_int, default=9, help="how many photos to return per query")
    p.add_argument("--min_score", type=float, default=None, help="keep only the hits scoring at least this")
    p.add_argument("--after", type=iso_date, default=None,
                   help="only photos taken on or after this date, YYYY-MM-DD (EXIF, else the file's time)")
    p.add_argument("--before", type=iso_date, default=None, help="only photos taken before this date, YYYY-MM-DD")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print results as JSON (query, rank, path, score), no grid")
    out.add_argument("--paths", action="store_true",
                     help="print only the matching photos' paths, one per line, no grid")
    add_gallery_args(p, batch_size=32, num_workers=2)
    # output
    p.add_argument("--output_dir", default="results", help="where the result grid is saved")
    p.add_argument("--show", action="store_true", help="open the grid in a window")
    args = p.parse_args(argv)
    check_gallery_args(p, args)
    if args.query is not None and not args.query.strip():
        p.error("--query is empty")
    if args.after and args.before and args.after >= args.before:
        p.error(f"--after {args.after} is not before --before {args.before}: no photo could match")
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


def report_index(ix, report, path):
    changes = {k: report[k] for k in ("added", "updated", "removed", "reused") if report[k]}
    if changes:
        # reused: moved, renamed or duplicate photos whose embedding was found by content, not encoded
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
    """The query photo (if any) then the hits with rank and score, in a near-square grid. Each
    photo is placed pixel for pixel on the figure (figimage), with its label as figure text: one
    Axes per panel took longer to lay out and draw than the photos themselves."""
    import matplotlib
    if not show:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(query_image, "query", "tab:blue")] if query_image else []
    for i, (p, s) in enumerate(zip(paths, scores), 1):
        panels.append((p, f"#{i}  {s:.3f}\n{os.path.basename(p)[:28]}", "black"))
    cols = math.ceil(math.sqrt(len(panels)))
    rows = math.ceil(len(panels) / cols)
    title = "\n".join(textwrap.wrap(title, 70, max_lines=3, placeholder=" ..."))
    cell_w, cell_h = GRID_PHOTO + GRID_GAP, GRID_PHOTO + GRID_LABEL + GRID_GAP
    head = GRID_TITLE * (title.count("\n") + 2)
    width, height = max(cols * cell_w + GRID_GAP, 600), head + rows * cell_h
    fig = plt.figure(figsize=(width / GRID_DPI, height / GRID_DPI), dpi=GRID_DPI)
    left0 = (width - cols * cell_w + GRID_GAP) // 2
    for k, (p, label, colour) in enumerate(panels):
        row, col = divmod(k, cols)
        left, bottom = left0 + col * cell_w, height - head - (row + 1) * cell_h + GRID_GAP  # the photo's box
        centre = (left + GRID_PHOTO / 2) / width
        try:
            img = open_rgb(p, GRID_PHOTO)
            img.thumbnail((GRID_PHOTO, GRID_PHOTO))  # a 24 MP photo would otherwise cost ~70 MB per panel
            fig.figimage(np.asarray(img), xo=left + (GRID_PHOTO - img.width) // 2,
                         yo=bottom + GRID_PHOTO - img.height, origin="upper")  # under its label
        except Exception:  # deleted or damaged since it was indexed: leave a labelled gap
            fig.text(centre, (bottom + GRID_PHOTO / 2) / height, "unreadable", ha="center", va="center")
        fig.text(centre, (bottom + GRID_PHOTO + 4) / height, label, ha="center", va="bottom", fontsize=9,
                 color=colour, fontweight="bold" if colour != "black" else "normal")
    fig.text(0.5, 1 - GRID_TITLE / 2 / height, title, ha="center", va="top", fontsize=13)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Glyph .* missing")  # e.g. CJK queries in the default font
        # zlib level 1, not 6: a grid of photos barely compresses further (the file is about 7%
        # larger), and level 6 takes several times as long to write it.
        fig.savefig(out_path, dpi=GRID_DPI, pil_kwargs={"compress_level": 1})
        if show:
            plt.show()
    plt.close(fig)


def index_gallery(gallery, encoded=None, files=None):
    """Bring the gallery's index up to date and save it, then the approximate index if the gallery
    uses one (gallery.ANN_FROM, --ann). encoded(): called once the photos are encoded (shard.stop,
    which frees the other processes of a sharded run). Returns (index, whether Ctrl-C cut the
    indexing short)."""
    before = ann_key(gallery.ix)
    report = gallery.update(gallery.ix, gallery.scan() if files is None else files)
    if encoded is not None:
        encoded()
    if report["changed"] or not os.path.exists(gallery.path):
        gallery.save(gallery.ix)  # first: a Ctrl-C while the approximate index is built loses no photo
    report_index(gallery.ix, report, gallery.path)
    # Interrupted, it follows the update (quick) but is not built anew: the next run does that.
    gallery.approximate(gallery.ix, report, before, build=not report["interrupted"])
    gallery.save_ann(gallery.ix)
    return gallery.ix, report["interrupted"]


def index_sharded(args):
    """--index_only under torchrun: every process encodes a share of the photos, rank 0 keeps the index."""
    rank, world, device = shard.start(args.device)
    try:
        # The export runs on the CPU only: processes with a GPU each encode on theirs with PyTorch.
        runtime = "torch" if device.startswith("cuda") and args.runtime == "auto" else args.runtime
        model = encoder.load(args.checkpoint, runtime, device)
        if rank > 0:
            shard.serve(model, args.batch_size, args.num_workers)
            return 0
        gallery = Gallery(args, model)
        gallery.encode_files = shard.encode_files
        ix, _ = index_gallery(gallery, shard.stop)
        log(f"index {gallery.path}: {len(ix)} photos, encoded by {world} processes")
        return 0
    finally:
        shard.finish()


def print_results(labels, results, n, photos_only, args):
    if args.json:
        print(json.dumps(result_rows(labels, results), ensure_ascii=False, indent=1))
        return
    if args.paths:  # the file names' own bytes, even those not UTF-8, so a pipe gets paths that open
        sys.stdout.flush()
        sys.stdout.buffer.write(b"".join(os.fsencode(p) + b"\n" for hits in results for p, _ in hits))
        sys.stdout.flush()
        return
    for i, (label, hits, like) in enumerate(zip(labels, results, photos_only)):
        what = f"like {readable(label)}" if like else f'for "{readable(label)}"'
        print(("\n" if i else "") + f"top {len(hits)} of {n} photos {what}:")
        for rank, (p, s) in enumerate(hits, 1):
            print(f"{rank:3d}  {s:.4f}  {readable(p)}")


def photo_term(text):
    """The photo a query term names (its path, ~ expanded), or None: the term is words. A term
    that looks like a path but names no file is searched as words, with a note."""
    path = os.path.expanduser(text)
    if os.path.isfile(path):
        return path
    if "/" in text or text.lower().endswith(IMAGE_EXTENSIONS):
        log(f"note: {text} is not a file; searched as words")
    return None


def embed(model, args, labels, image_size):
    """The parsed queries (lists of Term), their combined embeddings (Q, D) and which hold words."""
    def photo_emb(path):
        try:
            image = read_image(path, image_size)  # (3, S, S)
        except Exception as e:
            raise SystemExit(f"error: cannot read {'--image ' if args.image else ''}{path} ({type(e).__name__}: "
                             f"{e}); give a JPEG, PNG, WebP, HEIC or AVIF photo.")
        return model.encode_images(image[None])[0]
    try:
        if args.image:
            queries = [[Term(1.0, args.image, args.image)]]
        else:
            queries = [parse_query(label, photo_term) for label in labels]
        return queries, *embed_queries(model, queries, photo_emb)
    except ValueError as e:
        raise SystemExit(f"error: {e}")


def main(argv=None):
    args = get_args(argv)
    if shard.active():
        if not args.index_only:
            raise SystemExit("error: under torchrun search.py only indexes: pass --index_only, then search "
                             "with one process")
        return index_sharded(args)
    labels = read_queries(args.queries) if args.queries else [args.query or args.image]
    model = encoder.load(args.checkpoint, args.runtime, args.device, args.int8)
    gallery = Gallery(args, model)
    files = gallery.scan()
    if not args.index_only:  # before indexing: a bad query fails at once
        queries, q_emb, text = embed(model, args, labels, gallery.image_size)
    ix, interrupted = index_gallery(gallery, files=files)
    shown_root = gallery.shown_root
    if interrupted:
        log(f"interrupted: {len(ix)} photos indexed and saved; run again to index the rest.")
        return 130
    if args.index_only:
        log(f"index {gallery.path}: {len(ix)} photos")
        return 0
    if not len(ix):
        raise SystemExit(f"error: no readable photos in {shown_root} (searched recursively for "
                         f"{' '.join(IMAGE_EXTENSIONS)}).")
    results = [[(os.path.join(shown_root, ix.paths[r]), s) for r, s in hits]
               for hits in gallery.hits(ix, q_emb, args.top_k, text, args.min_score,
                                        taken_between(ix, args.after, args.before))]
    print_results(labels, results, len(ix), [not t for t in text], args)
    if args.json or args.paths or args.queries:
        return 0
    if not results[0]:
        log("no photo matches --min_score, --after and --before; no grid saved")
        return 0
    save_results(args, results[0], queries[0])
    return 0


def save_results(args, hits, terms):
    """The grid of the hits of --query or --image, headed by the query photo when it is one."""
    os.makedirs(args.output_dir, exist_ok=True)
    query_image = terms[0].photo if len(terms) == 1 else None
    if args.image:
        base = os.path.basename(args.image)
        out, title = f"search_image_{slug(os.path.splitext(base)[0])}.png", f"photos like {base}"
    else:
        out, title = f"search_{slug(args.query)}.png", f'"{args.query}"'
    out = os.path.join(args.output_dir, out)
    paths, hit_scores = zip(*hits)
    save_grid(paths, hit_scores, out, title, query_image, args.show)
    log(f"saved {out}")


if __name__ == "__main__":
    try:
        rc = main()
        sys.stdout.flush()  # here, not at exit: a closed pipe is met inside this try
        sys.exit(rc)
    except KeyboardInterrupt:  # e.g. while the caption bank is encoded: before anything is written
        print("\ninterrupted; the saved index and caption bank are complete (writes are atomic)", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # the reader left early (`search.py --json | head`): nothing went wrong here
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush of stdout is quiet
        sys.exit(141)  # 128 + SIGPIPE, as a program the signal ended
