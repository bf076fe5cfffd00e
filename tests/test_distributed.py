"""Multi-process training on CPU with gloo: 2 processes at batch B train as one process at 2B."""

import json
import os
import socket
import subprocess
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import train_argv
from torch.nn.parallel import DistributedDataParallel as DDP

import train
from dataset import Collate, PairDataset, shard_order
from model import DualEncoder, load_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B = 4
# Pairs of the training split, which lists the 5 captions of each photo together: photos 0 and 1
# have captions on both processes, so the same-photo mask must span the global batch.
ITEMS = [0, 5, 10, 1, 2, 6, 15, 20]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def model_and_batch(data_dir, items):
    """The tiny model in eval mode (no dropout, BatchNorm on its running statistics, so the batch
    split cannot matter), fp32, and one batch of training pairs without augmentation."""
    torch.manual_seed(0)
    m = DualEncoder(text_encoder=f"{data_dir}/text_encoder", embedding_dim=16, pretrained=False, amp=False)
    data = PairDataset(data_dir, "train", 64, augment=False)
    return m.eval(), Collate(load_tokenizer(f"{data_dir}/text_encoder"))([data[i] for i in items])


def loss_and_grads(net, model, batch):
    loss = train.batch_loss(net, batch, torch.device("cpu"))
    loss.backward()
    return loss.item(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def _step_on_rank(rank, world, port, data_dir, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model, batch = model_and_batch(data_dir, ITEMS[rank * B:(rank + 1) * B])
        torch.save(loss_and_grads(DDP(model, static_graph=True), model, batch), os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_loss_and_gradients_of_one_global_batch(tiny_data, tmp_path):
    mp.spawn(_step_on_rank, args=(2, free_port(), tiny_data, str(tmp_path)), nprocs=2)
    model, batch = model_and_batch(tiny_data, ITEMS)
    want_loss, want = loss_and_grads(model, model, batch)
    for rank in range(2):
        loss, grads = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert abs(loss - want_loss) < 1e-5, (rank, loss, want_loss)
        assert grads.keys() == want.keys() and "logit_scale" in grads
        for name, g in grads.items():
            # Gradients here span 1e-9 to 1e-2, so each is judged on its own scale; 1e-10 absorbs
            # float noise where the gradient is 0 in theory (the attention's key biases).
            atol = 1e-3 * want[name].abs().max().item() + 1e-10
            torch.testing.assert_close(g, want[name], rtol=1e-3, atol=atol, msg=f"rank {rank}: {name}")


def test_shards_rebuild_the_single_process_batches():
    order = torch.randperm(37).tolist()
    one = shard_order(order, 8, 0, 1)
    assert one == order[:32]
    parts = [shard_order(order, 4, r, 2) for r in range(2)]
    glued = [i for s in range(0, 32, 4) for part in parts for i in part[s:s + 4]]
    assert glued == one


def torchrun(*argv):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "train.py", *argv]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


def test_torchrun_writes_one_set_of_checkpoints_and_logs_and_resumes(tiny_data, tmp_path):
    first = torchrun(*train_argv(tiny_data, tmp_path, "--epochs", "1", "--save_every", "1"))
    second = torchrun(*train_argv(tiny_data, tmp_path, "--epochs", "2", "--save_every", "1", "--resume"))
    # One process logs: one line per epoch, one start line, one resume line.
    for out, epoch in ((first, 1), (second, 2)):
        assert [ln.split(" |")[0] for ln in out.splitlines() if " | loss " in ln] == [f"epoch {epoch}"], out
        assert out.count("training on cpu x 2 processes") == 1
    assert second.count("resumed from") == 1
    assert sorted(os.listdir(tmp_path)) == ["best.pt", "checkpoint_epoch_1.pt", "checkpoint_epoch_2.pt", "last.pt",
                                            "metrics.jsonl", "tokenizer", "training_curves.png"]
    history = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    # 240 pairs in global batches of 2 x 16: 7 steps per epoch.
    assert [(h["epoch"], h["step"]) for h in history] == [(1, 7), (2, 14)]
    ckpt = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["step"], ckpt["epoch_step"]) == (2, 14, 0)
