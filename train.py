"""Train the dual encoder with symmetric InfoNCE; validate Recall@K every epoch.

    python train.py --data_dir data/flickr8k --model_dir models --epochs 20
    python train.py @configs/offline.txt --data_dir data/flickr8k --model_dir models/offline
    torchrun --standalone --nproc_per_node 4 train.py --data_dir data/flickr8k --batch_size 64

Writes to --model_dir: last.pt (every epoch, and on Ctrl-C), best.pt (best validation R-sum),
checkpoint_epoch_N.pt (every --save_every epochs), metrics.jsonl, training_curves.png and the
tokenizer (so evaluate.py and search.py work offline). --resume continues from last.pt.
Under torchrun each of N processes trains on its shard with --batch_size B, and the loss runs
over the global batch of N*B pairs; only rank 0 validates and writes.
"""

import argparse
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from checkpoint import (
    eval_image_size,
    last_kept,
    model_from_args,
    read_checkpoint,
    resume_training,
    save_training,
    training_args,
)
from dataset import Collate, PairDataset, epoch_order, read_captions, shard_order
from device import keep_freed_memory, precision_summary, rank_and_world, torchrun_device
from export import write_export
from helpers import cli
from helpers.atomic import atomic_write
from helpers.cli import ArgParser, int_at_least, non_negative_float, non_negative_int, positive_float, positive_int
from helpers.interrupt import Terminated, held, ignore_sigterm, stop_signals
from model import LITE_MODELS, gather_batch, info_nce, load_tokenizer
from retrieval import cache_image_trunk, cache_val_trunk, cached_views, evaluate_split, format_metrics, plot_curves


def build_parser():
    # One line per flag, grouped by data, model, optim and run; a number's range is its type's (helpers/cli.py).
    p = ArgParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--data_dir", default="data/flickr8k", help="output of preprocess_flickr8k.py")
    p.add_argument("--model_dir", default="models", help="where checkpoints and logs go")
    p.add_argument("--image_size", type=positive_int, default=224, help="image side in pixels")
    p.add_argument("--num_workers", type=non_negative_int, default=min(4, cli.usable_cores()),
                   help="DataLoader worker processes (with --image_cache_views: caching and validation only)")
    p.add_argument("--eval_image_size", type=non_negative_int, default=0,
                   help="photo side for validation, evaluate.py and search.py (0: --image_size); see RESULTS.md")
    p.add_argument("--eval_flip", action="store_true",
                   help="validation, evaluate.py and search.py embed each photo and its mirror image, averaged")
    p.add_argument("--querybank", action="store_true",
                   help="evaluate.py and search.py rank with querybank normalisation against the training "
                        "captions and photos (not the per-epoch validation: see RESULTS.md)")
    # model
    p.add_argument("--image_encoder", default="mobilenet_v3_small",
                   choices=["mobilenet_v3_small", *LITE_MODELS], help="image tower")
    p.add_argument("--text_encoder", default="distilbert-base-uncased",
                   help="Hugging Face encoder name or local folder")
    p.add_argument("--text_pooling", default="cls", choices=["cls", "mean"], help="text pooling")
    p.add_argument("--embedding_dim", type=positive_int, default=512, help="joint embedding size")
    p.add_argument("--no_pretrained", action="store_true", help="random-init towers (no downloads)")
    p.add_argument("--image_weights", default=None, help="local state dict for the image tower")
    p.add_argument("--freeze_image", action="store_true", help="keep the image tower fixed (LiT)")
    p.add_argument("--freeze_image_blocks", type=non_negative_int, default=0,
                   help="keep the stem and the first N blocks of an efficientnet_lite tower fixed")
    p.add_argument("--image_cache_views", type=non_negative_int, default=0,
                   help="precompute the frozen blocks' output for N augmented views of each "
                        "photo once, and train the rest of the image tower on them (0: off)")
    p.add_argument("--recompute_image_blocks", action="store_true",
                   help="run the tuned efficientnet_lite blocks again in the backward pass instead of "
                        "keeping their activations: the same steps in less memory")
    p.add_argument("--freeze_text_layers", type=int_at_least(-1), default=-1,
                   help="keep the word embeddings and the first N text layers fixed (-1: none)")
    p.add_argument("--temperature", type=positive_float, default=0.07, help="initial softmax temperature")
    p.add_argument("--fixed_temperature", action="store_true", help="do not learn the temperature")
    p.add_argument("--no_same_image_mask", action="store_true",
                   help="treat other captions of the same photo in a batch as negatives")
    # optim
    p.add_argument("--batch_size", type=positive_int, default=32,
                   help="pairs per step (per process under torchrun)")
    p.add_argument("--lr", type=non_negative_float, default=5e-5, help="peak learning rate of the towers")
    p.add_argument("--image_lr", type=non_negative_float, default=0.0,
                   help="peak learning rate of the image tower (0: --lr)")
    p.add_argument("--head_lr", type=non_negative_float, default=1e-3,
                   help="peak learning rate of the projection heads and temperature")
    p.add_argument("--weight_decay", type=non_negative_float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--epochs", type=positive_int, default=20, help="passes over the training captions")
    p.add_argument("--captions_per_image", type=non_negative_int, default=0,
                   help="captions of each photo per epoch, drawn at random (0: all)")
    p.add_argument("--warmup_steps", type=non_negative_int, default=200,
                   help="linear warm-up, then cosine decay")
    p.add_argument("--max_steps", type=non_negative_int, default=0, help="stop after this many steps (0: no limit)")
    # run
    p.add_argument("--validate_from", type=positive_int, default=1,
                   help="validate (and pick best.pt) from this epoch on; earlier epochs only save last.pt")
    p.add_argument("--save_every", type=positive_int, default=5, help="keep checkpoint_epoch_N.pt every N epochs")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument("--no_amp", action="store_true", help="fp32 everywhere (no bf16 autocast)")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--resume", action="store_true", help="continue from <model_dir>/last.pt")
    p.add_argument("--no_export", action="store_true",
                   help="do not export best.pt to ONNX when training ends (search then runs on PyTorch)")
    return p


def get_args(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.freeze_image_blocks and args.image_encoder not in LITE_MODELS:
        p.error("--freeze_image_blocks needs an efficientnet_lite --image_encoder")
    if args.freeze_image_blocks > LITE_MODELS.get(args.image_encoder, 0):
        p.error(f"--freeze_image_blocks: {args.image_encoder} has {LITE_MODELS[args.image_encoder]} blocks")
    if args.recompute_image_blocks and args.image_encoder not in LITE_MODELS:
        p.error("--recompute_image_blocks needs an efficientnet_lite --image_encoder")
    if args.image_cache_views and not args.freeze_image_blocks:
        p.error("--image_cache_views needs --freeze_image_blocks (the blocks whose output is cached)")
    if args.validate_from > args.epochs:
        p.error(f"--validate_from {args.validate_from} is after the last epoch ({args.epochs})")
    if args.no_pretrained and args.image_weights:
        p.error("--no_pretrained and --image_weights contradict each other")
    return args


def model_file(args, name="last.pt"):
    """A file of the run in --model_dir; last.pt is written every epoch and on Ctrl-C, and --resume reads it."""
    return os.path.join(args.model_dir, name)


def param_groups(model, args):
    """The text tower at --lr, the image tower at --image_lr (default --lr), the new heads and
    the temperature at --head_lr; no decay on biases, norms or the temperature."""
    lrs = {"text_tower": args.lr, "image_tower": args.image_lr or args.lr}
    groups = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            lr = lrs.get(name.split(".", 1)[0], args.head_lr)
            groups.setdefault((lr, p.ndim >= 2), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": args.weight_decay if decay else 0.0}
            for (lr, decay), ps in groups.items()]


def frozen_modules(model, args):
    """The towers' parts that stay fixed: no gradient, and eval mode (BatchNorm statistics, dropout)."""
    modules = [model.image_tower] if args.freeze_image else []
    if args.freeze_image_blocks:
        modules += model.image_tower.trunk_modules(args.freeze_image_blocks)
    if args.freeze_text_layers >= 0:
        modules += model.text_trunk_modules(args.freeze_text_layers)
    return modules


def lr_factor(step, warmup, total):
    """Linear warm-up to 1, then cosine decay to 0 at `total` steps (pure: a resumed run replays it)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def main(argv=None):
    args = get_args(argv)
    keep_freed_memory()
    with stop_signals(), torchrun_device(args.device) as device:
        return run(args, device)


def run(args, device):
    """Build, then train epoch after epoch; Ctrl-C or SIGTERM save last.pt with the position within
    the epoch. Returns the exit status: 0, or 130 (Ctrl-C) and 143 (SIGTERM) as a shell reports them."""
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = rank_and_world()
    torch.manual_seed(args.seed + rank)  # dropout differs per process; DDP copies rank 0's weights
    train_set, pairs_per_epoch, steps_per_epoch, total_steps = build_data(args, world)
    r = build_run(args, device, rank == 0, total_steps)
    # DDP averages the gradients in backward (model.gather_batch: why that mean is the global batch's). static_graph:
    # a text tower with a pooler (BERT) computes weights no loss uses; DDP finds them once, not failing at step 2.
    net = DDP(r.model, device_ids=[device.index] if device.type == "cuda" else None,
              static_graph=True) if ddp else r.model
    trunk_cache = val = None  # the frozen image blocks' output, computed once: training views, val photos
    if args.image_cache_views:
        trunk_cache = cache_image_trunk(r.model, train_set, args.freeze_image_blocks, args.image_cache_views,
                                        args.num_workers, device)
    if args.freeze_image_blocks and r.master:
        val = cache_val_trunk(r.model, args.freeze_image_blocks, args.data_dir, eval_image_size(r.model_args),
                              r.model_args.get("eval_flip", False), device)
    if r.master:
        n_params = sum(p.numel() for p in r.model.parameters() if p.requires_grad)
        print(f"training on {device}{f' x {world} processes' if ddp else ''}: {pairs_per_epoch} pairs/epoch, "
              f"{steps_per_epoch} steps/epoch of {world * args.batch_size} pairs, {total_steps} steps, "
              f"{n_params / 1e6:.1f}M trainable parameters")
        print(precision_summary(device, not args.no_amp))
    try:
        train_epochs(r, net, train_set, trunk_cache, val)
    except KeyboardInterrupt as e:
        if r.master:  # keep what was learned: weights, optimizer and the position within the epoch
            save(r, "last.pt")
            print(f"\n{'terminated' if isinstance(e, Terminated) else 'interrupted'}: saved {model_file(args)} "
                  f"(epoch {r.state['epoch'] + 1}, step {r.state['step']}); continue with --resume", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130  # 128 + the signal's number, as a shell reports it
    validated = [h["val"] for h in r.state["history"] if h["val"] is not None]
    if validated:
        print(format_metrics(max(validated, key=lambda m: m["rsum"])))
    best = model_file(args, "best.pt")
    if r.master and not args.no_export and os.path.isfile(best):
        try:  # for search (export.write_export); a failure costs a warning, not the run, whose result is saved
            print(f"exported {best} for search: {write_export(best)}")
        except (Exception, SystemExit) as e:
            print(f"warning: could not export {best} ({e}); search will run it on PyTorch. Try again with "
                  f"python export.py --checkpoint {best}", file=sys.stderr)
    return 0


def train_epochs(r, net, train_set, trunk_cache=None, val=None):
    """Train up to --epochs or --max_steps, on this process's share of each epoch; rank 0 ends each one."""
    args, state = r.args, r.state
    rank, world = rank_and_world()
    # With the feature cache the loader only tokenizes captions, a small part of a step: no
    # workers. A worker forked after the first epoch shares the pages of the activations the last
    # step freed, and each page training writes into again gets copied: up to twice the memory.
    workers = 0 if trunk_cache is not None else args.num_workers
    while state["epoch"] < args.epochs and state["step"] < r.total_steps:
        train_set.epoch = state["epoch"]
        # Sharding our own permutation (not DistributedSampler) keeps a mid-epoch resume exact.
        order = epoch_order(train_set.image_ids, args.seed, state["epoch"], args.captions_per_image)
        order = shard_order(order, args.batch_size, rank, world)[state["epoch_step"] * args.batch_size:]
        loader = DataLoader(train_set, batch_size=args.batch_size, sampler=order, drop_last=True,
                            collate_fn=Collate(r.tokenizer), num_workers=workers,
                            pin_memory=r.device.type == "cuda", worker_init_fn=ignore_sigterm)
        loss, pairs_per_s = train_epoch(net, loader, r, trunk_cache)
        if r.master:
            end_epoch(r, loss, pairs_per_s, val)
        else:
            state["epoch"], state["epoch_step"] = state["epoch"] + 1, 0
        if isinstance(net, DDP):
            dist.barrier()  # the others wait while rank 0 validates and saves


def build_data(args, world):
    """The training split, checked against the batch of all `world` processes. Returns (train_set,
    pairs_per_epoch, steps_per_epoch, total_steps)."""
    os.makedirs(args.model_dir, exist_ok=True)
    if os.path.exists(model_file(args)) and not args.resume:
        raise SystemExit(f"error: {model_file(args)} exists; pass --resume to continue that run, or "
                         "choose another --model_dir (nothing is overwritten).")
    train_set = PairDataset(args.data_dir, "train", args.image_size, augment=True, seed=args.seed,
                            with_images=not args.image_cache_views)
    read_captions(args.data_dir, "val")  # fail now, not after the first epoch, if there is no val split
    pairs_per_epoch = len(epoch_order(train_set.image_ids, args.seed, 0, args.captions_per_image))
    steps_per_epoch = pairs_per_epoch // (world * args.batch_size)
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch_size {args.batch_size}{f' x {world} processes' if world > 1 else ''} is "
                         f"larger than the training split ({pairs_per_epoch} pairs per epoch); use a smaller batch.")
    if world > 1 and args.image_cache_views:
        raise SystemExit("error: --image_cache_views trains on one process only; drop it under torchrun.")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    return train_set, pairs_per_epoch, steps_per_epoch, total_steps


def build_run(args, device, master, total_steps):
    """The run: model, tokenizer, optimizer and training state, from <model_dir>/last.pt when resuming."""
    last = model_file(args)
    ckpt = read_checkpoint(last) if args.resume and os.path.exists(last) else None
    if args.resume and ckpt is None and master:
        print(f"no {last} to resume from; starting a new run")
    model_args = training_args(args, ckpt)
    model = model_from_args(model_args, pretrained=None if ckpt is None else False).to(device)
    model.image_tower.recompute = args.recompute_image_blocks
    for m in frozen_modules(model, args):
        m.requires_grad_(False)
    tokenizer = load_tokenizer(model_args["text_encoder"])
    if master:
        tokenizer.save_pretrained(model_file(args, "tokenizer"))
    optimizer = torch.optim.AdamW(param_groups(model, args))
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]
    state = {"epoch": 0, "step": 0, "epoch_step": 0, "best_rsum": -1.0, "history": []}
    if ckpt is not None:
        state = resume_training(ckpt, last, model, optimizer, state)
        if master:
            print(f"resumed from {last}: epoch {state['epoch']}, step {state['step']}")
    # What the epochs share. model_args: what checkpoints record as args; state: all a resume needs
    # besides weights and optimizer (`epoch` counts finished epochs, `epoch_step` the batches of the
    # current one already trained); master: the one process that validates, logs and writes files.
    return SimpleNamespace(args=args, device=device, master=master, total_steps=total_steps, model=model,
                           model_args=model_args, tokenizer=tokenizer, optimizer=optimizer, state=state)


def end_epoch(r, loss, pairs_per_s, val=None):
    """Validate the epoch just trained (from --validate_from on, and always the last, so a run that
    --max_steps ends early writes best.pt), record, save and print it. val: cache_val_trunk's output."""
    args, state, epoch = r.args, r.state, r.state["epoch"] + 1
    metrics = None
    if epoch >= args.validate_from or epoch >= args.epochs or state["step"] >= r.total_steps:
        options = {"eval_image_size": eval_image_size(r.model_args), "eval_flip": r.model_args.get("eval_flip", False)}
        metrics = evaluate_split(r.model, r.tokenizer, args.data_dir, "val", options,
                                 num_workers=min(args.num_workers, 2), image_embeddings=val)
    state["history"].append({"epoch": epoch, "step": state["step"], "loss": loss, "pairs_per_s": pairs_per_s,
                             "logit_scale": r.model.logit_scale.exp().item(), "val": metrics})
    improved = metrics is not None and metrics["rsum"] > state["best_rsum"]
    if improved:
        state["best_rsum"] = metrics["rsum"]
    # Until here a Ctrl-C saves (epoch, all its steps done): a resume goes straight to validation.
    state["epoch"], state["epoch_step"] = epoch, 0
    write_epoch(r, improved)
    val_line = (f"val R@1 t2i {metrics['t2i']['R@1']:.1f} i2t {metrics['i2t']['R@1']:.1f} | rsum "
                f"{metrics['rsum']:.1f}{' (best)' if improved else ''}" if metrics else "not validated")
    print(f"epoch {epoch} | loss {loss:.3f} | {val_line} | {pairs_per_s:.0f} pairs/s")


def write_epoch(r, improved):
    """last.pt, best.pt if the R-sum improved, checkpoint_epoch_N.pt every --save_every, the log and curves."""
    save(r, "last.pt")
    if improved:
        save(r, "best.pt", with_optimizer=False)
    if r.state["epoch"] % r.args.save_every == 0:
        save(r, f"checkpoint_epoch_{r.state['epoch']}.pt")
    with atomic_write(model_file(r.args, "metrics.jsonl")) as f:
        f.writelines(json.dumps(h) + "\n" for h in r.state["history"])
    plot_curves(r.state["history"], model_file(r.args, "training_curves.png"))


def save(r, name, with_optimizer=True):
    """<model_dir>/name (checkpoint.save_training); best.pt goes without the optimizer."""
    save_training(model_file(r.args, name), r.model, r.model_args, r.state, r.optimizer if with_optimizer else None)


def batch_loss(net, batch, device, same_image_mask=True, trunk_feats=None, n_blocks=0):
    """InfoNCE of one batch; under torchrun, of the global batch of every process. trunk_feats: the
    frozen image blocks' cached output for this batch, standing in for the photos (single process)."""
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    attention_mask = batch["attention_mask"].to(device, non_blocking=True)
    if trunk_feats is None:
        img_emb, txt_emb, scale = net(batch["images"].to(device, non_blocking=True), input_ids, attention_mask)
    else:
        img_emb = net.encode_image_trunk(trunk_feats.to(device), n_blocks)
        txt_emb, scale = net.encode_texts(input_ids, attention_mask), net.logit_scale.exp()
    # (N*B, D), (N*B, D), (N*B,): the same-photo mask must span the global batch, so it is built
    # from the gathered image ids, not from this process's batch alone.
    img_emb, txt_emb, image_ids = gather_batch(img_emb, txt_emb, batch["image_ids"].to(device))
    same = image_ids[:, None] == image_ids[None, :] if same_image_mask else None
    return info_nce(img_emb, txt_emb, scale, same)


def optimizer_step(model, optimizer, loss):
    """Backward and one AdamW step; the learned temperature is clamped after it."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.clamp_logit_scale()


def train_epoch(net, loader, r, trunk_cache=None):
    """One pass over `loader`, counting r.state's step and epoch_step; `net`: the model, or its DDP
    wrapper. trunk_cache: cache_image_trunk's output. Returns (mean loss, global pairs per second)."""
    args, state = r.args, r.state
    world = dist.get_world_size() if isinstance(net, DDP) else 1
    net.train()
    for m in frozen_modules(r.model, args):
        m.eval()
    bar = tqdm(held(loader), desc=f"epoch {state['epoch'] + 1}/{args.epochs}", unit="batch", leave=False,
               initial=state["epoch_step"], total=state["epoch_step"] + len(loader),
               disable=world > 1 and dist.get_rank() > 0)
    t0, pairs, losses = time.time(), 0, []
    for batch in bar:
        for g in r.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(state["step"], args.warmup_steps, r.total_steps)
        feats = None if trunk_cache is None else cached_views(trunk_cache, batch["image_ids"], args.seed, state["step"])
        loss = batch_loss(net, batch, r.device, not args.no_same_image_mask, feats, args.freeze_image_blocks)
        if not torch.isfinite(loss):
            raise SystemExit(f"error: loss became {loss.item()} at step {state['step']}; stopping "
                             f"({last_kept(args.model_dir)}). Try a lower --lr.")
        optimizer_step(r.model, r.optimizer, loss)
        state["step"] += 1
        state["epoch_step"] += 1
        pairs += len(batch["image_ids"]) * world
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", pairs_s=f"{pairs / (time.time() - t0):.0f}")
        if state["step"] >= r.total_steps:
            break
    bar.close()
    return sum(losses) / max(len(losses), 1), pairs / max(time.time() - t0, 1e-9)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:  # outside the training loop, or a second Ctrl-C while saving
        print("\ninterrupted; checkpoints already written are complete (writes are atomic)", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
