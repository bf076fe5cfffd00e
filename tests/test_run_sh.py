"""run.sh for real, with tiny settings: --demo (the README's first command), --source DIR and -h, each in a
copy of the scripts in tmp_path (run.sh writes data/, models/ and results/ beside itself). Its default
mode, on data already under data/, is test_docs.py's."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_preprocess import kaggle_folder

from dataset import read_captions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="run.sh needs bash")


@pytest.fixture
def repo(tmp_path):
    """run.sh and the Python files beside it and in helpers/, as a clone has them."""
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name == "run.sh":
            shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    shutil.copytree(os.path.join(ROOT, "helpers"), tmp_path / "helpers", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def run_sh(repo, *args):
    env = dict(os.environ, PYTHON=sys.executable, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run(["bash", str(repo / "run.sh"), *map(str, args)], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)


# Flags after the mode go to train.py and come after run.sh's own, so they win: a few steps on small photos.
TINY = ("--epochs", "1", "--max_steps", "2", "--image_size", "32", "--num_workers", "0", "--device", "cpu")


def test_help_prints_the_modes_and_a_missing_dir_is_a_usage_error(repo):
    header = [line[2:] for line in open(repo / "run.sh").read().splitlines()[1:11]]
    for flag in ("-h", "--help"):
        proc = run_sh(repo, flag)
        assert proc.returncode == 0 and proc.stdout.splitlines() == header
    assert any("./run.sh --demo" in line for line in header)
    proc = run_sh(repo, "--source")
    assert proc.returncode == 2 and proc.stdout.splitlines() == header
    assert not (repo / "data").exists() and not (repo / "models").exists()


def test_demo_runs_the_whole_pipeline_offline(repo):
    proc = run_sh(repo, "--demo", *TINY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads((repo / "results" / "demo" / "test_metrics.json").read_text())
    assert (m["n_images"], m["n_queries"], m["split"]) == (40, 200, "test")  # the demo: 400 photos, 10 % test
    assert (repo / "results" / "demo" / "search_a_small_red_circle_above_a_large_blue_square.png").stat().st_size > 0
    assert {"best.pt", "last.pt", "metrics.jsonl", "tokenizer"} <= set(os.listdir(repo / "models" / "demo"))
    assert torch.load(repo / "models" / "demo" / "last.pt", weights_only=True)["step"] == 2  # the flags given won


# --source DIR prepares the data for real; the scripts after it (the demo's test runs them) only log their
# arguments, which is how a second run, finding last.pt, resumes.
LOGGING_PYTHON = """#!/bin/sh
if [ "$1" = preprocess_flickr8k.py ]; then exec "$REAL_PYTHON" "$@"; fi
echo "$*" >> "$RUN_LOG"
"""


def test_source_dir_prepares_the_data_then_trains_evaluates_searches_and_resumes(repo):
    stub = repo / "python"
    stub.write_text(LOGGING_PYTHON)
    stub.chmod(0o755)
    source = kaggle_folder(repo / "downloaded" / "flickr8k")  # 20 photos, 2 captions each: 16 / 2 / 2 photos
    env = dict(os.environ, PYTHON=str(stub), REAL_PYTHON=sys.executable, RUN_LOG=str(repo / "calls.txt"))
    for _ in range(2):
        proc = subprocess.run(["bash", str(repo / "run.sh"), "--source", str(source), "--epochs", "3"], cwd=repo,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (repo / "models").mkdir(exist_ok=True)
        (repo / "models" / "last.pt").touch()  # as the first run's train.py leaves it
    rows = read_captions(str(repo / "data" / "flickr8k"))
    assert rows["image"].nunique() == 20 and sorted(set(rows["split"])) == ["test", "train", "val"]
    calls = (repo / "calls.txt").read_text().splitlines()
    assert calls == ["train.py --data_dir data/flickr8k --model_dir models --epochs 3",
                     "evaluate.py --checkpoint models/best.pt --split test --output_json results/test_metrics.json",
                     "search.py --checkpoint models/best.pt --query a dog running through snow --output_dir results",
                     "train.py --data_dir data/flickr8k --model_dir models --epochs 3 --resume", *calls[4:]]
    assert len(calls) == 6
