"""Models given as a config only (random weights, seeded), and where a model's weights come from, tensor by tensor.

No ≥1B weights ship offline here, so capacity planning, memory measurements and the sharded-model tests use Llama /
Qwen architectures built from a config (``--model-config``): a ``config.json`` file, a folder holding one, or a
preset name below (the public configs of those models, typed in, nothing downloaded). Their weights are random and
seeded *per tensor* (by the seed and the parameter's name), so a model built sharded over any number of ranks and the
same model built whole in one process hold the same weights bit for bit.

A :class:`WeightSource` hands out one tensor at a time: random (:class:`RandomWeights`) or read from safetensors files
opened lazily (:class:`SafetensorsWeights`: ``safe_open`` maps the file and copies only the asked tensor), so the
sharded loader (``scalerec.llm.sharded``) never holds a whole state dict.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

#: Public configs of a few Llama / Qwen models (architecture only; weights are random when built from these).
PRESETS: dict[str, dict] = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "smollm2-1.7b": dict(model_type="llama", vocab_size=49152, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=8192, rope_theta=130000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "llama-3.1-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                          num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                          max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5,
                          tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151643),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_word_embeddings=False, bos_token_id=151643, eos_token_id=151643),
}

ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def load_model_config(spec: str | os.PathLike | dict):
    """A transformers config from a preset name, a ``config.json`` file, a folder holding one, or a dict.

    Only decoder-only Llama-like architectures (``model_type`` in :data:`ARCHITECTURES`) are accepted; anything
    else is one clear error naming the file and the field.
    """
    from transformers import AutoConfig

    if isinstance(spec, dict):
        d, where = dict(spec), "the given config"
    elif str(spec).lower() in PRESETS:
        d, where = dict(PRESETS[str(spec).lower()]), f"preset {str(spec).lower()!r}"
    else:
        p = Path(spec)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise FileNotFoundError(f"{spec}: neither a model config file, a folder with a config.json, nor a "
                                    f"preset ({', '.join(sorted(PRESETS))})")
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}:{exc.lineno}: malformed JSON ({exc.msg})") from exc
        where = str(p)
    mt = d.get("model_type")
    if mt not in ARCHITECTURES:
        raise ValueError(f"{where}: field 'model_type' is {mt!r}; supported: {', '.join(ARCHITECTURES)}")
    d.pop("model_type")
    for key in ("quantization_config",):
        d.pop(key, None)
    return AutoConfig.for_model(mt, **d)


def model_class(config):
    """The causal-LM class of a config (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def n_parameters(config) -> int:
    """Parameters of a Llama/Qwen-like model of this config (tied embeddings counted once)."""
    d, f, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    h = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // h
    kv = config.num_key_value_heads or h
    attn = d * h * hd * 2 + d * kv * hd * 2
    if getattr(config, "model_type", "") == "qwen2":  # q, k, v biases
        attn += h * hd + 2 * kv * hd
    if getattr(config, "model_type", "") == "qwen3":  # q / k norms
        attn += 2 * hd
    layer = attn + 3 * d * f + 2 * d
    emb = config.vocab_size * d
    return n * layer + emb * (1 if config.tie_word_embeddings else 2) + d


# ----------------------------------------------------------------------------------------------
# where the weights come from

class WeightSource:
    """One tensor at a time, by parameter name (never a whole state dict)."""

    def get(self, name: str, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__


class RandomWeights(WeightSource):
    """Seeded per tensor: N(0, ``std``²) for matrices, ones for norm weights, zeros for biases. A tensor depends on
    the seed and its name only, so the model is the same however it is partitioned."""

    def __init__(self, seed: int = 0, std: float = 0.02):
        self.seed, self.std = int(seed), float(std)

    def get(self, name: str, shape, dtype) -> torch.Tensor:
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=dtype)
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=dtype)
        h = hashlib.sha256(f"{self.seed}|{name}".encode()).digest()
        gen = torch.Generator().manual_seed(int.from_bytes(h[:8], "little") & ((1 << 63) - 1))
        return (torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * self.std).to(dtype)

    def describe(self) -> str:
        return f"random (seed {self.seed}, std {self.std})"


class SafetensorsWeights(WeightSource):
    """Tensors read lazily from a checkpoint folder (``model.safetensors`` or an indexed set of shards)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
            self.where = {k: self.folder / v for k, v in wm.items()}
        else:
            files = sorted(self.folder.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"{self.folder}: no *.safetensors file (the sharded loader reads safetensors "
                                        f"only; a GGUF is converted once, see docs/llm-sharded.md)")
            from safetensors import safe_open

            self.where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():
                        self.where[k] = f

    def get(self, name: str, shape, dtype) -> torch.Tensor:
        from safetensors import safe_open

        key = name if name in self.where else None
        tied = {"lm_head.weight": "model.embed_tokens.weight", "model.embed_tokens.weight": "lm_head.weight"}
        if key is None and tied.get(name) in self.where:
            key = tied[name]  # tied embedding and head, saved once under either name
        if key is None:
            raise KeyError(f"{self.folder}: no tensor {name!r} in the checkpoint")
        with safe_open(str(self.where[key]), framework="pt") as h:
            t = h.get_tensor(key)
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{self.folder}: tensor {key!r} has shape {tuple(t.shape)}, the model wants "
                             f"{tuple(shape)}")
        return t.to(dtype)

    def describe(self) -> str:
        return f"safetensors {self.folder}"


def build_unsharded(config, source: WeightSource, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The whole model in this process with ``source``'s weights (the reference the sharded model must equal),
    frozen and in eval mode."""
    model = construct(config, dtype)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(source.get(name, p.shape, dtype))
    model.eval()
    model.requires_grad_(False)
    return model


def construct(config, dtype: torch.dtype) -> torch.nn.Module:
    """The model class of ``config`` built in ``dtype`` without initialising weights (they are all loaded next):
    transformers' ``no_init_weights`` (which also skips the tying, done after)."""
    from transformers.initialization import no_init_weights

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights():
            model = model_class(config)(config)
    finally:
        torch.set_default_dtype(prev)
    model.tie_weights()
    return model
