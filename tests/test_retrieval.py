import numpy as np
import torch

from retrieval import querybank_bias, recall_metrics


def brute_force(img, txt, caption_image, ks=(1, 5, 10)):
    """Loop version of the metrics: a tie ranks against the target."""
    sims = txt @ img.T
    t2i = []
    for q in range(len(txt)):
        target = sims[q, caption_image[q]]
        t2i.append(1 + sum(1 for j in range(len(img)) if j != caption_image[q] and sims[q, j] >= target))
    i2t = []
    for i in range(len(img)):
        best = None
        for q in range(len(txt)):
            if caption_image[q] != i:
                continue
            rank = 1 + sum(1 for q2 in range(len(txt)) if caption_image[q2] != i and sims[q2, i] >= sims[q, i])
            best = rank if best is None else min(best, rank)
        i2t.append(best)
    out = {}
    for name, ranks in (("t2i", t2i), ("i2t", i2t)):
        r = torch.tensor(ranks, dtype=torch.float64)
        out[name] = {**{f"R@{k}": 100 * (r <= k).double().mean().item() for k in ks},
                     "mean_rank": r.mean().item(), "median_rank": r.median().item()}
    return out


def test_metrics_match_brute_force_with_five_captions():
    g = torch.Generator().manual_seed(0)
    n = 30
    img = torch.nn.functional.normalize(torch.randn(n, 8, generator=g), dim=-1)
    caption_image = torch.arange(n).repeat_interleave(5)
    # Captions near their photo, with noise, so ranks spread over 1..n.
    txt = torch.nn.functional.normalize(img[caption_image] + 0.9 * torch.randn(5 * n, 8, generator=g), dim=-1)
    got, want = recall_metrics(img, txt, caption_image), brute_force(img, txt, caption_image)
    for d in ("t2i", "i2t"):
        for key, value in want[d].items():
            assert abs(got[d][key] - value) < 1e-6, (d, key)
    assert 0 < got["t2i"]["R@1"] < 100  # the case is not degenerate
    assert got["n_images"] == n and got["n_queries"] == 5 * n


def test_ties_count_against_the_model():
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # two identical photos
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    m = recall_metrics(img, txt, torch.tensor([0, 1]))
    assert m["t2i"]["R@1"] == 0.0 and m["t2i"]["mean_rank"] == 2.0


def test_perfect_and_reversed_rankings():
    img = torch.eye(4)
    caption_image = torch.arange(4).repeat_interleave(2)
    perfect = recall_metrics(img, img[caption_image], caption_image)
    assert perfect["t2i"]["R@1"] == 100.0 and perfect["i2t"]["R@1"] == 100.0
    assert perfect["rsum"] == 600.0 and perfect["t2i"]["median_rank"] == 1.0
    worst = recall_metrics(img, -img[caption_image], caption_image)
    assert worst["t2i"]["R@1"] == 0.0 and worst["t2i"]["mean_rank"] == 4.0


def test_querybank_bias_is_the_inverted_softmax_normaliser():
    g = torch.Generator().manual_seed(1)
    gallery, bank = torch.randn(7, 4, generator=g), torch.randn(11, 4, generator=g)
    want = torch.tensor([torch.log(sum(torch.exp(5.0 * (b @ x)) for b in bank)) / 5.0 for x in gallery])
    assert torch.allclose(querybank_bias(gallery, bank, 5.0, chunk=3), want, atol=1e-5)  # chunks of 3, 3, 1


def test_biased_metrics_rank_the_adjusted_similarities():
    # Subtracting a bias per photo (per caption) equals appending -bias (and 1) as an extra
    # embedding dimension, which brute_force ranks directly.
    g = torch.Generator().manual_seed(2)
    n = 12
    img = torch.nn.functional.normalize(torch.randn(n, 6, generator=g), dim=-1)
    caption_image = torch.arange(n).repeat_interleave(3)
    txt = torch.nn.functional.normalize(img[caption_image] + torch.randn(3 * n, 6, generator=g), dim=-1)
    img_bias, txt_bias = 0.3 * torch.randn(n, generator=g), 0.3 * torch.randn(3 * n, generator=g)
    got = recall_metrics(img, txt, caption_image, img_bias, txt_bias)
    ones = lambda x: torch.ones(len(x), 1)  # noqa: E731
    t2i = brute_force(torch.cat([img, -img_bias[:, None]], 1), torch.cat([txt, ones(txt)], 1), caption_image)["t2i"]
    i2t = brute_force(torch.cat([img, ones(img)], 1), torch.cat([txt, -txt_bias[:, None]], 1), caption_image)["i2t"]
    for d, want in (("t2i", t2i), ("i2t", i2t)):
        for key, value in want.items():
            assert abs(got[d][key] - value) < 1e-6, (d, key)
    assert got["t2i"] != recall_metrics(img, txt, caption_image)["t2i"]  # the biases changed the ranking


def test_duplicates_a_rounding_step_apart_still_tie_against_the_model():
    # Biases of identical rows can differ in the last float32 bit (a row's place in a matrix product,
    # the CPU's kernels): the duplicate must still count as a tie, in both directions.
    step = torch.finfo(torch.float32).eps
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # a photo and its duplicate
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])  # a caption of each, the same words
    m = recall_metrics(img, txt, torch.tensor([0, 1]), img_bias=torch.tensor([0.0, step]),
                       txt_bias=torch.tensor([step, 0.0]))
    assert m["t2i"]["mean_rank"] == 2.0 and m["t2i"]["R@1"] == 0.0
    assert m["i2t"]["mean_rank"] == 2.0 and m["i2t"]["R@1"] == 0.0


def test_querybank_demotes_a_hub():
    # Four photos and a "hub" photo that every caption is a little closer to than to its own.
    e = torch.eye(5)[:4]
    hub = torch.nn.functional.normalize(torch.tensor([[1.0, 1, 1, 1, 0]]), dim=-1)
    img = torch.cat([e, hub])
    txt = torch.nn.functional.normalize(0.6 * e + 0.8 * hub, dim=-1)
    caption_image = torch.arange(4)
    assert recall_metrics(img, txt, caption_image)["t2i"]["R@1"] == 0.0  # the hub wins every query
    bank = torch.nn.functional.normalize(0.5 * e + 0.8 * hub, dim=-1)  # other captions of the same kind
    fixed = recall_metrics(img, txt, caption_image, img_bias=querybank_bias(img, bank, 20.0))
    assert fixed["t2i"]["R@1"] == 100.0


def test_evaluate_keeps_its_embeddings_beside_the_checkpoint(tiny_data, tmp_path, monkeypatch):
    # A second evaluate.py call reads the split's and the querybank's embeddings instead of
    # encoding them, with the very figures of an uncached evaluation; a changed photo, checkpoint or
    # option encodes again.
    import json
    import os
    import shutil

    from tiny import make_checkpoint

    import evaluate
    import retrieval
    from checkpoint import load_model
    data = str(tmp_path / "data")
    shutil.copytree(tiny_data, data)  # its photos' times change below
    ck = make_checkpoint(tmp_path / "m" / "best.pt", os.path.join(data, "text_encoder"), 0,
                         querybank=True, data_dir=data)
    encoded, real = [], retrieval.encode_image_dataset
    monkeypatch.setattr(retrieval, "encode_image_dataset",
                        lambda *a, **k: encoded.append(k.get("desc", "split")) or real(*a, **k))
    texts, real_texts = [], retrieval.encode_texts
    monkeypatch.setattr(retrieval, "encode_texts", lambda *a, **k: texts.append(len(a[2])) or real_texts(*a, **k))
    out = tmp_path / "r.json"

    def figures(*extra):
        assert evaluate.main(["--checkpoint", ck, "--split", "val", "--num_workers", "0", "--device", "cpu",
                              "--output_json", str(out), *extra]) == 0
        return json.loads(out.read_text())

    def counts():
        return encoded.count("split"), encoded.count("encoding the photo bank"), len(texts)
    first = figures()
    model, tok, _ = load_model(ck, torch.device("cpu"))
    options = {"eval_image_size": 32, "querybank": True}
    want = real(model, retrieval.EvalSplit(data, "val", 32).image_dataset, torch.device("cpu"))
    assert counts() == (1, 1, 2)  # the val captions, then the caption bank
    fresh = retrieval.evaluate_split(model, tok, data, "val", options)  # no keep: all encoded again
    assert counts() == (2, 2, 4)
    assert {d: first[d] for d in ("t2i", "i2t")} == {d: fresh[d] for d in ("t2i", "i2t")}
    kept = np.load(tmp_path / "m" / "eval_best_val.npz")
    assert torch.equal(torch.from_numpy(kept["photos"]), want)
    assert figures() == first and counts() == (2, 2, 4)  # all kept: nothing encoded
    assert figures("--eval_flip")["eval_flip"] is True and counts() == (3, 3, 6)
    assert figures() == first and counts() == (4, 4, 8)  # one file a split: the last options
    os.utime(ck, ns=(1, 2))  # the same content: the kept embeddings still serve
    assert figures() == first and counts() == (4, 4, 8)
    val_photo = retrieval.EvalSplit(data, "val", 32).images[0]
    os.utime(os.path.join(data, "images", val_photo), ns=(3, 4))  # a val photo changed: the bank still serves
    assert figures() == first and counts() == (5, 4, 9)
    train_photo = retrieval.EvalSplit(data, "train", 32).images[0]
    os.utime(os.path.join(data, "images", train_photo), ns=(3, 4))  # a train photo changed: the bank again
    assert figures() == first and counts() == (5, 5, 10)
    state = torch.load(ck, weights_only=True)
    state["model"]["logit_scale"] += 1.0  # another checkpoint: everything encoded again
    torch.save(state, ck)
    figures()
    assert counts() == (6, 6, 12)
