import math

import pytest
import torch
import torch.nn.functional as F

import device
import model
from model import DualEncoder, info_nce


def unit(x):
    return F.normalize(x, dim=-1)


def test_info_nce_identical_embeddings_is_log_b():
    e = unit(torch.ones(8, 16))  # every pair equally similar: a uniform softmax
    assert info_nce(e, e, torch.tensor(10.0)).item() == pytest.approx(math.log(8), rel=1e-5)


def test_info_nce_well_separated_pairs_near_zero():
    e = torch.eye(6)
    assert info_nce(e, e, torch.tensor(100.0)).item() < 1e-6


def test_info_nce_is_symmetric():
    g = torch.Generator().manual_seed(0)
    a, b = unit(torch.randn(5, 8, generator=g)), unit(torch.randn(5, 8, generator=g))
    s = torch.tensor(7.0)
    assert info_nce(a, b, s).item() == pytest.approx(info_nce(b, a, s).item(), rel=1e-6)


def brute_force_loss(img, txt, scale, same):
    """Row-by-row cross-entropy with same-photo partners dropped from the candidates."""
    n, total = len(img), 0.0
    for a, b in ((img, txt), (txt, img)):
        for i in range(n):
            cands = [j for j in range(n) if j == i or not same[i][j]]
            logits = torch.stack([scale * a[i] @ b[j] for j in cands])
            total += -(logits[cands.index(i)] - torch.logsumexp(logits, 0))
    return (total / (2 * n)).item()


def test_info_nce_same_image_mask_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    img, txt = unit(torch.randn(6, 8, generator=g)), unit(torch.randn(6, 8, generator=g))
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    same = ids[:, None] == ids[None, :]
    s = torch.tensor(5.0)
    assert info_nce(img, txt, s, same).item() == pytest.approx(brute_force_loss(img, txt, s, same), rel=1e-5)
    # Masking removes negatives, so the loss can only go down.
    assert info_nce(img, txt, s, same) < info_nce(img, txt, s)


def test_same_photo_captions_are_not_pushed_apart():
    # Two captions of one photo, both equal to it: with the mask the loss is that of 2 clean pairs.
    img = unit(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    assert info_nce(img, img, torch.tensor(100.0), same).item() < 1e-6
    assert info_nce(img, img, torch.tensor(100.0)).item() > 0.4  # without it, ~log 2 for the twins


@pytest.fixture(scope="module")
def tiny_model(tiny_data):
    torch.manual_seed(0)
    return DualEncoder(text_encoder=f"{tiny_data}/text_encoder", embedding_dim=16, pretrained=False).eval()


def test_embeddings_are_unit_length(tiny_model, tiny_data):
    tok = model.load_tokenizer(f"{tiny_data}/text_encoder")
    t = tok(["a red circle", "the square is blue and big"], padding="longest", return_tensors="pt")
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        img_emb, txt_emb, scale = tiny_model(images, t["input_ids"], t["attention_mask"])
    assert img_emb.shape == (3, 16) and txt_emb.shape == (2, 16)
    assert torch.allclose(img_emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt_emb.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert scale.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_flip_averages_a_photo_with_its_mirror_image(tiny_data):
    torch.manual_seed(0)
    m = DualEncoder(text_encoder=f"{tiny_data}/text_encoder", embedding_dim=16, pretrained=False)
    images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
    images[:, 0, :, :32] = 255  # a red left half: the mirror image is another photo
    for mod in m.modules():  # batch norm statistics of one batch: photos map to distinct points
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None
    with torch.no_grad():
        m.encode_images(images)
        m.eval()
        symmetric = torch.cat([images[..., :32], images[..., :32].flip(-1)], -1)
        plain, mirrored = m.encode_images(images), m.encode_images(images.flip(-1))
        assert torch.equal(m.encode_images(images, flip=False), plain)
        both = m.encode_images(images, flip=True)
        assert torch.allclose(both, torch.nn.functional.normalize(plain + mirrored, dim=-1), atol=1e-6)
        assert (both * plain).sum(-1).max() < 0.999  # differs from the photo's own embedding
        assert torch.allclose(m.encode_images(symmetric, flip=True), m.encode_images(symmetric), atol=1e-5)


def test_logit_scale_is_clamped_and_can_be_fixed(tiny_data):
    m = DualEncoder(text_encoder=f"{tiny_data}/text_encoder", embedding_dim=8, pretrained=False,
                    temperature=0.001, fixed_temperature=True)
    assert not m.logit_scale.requires_grad
    m.clamp_logit_scale()
    assert m.logit_scale.exp().item() == pytest.approx(100.0, rel=1e-5)


def test_mean_pooling_ignores_padding(tiny_data):
    torch.manual_seed(0)
    m = DualEncoder(text_encoder=f"{tiny_data}/text_encoder", embedding_dim=8, pretrained=False,
                    text_pooling="mean").eval()
    tok = model.load_tokenizer(f"{tiny_data}/text_encoder")
    alone = tok(["a red circle"], return_tensors="pt")
    padded = tok(["a red circle", "one blue square on grey coloured"], padding="longest", return_tensors="pt")
    with torch.no_grad():
        a = m.encode_texts(alone["input_ids"], alone["attention_mask"])
        b = m.encode_texts(padded["input_ids"], padded["attention_mask"])[:1]
    assert torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("cuda, mps, want", [(True, True, "cuda"), (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, want):
    # The precision policy: test_precision.py.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2 * cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert device.pick_device("auto") == torch.device(want)
    assert device.pick_device("cpu") == torch.device("cpu")
    # Under torchrun each process takes its own GPU.
    assert device.pick_device("auto", local_rank=1) == (torch.device("cuda", 1) if cuda else torch.device(want))


def test_missing_pretrained_weights_give_a_clear_error(monkeypatch, capsys):
    from torchvision.models import MobileNet_V3_Small_Weights

    def offline(*a, **k):
        raise OSError("Name or service not known")
    monkeypatch.setattr(type(MobileNet_V3_Small_Weights.IMAGENET1K_V1), "get_state_dict", offline)
    with pytest.raises(SystemExit) as e:
        model.build_image_tower("mobilenet_v3_small", pretrained=True)
    msg = str(e.value)
    assert "--no_pretrained" in msg and "--image_weights" in msg and "Traceback" not in msg


@pytest.mark.parametrize("name", ["no-such-org/no-such-model-xyz", "/no/such/folder"])
def test_missing_text_encoder_gives_a_clear_error(name):
    with pytest.raises(SystemExit) as e:
        model.build_text_tower(name, pretrained=True)
    assert "text encoder" in str(e.value) and "--no_pretrained" in str(e.value)
    with pytest.raises(SystemExit, match="tokenizer"):
        model.load_tokenizer(name)


def test_texts_in_length_groups_match_one_batch_with_gradients(tiny_data):
    # encode_texts encodes a large batch in groups of similar length, each cut to its own longest
    # caption: the embeddings and the gradients must be those of the one padded batch.
    torch.manual_seed(0)
    m = DualEncoder(text_encoder=f"{tiny_data}/text_encoder", embedding_dim=8, pretrained=False,
                    text_pooling="mean").eval()
    tok = model.load_tokenizer(f"{tiny_data}/text_encoder")
    words = "a red circle on one blue square beside grey coloured shapes".split()
    texts = [" ".join(words[: 1 + (7 * i) % len(words)]) for i in range(11)]
    t = tok(texts, padding="longest", return_tensors="pt")
    assert t["attention_mask"].sum(1).unique().numel() > 3  # lengths differ, so groups are cut
    weights = torch.randn(len(texts), 8, generator=torch.Generator().manual_seed(1))  # a loss per row
    grads = []
    for chunk in (len(texts), 3):
        m.zero_grad()
        emb = m.encode_texts(t["input_ids"], t["attention_mask"], chunk=chunk)
        (emb * weights).sum().backward()
        grads.append((emb.detach(), m.text_proj.weight.grad.clone(),
                      m.text_tower.embeddings.word_embeddings.weight.grad.clone()))
    for whole, grouped in zip(*grads):
        assert torch.allclose(whole, grouped, atol=1e-5)
    # Left-padded ids cannot be cut at the group's longest caption: one batch then.
    left = t["attention_mask"].flip(1)
    assert torch.allclose(m.encode_texts(t["input_ids"].flip(1), left, chunk=3),
                          m.encode_texts(t["input_ids"].flip(1), left, chunk=len(texts)))
