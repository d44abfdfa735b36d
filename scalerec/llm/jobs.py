"""Resumable batch text-to-embedding jobs over Ray.

Contract: the input (JSONL or Parquet) is cut into fixed, numbered shards of ``shard_size`` records in input
order; shard ``k`` is written as ``DIR/shard-0000k.parquet`` atomically (written to a temporary name in the
same folder, then ``os.replace``), only after all its texts are fitted. A rerun with the same input and
settings skips every shard whose file exists, so a job killed at any moment loses no finished shard and fits
no finished text twice. ``DIR/job.json`` records the settings; a rerun with different settings is refused.

Execution: Ray actors over explicit shards (not Ray Data): each actor loads the model once and fits whole
shards; the driver hands pending shards to idle actors and shows a progress bar (texts, tokens/s). Ray Data's
``write_parquet`` names its files at random, so a rerun would duplicate output, and its blocks do not map to
our shard numbers; explicit shards keep the output deterministic (see docs/llm.md).

Bad input never stops the job: a malformed JSONL line, a missing or non-string field, an empty text or a text
longer than the model's context becomes a row with ``status="failed"`` and an ``error`` naming the file, line
and field; the other texts are fitted as usual.

Fit settings: by default the length rule and the escalation ladder of ``scalerec.llm.schedule`` (a text that greedy
decoding does not reproduce after an attempt is fitted again with the next rung, up to ``max_seconds_per_text``);
each row records its attempts, whether greedy decoding reproduces it (``exact``) and why its fitting stopped.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

MANIFEST = "job.json"
SHARED_M = "shared_m.npy"


# ----------------------------------------------------------------------------------------------
# input

@dataclass
class Record:
    """One input text (or the reason it cannot be one)."""

    id: str
    text: str | None
    source: str          # "file:line" (1-based line for JSONL, row for Parquet)
    error: str | None = None


def read_records(path: str | os.PathLike, text_field: str = "text", id_field: str = "id") -> list[Record]:
    """Read texts from ``.jsonl`` / ``.json`` (one object per line) or ``.parquet``.

    A missing id falls back to the line (row) number; bad lines become records with ``error`` set.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such input file")
    recs: list[Record] = []
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        with open(p, encoding="utf-8") as f:
            for ln, line in enumerate(f, start=1):
                src = f"{p.name}:{ln}"
                if not line.strip():
                    continue  # blank lines are not records
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    recs.append(Record(id=f"line-{ln}", text=None, source=src,
                                       error=f"{src}: malformed JSON ({exc.msg} at column {exc.colno})"))
                    continue
                recs.append(_record_from(obj, src, ln, text_field, id_field))
    elif p.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        if text_field not in table.column_names:
            raise ValueError(f"{p}: no column {text_field!r} (columns: {', '.join(table.column_names)})")
        rows = table.to_pylist()
        for r, obj in enumerate(rows, start=1):
            recs.append(_record_from(obj, f"{p.name}:row {r}", r, text_field, id_field))
    else:
        raise ValueError(f"{p}: unknown input format {p.suffix!r} (use .jsonl or .parquet)")
    seen: dict[str, str] = {}
    for rec in recs:
        if rec.id in seen and rec.error is None:
            rec.error = f"{rec.source}: duplicate id {rec.id!r} (first at {seen[rec.id]})"
        seen.setdefault(rec.id, rec.source)
    return recs


def _record_from(obj, src: str, n: int, text_field: str, id_field: str) -> Record:
    if not isinstance(obj, dict):
        return Record(id=f"line-{n}", text=None, source=src, error=f"{src}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get(id_field)
    rid = f"line-{n}" if rid is None else str(rid)
    if text_field not in obj or obj[text_field] is None:
        return Record(id=rid, text=None, source=src, error=f"{src}: missing field {text_field!r}")
    text = obj[text_field]
    if not isinstance(text, str):
        return Record(id=rid, text=None, source=src, error=f"{src}: field {text_field!r} is {type(text).__name__}, not a string")
    if not text.strip():
        return Record(id=rid, text=text, source=src, error=f"{src}: field {text_field!r} is empty")
    return Record(id=rid, text=text, source=src)


def file_fingerprint(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# job settings and shards

@dataclass
class JobSpec:
    model: str
    input: str
    output: str
    mode: str = "one-step"            # "one-step" or "ar"
    n_mem: int = 1                    # ar mode: [mem] vectors per text
    shard_size: int = 16
    batch_size: int = 8               # texts fitted together inside a worker
    workers: int = 1
    threads: int = 1                  # torch threads per worker
    dtype: str | None = None
    device: str | None = None
    fit: dict = field(default_factory=dict)   # FitConfig overrides (hold for every attempt)
    rule: str = "length"              # "length": the length rule (scalerec/llm/schedule.py); "fixed": FitConfig()
    max_attempts: int | None = None   # rungs of the escalation ladder to try (None: all; 1: no escalation)
    max_seconds_per_text: float | None = None  # no further attempt once its worst case could exceed this
    shared_m: str | None = None       # path of a shared m (.npy) for one-step mode; only e is fitted
    text_field: str = "text"
    id_field: str = "id"

    def identity(self) -> dict:
        """The settings a rerun must match to resume (workers/threads/batch may change)."""
        return {"model": self.model, "mode": self.mode, "n_mem": self.n_mem, "shard_size": self.shard_size,
                "fit": self.fit, "text_field": self.text_field, "id_field": self.id_field,
                "dtype": self.dtype, "shared_m": bool(self.shared_m), "rule": self.rule,
                "max_attempts": self.max_attempts, "max_seconds_per_text": self.max_seconds_per_text}


def shard_path(out: Path, k: int) -> Path:
    return out / f"shard-{k:05d}.parquet"


def plan_shards(records: list[Record], shard_size: int) -> list[list[Record]]:
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    return [records[i: i + shard_size] for i in range(0, len(records), shard_size)]


def write_manifest(spec: JobSpec, n_records: int, n_shards: int, fingerprint: str) -> dict:
    out = Path(spec.output)
    out.mkdir(parents=True, exist_ok=True)
    man = {"identity": spec.identity(), "input": str(spec.input), "input_sha256_16": fingerprint,
           "n_records": n_records, "n_shards": n_shards, "format": 1}
    path = out / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("identity") != man["identity"] or old.get("input_sha256_16") != fingerprint:
            diff = {k: (old.get("identity", {}).get(k), v) for k, v in man["identity"].items()
                    if old.get("identity", {}).get(k) != v}
            if old.get("input_sha256_16") != fingerprint:
                diff["input"] = "content changed"
            raise ValueError(f"{out}: holds a job with other settings ({diff}); use a new output folder")
        return old
    tmp = out / f".{MANIFEST}.{uuid.uuid4().hex}"
    tmp.write_text(json.dumps(man, indent=1))
    os.replace(tmp, path)
    return man


def write_shard_atomic(rows: list[dict], path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([
        ("id", pa.string()), ("text", pa.string()), ("source", pa.string()), ("status", pa.string()),
        ("error", pa.string()), ("token_ids", pa.list_(pa.int32())), ("n_tokens", pa.int32()),
        ("vectors", pa.list_(pa.list_(pa.float32()))), ("accuracy", pa.float32()), ("steps", pa.int32()),
        ("seconds", pa.float32()), ("loss", pa.float32()), ("restarts", pa.int32()), ("mode", pa.string()),
        ("model", pa.string()), ("shard", pa.int32()), ("exact", pa.bool_()), ("decoded_accuracy", pa.float32()),
        ("attempts", pa.int32()), ("stop_reason", pa.string()),
        ("attempt_log", pa.list_(pa.struct([("attempt", pa.int32()), ("rung", pa.string()), ("steps", pa.int32()),
                                            ("seconds", pa.float32()), ("accuracy", pa.float32()),
                                            ("decoded_accuracy", pa.float32()), ("exact", pa.bool_()),
                                            ("restarts", pa.int32())]))),
    ])
    table = pa.Table.from_pylist(rows, schema=schema)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_outputs(out: str | os.PathLike) -> list[dict]:
    """All rows of a job's finished shards, in shard order."""
    import pyarrow.parquet as pq

    rows: list[dict] = []
    for p in sorted(Path(out).glob("shard-*.parquet")):
        rows.extend(pq.read_table(p).to_pylist())
    return rows


# ----------------------------------------------------------------------------------------------
# the per-shard work (runs inside a Ray actor, or in-process)

class ShardFitter:
    """Loads the model once; fits whole shards."""

    def __init__(self, spec: JobSpec, shared_m: np.ndarray | None = None):
        import torch

        from .model import load_causal_lm

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        torch.set_num_threads(max(1, int(spec.threads)))
        self.spec = spec
        self.lm = load_causal_lm(spec.model, dtype=spec.dtype, device=spec.device)
        check_fit_settings(spec)
        self.shared_m = None if shared_m is None else torch.as_tensor(shared_m, dtype=torch.float32)

    def fit_shard(self, k: int, records: list[Record]) -> dict:
        from .inputs import n_sink
        from .schedule import encode_texts

        spec, lm = self.spec, self.lm
        t0 = time.perf_counter()
        rows: list[dict] = []
        todo: list[tuple[int, list[int]]] = []
        extra = (spec.n_mem if spec.mode == "ar" else 0) + n_sink(lm)
        base = {"mode": spec.mode, "model": lm.name, "shard": k}
        for j, rec in enumerate(records):
            row = {"id": rec.id, "text": rec.text, "source": rec.source, "status": "failed", "error": rec.error,
                   "token_ids": None, "n_tokens": None, "vectors": None, "accuracy": None, "steps": None,
                   "seconds": None, "loss": None, "restarts": None, "exact": None, "decoded_accuracy": None,
                   "attempts": 0, "stop_reason": "input_error", "attempt_log": [], **base}
            rows.append(row)
            if rec.error is not None:
                continue
            try:
                toks = lm.encode(rec.text)
            except Exception as exc:  # a tokenizer failure is this text's failure, not the shard's
                row["error"] = f"{rec.source}: tokenizer failed: {exc}"
                continue
            row["token_ids"], row["n_tokens"] = toks, len(toks)
            row["error"] = token_error(rec, toks, lm, extra, spec.text_field)
            if row["error"] is None:
                todo.append((j, toks))
        # the length rule and the escalation ladder; texts of one setting are fitted in batches of similar length
        res = encode_texts(lm, [t for _, t in todo], mode=spec.mode, n_mem=spec.n_mem, shared_m=self.shared_m,
                           fit=fit_kwargs(spec.fit), rule=spec.rule, max_attempts=spec.max_attempts,
                           max_seconds_per_text=spec.max_seconds_per_text, batch_size=spec.batch_size)
        for (j, _), r in zip(todo, res):
            rows[j].update(status="ok", error=None, vectors=r.vectors.numpy().tolist(), accuracy=r.accuracy,
                           steps=r.steps, seconds=r.seconds, loss=r.loss, restarts=r.restarts, exact=r.exact,
                           decoded_accuracy=r.decoded_accuracy, attempts=len(r.attempts), stop_reason=r.stop_reason,
                           attempt_log=[a.to_dict() for a in r.attempts])
        write_shard_atomic(rows, shard_path(Path(spec.output), k))
        n_tok = sum(len(t) for _, t in todo)
        return {"shard": k, "texts": len(records), "fitted": len(todo), "tokens": n_tok,
                "failed": sum(r["status"] == "failed" for r in rows),
                "exact": sum(1 for r in rows if r["status"] == "ok" and r["exact"]),
                "by_length": outcome_by_length(rows), "seconds": time.perf_counter() - t0}

    def ready(self) -> bool:
        return True


def outcome_by_length(rows: list[dict], exact=None) -> dict:
    """{length bucket: {"exact", "not_exact", "failed"}} over job rows; ``exact(row)`` says whether a fitted row
    counts as exact (default: its recorded greedy exact-match)."""
    from .schedule import length_bucket

    out: dict = {}
    for r in rows:
        c = out.setdefault(length_bucket(r.get("n_tokens")), {"exact": 0, "not_exact": 0, "failed": 0})
        if r["status"] != "ok":
            c["failed"] += 1
        elif (exact(r) if exact is not None else r.get("exact")):
            c["exact"] += 1
        else:
            c["not_exact"] += 1
    return out


def add_outcomes(total: dict, part: dict) -> None:
    for b, c in part.items():
        t = total.setdefault(b, {"exact": 0, "not_exact": 0, "failed": 0})
        for key, v in c.items():
            t[key] += v


def check_fit_settings(spec: JobSpec) -> None:
    """The job's fit settings are valid for every rung of its ladder (an error before any model loads)."""
    from .fitting import FitConfig
    from .schedule import LADDER, attempt_settings

    fit = fit_kwargs(spec.fit)
    n = len(LADDER) if spec.max_attempts is None else spec.max_attempts
    if not (isinstance(n, int) and 1 <= n <= len(LADDER)):
        raise ValueError(f"max_attempts must be 1..{len(LADDER)} (the ladder's rungs), got {spec.max_attempts!r}")
    if spec.max_seconds_per_text is not None and not spec.max_seconds_per_text > 0:
        raise ValueError(f"max_seconds_per_text must be > 0, got {spec.max_seconds_per_text!r}")
    for k in range(1, n + 1):
        FitConfig(**attempt_settings(16, spec.mode, k, fit, spec.rule))


def token_error(rec, toks: list[int], lm, extra: int, text_field: str) -> str | None:
    """Why a text's tokens cannot be fitted (none, or longer than the model's context), or None."""
    if not toks:
        return f"{rec.source}: field {text_field!r} has no tokens"
    if len(toks) + extra > lm.max_positions:
        return f"{rec.source}: {len(toks)} tokens exceed the model context of {lm.max_positions} positions"
    return None


def fit_kwargs(fit: dict) -> dict:
    """``fit`` (FitConfig field -> value) checked against FitConfig's fields, ready for ``FitConfig(**...)``."""
    from .fitting import FitConfig

    known = set(FitConfig.__dataclass_fields__)
    bad = sorted(set(fit) - known)
    if bad:
        raise ValueError(f"unknown fit settings {bad}; known: {sorted(known)}")
    kw = dict(fit)
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    return kw


# ----------------------------------------------------------------------------------------------
# the driver

def run_job(spec: JobSpec, ray_address: str | None = None, progress: bool = True,
            max_shards: int | None = None, max_retries: int = 2) -> dict:
    """Run (or resume) an encoding job; returns a summary of the work done in this run.

    ``max_shards`` stops after that many shards of this run were written (for tests and partial runs).
    A worker that dies (killed, out of memory) is replaced and its shard retried up to ``max_retries`` times;
    an exception raised by the fitting code itself stops the job (finished shards stay on disk).
    """
    if spec.mode not in ("one-step", "ar"):
        raise ValueError(f"unknown mode {spec.mode!r}: 'one-step' or 'ar'")
    check_fit_settings(spec)  # fail early on unknown or invalid settings
    if spec.mode == "ar" and spec.shared_m:
        raise ValueError("a shared m applies to one-step mode only")
    records = read_records(spec.input, spec.text_field, spec.id_field)
    if not records:
        raise ValueError(f"{spec.input}: no records")
    shards = plan_shards(records, spec.shard_size)
    out = Path(spec.output)
    write_manifest(spec, len(records), len(shards), file_fingerprint(spec.input))
    shared = None
    if spec.shared_m:
        shared = _install_shared_m(spec, out)
    # clean temporaries of a killed run (never a finished shard)
    for tmp in out.glob(".shard-*.tmp"):
        tmp.unlink(missing_ok=True)
    pending = [k for k in range(len(shards)) if not shard_path(out, k).exists()]
    summary = {"shards": len(shards), "skipped": len(shards) - len(pending), "written": 0, "texts": 0,
               "fitted": 0, "failed": 0, "exact": 0, "not_exact": 0, "tokens": 0, "seconds": 0.0,
               "workers": spec.workers, "by_length": {}}
    if max_shards is not None:
        pending = pending[:max_shards]
    if not pending:
        return summary

    import ray
    from tqdm import tqdm

    started_here = False
    if not ray.is_initialized():
        if ray_address or os.environ.get("RAY_ADDRESS"):
            ray.init(address=ray_address)  # a cluster (`ray job submit` sets RAY_ADDRESS)
        else:
            # address="local": a new in-process cluster, never one that `ray start` left on this machine
            ray.init(address="local", num_cpus=max(spec.workers * spec.threads, 1), include_dashboard=False,
                     log_to_driver=False)
        started_here = True
    t0 = time.perf_counter()
    try:
        n_workers = max(1, min(spec.workers, len(pending)))
        Actor = ray.remote(num_cpus=spec.threads)(ShardFitter)
        # (Ray gives each actor OMP_NUM_THREADS = its num_cpus; a local Ray inherits this process's environment)
        actors = [Actor.remote(spec, shared) for _ in range(n_workers)]
        queue = list(pending)
        running: dict = {}
        bar = tqdm(total=sum(len(shards[k]) for k in pending), unit="text", desc="encode", disable=not progress)
        for a in actors:
            if queue:
                k = queue.pop(0)
                running[a.fit_shard.remote(k, shards[k])] = (a, k)
        tries: dict[int, int] = {}
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            a, k_done = running.pop(ref)
            try:
                res = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.OutOfMemoryError) as exc:
                # the worker died (killed, out of memory): finished shards are on disk; give this shard
                # to a fresh actor, at most `max_retries` times
                tries[k_done] = tries.get(k_done, 0) + 1
                if tries[k_done] > max_retries:
                    raise RuntimeError(f"shard {k_done}: worker died {tries[k_done]} times; last: {exc}") from exc
                try:
                    ray.kill(a)
                except Exception:
                    pass
                actors[actors.index(a)] = a = Actor.remote(spec, shared)
                running[a.fit_shard.remote(k_done, shards[k_done])] = (a, k_done)
                continue
            summary["written"] += 1
            for key in ("texts", "fitted", "failed", "exact", "tokens"):
                summary[key] += res[key]
            summary["not_exact"] += res["fitted"] - res["exact"]
            add_outcomes(summary["by_length"], res["by_length"])
            el = time.perf_counter() - t0
            bar.update(res["texts"])
            bar.set_postfix(tok_s=f"{summary['tokens'] / max(el, 1e-9):.1f}", failed=summary["failed"])
            if queue:
                k = queue.pop(0)
                running[a.fit_shard.remote(k, shards[k])] = (a, k)
        bar.close()
        for a in actors:
            ray.kill(a)
    finally:
        if started_here:
            ray.shutdown()
    summary["seconds"] = time.perf_counter() - t0
    summary["tokens_per_s"] = summary["tokens"] / max(summary["seconds"], 1e-9)
    summary["texts_per_hour"] = summary["texts"] / max(summary["seconds"], 1e-9) * 3600
    return summary


def _install_shared_m(spec: JobSpec, out: Path) -> np.ndarray:
    """Copy the given shared m into the job folder (so the outputs are decodable on their own)."""
    dst = out / SHARED_M
    src = Path(spec.shared_m)
    m = np.load(src).astype(np.float32).reshape(-1)
    if dst.exists():
        old = np.load(dst).astype(np.float32).reshape(-1)
        if old.shape != m.shape or not np.array_equal(old, m):
            raise ValueError(f"{out}: its {SHARED_M} differs from {src}; use a new output folder")
        return old
    tmp = out / f".{SHARED_M}.{uuid.uuid4().hex}.npy"
    np.save(tmp, m)
    os.replace(tmp, dst)
    return m
