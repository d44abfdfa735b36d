"""Shared helpers of the LLM tests (imported by tests/test_llm_*.py; holds no tests; not a conftest, to stay out of other tests)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "data" / "text" / "tinyshakespeare_head.txt"

_CACHE: dict = {}


def smollm2():
    """SmolLM2-135M-Instruct, loaded once per test session."""
    if "lm" not in _CACHE:
        import torch

        # OMP_NUM_THREADS when set (make test sets 2); 2 threads on a busy machine wait on each other
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, min(2, os.cpu_count() or 1))))
        from scalerec.llm import load_causal_lm

        _CACHE["lm"] = load_causal_lm("smollm2", dtype="float32", device="cpu")
    return _CACHE["lm"]


def passage_ids(lm, n_tokens: int, index: int = 0) -> list[int]:
    """A passage of exactly n_tokens token ids from the bundled Shakespeare excerpt."""
    if "ids" not in _CACHE:
        _CACHE["ids"] = lm.encode(TEXT.read_text())
    ids = _CACHE["ids"]
    start = 1000 + 500 * index
    return ids[start: start + n_tokens]


def tiny_model_dir(lm, root: Path) -> Path:
    """A tiny randomly initialised Llama with SmolLM2's tokenizer (for job-contract tests)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / "tiny-llama"
    if (out / "config.json").exists():
        return out
    lm.tokenizer.save_pretrained(out)
    cfg = LlamaConfig(vocab_size=len(lm.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=48,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def lm():
    return smollm2()
