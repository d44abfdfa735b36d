import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def beauty_path():
    return os.path.join(DATA, "beauty", "Beauty.txt")


@pytest.fixture
def ml100k_path():
    return os.path.join(DATA, "ml-100k", "u.data")
