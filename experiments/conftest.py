"""The experiments' tests run apart from the product's suite: python -m pytest experiments"""
import os
import sys

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    from tiny import make_tiny_dataset
    return make_tiny_dataset(str(tmp_path_factory.mktemp("tiny")))
