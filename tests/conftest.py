import os
import sys

import pytest

# No test may reach the network: Hugging Face libraries read these once, at import.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Tests import the top-level scripts and modules directly, as a user would run them.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from tiny import make_tiny_dataset
    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_data, tmp_path_factory):
    """An untrained tiny checkpoint (tiny.make_checkpoint), for tests that index and search photos."""
    from tiny import make_checkpoint
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "m" / "best.pt",
                           os.path.join(tiny_data, "text_encoder"), 5)
