import os

import pytest
import torch

import checkpoint
from model import DualEncoder


@pytest.fixture(scope="module")
def tiny_model(tiny_data):
    torch.manual_seed(0)
    return DualEncoder(text_encoder=f"{tiny_data}/text_encoder", embedding_dim=16, pretrained=False).eval()


def test_checkpoint_round_trip_weights_only(tmp_path, tiny_model, tiny_data):
    # eval_flip: an inference option that steers evaluation and search, never the model built.
    args = {"image_encoder": "mobilenet_v3_small", "text_encoder": f"{tiny_data}/text_encoder",
            "embedding_dim": 16, "text_pooling": "cls", "temperature": 0.07, "fixed_temperature": False,
            "image_size": 64, "no_pretrained": True, "data_dir": tiny_data, "eval_flip": True}
    path = tmp_path / "ck.pt"
    checkpoint.save_checkpoint(str(path), tiny_model, args, epoch=3, metrics={"rsum": 1.0})
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["metrics"] == {"rsum": 1.0} and ckpt["args"]["eval_flip"] is True
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary file left
    loaded, tok, _ = checkpoint.load_model(str(path), torch.device("cpu"))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.allclose(loaded.encode_images(images), tiny_model.encode_images(images), atol=1e-6)


def test_eval_image_size_defaults_to_the_training_size():
    assert checkpoint.eval_image_size({"image_size": 224}) == 224  # checkpoints from before the flag
    assert checkpoint.eval_image_size({"image_size": 224, "eval_image_size": 0}) == 224
    assert checkpoint.eval_image_size({"image_size": 224, "eval_image_size": 256}) == 256


def test_not_a_checkpoint_is_refused(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    with pytest.raises(SystemExit, match="not a readable checkpoint"):
        checkpoint.read_checkpoint(str(bad))
    with pytest.raises(SystemExit, match="not found"):
        checkpoint.read_checkpoint(str(tmp_path / "missing.pt"))
