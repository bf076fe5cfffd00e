"""experiments/ranking_levers/ranking_levers.py: the ranking-time levers behind RESULTS.md's table, each against a
brute-force reference."""

import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

from model import DualEncoder, load_tokenizer
from retrieval import encode_image_dataset, encode_texts

_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ranking_levers.py")
_spec = importlib.util.spec_from_file_location("ranking_levers", _path)
levers = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(levers)


def _unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_active_photos_and_dynamic_querybank_match_their_definition():
    gallery, bank, queries = _unit(12, 8), _unit(10, 8, seed=1), _unit(30, 8, seed=2)
    active = levers.active_photos(gallery, bank, chunk=7)
    expected = torch.zeros(12, dtype=torch.bool)
    for b in bank:
        expected[int(torch.argmax(gallery @ b))] = True
    assert torch.equal(active, expected) and 0 < int(active.sum()) < 12  # a real mix of both cases
    sims, bias = queries @ gallery.T, torch.rand(12)
    got = levers.dynamic_querybank(sims, bias, active)
    for q in range(30):
        top = int(torch.argmax(sims[q]))
        assert torch.equal(got[q], sims[q] - bias if active[top] else sims[q])


def test_late_interaction_is_the_mean_over_words_of_the_best_region():
    tokens, regions = _unit(3, 5, 4), _unit(3, 2, 6, 4, seed=1)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0]])
    got = levers.late_interaction(tokens, mask, regions)
    for q in range(3):
        for c in range(2):
            best = [max(float(tokens[q, t] @ regions[q, c, p]) for p in range(6)) for t in range(5) if mask[q, t]]
            assert got[q, c].item() == pytest.approx(sum(best) / len(best), abs=1e-6)


def test_word_mask_drops_cls_and_sep():
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert levers.word_mask(mask).tolist() == [[0, 1, 1, 0, 0], [0, 1, 1, 1, 0]]


def test_rerank_reorders_only_the_top_k():
    base = torch.rand(600, 9, generator=torch.Generator().manual_seed(0))  # over ROWS: several chunks
    new = torch.rand(600, 9, generator=torch.Generator().manual_seed(1))
    out = levers.rerank(base, 4, lambda rows, cand: new[rows].gather(1, cand))
    for q in (0, 299, 599):
        top = base[q].topk(4).indices
        order = out[q].argsort(descending=True).tolist()
        assert order[:4] == top[new[q, top].argsort(descending=True)].tolist()
        assert order[4:] == [i for i in base[q].argsort(descending=True).tolist() if i not in top.tolist()]
    # With every photo a candidate it is the new score's own ranking.
    full = levers.rerank(base, 9, lambda rows, cand: new[rows].gather(1, cand))
    assert torch.equal(full.argsort(1, descending=True), new.argsort(1, descending=True))


def test_t2i_ranks_of_a_score_matrix_count_ties_against_the_model():
    scores = torch.tensor([[0.9, 0.1, 0.2], [0.5, 0.5, 0.1], [0.3, 0.2, 0.1]])
    m = levers.rank_summary(levers.t2i_ranks(scores, torch.tensor([0, 1, 2])))  # ranks 1, 2, 3
    assert (m["R@1"], m["R@5"], m["median_rank"]) == (pytest.approx(100 / 3), 100.0, 2.0)


def test_encode_split_gives_evaluate_pys_embeddings_and_the_pooled_regions(tiny_data):
    pytest.importorskip("efficientnet_lite_pytorch")
    torch.manual_seed(0)
    m = DualEncoder("efficientnet_lite0", f"{tiny_data}/text_encoder", embedding_dim=16, text_pooling="mean",
                    pretrained=False, amp=False).eval()
    tok = load_tokenizer(f"{tiny_data}/text_encoder")
    feats = levers.encode_split(m, tok, tiny_data, "val", 64, torch.device("cpu"))
    data = levers.EvalSplit(tiny_data, "val", 64)
    assert torch.allclose(feats["img"], encode_image_dataset(m, data.image_dataset, torch.device("cpu"), flip=True),
                          atol=1e-5)
    assert torch.allclose(feats["txt"], encode_texts(m, tok, data.captions, torch.device("cpu")), atol=1e-5)
    assert feats["regions"].shape == (8, 4, 1280)  # 64 px -> 2 x 2 regions
    pooled = F.normalize(m.image_proj(feats["regions"].float().mean(1)), dim=-1)
    own = encode_image_dataset(m, data.image_dataset, torch.device("cpu"))
    assert torch.allclose(pooled, own, atol=2e-3)  # float16 regions
    assert torch.equal(feats["caption_image"], data.caption_image)
    # The token states are the tower's last layer at the real tokens (mean-pooled: the caption).
    mask = feats["mask"]
    pooled_txt = (feats["states"].float() * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(F.normalize(m.text_proj(pooled_txt), dim=-1), feats["txt"], atol=2e-3)


def test_a_trained_late_head_learns_the_region_that_matches_a_word():
    # Photos of two regions, one of which is "its" word; captions of that word and a shared one.
    torch.manual_seed(0)
    n, dim = 16, 8
    words = _unit(n + 1, dim, seed=3)  # word i belongs to photo i; word n is in every caption
    regions = torch.stack([torch.stack([words[i], words[(i + 1) % n] * 0 + _unit(dim, seed=10 + i)]) for i in range(n)])
    states = torch.stack([torch.stack([words[n], words[i], words[n]]) for i in range(n)]).repeat(2, 1, 1)
    train = {"states": states.half(), "mask": torch.ones(2 * n, 3, dtype=torch.long),
             "regions": regions.half(), "caption_image": torch.arange(n).repeat(2),
             "img": torch.zeros(n, dim), "txt": torch.zeros(2 * n, dim)}  # global similarities all 0
    head = levers.train_late_head(train, 1.0, d=8, epochs=30, batch=8, negatives=3, pool=n - 1, lr=3e-2)
    with torch.no_grad():
        tokens, proj = head.project(train["states"][:n], train["regions"])
        scores = head(tokens, levers.word_mask(train["mask"][:n]), proj[None].expand(n, -1, -1, -1),
                      torch.zeros(n, n))
    assert (scores.argmax(1) == torch.arange(n)).float().mean() >= 0.9
