"""experiments/screen_recipe/screen_recipe.py, the GPU screen behind RESULTS.md's table of recipe variants."""

import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

import model
import train

_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "screen_recipe.py")
_spec = importlib.util.spec_from_file_location("screen_recipe", _path)
screen = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(screen)

TINY = ["--no_pretrained", "--image_size", "64", "--batch_size", "8", "--epochs", "3", "--embedding_dim", "32",
        "--image_cache_views", "1", "--warmup_steps", "5", "--lr", "2e-3"]


def test_clustered_order_makes_batches_of_whole_clusters():
    cluster = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 0, 1, 2])  # photo -> cluster, 4 photos each
    order = screen.clustered_order(cluster, 3, 4)(list(range(12)), 0, 0)  # one caption per photo
    assert sorted(order) == list(range(12))
    assert all(len({int(cluster[i]) for i in order[b:b + 4]}) == 1 for b in range(0, 12, 4))
    assert order != screen.clustered_order(cluster, 3, 4)(list(range(12)), 0, 1)  # reshuffled each epoch


def test_image_clusters_group_every_train_image(tiny_data):
    from dataset import read_captions
    n_images = read_captions(tiny_data, "train")["image"].nunique()
    cluster = screen.image_clusters(tiny_data, os.path.join(tiny_data, "text_encoder"), 3, torch.device("cpu"))
    assert cluster.shape == (n_images,) and set(cluster.tolist()) <= {0, 1, 2} and len(set(cluster.tolist())) > 1
    assert torch.equal(cluster, screen.image_clusters(tiny_data, os.path.join(tiny_data, "text_encoder"), 3,
                                                      torch.device("cpu")))  # seeded: the same every run


def test_label_smoothing_zero_is_the_plain_loss():
    torch.manual_seed(0)
    img, txt = (torch.nn.functional.normalize(torch.randn(6, 8), dim=-1) for _ in range(2))
    same = torch.eye(6, dtype=torch.bool) | (torch.arange(6)[:, None] == 5 - torch.arange(6)[None, :])
    assert torch.allclose(screen.smoothed_info_nce(img, txt, 10.0, same, eps=0.0), model.info_nce(img, txt, 10.0, same))
    # Without a mask it is F.cross_entropy's label smoothing; with one, finite and over the rest.
    labels = torch.arange(6)
    logits = 10.0 * img @ txt.T
    expected = (F.cross_entropy(logits, labels, label_smoothing=0.1)
                + F.cross_entropy(logits.T, labels, label_smoothing=0.1)) / 2
    assert torch.allclose(screen.smoothed_info_nce(img, txt, 10.0), expected)
    masked = screen.smoothed_info_nce(img, txt, 10.0, same)
    assert torch.isfinite(masked) and masked > model.info_nce(img, txt, 10.0, same)


def test_screen_trains_a_variant_and_reports_both_rankings(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    for name in ("info_nce", "epoch_order", "evaluate_split"):  # the screen patches these: restore them
        monkeypatch.setattr(train, name, getattr(train, name))
    out = tmp_path / "screen.jsonl"
    argv = ["bs256_ls01", "--data_dir", tiny_data, "--runs_dir", str(tmp_path / "runs"), "--out", str(out),
            "--text_encoder", os.path.join(tiny_data, "text_encoder"), "--device", "cpu", "--validate_from", "2",
            "--num_workers", "0", *TINY]
    assert screen.main(argv) == 0
    assert train.info_nce is screen.smoothed_info_nce
    (result,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert result["variant"] == "bs256_ls01" and result["flags"][:2] == ["--batch_size", "256"]
    assert result["flags"][2:] == TINY  # the flags given after the variant's, recorded
    assert [epoch for epoch, *_ in result["curve"]] == [2, 3]  # epoch 1 was not validated
    best = max(result["curve"], key=lambda c: c[3])
    assert result["best_epoch"] == best[0]
    # The cosine evaluation of best.pt is the validation of its epoch, recomputed.
    assert result["cosine"]["rsum"] == pytest.approx(best[3], abs=0.1)
    assert 0 < result["querybank"]["rsum"] <= 600


def test_screen_refuses_validation_after_the_last_epoch(tiny_data, tmp_path, capsys):
    with pytest.raises(SystemExit, match="2"):
        screen.main(["recipe", "--data_dir", tiny_data, "--runs_dir", str(tmp_path), "--validate_from", "30"])
    assert "after the last epoch" in capsys.readouterr().err
