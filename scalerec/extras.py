"""Optional dependencies ("extras") and the one-line error that names the one to install.

``pip install scalerec`` installs the recommender core (torch, numpy, omegaconf, pyarrow, tqdm). The rest comes
with extras (``pyproject.toml``): ``[dist]`` Ray Train + DeepSpeed, ``[faiss]``, ``[llm]`` (transformers, gguf,
accelerate), ``[peft]`` (peft), ``[bench]`` (matplotlib), ``[all]``. A command that needs one calls
:func:`require` before it imports the package::

    faiss = require("faiss", "faiss")

and, where the package is missing, stops with one line:
``scalerec recommend needs the [faiss] extra: pip install 'scalerec[faiss]'``.
"""
from __future__ import annotations

import importlib
import os
import sys
from types import ModuleType

# extra -> the distributions it installs (kept in step with pyproject.toml by tests/test_docs.py)
EXTRAS: dict[str, tuple[str, ...]] = {
    "dist": ("ray[train,default]", "deepspeed"),
    "faiss": ("faiss-cpu",),
    "llm": ("transformers", "gguf", "accelerate"),
    "peft": ("peft",),
    "bench": ("matplotlib",),
}


class MissingExtra(ImportError):
    """An optional package is not installed; the message names the extra that installs it."""


def _command() -> str:
    """``scalerec <subcommand>`` when running under the ``scalerec`` command, else ``scalerec``."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if prog == "scalerec" or prog.endswith("cli.py"):
        sub = next((a for a in sys.argv[1:] if not a.startswith("-")), None)
        if sub:
            return f"scalerec {sub}"
    return "scalerec"


def require(extra: str, module: str, command: str | None = None) -> ModuleType:
    """Import ``module`` and return it, or raise :class:`MissingExtra` naming ``extra`` in one line.

    ``command`` is the subcommand to name in the message (default: the one being run, if any). An
    ImportError raised *inside* an installed ``module`` (a broken dependency of it) is not a missing extra
    and propagates unchanged.
    """
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}; extras: {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.split(".")[0]
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise
        who = f"scalerec {command}" if command else _command()
        raise MissingExtra(f"{who} needs the [{extra}] extra: pip install 'scalerec[{extra}]'") from exc
