"""Which pairs each step trains on, and at what learning rate: the epoch's order of pairs, each
process's shard of it under torchrun, and the warm-up and cosine schedule. Pure functions of their
arguments, so a resumed run replays them exactly. Example:

    python -c "import schedule; print(schedule.epoch_order([0, 0, 1, 1], seed=42, epoch=0))"
"""

import math

import torch


def lr_factor(step, warmup, total):
    """Linear warm-up to 1, then cosine decay to 0 at `total` steps."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def epoch_order(image_ids, seed, epoch, captions_per_image=0):
    """Indices of the epoch's pairs in training order, a pure function of (seed, epoch), so
    resuming replays it. captions_per_image k > 0 keeps k random captions of each photo (all of
    a photo that has fewer): with k = 1 an epoch shows every photo once."""
    g = torch.Generator().manual_seed(seed + epoch)
    ids = torch.as_tensor(image_ids)
    keep = torch.arange(len(ids))
    if captions_per_image:
        # Order the pairs by photo, and within a photo at random; keep the first k of each.
        by_priority = torch.argsort(torch.rand(len(ids), generator=g))
        order = by_priority[torch.argsort(ids[by_priority], stable=True)]
        sorted_ids = ids[order].contiguous()
        rank = torch.arange(len(ids)) - torch.searchsorted(sorted_ids, sorted_ids)  # 0, 1, ... per photo
        keep = order[rank < captions_per_image]
    return keep[torch.randperm(len(keep), generator=g)].tolist()


def shard_order(order, batch_size, rank=0, world=1):
    """This process's part of the epoch's order, in whole batches. Process r takes the r-th B of
    every N*B, so step s of all N processes together trains on order[s*N*B:(s+1)*N*B], gathered
    in that order: N processes at batch B see the batches of one process at batch N*B."""
    steps = len(order) // (world * batch_size)
    blocks = torch.tensor(order[:steps * world * batch_size]).view(steps, world, batch_size)
    return blocks[:, rank].flatten().tolist()
