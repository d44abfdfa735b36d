"""Encoding jobs with the frozen model sharded over Ray workers (``scalerec encode --shard-model zero3``).

Orchestration by Ray: W actors (``num_cpus = threads`` each) form one torch.distributed group (gloo on CPU ranks,
NCCL on GPU ranks): rank 0's actor picks the address and a free port, every actor joins. Each rank then builds the
ZeRO-3 partitioned model (``scalerec.llm.sharded``) and fits the texts of the shards assigned to it, data parallel
over texts; all ranks step together (every layer's gather is a collective).

The job contract is today's (``scalerec.llm.jobs``, whose helpers this module imports): numbered shards of
``shard_size`` records in input order, a shard written atomically (temporary name, then ``os.replace``) only when all
its texts are done, a rerun skips every written shard and refuses a folder holding another job. Pending shards are
dealt to the ranks round robin; inside a rank the texts of its shards queue in shard order for slot refill, and a
shard is written as soon as its last text finishes. If a rank dies (killed, out of memory), the group cannot go on
(its parameter shards are gone): the driver kills the other actors, forms a new group and resumes from the shards on
disk, at most ``max_retries`` times. Finished shards are never refitted; texts of unfinished shards are fitted again.
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .jobs import (JobSpec, _install_shared_m, file_fingerprint, fit_kwargs, plan_shards, read_records, token_error,
                   shard_path, write_manifest, write_shard_atomic)


@dataclass
class ModelSource:
    """What a rank builds: a config (model architecture), where the weights come from, and the tokenizer folder."""

    config: object
    weights: str              # "random" or a safetensors folder
    tokenizer: str | None     # a folder with tokenizer files, or None (texts must then be token ids)
    name: str
    seed: int = 0
    dtype: str = "float32"

    def build(self, device: str = "cpu"):
        import torch

        from .model_config import RandomWeights, SafetensorsWeights
        from .sharded import build_sharded_lm

        tok = None
        if self.tokenizer is not None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.tokenizer)
        src = RandomWeights(self.seed) if self.weights == "random" else SafetensorsWeights(self.weights)
        return build_sharded_lm(self.config, src, dtype=getattr(torch, self.dtype), tokenizer=tok, name=self.name,
                                device=device)


_DTYPES = {None: "float32", "float32": "float32", "fp32": "float32", "float64": "float64",
           "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def resolve_source(model: str | None, model_config: str | None = None, dtype: str | None = None,
                   seed: int = 0) -> ModelSource:
    """The model of a sharded job, checked on the driver (one clear error, before any worker starts).

    ``model_config``: a preset, ``config.json`` or folder (random weights, seeded); its tokenizer comes from the
    config's folder when it holds one, else from ``model``. Without it, ``model`` must be a bundled name or a
    ``.gguf`` (converted once to a safetensors checkpoint by ``scalerec.llm.model``'s cache, in this process: the
    one full copy, see docs/llm-sharded.md), or a folder with ``config.json`` and ``*.safetensors``.
    """
    from .model import BUNDLED, gguf_cache_dir, load_causal_lm, resolve_model
    from .model_config import PRESETS, load_model_config

    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; one of {sorted(k for k in _DTYPES if k)}")
    dt = _DTYPES[dtype]
    if model_config is not None:
        config = load_model_config(model_config)
        tok = None
        mc = Path(model_config)
        folder = mc if mc.is_dir() else mc.parent if mc.is_file() else None
        if folder is not None and any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
            tok = str(folder)
        elif model is not None:
            tok = resolve_source(model, dtype=dtype).tokenizer
        label = str(model_config) if str(model_config).lower() not in PRESETS else str(model_config).lower()
        return ModelSource(config=config, weights="random", tokenizer=tok, name=f"config:{label}#seed{seed}",
                           seed=seed, dtype=dt)
    if model is None:
        raise ValueError("a sharded job needs --model (a model file or folder) or --model-config")
    p = Path(model)
    is_gguf = model.lower() in BUNDLED or (p.is_file() and p.suffix == ".gguf") or \
        (p.is_dir() and not (p / "config.json").exists() and any(p.glob("*.gguf")))
    if is_gguf:
        where, gguf = resolve_model(model)
        cache = gguf_cache_dir(where, gguf)
        if cache is None:
            raise ValueError(f"{model}: a GGUF model is loaded sharded from its converted safetensors copy, and the "
                             "converted-model cache is off (SCALEREC_MODEL_CACHE=off)")
        if not (cache / ".scalerec-complete").exists():
            lm = load_causal_lm(model, dtype="float32", device="cpu")  # writes the cache (the one full copy)
            del lm
        folder = cache
    elif p.is_dir() and (p / "config.json").exists():
        folder = p
    else:
        raise ValueError(f"{model}: neither a model file (.gguf), a model folder (config.json + *.safetensors), "
                         "a bundled model name, nor a model config (--model-config)")
    if not any(folder.glob("*.safetensors")):
        raise ValueError(f"{folder}: no *.safetensors weights (the sharded loader reads safetensors only)")
    return ModelSource(config=load_model_config(folder), weights=str(folder), tokenizer=str(folder),
                       name=model.lower() if model.lower() in BUNDLED else str(model), seed=seed, dtype=dt)


# ----------------------------------------------------------------------------------------------
# the Ray side: actors forming one process group

class RankActor:
    """One rank: joins the group, builds the sharded model, runs functions with it."""

    def __init__(self, threads: int = 1):
        import torch

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(max(1, int(threads)))
        self.lm = None
        self.rank = -1

    def address(self) -> tuple[str, int, int]:
        """(this node's IP, a free port, this process's id)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port, os.getpid()

    def join(self, rank: int, world: int, addr: str, port: int, timeout_s: float = 600.0) -> int:
        from datetime import timedelta

        import torch.distributed as dist

        os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                          LOCAL_RANK="0")
        dist.init_process_group("gloo", init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        self.rank = rank
        return rank

    def build(self, source: ModelSource) -> dict:
        import resource

        t0 = time.perf_counter()
        self.lm = source.build()
        return {"rank": self.rank, "seconds": time.perf_counter() - t0,
                "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}

    def call(self, fn, *args, **kwargs):
        """``fn(lm, *args, **kwargs)`` on this rank (every rank of the group must be called alike)."""
        return fn(self.lm, *args, **kwargs)

    def leave(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _check_cpus(world: int, threads: int) -> None:
    import ray

    have = ray.cluster_resources().get("CPU", 0)
    if world * threads > have:
        raise ValueError(f"--workers {world} × --threads {threads} need {world * threads} CPUs, the Ray cluster has "
                         f"{int(have)}: all ranks of a sharded model must run at once")


def start_group(world: int, source: ModelSource | None, threads: int = 1) -> list:
    """W actors joined into one group, each with the sharded model built (``source``; None: no model)."""
    import ray

    _check_cpus(world, threads)
    # every allocation of 128 KiB and more is its own mapping, returned to the OS when freed: a rank gathers and
    # frees each layer's parameters twice a step, and glibc's heap otherwise keeps the freed pieces (RSS far above
    # what is live)
    env = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "131072")}
    Actor = ray.remote(num_cpus=threads, runtime_env={"env_vars": env})(RankActor)
    actors = [Actor.remote(threads) for _ in range(world)]
    addr, port, _ = ray.get(actors[0].address.remote())
    ray.get([a.join.remote(r, world, addr, port) for r, a in enumerate(actors)])
    if source is not None:
        ray.get([a.build.remote(source) for a in actors])
    return actors


def run_on_group(actors: list, fn, per_rank_args: list[tuple]) -> list:
    """``fn(lm, *per_rank_args[r])`` on every rank at once; the results in rank order."""
    import ray

    return ray.get([a.call.remote(fn, *args) for a, args in zip(actors, per_rank_args)])


def stop_group(actors: list) -> None:
    import ray

    for a in actors:
        try:
            ray.kill(a)
        except Exception:
            pass


def ensure_ray(world: int, threads: int, address: str | None = None) -> bool:
    """Start a local Ray (all of this machine's CPUs) unless one is running or an address is given; True if
    started here."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address)
    else:
        # address="local": a fresh Ray of our own, even when another (e.g. `ray start`) runs on this machine
        ray.init(address="local", num_cpus=os.cpu_count() or 1, include_dashboard=False, log_to_driver=False)
    return True


# ----------------------------------------------------------------------------------------------
# the per-rank job

@dataclass
class RankWork:
    """What one rank fits: its shards (number, records) and the job's settings."""

    spec: JobSpec
    shards: list = field(default_factory=list)       # [(k, [Record, ...]), ...]
    shared_m: np.ndarray | None = None
    kill_after_shards: int | None = None             # tests: SIGKILL this rank after writing that many shards


def _fit_rank(lm, work: RankWork) -> dict:
    """Fit this rank's shards with slot refill across them; write each shard when its last text is done."""
    import signal

    import torch

    from .fitting import FitConfig
    from .inputs import n_sink
    from .sharded import fit_sharded

    spec = work.spec
    cfg = FitConfig(**fit_kwargs(spec.fit))
    out = Path(spec.output)
    extra = (spec.n_mem if spec.mode == "ar" else 0) + n_sink(lm)
    t0 = time.perf_counter()
    rows_of: dict[int, list[dict]] = {}
    left: dict[int, int] = {}
    todo: list[tuple[int, int, list[int]]] = []      # (shard, row, token ids)
    for k, records in work.shards:
        rows = rows_of[k] = []
        base = {"mode": spec.mode, "model": lm.name, "shard": k}
        for j, rec in enumerate(records):
            row = {"id": rec.id, "text": rec.text, "source": rec.source, "status": "failed", "error": rec.error,
                   "token_ids": None, "n_tokens": None, "vectors": None, "accuracy": None, "steps": None,
                   "seconds": None, "loss": None, "restarts": None, **base}
            rows.append(row)
            if rec.error is not None:
                continue
            toks = lm.encode(rec.text)
            row["token_ids"], row["n_tokens"] = toks, len(toks)
            row["error"] = token_error(rec, toks, lm, extra, spec.text_field)
            if row["error"] is None:
                todo.append((k, j, toks))
        left[k] = sum(1 for t in todo if t[0] == k)
    summary = {"written": 0, "texts": 0, "fitted": len(todo), "failed": 0, "exact": 0,
               "tokens": sum(len(t[2]) for t in todo), "steps": 0, "rank": lm.rank}

    def write(k: int) -> None:
        rows = rows_of[k]
        write_shard_atomic(rows, shard_path(out, k))
        summary["written"] += 1
        summary["texts"] += len(rows)
        summary["failed"] += sum(r["status"] == "failed" for r in rows)
        summary["exact"] += sum(1 for r in rows if r["status"] == "ok" and r["accuracy"] >= 1.0)
        if work.kill_after_shards is not None and summary["written"] >= work.kill_after_shards:
            os.kill(os.getpid(), signal.SIGKILL)

    for k, _ in work.shards:
        if left[k] == 0:
            write(k)

    def on_done(i: int, r) -> None:
        k, j, _ = todo[i]
        rows_of[k][j].update(status="ok", error=None, vectors=r.vectors.numpy().tolist(), accuracy=r.accuracy,
                             steps=r.steps, seconds=r.seconds, loss=r.loss, restarts=r.restarts)
        summary["steps"] += r.steps
        left[k] -= 1
        if left[k] == 0:
            write(k)

    shared = None if work.shared_m is None else torch.as_tensor(work.shared_m, dtype=torch.float32)
    n_vec = spec.n_mem if spec.mode == "ar" else (1 if shared is not None else 2)
    fit_sharded(lm, [t[2] for t in todo], n_vec, spec.mode, cfg, batch_size=spec.batch_size, shared_m=shared,
                on_done=on_done)
    summary["seconds"] = time.perf_counter() - t0
    return summary


def run_sharded_job(spec: JobSpec, model_config: str | None = None, ray_address: str | None = None,
                    max_retries: int = 2, seed: int = 0, kill_rank: tuple[int, int] | None = None) -> dict:
    """Run (or resume) an encoding job with the model sharded over ``spec.workers`` ranks; a summary of this run.

    ``kill_rank`` = (rank, n): for tests, that rank SIGKILLs itself after writing n shards (first attempt only).
    """
    import ray

    fit_kwargs(spec.fit)
    if spec.mode not in ("one-step", "ar"):
        raise ValueError(f"unknown mode {spec.mode!r}: 'one-step' or 'ar'")
    if spec.mode == "ar" and spec.shared_m:
        raise ValueError("a shared m applies to one-step mode only")
    if spec.workers < 1 or spec.threads < 1:
        raise ValueError(f"--workers and --threads must be >= 1 (got {spec.workers}, {spec.threads})")
    source = resolve_source(spec.model, model_config, spec.dtype, seed)
    if source.tokenizer is None:
        raise ValueError(f"{model_config}: a config-only model needs a tokenizer: a config folder holding "
                         "tokenizer files, or --model naming a model whose tokenizer to use")
    records = read_records(spec.input, spec.text_field, spec.id_field)
    if not records:
        raise ValueError(f"{spec.input}: no records")
    shards = plan_shards(records, spec.shard_size)
    out = Path(spec.output)
    if model_config is not None:
        spec = JobSpec(**{**spec.__dict__, "model": source.name})  # the manifest names the config and seed
    write_manifest(spec, len(records), len(shards), file_fingerprint(spec.input))
    shared = _install_shared_m(spec, out) if spec.shared_m else None
    for tmp in out.glob(".shard-*.tmp"):
        tmp.unlink(missing_ok=True)
    pending = [k for k in range(len(shards)) if not shard_path(out, k).exists()]
    done_before = [k for k in range(len(shards)) if k not in set(pending)]
    summary = {"shards": len(shards), "skipped": len(shards) - len(pending), "written": 0, "texts": 0, "fitted": 0, "failed": 0, "exact": 0, "tokens": 0, "steps": 0,
               "seconds": 0.0, "workers": spec.workers, "attempts": 0, "shard_model": "zero3",
               "written_by_attempt": []}
    if not pending:
        return summary
    started = ensure_ray(spec.workers, spec.threads, ray_address)
    t0 = time.perf_counter()
    try:
        _check_cpus(spec.workers, spec.threads)
        attempt = 0
        while pending:
            attempt += 1
            world = spec.workers
            works = [RankWork(spec=spec, shards=[(k, shards[k]) for k in pending[r::world]], shared_m=shared)
                     for r in range(world)]
            if kill_rank is not None and attempt == 1:
                works[kill_rank[0]].kill_after_shards = kill_rank[1]
            actors = []
            try:
                actors = start_group(world, source, spec.threads)
                refs = [a.call.remote(_fit_rank, w) for a, w in zip(actors, works)]
                results = ray.get(refs)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.OutOfMemoryError, ray.exceptions.RayTaskError) as exc:
                if attempt > max_retries:
                    raise RuntimeError(f"sharded job: the group failed {attempt} times; last: {exc}") from exc
                results = None
            finally:
                stop_group(actors)
            if results is not None:
                for res in results:
                    for key in ("fitted", "failed", "exact", "tokens", "steps"):
                        summary[key] += res[key]
            now = [k for k in range(len(shards)) if not shard_path(out, k).exists()]
            summary["written_by_attempt"].append([k for k in pending if k not in set(now)])
            pending = now
        summary["attempts"] = attempt
    finally:
        if started:
            ray.shutdown()
    # counted from disk: shards written by an attempt that failed later count too
    written = [k for k in range(len(shards)) if shard_path(out, k).exists()]
    summary["written"] = len(written) - summary["skipped"]
    summary["texts"] = sum(len(shards[k]) for k in written) - sum(len(shards[k]) for k in done_before)
    summary["seconds"] = time.perf_counter() - t0
    summary["texts_per_hour"] = summary["texts"] / max(summary["seconds"], 1e-9) * 3600
    return summary


# ----------------------------------------------------------------------------------------------
# fitting token lists on a running group (library use, tests, benchmarks)

def _fit_texts(lm, toks, mode, n_vectors, cfg, batch_size, shared_m=None):
    from .sharded import fit_sharded

    log: list = []
    res = fit_sharded(lm, toks, n_vectors, mode, cfg, batch_size=batch_size, shared_m=shared_m, loss_log=log)
    return res, log


def fit_on_group(actors: list, token_lists: list[list[int]], mode: str, n_vectors: int, cfg, batch_size: int = 8,
                 shared_m=None):
    """Fit token lists on a group from :func:`start_group`, text i on rank i % W; returns (results, per-step
    losses) in input order."""
    W = len(actors)
    out = run_on_group(actors, _fit_texts, [(token_lists[r::W], mode, n_vectors, cfg, batch_size, shared_m)
                                            for r in range(W)])
    res: list = [None] * len(token_lists)
    losses: list = [None] * len(token_lists)
    for r, (rr, log) in enumerate(out):
        for j, i in enumerate(range(r, len(token_lists), W)):
            res[i], losses[i] = rr[j], log[j]
    return res, losses


def print_summary(summary: dict, as_json: bool = False) -> int:
    """``scalerec encode --shard-model``'s report (one JSON line with ``--json``); the exit code."""
    import json
    import sys

    msg = (f"sharded over {summary['workers']} ranks: shards {summary['written']} written, {summary['skipped']} "
           f"already done (of {summary['shards']}); texts {summary['texts']} ({summary['fitted']} fitted, "
           f"{summary['exact']} exact, {summary['failed']} failed); {summary['attempts']} group(s) formed")
    print(msg, file=sys.stderr if as_json else sys.stdout)
    if as_json:
        print(json.dumps(summary))
    return 0
