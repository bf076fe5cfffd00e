"""plain_text.py (search.py's text path without transformers) against transformers itself."""

import json

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertModel, DistilBertConfig, DistilBertModel

import checkpoint
import dataset
import model
import plain_text
import synthetic

TEXTS = ["a dog runs through the snow", "", "Ünïcödé café — 雪の中の犬",
         " ".join(["a very long caption"] * 40)]  # past the 64-token limit


def tiny(kind):
    torch.manual_seed(0)
    if kind == "bert":
        return BertModel(BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=80)).eval()
    return DistilBertModel(DistilBertConfig(vocab_size=120, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=80)).eval()


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_plain_tower_matches_transformers(kind):
    hf = tiny(kind)
    config = json.loads(hf.config.to_json_string())  # what checkpoints store as text_config
    assert plain_text.supports(config)
    plain = plain_text.PlainTextTower(config, hf.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 120, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padded rows: their padding must not change the other tokens' outputs
    mask[2, 2:] = 0
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = plain(ids, mask).last_hidden_state
    keep = mask.bool()
    assert torch.allclose(got[keep], want[keep], atol=1e-5), (got[keep] - want[keep]).abs().max()


def test_unsupported_configs_fall_back():
    assert not plain_text.supports({"model_type": "roberta"})
    assert not plain_text.supports({"model_type": "bert", "position_embedding_type": "relative_key"})
    assert not plain_text.supports({"model_type": "distilbert", "sinusoidal_pos_embds": True})


def test_plain_tokenizer_matches_transformers(tmp_path):
    folder = str(tmp_path / "tok")
    synthetic.save_tiny_text_encoder(folder, ["a dog runs through the snow", "two cats on a red sofa"])
    want = AutoTokenizer.from_pretrained(folder)(TEXTS, padding="longest", truncation=True, max_length=64,
                                                 return_tensors="pt")
    got = plain_text.PlainTokenizer(folder)(TEXTS, padding="longest", truncation=True, max_length=64)
    assert got["input_ids"].shape[1] == 64  # the long caption was cut
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])


def test_load_model_plain_text_gives_the_same_embeddings(tmp_path):
    folder = str(tmp_path / "tower")
    synthetic.save_tiny_text_encoder(folder, ["a dog runs through the snow", "two cats on a red sofa"])
    m = model.DualEncoder(text_encoder=folder, pretrained=False, text_pooling="mean")
    args = {"image_encoder": "mobilenet_v3_small", "text_encoder": folder, "embedding_dim": 512,
            "text_pooling": "mean", "temperature": 0.07, "fixed_temperature": False, "image_size": 64}
    run = tmp_path / "run"
    run.mkdir()
    model.load_tokenizer(folder).save_pretrained(run / "tokenizer")
    checkpoint.save_checkpoint(str(run / "best.pt"), m, args, 1, None)
    ref, ref_tok, _ = checkpoint.load_model(str(run / "best.pt"), torch.device("cpu"))
    fast, fast_tok, _ = checkpoint.load_model(str(run / "best.pt"), torch.device("cpu"), plain_text=True)
    assert isinstance(fast.text_tower, plain_text.PlainTextTower) and isinstance(fast_tok, plain_text.PlainTokenizer)
    with torch.no_grad():
        ta, tb = dataset.tokenize(ref_tok, TEXTS), dataset.tokenize(fast_tok, TEXTS)
        a = ref.encode_texts(ta["input_ids"], ta["attention_mask"])
        b = fast.encode_texts(tb["input_ids"], tb["attention_mask"])
    # On a CPU with native bf16 the text tower runs under bf16 autocast: equal up to its rounding.
    assert (a * b).sum(-1).min() > 0.999
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    assert torch.equal(ref.encode_images(images), fast.encode_images(images))


def test_damaged_saved_tokenizer_is_one_clear_error(tmp_path):
    folder = str(tmp_path / "tower")
    synthetic.save_tiny_text_encoder(folder, ["a dog runs"])
    m = model.DualEncoder(text_encoder=folder, pretrained=False)
    args = {"image_encoder": "mobilenet_v3_small", "text_encoder": folder, "embedding_dim": 512,
            "text_pooling": "cls", "temperature": 0.07, "fixed_temperature": False, "image_size": 64}
    model.load_tokenizer(folder).save_pretrained(tmp_path / "tokenizer")
    checkpoint.save_checkpoint(str(tmp_path / "best.pt"), m, args, 1, None)
    (tmp_path / "tokenizer" / "tokenizer.json").write_text("{not json")
    with pytest.raises(SystemExit, match="tokenizer saved beside .* cannot be read"):
        checkpoint.load_model(str(tmp_path / "best.pt"), torch.device("cpu"), plain_text=True)
