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

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset import Collate, PairDataset, read_captions
from model import (
    gather_batch,
    info_nce,
    load_tokenizer,
    load_weights,
    model_from_args,
    pick_device,
    read_checkpoint,
    save_checkpoint,
)
from retrieval import evaluate_split, format_metrics


class ArgParser(argparse.ArgumentParser):
    def convert_arg_line_to_args(self, line):
        # Flag files (@configs/offline.txt) hold "--flag value" per line and # comments.
        return line.split("#", 1)[0].split()


def get_args(argv=None):
    p = ArgParser(description=__doc__, fromfile_prefix_chars="@",
                  formatter_class=argparse.RawDescriptionHelpFormatter)
    # data
    p.add_argument("--data_dir", default="data/flickr8k", help="output of preprocess_flickr8k.py")
    p.add_argument("--model_dir", default="models", help="where checkpoints and logs go")
    p.add_argument("--image_size", type=int, default=224, help="image side in pixels")
    p.add_argument("--num_workers", type=int, default=4, help="DataLoader worker processes")
    # model
    p.add_argument("--image_encoder", default="mobilenet_v3_small",
                   choices=["mobilenet_v3_small", "efficientnet_lite0"], help="image tower")
    p.add_argument("--text_encoder", default="distilbert-base-uncased",
                   help="Hugging Face encoder name or local folder")
    p.add_argument("--text_pooling", default="cls", choices=["cls", "mean"], help="text pooling")
    p.add_argument("--embedding_dim", type=int, default=512, help="joint embedding size")
    p.add_argument("--no_pretrained", action="store_true", help="random-init towers (no downloads)")
    p.add_argument("--image_weights", default=None, help="local state dict for the image tower")
    p.add_argument("--freeze_image", action="store_true", help="keep the image tower fixed (LiT)")
    p.add_argument("--temperature", type=float, default=0.07, help="initial softmax temperature")
    p.add_argument("--fixed_temperature", action="store_true", help="do not learn the temperature")
    p.add_argument("--no_same_image_mask", action="store_true",
                   help="treat other captions of the same photo in a batch as negatives")
    # optim
    p.add_argument("--batch_size", type=int, default=32, help="pairs per step (per process under torchrun)")
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate of the towers")
    p.add_argument("--head_lr", type=float, default=1e-3,
                   help="peak learning rate of the projection heads and temperature")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="AdamW weight decay")
    p.add_argument("--epochs", type=int, default=20, help="passes over the training captions")
    p.add_argument("--warmup_steps", type=int, default=200, help="linear warm-up, then cosine decay")
    p.add_argument("--max_steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    # run
    p.add_argument("--save_every", type=int, default=5, help="keep checkpoint_epoch_N.pt every N epochs")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, mps or cpu")
    p.add_argument("--no_amp", action="store_true", help="fp32 everywhere (no bf16 autocast)")
    p.add_argument("--seed", type=int, default=42, help="random seed")
    p.add_argument("--resume", action="store_true", help="continue from <model_dir>/last.pt")
    args = p.parse_args(argv)
    for name in ("batch_size", "epochs", "embedding_dim", "image_size", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.num_workers < 0 or args.max_steps < 0 or args.warmup_steps < 0:
        p.error("--num_workers, --max_steps and --warmup_steps cannot be negative")
    if not 0 < args.temperature < math.inf:  # also refuses nan
        p.error("--temperature must be a positive number")
    if not all(0 <= x < math.inf for x in (args.lr, args.head_lr, args.weight_decay)):
        p.error("--lr, --head_lr and --weight_decay must be non-negative numbers")
    if args.no_pretrained and args.image_weights:
        p.error("--no_pretrained and --image_weights contradict each other")
    return args


def param_groups(model, args):
    """Towers at --lr, the new heads and the temperature at --head_lr; no decay on biases,
    norms or the temperature."""
    groups = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        head = not name.startswith(("image_tower.", "text_tower."))
        decay = p.ndim >= 2
        groups.setdefault((head, decay), []).append(p)
    return [{"params": ps, "lr": args.head_lr if head else args.lr,
             "weight_decay": args.weight_decay if decay else 0.0}
            for (head, decay), ps in groups.items()]


def lr_factor(step, warmup, total):
    """Linear warm-up to 1, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def epoch_order(n, seed, epoch):
    """The epoch's shuffle, a pure function of (seed, epoch), so resuming replays it."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()


def shard_order(order, batch_size, rank=0, world=1):
    """This process's part of the epoch's order, in whole batches. Process r takes the r-th B of
    every N*B, so step s of all N processes together trains on order[s*N*B:(s+1)*N*B], gathered
    in that order: N processes at batch B see the batches of one process at batch N*B."""
    steps = len(order) // (world * batch_size)
    blocks = torch.tensor(order[:steps * world * batch_size]).view(steps, world, batch_size)
    return blocks[:, rank].flatten().tolist()


def plot_curves(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(epochs, [h["loss"] for h in history], marker="o")
    a.set(xlabel="epoch", ylabel="training loss", title="InfoNCE loss")
    for d, label in (("t2i", "text→image"), ("i2t", "image→text")):
        b.plot(epochs, [h["val"][d]["R@1"] for h in history], marker="o", label=f"{label} R@1")
        b.plot(epochs, [h["val"][d]["R@10"] for h in history], marker=".", ls="--", label=f"{label} R@10")
    b.set(xlabel="epoch", ylabel="recall (%)", title="validation recall")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = get_args(argv)
    # torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python train.py` sets none of them.
    ddp = "RANK" in os.environ
    device = pick_device(args.device, int(os.environ["LOCAL_RANK"]) if ddp else None)
    if not ddp:
        return run(args, device)
    if device.type == "mps":
        raise SystemExit("error: torchrun trains on CUDA (nccl) or CPU (gloo), not MPS; pass --device cpu.")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # so collectives and barrier() use this process's GPU
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return run(args, device)
    finally:
        dist.destroy_process_group()


def run(args, device):
    ddp = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)
    master = rank == 0  # the one process that validates, logs and writes files
    log = print if master else lambda *a, **k: None
    torch.manual_seed(args.seed + rank)  # dropout differs per process; DDP copies rank 0's weights
    os.makedirs(args.model_dir, exist_ok=True)
    last_path = os.path.join(args.model_dir, "last.pt")
    if os.path.exists(last_path) and not args.resume:
        raise SystemExit(f"error: {last_path} exists; pass --resume to continue that run, or "
                         "choose another --model_dir (nothing is overwritten).")

    train_set = PairDataset(args.data_dir, "train", args.image_size, augment=True, seed=args.seed)
    read_captions(args.data_dir, "val")  # fail now, not after the first epoch, if there is no val split
    steps_per_epoch = len(train_set) // (world * args.batch_size)
    if steps_per_epoch == 0:
        raise SystemExit(f"error: --batch_size {args.batch_size}{f' x {world} processes' if ddp else ''} is larger "
                         f"than the training split ({len(train_set)} pairs); use a smaller batch.")
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)

    ckpt = read_checkpoint(last_path) if args.resume and os.path.exists(last_path) else None
    if args.resume and ckpt is None:
        log(f"no {last_path} to resume from; starting a new run")
    model_args = {**vars(args), "amp": not args.no_amp}
    if ckpt is not None:
        # The model is rebuilt as it was trained; flags given now only steer the schedule.
        model_args.update({k: ckpt["args"][k] for k in ckpt["args"] if k.startswith(("image_", "text_"))
                           or k in ("embedding_dim", "temperature", "fixed_temperature", "no_pretrained")})
    model = model_from_args(model_args, pretrained=None if ckpt is None else False).to(device)
    if args.freeze_image:
        model.image_tower.requires_grad_(False)
    tokenizer = load_tokenizer(model_args["text_encoder"])
    if master:
        tokenizer.save_pretrained(os.path.join(args.model_dir, "tokenizer"))
    optimizer = torch.optim.AdamW(param_groups(model, args))
    for g in optimizer.param_groups:
        g["base_lr"] = g["lr"]

    # Everything a resume needs besides weights and optimizer. `epoch` counts finished epochs;
    # `epoch_step` counts the batches of the current one already trained.
    state = {"epoch": 0, "step": 0, "epoch_step": 0, "best_rsum": -1.0, "history": []}
    if ckpt is not None:
        load_weights(model, ckpt["model"], last_path)
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            state = {k: ckpt[k] for k in state}
            torch.set_rng_state(ckpt["rng_state"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise SystemExit(f"error: cannot resume from {last_path} ({type(e).__name__}: {e}): it is not a "
                             "training checkpoint of this train.py, or the run used another --freeze_image. "
                             "Resume with the run's own flags, or start a new --model_dir.")
        log(f"resumed from {last_path}: epoch {state['epoch']}, step {state['step']}")
    # DDP averages gradients across processes in backward (model.gather_batch explains why that
    # mean is the gradient of the global batch). static_graph: a text tower with a pooler (BERT)
    # computes weights no loss uses; DDP finds them once rather than failing at the second step.
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
              static_graph=True) if ddp else model

    def save(path):
        # Never let a diverged model replace a good checkpoint (the loss check misses NaN gradients).
        if not torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all():
            raise SystemExit(f"error: the weights became NaN or infinite by step {state['step']}; "
                             f"stopping without saving them ({kept(last_path)}). Try a lower --lr.")
        metrics = state["history"][-1]["val"] if state["history"] else None
        save_checkpoint(path, model, model_args, state["epoch"], metrics, optimizer,
                        rng_state=torch.get_rng_state(), **{k: v for k, v in state.items() if k != "epoch"})

    collate = Collate(tokenizer)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(f"training on {device}{f' x {world} processes' if ddp else ''}: {len(train_set)} pairs, "
        f"{steps_per_epoch} steps/epoch of {world * args.batch_size} pairs, {total_steps} steps, "
        f"{n_params / 1e6:.1f}M trainable parameters")
    try:
        while state["epoch"] < args.epochs and state["step"] < total_steps:
            epoch = state["epoch"]
            train_set.epoch = epoch
            # Sharding our own permutation (not DistributedSampler) keeps a mid-epoch resume exact.
            order = shard_order(epoch_order(len(train_set), args.seed, epoch), args.batch_size, rank, world)
            order = order[state["epoch_step"] * args.batch_size:]
            loader = DataLoader(train_set, batch_size=args.batch_size, sampler=order, drop_last=True,
                                collate_fn=collate, num_workers=args.num_workers,
                                pin_memory=device.type == "cuda")
            loss, pairs_per_s = train_epoch(net, loader, optimizer, state, args, device, total_steps,
                                            steps_per_epoch, last_path)
            if not master:
                state["epoch"], state["epoch_step"] = epoch + 1, 0
                dist.barrier()  # wait while rank 0 validates and saves
                continue
            metrics = evaluate_split(model, tokenizer, args.data_dir, "val", model_args["image_size"],
                                     device, num_workers=min(args.num_workers, 2))
            state["history"].append({"epoch": epoch + 1, "step": state["step"], "loss": loss,
                                     "pairs_per_s": pairs_per_s,
                                     "logit_scale": model.logit_scale.exp().item(), "val": metrics})
            improved = metrics["rsum"] > state["best_rsum"]
            state["best_rsum"] = max(state["best_rsum"], metrics["rsum"])
            # Until here a Ctrl-C saves (epoch, all its steps done): a resume goes straight to validation.
            state["epoch"], state["epoch_step"] = epoch + 1, 0
            save(last_path)
            if improved:
                save(os.path.join(args.model_dir, "best.pt"))
            if (epoch + 1) % args.save_every == 0:
                save(os.path.join(args.model_dir, f"checkpoint_epoch_{epoch + 1}.pt"))
            with open(os.path.join(args.model_dir, "metrics.jsonl"), "w") as f:
                f.writelines(json.dumps(h) + "\n" for h in state["history"])
            plot_curves(state["history"], os.path.join(args.model_dir, "training_curves.png"))
            print(f"epoch {epoch + 1} | loss {loss:.3f} | val R@1 t2i {metrics['t2i']['R@1']:.1f} "
                  f"i2t {metrics['i2t']['R@1']:.1f} | rsum {metrics['rsum']:.1f}"
                  f"{' (best)' if improved else ''} | {pairs_per_s:.0f} pairs/s")
            if ddp:
                dist.barrier()
    except KeyboardInterrupt:
        # Keep what was learned: weights, optimizer and the position within the epoch.
        if master:
            save(last_path)
            print(f"\ninterrupted: saved {last_path} (epoch {state['epoch'] + 1}, step {state['step']}); "
                  "continue with --resume", file=sys.stderr)
        return 130
    if state["history"]:
        print(format_metrics(max(state["history"], key=lambda h: h["val"]["rsum"])["val"]))
    return 0


def batch_loss(net, batch, device, same_image_mask=True):
    """InfoNCE of one batch; under torchrun, of the global batch of every process."""
    img_emb, txt_emb, scale = net(batch["images"].to(device, non_blocking=True),
                                  batch["input_ids"].to(device, non_blocking=True),
                                  batch["attention_mask"].to(device, non_blocking=True))
    # (N*B, D), (N*B, D), (N*B,): the same-photo mask must span the global batch, so it is built
    # from the gathered image ids, not from this process's batch alone.
    img_emb, txt_emb, image_ids = gather_batch(img_emb, txt_emb, batch["image_ids"].to(device))
    same = image_ids[:, None] == image_ids[None, :] if same_image_mask else None
    return info_nce(img_emb, txt_emb, scale, same)


def train_epoch(net, loader, optimizer, state, args, device, total_steps, steps_per_epoch, last_path):
    """One pass over `loader`; updates state["step"] and state["epoch_step"] after every step.
    `net` is the model, or its DDP wrapper under torchrun. Returns (mean loss, global pairs per second)."""
    model = net.module if isinstance(net, DDP) else net
    world = dist.get_world_size() if isinstance(net, DDP) else 1
    net.train()
    if args.freeze_image:
        model.image_tower.eval()  # frozen BatchNorm statistics too
    bar = tqdm(loader, desc=f"epoch {state['epoch'] + 1}/{args.epochs}", unit="batch", leave=False,
               initial=state["epoch_step"], total=steps_per_epoch, disable=world > 1 and dist.get_rank() > 0)
    t0, pairs, losses = time.time(), 0, []
    for batch in bar:
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(state["step"], args.warmup_steps, total_steps)
        loss = batch_loss(net, batch, device, not args.no_same_image_mask)
        if not torch.isfinite(loss):
            raise SystemExit(f"error: loss became {loss.item()} at step {state['step']}; stopping "
                             f"({kept(last_path)}). Try a lower --lr.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale()
        state["step"] += 1
        state["epoch_step"] += 1
        pairs += len(batch["images"]) * world
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", pairs_s=f"{pairs / (time.time() - t0):.0f}")
        if state["step"] >= total_steps:
            break
    bar.close()
    return sum(losses) / max(len(losses), 1), pairs / max(time.time() - t0, 1e-9)


def kept(last_path):
    return f"the last good checkpoint {last_path} is kept" if os.path.exists(last_path) else "no checkpoint yet"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # outside the training loop, or a second Ctrl-C while saving
        print("\ninterrupted; checkpoints already written are complete (writes are atomic)", file=sys.stderr)
        sys.exit(130)
