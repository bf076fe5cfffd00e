"""benchmarks/bench.py end to end on tiny settings: the JSON has its keys and every figure is a positive
number, and our pipeline's training step is train.py's.

No timing is asserted: tests share machines, and speed is what bench.py reports, not what it tests.
"""

import json
import math
import os
import sys

import pytest
import torch

import device
import train

# On sys.path, not loaded from its file: the processes bench.py spawns import it by name.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench  # noqa: E402


def test_quick_bench_writes_finite_positive_figures(tiny_data, tmp_path, capsys):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--device", "cpu", "--text_encoder", os.path.join(tiny_data, "text_encoder"),
            "--image_size", "64", "--batch_size", "4", "--steps", "2", "--num_workers", "0", "--photos", "6",
            "--gallery", "100", "--queries", "3", "--encode_images", "8", "--naive_encode_images", "2",
            "--json", str(out)]
    assert bench.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["device"].startswith("cpu") and r["device_type"] == "cpu"
    for key in ("train_pairs_per_s", "train_ratio", "encode_images_per_s", "encode_ratio", "query_ms_p50",
                "query_ms_p95", "query_ratio", "train_peak_mem_mb", "train_pairs_per_s_baseline",
                "encode_images_per_s_baseline", "query_ms_p50_baseline", "train_data_pairs_per_s"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    assert len(r["per_round"]) == r["rounds"] == 1
    printed = capsys.readouterr().out
    assert "training, pairs/s" in printed
    # The CPU's capability and what the precision policy chose on it, in the JSON and on screen.
    assert r["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert r["precision"] == device.precision_summary(torch.device("cpu"))
    assert f"CPU capability {r['cpu_capability']} | ours: {r['precision']} | naive: fp32" in printed


def test_real_data_dir_and_no_baseline(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--no_baseline", "--device", "cpu", "--data_dir", str(tiny_data),
            "--text_encoder", os.path.join(tiny_data, "text_encoder"), "--image_size", "64",
            "--batch_size", "4", "--steps", "1", "--num_workers", "0", "--gallery", "10", "--queries", "2",
            "--encode_images", "4", "--json", str(out)]
    assert bench.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["train_pairs_per_s"] > 0 and "train_ratio" not in r and "train_pairs_per_s_baseline" not in r



def test_our_training_step_is_train_py_s(tiny_data, monkeypatch):
    """measure_train runs train.batch_loss and train.optimizer_step on each of its batches."""
    calls = []
    for name in ("batch_loss", "optimizer_step"):
        real = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    args = bench.get_args(["--device", "cpu", "--text_encoder", os.path.join(tiny_data, "text_encoder"),
                           "--image_size", "32", "--batch_size", "4", "--steps", "2", "--warmup", "1",
                           "--num_workers", "0"])
    out = bench.measure_train(args, device.pick_device("cpu"), tiny_data, naive=False)
    assert calls == ["batch_loss", "optimizer_step"] * 3 and out["pairs_per_s"] > 0
    calls.clear()
    bench.measure_train(args, device.pick_device("cpu"), tiny_data, naive=True)
    assert calls == ["optimizer_step"] * 3  # the naive baseline computes its own loss


@pytest.mark.parametrize("flag, value", [("--batch_size", "0"), ("--steps", "-1"), ("--warmup", "-1"),
                                         ("--rounds", "x")])
def test_bad_numbers_are_argparse_errors(flag, value, capsys):
    with pytest.raises(SystemExit) as e:
        bench.get_args([flag, value])
    assert e.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err
