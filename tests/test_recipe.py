"""Each flag of the recipes changes what it says it changes, seen through train.main on the tiny dataset
and checked against values worked out here: the learning rate of every parameter at every step (by
group and schedule), weight decay, frozen layers and blocks, recomputed blocks, captions per photo,
and the inference options of validation."""

import json
import math
import os
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from tiny import train_argv

import evaluate
import model
import train
from dataset import Collate, PairDataset
from model import DualEncoder, load_tokenizer


def fast_argv(data_dir, model_dir, *extra):
    """train_argv with 32-pixel photos: 15 steps of 16 pairs an epoch."""
    return train_argv(data_dir, model_dir, "--image_size", "32", *extra)


def weights(path):
    return torch.load(path, weights_only=True)["model"]


def initial_weights(monkeypatch):
    """A dict that, once train.main has built its model, holds a copy of the model's initial state."""
    start = {}
    real = train.model_from_args

    def built(*a, **k):
        m = real(*a, **k)
        start.update({k: v.clone() for k, v in m.state_dict().items()})
        return m
    monkeypatch.setattr(train, "model_from_args", built)
    return start


def record_steps(monkeypatch):
    """A list that gets, for every optimizer step train.main takes, (loss, {name: (lr, weight decay)} of the
    parameters the optimizer holds, {name: gradient})."""
    steps = []
    real = train.optimizer_step

    def recording(m, optimizer, loss):
        held = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
        real(m, optimizer, loss)  # backward and step; the gradients stay until the next step's zero_grad
        steps.append((loss.item(), {n: held[id(p)] for n, p in m.named_parameters() if id(p) in held},
                      {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    monkeypatch.setattr(train, "optimizer_step", recording)
    return steps


def no_decay_names(m):
    """Biases, the weights of norm layers and the temperature: what AdamW must not decay (README)."""
    norms = (nn.LayerNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
    names = {"logit_scale"}
    for module_name, module in m.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(module, norms):
                names.add(f"{module_name}.{name}" if module_name else name)
    return names


def schedule(step, warmup, total):
    """Linear warm-up to 1 over `warmup` steps (the first step at 1/warmup), then a half cosine to 0
    at `total`, written out from the README's description."""
    if step < warmup:
        return (step + 1) / warmup
    return (1 + math.cos(math.pi * (step - warmup) / (total - warmup))) / 2


def test_every_parameter_trains_at_its_flags_rate_on_the_warm_up_and_cosine_schedule(tiny_data, tmp_path,
                                                                                     monkeypatch):
    steps = record_steps(monkeypatch)
    # Three epochs of one caption per photo: 48 pairs, 3 steps of 16 each.
    argv = fast_argv(tiny_data, tmp_path, "--epochs", "3", "--captions_per_image", "1", "--validate_from", "3",
                     "--lr", "1e-3", "--image_lr", "2e-3", "--head_lr", "4e-3", "--weight_decay", "0.05",
                     "--warmup_steps", "3")
    assert train.main(argv) == 0
    assert len(steps) == 9
    # The schedule by hand at step 0, the end of the warm-up, half-way through the decay and the last step:
    # 1/3, 1, 1, (1 + cos(pi/2))/2, (1 + cos(5 pi/6))/2.
    factors = [schedule(s, 3, 9) for s in range(9)]
    assert [factors[s] for s in (0, 2, 3, 6, 8)] == pytest.approx([1 / 3, 1.0, 1.0, 0.5, 0.0669873], abs=1e-6)
    m = DualEncoder(text_encoder=os.path.join(tiny_data, "text_encoder"), embedding_dim=32, pretrained=False)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "image_tower.0.0.0.weight" in trainable and "image_proj.weight" in trainable
    no_decay = no_decay_names(m)
    assert {"image_proj.bias", "text_tower.transformer.layer.0.output_layer_norm.weight",
            "image_tower.0.0.1.weight"} <= no_decay  # a bias, a LayerNorm, a BatchNorm
    for step, (_, held, _) in enumerate(steps):
        assert set(held) == trainable
        for name, (lr, decay) in held.items():
            peak = 1e-3 if name.startswith("text_tower.") else 2e-3 if name.startswith("image_tower.") else 4e-3
            assert lr == pytest.approx(peak * factors[step], rel=1e-9), (step, name)
            assert decay == (0.0 if name in no_decay else 0.05), name


def test_image_lr_zero_means_lr_and_frozen_parameters_get_no_group(tiny_data):
    m = DualEncoder(text_encoder=os.path.join(tiny_data, "text_encoder"), embedding_dim=8, pretrained=False)
    m.text_tower.embeddings.requires_grad_(False)
    args = SimpleNamespace(lr=3e-4, image_lr=0.0, head_lr=1e-2, weight_decay=0.1)
    groups = train.param_groups(m, args)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(lr_of)  # no parameter in two groups
    for name, p in m.named_parameters():
        if name.startswith("text_tower.embeddings."):
            assert id(p) not in lr_of, name
        else:
            assert lr_of[id(p)] == (1e-2 if name.split(".")[0] in ("image_proj", "text_proj", "logit_scale")
                                    else 3e-4), name


def changed_and_kept(start, end):
    kept = {k for k in start if torch.equal(start[k], end[k])}
    return set(start) - kept, kept


def test_freeze_text_layers_keeps_the_embeddings_and_first_layers_and_trains_the_rest(tiny_data, tmp_path,
                                                                                       monkeypatch):
    start = initial_weights(monkeypatch)
    assert train.main(fast_argv(tiny_data, tmp_path, "--epochs", "1", "--max_steps", "1",
                                "--freeze_text_layers", "1")) == 0
    end = weights(tmp_path / "last.pt")
    params = {n for n, _ in DualEncoder(text_encoder=os.path.join(tiny_data, "text_encoder"), embedding_dim=32,
                                        pretrained=False).named_parameters()}
    frozen = {k for k in params if k.startswith(("text_tower.embeddings.", "text_tower.transformer.layer.0."))}
    assert len(frozen) > 10 and any(k.startswith("text_tower.transformer.layer.1.") for k in params)
    changed, kept = changed_and_kept({k: start[k] for k in params}, end)
    assert kept == frozen
    # 0: the word embeddings alone; -1 (the default): nothing.
    m = DualEncoder(text_encoder=os.path.join(tiny_data, "text_encoder"), embedding_dim=8, pretrained=False)
    for n, want in ((0, [m.text_tower.embeddings]), (-1, [])):
        args = SimpleNamespace(freeze_image=False, freeze_image_blocks=0, freeze_text_layers=n)
        assert train.frozen_modules(m, args) == want


def test_freeze_image_keeps_the_whole_image_tower_and_its_statistics(tiny_data, tmp_path, monkeypatch):
    start = initial_weights(monkeypatch)
    assert train.main(fast_argv(tiny_data, tmp_path, "--epochs", "1", "--max_steps", "2", "--freeze_image")) == 0
    end = weights(tmp_path / "last.pt")
    image = {k for k in start if k.startswith("image_tower.")}
    changed, kept = changed_and_kept(start, end)
    # Weights and BatchNorm statistics alike (the tower runs in eval mode); the rest trains.
    assert image <= kept and any(k.endswith("running_mean") for k in image)
    assert {"image_proj.weight", "text_proj.weight"} <= changed


def test_freeze_image_blocks_keeps_the_stem_and_first_blocks_and_trains_the_rest(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    start = initial_weights(monkeypatch)
    assert train.main(fast_argv(tiny_data, tmp_path, "--epochs", "1", "--max_steps", "1", "--image_encoder",
                                "efficientnet_lite0", "--freeze_image_blocks", "5")) == 0
    end = weights(tmp_path / "last.pt")
    frozen_prefixes = ("image_tower.net._conv_stem.", "image_tower.net._bn0.",
                       *(f"image_tower.net._blocks.{i}." for i in range(5)))
    image = {k for k in start if k.startswith("image_tower.")}
    frozen = {k for k in image if k.startswith(frozen_prefixes)}
    classifier = {k for k in image if k.startswith("image_tower.net._fc.")}  # never trained: not in the loss
    # Weights and BatchNorm statistics of the frozen part stay as they were (it runs in eval mode).
    assert any(k.endswith("running_mean") for k in frozen) and len(frozen) > 40
    changed, kept = changed_and_kept({k: start[k] for k in image}, end)
    assert kept == frozen | classifier
    assert "image_tower.net._blocks.5._bn2.running_var" in changed and "image_tower.net._bn1.weight" in changed


def lite_steps(tiny_data, model_dir, monkeypatch, *extra):
    """(losses, gradients per step, final weights, blocks run through torch.utils.checkpoint) of a
    two-step efficientnet_lite0 run."""
    steps = record_steps(monkeypatch)
    calls = []
    real = model.checkpoint
    monkeypatch.setattr(model, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert train.main(train_argv(tiny_data, model_dir, "--epochs", "1", "--max_steps", "2", "--image_encoder",
                                 "efficientnet_lite0", "--batch_size", "8", *extra)) == 0
    return [s[0] for s in steps], [s[2] for s in steps], weights(model_dir / "last.pt"), len(calls)


def test_recompute_image_blocks_gives_the_same_losses_gradients_and_weights(tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("efficientnet_lite_pytorch")
    plain = lite_steps(tiny_data, tmp_path / "plain", monkeypatch)
    recomputed = lite_steps(tiny_data, tmp_path / "recomputed", monkeypatch, "--recompute_image_blocks")
    assert plain[3] == 0 and recomputed[3] == 2 * 16  # every block of Lite0, at each of the two steps
    assert recomputed[0] == pytest.approx(plain[0], rel=1e-6) and len(plain[0]) == 2
    for step, (got, want) in enumerate(zip(recomputed[1], plain[1])):
        assert got.keys() == want.keys() and len(got) > 100
        for k in want:
            assert torch.allclose(got[k], want[k], rtol=1e-5, atol=1e-7), (step, k)
    # Weights and BatchNorm statistics (updated once per step, not again by the recomputation).
    for k, v in plain[2].items():
        assert torch.allclose(recomputed[2][k].float(), v.float(), rtol=1e-5, atol=1e-7), k


def test_captions_per_image_draws_that_many_captions_of_every_photo_each_epoch(tiny_data, tmp_path, monkeypatch,
                                                                                capsys):
    seen = []
    real = train.batch_loss

    def recording(net, batch, *a, **k):
        ids = batch["image_ids"].tolist()
        seen.append([(i, tuple(t[m.bool()].tolist())) for i, t, m in zip(ids, batch["input_ids"],
                                                                          batch["attention_mask"])])
        return real(net, batch, *a, **k)
    monkeypatch.setattr(train, "batch_loss", recording)
    assert train.main(fast_argv(tiny_data, tmp_path, "--epochs", "2", "--captions_per_image", "2", "--batch_size", "32",
                                "--validate_from", "2")) == 0
    assert "96 pairs/epoch, 3 steps/epoch of 32 pairs, 6 steps" in capsys.readouterr().out  # 48 photos x 2
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 6
    epochs = [sum(seen[:3], []), sum(seen[3:], [])]
    for pairs in epochs:
        assert Counter(i for i, _ in pairs) == {i: 2 for i in range(48)}  # every photo twice
        assert len(set(pairs)) == 96  # two different captions of it
    assert set(epochs[0]) != set(epochs[1])  # drawn again each epoch


def test_validation_embeds_photos_at_the_eval_size_with_the_flip_as_evaluate_py_does(tiny_data, tmp_path,
                                                                                     monkeypatch):
    seen, real = set(), DualEncoder.encode_images  # (photo side, flip, gradients on) of the photo batches encoded
    monkeypatch.setattr(DualEncoder, "encode_images", lambda m, images, flip=False: seen.add(
        (images.shape[-1], flip, torch.is_grad_enabled())) or real(m, images, flip))
    assert train.main(fast_argv(tiny_data, tmp_path, "--epochs", "1", "--max_steps", "3", "--eval_image_size", "40",
                                "--eval_flip")) == 0
    assert seen == {(32, False, True), (40, True, False)}  # training batches, validation
    val = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]["val"]
    out = tmp_path / "val.json"
    assert evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--split", "val", "--output_json", str(out),
                          "--num_workers", "0", "--device", "cpu"]) == 0
    as_trained = json.loads(out.read_text())
    assert (as_trained["eval_image_size"], as_trained["eval_flip"]) == (40, True)
    assert {d: as_trained[d] for d in ("t2i", "i2t")} == {d: val[d] for d in ("t2i", "i2t")}


def test_batch_loss_leaves_other_captions_of_a_photo_out_of_the_negatives(tiny_data):
    from test_model import brute_force_loss
    torch.manual_seed(0)
    m = DualEncoder(text_encoder=os.path.join(tiny_data, "text_encoder"), embedding_dim=16, pretrained=False,
                    amp=False).eval()
    pairs = PairDataset(tiny_data, "train", 32, augment=False)
    batch = Collate(load_tokenizer(os.path.join(tiny_data, "text_encoder")))([pairs[i] for i in (0, 1, 5, 10, 11, 12)])
    with torch.no_grad():
        img, txt, scale = m(batch["images"], batch["input_ids"], batch["attention_mask"])
        ids = batch["image_ids"]
        assert ids.tolist() == [0, 0, 1, 2, 2, 2]  # five captions a photo, in file order
        same = (ids[:, None] == ids[None, :]).tolist()
        unmasked = [[i == j for j in range(6)] for i in range(6)]
        cpu = torch.device("cpu")
        want = brute_force_loss(img, txt, scale, same)
        assert train.batch_loss(m, batch, cpu).item() == pytest.approx(want, rel=1e-5)
        want = brute_force_loss(img, txt, scale, unmasked)
        assert train.batch_loss(m, batch, cpu, same_image_mask=False).item() == pytest.approx(want, rel=1e-5)


def test_collate_stacks_the_photos_and_pads_the_captions_to_the_longest(tiny_data):
    tok = load_tokenizer(os.path.join(tiny_data, "text_encoder"))
    images = [torch.full((3, 4, 4), i, dtype=torch.uint8) for i in range(3)]
    captions = ["a red circle", "one blue square on grey " * 30, "square"]
    batch = Collate(tok)(list(zip(images, captions, [7, 7, 2])))
    assert torch.equal(batch["images"], torch.stack(images)) and batch["image_ids"].tolist() == [7, 7, 2]
    alone = [tok(c, truncation=True, max_length=64)["input_ids"] for c in captions]  # each caption by itself
    assert [len(a) for a in alone] == [5, 64, 3]  # [CLS] words [SEP], cut at 64 tokens
    assert batch["input_ids"].tolist() == [a + [tok.pad_token_id] * (64 - len(a)) for a in alone]
    assert batch["attention_mask"].tolist() == [[1] * len(a) + [0] * (64 - len(a)) for a in alone]
    short = Collate(tok)([(images[0], "a red circle", 0), (images[1], "square", 1)])
    assert short["input_ids"].shape == (2, 5)  # padded to this batch's longest, not to 64
    assert Collate(tok)([(None, "square", 0)])["images"] is None  # training from the feature cache


def test_no_same_image_mask_reaches_the_loss(tiny_data, tmp_path, monkeypatch):
    seen, real = [], train.batch_loss
    monkeypatch.setattr(train, "batch_loss", lambda net, batch, device, mask=True, *rest: seen.append(mask)
                        or real(net, batch, device, mask, *rest))
    for flags, want in (((), True), (("--no_same_image_mask",), False)):
        seen.clear()
        argv = train_argv(tiny_data, tmp_path / str(want), "--epochs", "1", "--max_steps", "2", *flags)
        assert train.main(argv) == 0
        assert seen == [want, want]
