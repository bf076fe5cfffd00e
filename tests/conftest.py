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
