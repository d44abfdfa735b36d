import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# converted GGUF models (scalerec.llm.model.gguf_cache_dir) go to the temp dir, not the user's ~/.cache; set
# before any Ray process starts, so that the workers of the encoding-job tests find the entry the tests made
os.environ.setdefault("SCALEREC_MODEL_CACHE", os.path.join(tempfile.gettempdir(), "scalerec-test-model-cache"))


@pytest.fixture
def beauty_path():
    return os.path.join(DATA, "beauty", "Beauty.txt")


@pytest.fixture
def ml100k_path():
    return os.path.join(DATA, "ml-100k", "u.data")
