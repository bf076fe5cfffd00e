"""search.py --index_only spread over 2 processes with gloo on CPU, started as torchrun starts them
(RANK, WORLD_SIZE, ... in the environment): the index one process writes, and nothing written when
a process dies."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_distributed import REPO, free_port
from tiny import photo

import search
from helpers import shard
from index import GalleryIndex

WORLD = 2


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / "photos"
    for i in range(11):
        photo(d / f"{'sub/' if i % 3 else ''}p{i:02d}.jpg", 60 + i)
    (d / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")  # unreadable: listed as failed, by rank 0
    return d


def argv(tiny_ckpt, folder, index_dir):
    return ["--checkpoint", tiny_ckpt, "--images_dir", str(folder), "--index_dir", str(index_dir), "--device", "cpu",
            "--num_workers", "0", "--batch_size", "2", "--index_only"]


def _index_on_rank(rank, world, port, args, fail_rank, out=None):
    """One process of a sharded run, as torchrun would start it; rank `fail_rank` fails as it encodes.
    A SystemExit's message goes to out/rank<N>.txt."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    shard.ROUND = 2  # several rounds of gathering for a dozen photos
    if rank == fail_rank:
        def dies(*a, **k):
            raise RuntimeError("planted: this process dies while encoding")
        shard.encode_image_files = dies
    try:
        assert search.main(args) == 0
    except SystemExit as e:
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(str(e.code))
        raise


def index_of(index_dir):
    return GalleryIndex.load(next(index_dir.glob("index_*.npz")))


def test_two_processes_write_the_single_process_index(tiny_ckpt, folder, tmp_path, capsys):
    assert search.main(argv(tiny_ckpt, folder, tmp_path / "one")) == 0
    mp.spawn(_index_on_rank, args=(WORLD, free_port(), argv(tiny_ckpt, folder, tmp_path / "two"), None), nprocs=WORLD)
    one, two = index_of(tmp_path / "one"), index_of(tmp_path / "two")
    assert len(one) == 11 and sorted(one.paths) == sorted(two.paths)
    assert list(one.failed) == list(two.failed) == ["broken.jpg"]
    rows = [two.paths.index(p) for p in one.paths]
    # The same embedding for each photo, to float16 rounding (other batches, other processes).
    assert np.abs(one.emb.astype(np.float32) - two.emb[rows].astype(np.float32)).max() <= 1e-3
    assert (one.stats == two.stats[rows]).all() and (one.fps == two.fps[rows]).all()

    def ranking(index_dir, *query):
        capsys.readouterr()
        search.main([*argv(tiny_ckpt, folder, index_dir)[:-1], *query, "--json", "--top_k", "20"])
        return [r["path"] for r in json.loads(capsys.readouterr().out)]
    for query in (("--query", "a red circle"), ("--image", str(folder / "sub" / "p04.jpg"))):
        assert ranking(tmp_path / "two", *query) == ranking(tmp_path / "one", *query)


def test_the_torchrun_command_indexes_with_two_processes(tiny_ckpt, folder, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(WORLD),
           "search.py", *argv(tiny_ckpt, folder, tmp_path)]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stderr.count("photos, encoded by 2 processes") == 1  # rank 0 alone reports
    ix = index_of(tmp_path)
    assert len(ix) == 11 and list(ix.failed) == ["broken.jpg"]


def test_a_process_that_dies_leaves_the_index_as_it_was(tiny_ckpt, folder, tmp_path):
    index_dir = tmp_path / "index"
    assert search.main(argv(tiny_ckpt, folder, index_dir)) == 0
    before = {p.name: p.read_bytes() for p in index_dir.iterdir()}
    for i in range(6):
        photo(folder / f"new{i}.jpg", 90 + i)  # work for both processes
    # Each process left to end on its own (mp.spawn's join would stop rank 0 when rank 1 fails), as
    # rank 0 does when a machine of a torchrun job is lost.
    ctx = mp.spawn(_index_on_rank, args=(WORLD, free_port(), argv(tiny_ckpt, folder, index_dir), 1, str(tmp_path)),
                   nprocs=WORLD, join=False)
    try:
        for p in ctx.processes:
            p.join(900)  # a guard against a hang only: each process ends on its own (on a loaded machine, minutes)
        codes = [p.exitcode for p in ctx.processes]
    finally:
        for p in ctx.processes:
            if p.is_alive():  # hung: the test fails, and leaves no process behind
                p.kill()
    assert codes == [1, 1]
    assert "a process of the sharded run failed" in (tmp_path / "rank0.txt").read_text()
    assert {p.name: p.read_bytes() for p in index_dir.iterdir()} == before  # nothing written, no leftovers


def test_a_query_under_torchrun_is_refused(tiny_ckpt, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit, match="pass --index_only"):
        search.main([*argv(tiny_ckpt, folder, tmp_path)[:-1], "--query", "a dog"])
