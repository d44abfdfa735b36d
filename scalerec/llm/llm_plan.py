"""Per-rank memory and step time of embedding fitting with the frozen model sharded over W ranks (ZeRO-3), or
whole on every worker (data parallel), for CPU and GPU ranks: ``scalerec llm-plan``.

The model of one rank (``scalerec.llm.sharded``: every parameter partitioned, gathered for its module's forward
and again for its backward, released right after; no prefetch; no gradient or optimizer state for the model):

* memory = the larger of loading (runtime + partition + three copies of the largest tensor on rank 0: the source
  tensor, its converted copy, the gathered parameter) and fitting:
  runtime (libraries; a CUDA context on a GPU) + the rank's partition ``N·b/W`` + the gathered working set
  (the largest parameter, twice: the gathered tensor and the collective's buffer) + the activations a backward
  needs (per layer and position ``8·d + 2·d_kv + 4·f`` values, Llama-like) + the logits (float32, three copies:
  the cast, the softmax, its gradient) + the per-text vectors (negligible);
* step time = compute + communication (CPU ranks: the gloo gathers block, no overlap) or the larger of the two (GPU
  ranks, NCCL overlaps with compute): compute ≈ 2 forward passes (the backward computes input gradients only, no
  weight gradients) ≈ ``4·N_layers·B·T + 4·V·d·B·L`` FLOPs at the rank's effective FLOP/s; communication = every
  parameter received twice a step, ``2·N·b·(W-1)/W`` bytes at the rank's all-gather bandwidth, plus a fixed cost per
  gathered tensor (two gathers of each of the ~9 tensors a layer: DeepSpeed's hooks and the ranks' rendezvous;
  on a busy shared CPU this term dominates).

Data parallel (``W`` whole copies) is the same with ``W = 1`` per worker and no communication, so it is faster
whenever the model fits one worker; sharding is for models that do not (the crossover is memory, not speed).
The CPU constants are measured on this project's machine (benchmarks/llm_sharded.py checks the plan against what
it measures); the GPU ones are datasheet peaks times an efficiency, to be replaced by a measurement when a GPU is
lent.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

BYTES = {"float32": 4, "fp32": 4, "float64": 8, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass
class Hardware:
    """One rank's device. ``flops``: effective FLOP/s per dtype byte size (4: fp32, 2: bf16/fp16, 8: fp64);
    ``gather_gbs``: all-gather bandwidth a rank receives at (GB/s); ``runtime_gb``: fixed per-rank memory."""

    name: str
    kind: str                   # "cpu" or "gpu"
    mem_gb: float
    flops: dict
    gather_gbs: float
    runtime_gb: float
    overlap: bool
    gather_latency_s: float = 0.0   # fixed cost of one parameter's all-gather (hooks, rendezvous)

    def flops_for(self, b: int) -> float:
        return self.flops.get(b, self.flops[4])


HARDWARE = {
    # one thread of this project's 2-core CPU machine (benchmarks/llm_sharded.py --section calibrate measures them:
    # an fp32 matmul of the fitting step's shapes, and a gloo all-gather between two local processes)
    "cpu": Hardware("cpu (1 thread, gloo)", "cpu", 64.0, {4: 3.0e10, 8: 1.5e10, 2: 0.6e10}, 1.0, 0.75, False,
                    0.018),
    # datasheet dense peaks x 0.4 (fp32 as TF32 tensor cores x 0.4 too); NVLink all-gather ~ 200 / 150 GB/s a rank
    "h100-80gb": Hardware("NVIDIA H100 80 GB (NVLink)", "gpu", 80.0, {4: 0.4 * 495e12, 2: 0.4 * 989e12,
                                                                       8: 0.4 * 67e12}, 200.0, 2.0, True, 5e-5),
    "a100-80gb": Hardware("NVIDIA A100 80 GB (NVLink)", "gpu", 80.0, {4: 0.4 * 156e12, 2: 0.4 * 312e12,
                                                                       8: 0.4 * 19.5e12}, 150.0, 2.0, True, 5e-5),
}


def _shapes(config):
    d, f, nl, V = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    h = config.num_attention_heads
    hd = getattr(config, "head_dim", None) or d // h
    kv = (config.num_key_value_heads or h) * hd
    return d, f, nl, V, kv


def plan(config, world: int, batch: int, tokens: int, dtype: str = "float32", hardware: str | Hardware = "cpu",
         mode: str = "one-step", n_vectors: int = 2, sharded: bool = True) -> dict:
    """Per-rank memory (GB) and seconds a step for fitting ``batch`` texts of ``tokens`` tokens on each of ``world``
    ranks (``sharded``: one ZeRO-3 group; else ``world`` whole copies), and texts/hour per rank at a given number of
    steps per text (``texts_per_hour(steps)`` in the result's ``per_step_texts``)."""
    from .model_config import n_parameters

    hw = HARDWARE[hardware] if isinstance(hardware, str) else hardware
    if dtype not in BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(BYTES)}")
    if world < 1 or batch < 1 or tokens < 1:
        raise ValueError(f"world, batch and tokens must be >= 1 (got {world}, {batch}, {tokens})")
    b = BYTES[dtype]
    d, f, nl, V, kv = _shapes(config)
    N = n_parameters(config)
    n_emb = V * d * (1 if config.tie_word_embeddings else 2)
    W = world if sharded else 1
    T = tokens + 1 + (n_vectors - 1 if mode == "ar" else 1)   # sink + fitted vectors + (teacher-forced) tokens
    partition = N * b / W
    largest = max(V * d, d * f, d * d)
    gathered = 2 * largest * b if W > 1 else 0
    act = batch * T * nl * (8 * d + 2 * kv + 4 * f) * b
    logits = batch * tokens * V * 4 * 3
    gb = 1e9
    fit_mem = hw.runtime_gb * gb + partition + gathered + act + logits
    # loading: rank 0 holds the source tensor and its converted copy beside the gathered parameter
    build = hw.runtime_gb * gb + partition + 3 * largest * b
    mem = max(fit_mem, build)
    fl = 4 * (N - n_emb) * batch * T + 4 * V * d * batch * tokens
    compute_s = fl / hw.flops_for(b)
    n_tensors = nl * 9 + (1 if config.tie_word_embeddings else 2) + 1  # 7 matrices + 2 norms a layer (Llama)
    comm_s = (2 * N * b * (W - 1) / W / (hw.gather_gbs * gb) + 2 * n_tensors * hw.gather_latency_s) if W > 1 else 0.0
    step_s = max(compute_s, comm_s) if hw.overlap else compute_s + comm_s
    return {"params": N, "params_b": round(N / 1e9, 3), "dtype": dtype, "world": world, "sharded": sharded,
            "batch": batch, "tokens": tokens, "positions": T, "hardware": hw.name,
            "mem_gb": {"total": mem / gb, "fit": fit_mem / gb, "build": build / gb, "runtime": hw.runtime_gb,
                       "partition": partition / gb,
                       "gathered": gathered / gb, "activations": act / gb, "logits": logits / gb},
            "fits": mem <= hw.mem_gb * gb, "rank_mem_gb": hw.mem_gb,
            "step_s": step_s, "compute_s": compute_s, "comm_s": comm_s, "step_flops": fl,
            "texts_per_step": batch * world}


def texts_per_hour(p: dict, steps_per_text: float) -> float:
    """All ranks together, a plan's texts/hour when each text takes ``steps_per_text`` steps."""
    return 3600.0 / (p["step_s"] * steps_per_text) * p["texts_per_step"]


def min_world(config, batch: int, tokens: int, dtype: str, hardware: str = "cpu", max_world: int = 1024) -> int | None:
    """The fewest sharded ranks whose per-rank memory fits (None: not even ``max_world``)."""
    for w in range(1, max_world + 1):
        if plan(config, w, batch, tokens, dtype, hardware)["fits"]:
            return w
    return None


# ----------------------------------------------------------------------------------------------
# the command

def add_parser(subparsers) -> None:
    p = subparsers.add_parser("llm-plan", help="per-rank memory and step time of fitting with a sharded frozen LLM",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model-config", required=True, help="a preset (e.g. llama-3.1-8b), config.json or folder")
    p.add_argument("--workers", type=int, default=1, help="ranks (W)")
    p.add_argument("--batch-size", type=int, default=8, help="texts fitted at once on each rank")
    p.add_argument("--tokens", type=int, default=32, help="tokens per text")
    p.add_argument("--dtype", default="float32", choices=sorted(BYTES))
    p.add_argument("--hardware", default="cpu", choices=sorted(HARDWARE))
    p.add_argument("--mode", default="one-step", choices=["one-step", "ar"])
    p.add_argument("--steps-per-text", type=float, default=100.0, help="for the texts/hour figure")
    p.add_argument("--data-parallel", action="store_true", help="W whole copies instead of one sharded model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_plan)


def run_plan(args) -> int:
    from .model_config import load_model_config

    cfg = load_model_config(args.model_config)
    n_vec = 2 if args.mode == "one-step" else 1
    p = plan(cfg, args.workers, args.batch_size, args.tokens, args.dtype, args.hardware, mode=args.mode,
             n_vectors=n_vec, sharded=not args.data_parallel)
    p["texts_per_hour"] = texts_per_hour(p, args.steps_per_text)
    p["min_world"] = min_world(cfg, args.batch_size, args.tokens, args.dtype, args.hardware)
    m = p["mem_gb"]
    line = (f"{p['params_b']} B params, {args.dtype}, W={args.workers} {'sharded' if p['sharded'] else 'whole'} on "
            f"{p['hardware']}: {m['total']:.2f} GB a rank (partition {m['partition']:.2f}, gathered "
            f"{m['gathered']:.2f}, activations {m['activations']:.2f}, logits {m['logits']:.2f}, runtime "
            f"{m['runtime']:.2f}) of {p['rank_mem_gb']:.0f} -> {'fits' if p['fits'] else 'does NOT fit'}; "
            f"{p['step_s']:.3g} s a step (compute {p['compute_s']:.3g}, gathers {p['comm_s']:.3g}); "
            f"{p['texts_per_hour']:.3g} texts/hour at {args.steps_per_text:g} steps a text; fewest ranks that fit: "
            f"{p['min_world']}")
    print(line, file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(p))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scalerec.llm.llm_plan")
    add_parser(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(["llm-plan", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["plan", "texts_per_hour", "min_world", "HARDWARE", "Hardware", "asdict"]
