"""Photo encoding spread over processes with torchrun: each process encodes its share of the photos
an index update needs, and rank 0, the one process that reads and writes the index, gathers them.

    torchrun --nproc_per_node 4 search.py --images_dir BIG --index_only
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        search.py --images_list all.txt --index_only

Rank 0 runs the update as a single process does (search.py's index_gallery), with encode_files
in place of index.encode_image_files: it sends the list of files to encode to every process, each
encodes every world-th file of each round of ROUND x world files, and rank 0 puts the embeddings
back in the list's order. The others only encode (`serve`). So the index is the single-process one,
up to the float16 rounding of embeddings computed in other batches. The photos' paths must be the
same on every machine (a shared file system).

Only file names and embeddings travel, as Python objects over gloo (CPU memory, one round at a time:
ROUND x D x 2 bytes a process). On GPUs each process encodes on cuda:LOCAL_RANK with PyTorch, and
the group also has NCCL for CUDA tensors ("cpu:gloo,cuda:nccl"), which none of these exchanges needs.

A process that dies makes the others' next exchange fail (or torchrun stops them); rank 0 then exits
with an error before it has written anything, and the index on disk stays the one from before (its
writes are atomic anyway). Ctrl-C stops the run the same way: unlike a single process, which keeps
the photos encoded so far, a sharded run keeps nothing of the interrupted update.
"""

import os
import re

import numpy as np

from index import encode_image_files

ROUND = 1024  # photos a process encodes between two gatherings: 1 MB of float16 at D=512


def active():
    """Whether torchrun started this process (it sets RANK, LOCAL_RANK and WORLD_SIZE)."""
    return "RANK" in os.environ


def start(device_name):
    """Join torchrun's process group. Returns (rank, world size, this process's device name)."""
    import torch
    import torch.distributed as dist

    from device import pick_device
    device = pick_device(device_name, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), str(device)


def finish():
    import torch.distributed as dist
    dist.destroy_process_group()


def encode_files(encoder, paths, image_size, batch_size=32, num_workers=0):
    """On rank 0, what index.encode_image_files does, with every process encoding a share:
    (emb (M, D) float16 of the readable files in order, errors: one string per file, '' where read)."""
    import torch.distributed as dist
    _exchange(dist.broadcast_object_list, [paths], src=0)
    return _encode_rounds(encoder, paths, image_size, batch_size, num_workers)


def serve(encoder, batch_size, num_workers):
    """On the other ranks: encode shares of the lists rank 0 sends until it sends None (stop)."""
    import torch.distributed as dist
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        _encode_rounds(encoder, box[0], encoder.image_size, batch_size, num_workers)


def stop():
    """On rank 0, once the index's photos are encoded: the other ranks' serve() returns."""
    import torch.distributed as dist
    _exchange(dist.broadcast_object_list, [None], src=0)


def _exchange(collective, *args, **kwargs):
    """A collective call on rank 0, turning a peer's failure into a clear error."""
    try:
        collective(*args, **kwargs)
    except RuntimeError as e:  # torch's DistBackendError and gloo's closed connections are RuntimeErrors
        why = re.sub(r"^\[[^\]]*\]\s*", "", str(e).splitlines()[0])[:200]  # less gloo's source file and line
        raise SystemExit(f"error: a process of the sharded run failed ({why}); the index was not changed")


def _encode_rounds(encoder, paths, image_size, batch_size, num_workers):
    """This process's share of `paths`, round by round; rank 0 gathers every share and returns
    them in the order of `paths` (other ranks return None)."""
    import torch.distributed as dist
    from tqdm import tqdm
    rank, world = dist.get_rank(), dist.get_world_size()
    embs, errors = [np.empty((0, encoder.dim), np.float16)], []
    step = ROUND * world
    with tqdm(total=len(paths), desc=f"indexing photos ({world} processes)", unit="photo", disable=rank > 0) as bar:
        for lo in range(0, len(paths), step):
            chunk = paths[lo:lo + step]
            mine = chunk[rank::world]
            emb, errs = encode_image_files(encoder, mine, image_size, batch_size, num_workers, progress=False)
            if len(errs) < len(mine):
                raise KeyboardInterrupt  # stopped in this process: the whole run stops, nothing is written
            parts = [None] * world if rank == 0 else None
            if rank > 0:
                dist.gather_object((emb, errs), parts, dst=0)
                continue
            _exchange(dist.gather_object, (emb, errs), parts, dst=0)
            chunk_errors, order = [""] * len(chunk), []
            for r, (_, part_errs) in enumerate(parts):
                chunk_errors[r::world] = part_errs
                order.append(np.arange(r, len(chunk), world)[np.array([not e for e in part_errs], bool)])
            order = np.concatenate(order)  # the chunk position of each row gathered
            embs.append(np.concatenate([e for e, _ in parts])[np.argsort(order)])
            errors += chunk_errors
            bar.update(len(chunk))
    return (np.concatenate(embs), errors) if rank == 0 else None
