"""bench.py end to end on tiny settings: the JSON has its keys and every figure is a positive number.

No timing is asserted: tests share machines, and speed is what bench.py reports, not what it tests.
"""

import json
import math
import os

import bench


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
    assert "training, pairs/s" in capsys.readouterr().out


def test_real_data_dir_and_no_baseline(tiny_data, tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--quick", "--no_baseline", "--device", "cpu", "--data_dir", str(tiny_data),
            "--text_encoder", os.path.join(tiny_data, "text_encoder"), "--image_size", "64",
            "--batch_size", "4", "--steps", "1", "--num_workers", "0", "--gallery", "10", "--queries", "2",
            "--encode_images", "4", "--json", str(out)]
    assert bench.main(argv) == 0
    r = json.loads(out.read_text())
    assert r["train_pairs_per_s"] > 0 and "train_ratio" not in r and "train_pairs_per_s_baseline" not in r

