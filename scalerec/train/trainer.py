"""The training loop: one loop for one process and for every rank of W (docs/architecture.md).

Pieces chosen by config, everything else written once:

* the item table — a local dense table inside SASRec (``scaleout.table.sharded=false``), or the row-sharded
  ``ShardedItemTable`` (``true``; ``auto``, the default, picks it when ``trainer.workers > 1``), which also
  runs with one worker;
* the dense part's engine — plain Adam in one process, DeepSpeed ZeRO over W ranks (``trainer.engine``);
* where the rank lives — ``LocalRun`` or ``RayRun`` (``scalerec.train.context``).

Per step, rank r of W: its slice of the global batch (the global batch and its order depend on the seed and
the epoch only), dropout seeded by (seed, global step, rank), the loss's sampling by (seed, global step) — the
same on every rank, so a sharded loss equals the single-process one — then backward and both optimizers.
Per epoch: validation NDCG@10 (full ranking, history excluded, every metric incl. COV@k), early stopping after
``trainer.patience`` epochs without improvement (0: never), ``best/`` on improvement, ``checkpoint/`` and one
``metrics.jsonl`` line. At the end ``best/`` is reloaded and evaluated on test and validation (``final.json``).
"""
from __future__ import annotations

import json
import os
import resource
import time

import numpy as np
import torch
from omegaconf import OmegaConf

from scalerec.data.source import DataSource
from scalerec.dist import collectives as coll
from scalerec.eval.full_ranking import evaluate_table
from scalerec.losses import get_loss
from scalerec.models.build import build_model
from scalerec.models.sharded_table import ShardedItemTable
from scalerec.models.tables import DenseItemTable
from scalerec.train.checkpoint import check_same_data, read_state, write_common
from scalerec.train.engine import make_engine

PHASES = ("lookup", "forward", "loss", "backward", "dense_step", "table_step")


def table_is_sharded(cfg) -> bool:
    v = cfg.scaleout.table.sharded
    if isinstance(v, str):
        if v != "auto":
            raise ValueError(f"scaleout.table.sharded must be true, false or auto, got {v!r}")
        return int(cfg.trainer.workers) > 1
    return bool(v)


def loss_from_config(cfg):
    params = OmegaConf.to_container(cfg.loss.params, resolve=True) if cfg.loss.params is not None else {}
    return get_loss(str(cfg.loss.name), **(params or {}))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Parts:
    """The model, its table backend and its engine for one rank."""

    def __init__(self, cfg, data: DataSource, run):
        self.cfg, self.run = cfg, run
        self.sharded = table_is_sharded(cfg)
        torch.manual_seed(int(cfg.trainer.seed))
        self.module = build_model(cfg, data.num_items, item_table=not self.sharded)
        self.table = None
        if self.sharded:
            t = cfg.scaleout.table
            self.table = ShardedItemTable(
                data.num_items, int(cfg.model.hidden), group=run.table_group, layout=str(t.layout),
                popularity=data.popularity() if t.layout == "popularity" else None, dtype=str(t.dtype),
                optimizer=str(t.optimizer), lr=float(t.lr), init_std=t.init_std, seed=int(cfg.trainer.seed))
        self.engine = None

    def start_engine(self):
        self.engine = make_engine(self.cfg, self.module, self.run.world_size)

    def encode(self, seqs):
        rows = self.table.lookup(seqs) if self.sharded else None
        return self.engine(seqs, rows) if rows is not None else self.engine(seqs)

    def loss_table(self):
        return self.table if self.sharded else self.engine.module.item_table

    def eval_table(self):
        return self.table if self.sharded else DenseItemTable(self.engine.module.item_table)

    def nbytes(self) -> dict:
        if self.sharded:
            return self.table.nbytes()
        w = self.module.item_table
        return {"table": w.numel() * w.element_size(), "optimizer": 2 * w.numel() * 4}


def _new_state(W: int) -> dict:
    return {"epoch": 1, "step": 0, "global_step": 0, "best": -1.0, "best_epoch": 0, "bad_epochs": 0,
            "elapsed": 0.0, "world_size": W}


def _carry_best(ckpt_dir: str, out_dir: str, state: dict, rank: int, run) -> None:
    """A run resumed into another output directory takes the ``best/`` that sits beside its checkpoint; with
    none to be found, the best so far is forgotten, so the next validation writes a new ``best/``."""
    import shutil

    mine, theirs = os.path.join(out_dir, "best"), os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "best")
    has_mine, has_theirs = os.path.isdir(mine), os.path.isdir(theirs)
    run.barrier()  # every rank decides from the same state of the files, before rank 0 copies anything
    if has_mine:
        return
    if has_theirs:
        if rank == 0:
            shutil.copytree(theirs, mine)
        run.barrier()
    else:
        state["best"], state["best_epoch"], state["bad_epochs"] = -1.0, 0, 0


def fit(cfg, run, dataset=None, log=print) -> dict:
    """Train per ``cfg`` as rank ``run.rank`` of ``run.world_size``; returns (on every rank) ``best_epoch``,
    ``valid``, ``test``, ``epochs``, ``global_step``, ``seconds``, ``output_dir`` and the run's figures."""
    tr = cfg.trainer
    W, rank = run.world_size, run.rank
    if int(tr.threads) > 0:
        torch.set_num_threads(int(tr.threads))
    seed = int(tr.seed)
    out_dir = str(cfg.output_dir)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
    data = DataSource(cfg, dataset)
    if W > data.num_items:
        raise ValueError(f"trainer.workers ({W}) is larger than the catalog (C = {data.num_items} items)")
    parts = _Parts(cfg, data, run)
    state = _new_state(W)
    same_world = False
    with run.restore_dir() as d:
        if d:
            saved = read_state(d)
            check_same_data(saved, data.meta(), d)
            if bool(saved.get("table_sharded")) != parts.sharded:
                raise ValueError(f"{d}: written with scaleout.table.sharded={saved.get('table_sharded')}, this run "
                                 f"uses {parts.sharded}")
            sd = torch.load(os.path.join(d, "model.pt"), map_location="cpu", weights_only=True)
            parts.module.load_state_dict(sd)
            if parts.sharded:
                parts.table.load(d)
            state.update({k: saved[k] for k in _new_state(W) if k in saved}, world_size=W)
            same_world = saved["world_size"] == W
            restored_from = saved["global_step"]
            _carry_best(d, out_dir, state, rank, run)
            if rank == 0:
                log(f"resumed from {d} at epoch {state['epoch']} step {state['step']} (written at W={saved['world_size']})")
        else:
            restored_from = None
        parts.start_engine()
        if d and same_world:
            parts.engine.load(d)
    source = run.restore_source
    metrics_path = os.path.join(out_dir, "metrics.jsonl")
    if rank == 0 and restored_from is None and os.path.exists(metrics_path):
        os.remove(metrics_path)

    loss_fn = loss_from_config(cfg)
    ks = sorted({int(k) for k in cfg.eval.ks} | {10})
    eval_bs, maxlen = int(cfg.eval.batch_size), int(cfg.model.maxlen)
    vmax = int(cfg.eval.valid_max_cases) or None
    every = int(cfg.scaleout.checkpoint_every)
    fail_marker = os.path.join(out_dir, ".fail_injected")
    data_meta, item_ids = data.meta(), data.item_ids()
    rss = {"after_setup": _peak_rss()}

    def encode_last(seqs):
        return parts.encode(seqs)[:, -1]

    def evaluate(split: str, max_cases):
        parts.engine.module.eval()
        try:
            return evaluate_table(encode_last, parts.eval_table(), data.eval_set(split, max_cases), ks, eval_bs, maxlen,
                                  progress=bool(tr.progress) and run.progress_bars)
        finally:
            parts.engine.module.train()

    def write(d: str, with_optimizer: bool):
        write_common(d, rank=rank, state={**state, "table_sharded": parts.sharded}, cfg=cfg, data_meta=data_meta,
                     item_ids=item_ids, dense_state=parts.engine.dense_state(), table=parts.table)
        if with_optimizer:
            parts.engine.save(d, rank)

    averaged = parts.engine.averages_grads
    parts.engine.module.train()
    t_run = time.time()
    epochs, patience, budget = int(tr.epochs), int(tr.patience), float(tr.time_budget_s)
    step_losses, phases, train_seconds = [], dict.fromkeys(PHASES, 0.0), 0.0
    last_loss, stop = float("nan"), False
    epoch = int(state["epoch"]) - 1
    while state["epoch"] <= epochs and not stop:
        epoch = int(state["epoch"])
        t_epoch, losses = time.perf_counter(), []
        batches = data.batches(epoch, int(state["step"]), rank, W)
        if tr.progress and run.progress_bars and rank == 0:
            from tqdm import tqdm

            batches = tqdm(batches, total=data.steps_per_epoch - int(state["step"]), desc=f"epoch {epoch}",
                           unit="batch", leave=False)
        for step, x, y in batches:
            g = int(state["global_step"])
            if g == int(cfg.scaleout.fail_at_step) and rank == min(1, W - 1) and not os.path.exists(fail_marker):
                open(fail_marker, "w").close()
                log(f"rank {rank}: injected failure at step {g}")
                time.sleep(5)  # let the controller collect the last report (a real crash may lose it)
                os._exit(1)
            t0 = time.perf_counter()
            torch.manual_seed((seed * 1_000_003 + g) * 64 + rank)  # dropout: differs per rank
            rows = parts.table.lookup(x) if parts.sharded else None
            t1 = time.perf_counter()
            h = parts.engine(x, rows) if rows is not None else parts.engine(x)
            mask = y > 0
            t2 = time.perf_counter()
            torch.manual_seed(seed * 7_919 + g)  # the loss's sampling: the same on every rank
            loss = loss_fn(h[mask], parts.loss_table(), y[mask])
            if parts.sharded:  # a sharded loss is already the mean over all ranks' queries
                scale, value = (W if averaged else 1.0), loss.detach()
            else:  # a local loss: the mean over this rank's queries, reweighted to the global mean
                n = torch.tensor([float(mask.sum())])
                n_all = coll.all_reduce(n.clone(), "sum", run.table_group)
                scale = (W if averaged else 1.0) * float(n / n_all)
                value = coll.all_reduce(loss.detach().reshape(1) * (n / n_all), "sum", run.table_group)[0]
            t3 = time.perf_counter()
            parts.engine.backward(loss * scale)
            t4 = time.perf_counter()
            parts.engine.step()
            t5 = time.perf_counter()
            if parts.sharded:
                parts.table.step(grad_scale=1.0 / scale)
            t6 = time.perf_counter()
            for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                phases[k] += dt
            train_seconds += t6 - t0
            rss.setdefault("after_first_step", _peak_rss())
            last_loss = float(value)
            losses.append(last_loss)
            step_losses.append((g, last_loss))
            state["step"], state["global_step"] = step + 1, g + 1
            if not run.progress_bars and g % 20 == 0 and rank == 0:
                log(f"epoch {epoch} step {step + 1}/{data.steps_per_epoch} loss {last_loss:.4f}")
            if every and state["global_step"] % every == 0 and state["step"] < data.steps_per_epoch:
                state["elapsed"] += time.perf_counter() - t_epoch
                t_epoch = time.perf_counter()
                run.save("checkpoint", lambda d: write(d, True),
                         {"epoch": epoch, "global_step": state["global_step"], "loss": last_loss})
        state["elapsed"] += time.perf_counter() - t_epoch
        rss.setdefault("after_training_steps", _peak_rss())
        record = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else last_loss, "steps": len(losses),
                  "train_seconds": round(state["elapsed"], 3), "global_step": state["global_step"]}
        if epoch % int(tr.eval_every) == 0 or epoch == epochs:
            valid = evaluate("valid", vmax)
            rss.setdefault("after_eval", _peak_rss())
            record["valid"] = {k: round(v, 6) for k, v in valid.items()}
            if valid["NDCG@10"] > state["best"]:
                state["best"], state["best_epoch"], state["bad_epochs"] = valid["NDCG@10"], epoch, 0
                run.save("best", lambda d: write(d, False))
            else:
                state["bad_epochs"] += 1
                stop = patience > 0 and state["bad_epochs"] >= patience
        state["epoch"], state["step"] = epoch + 1, 0
        stop = stop or (budget > 0 and state["elapsed"] >= budget)
        if rank == 0:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(record) + "\n")
            log(f"epoch {epoch}: loss {record['loss']:.4f}  valid NDCG@10 "
                f"{record.get('valid', {}).get('NDCG@10', float('nan')):.4f}  ({state['elapsed']:.1f}s)")
        run.save("checkpoint", lambda d: write(d, True), {**record, "world_size": W})
        if budget > 0 and state["elapsed"] >= budget and rank == 0:
            log(f"time budget {budget}s reached after epoch {epoch}")

    best_dir = os.path.join(out_dir, "best")
    if os.path.isdir(best_dir):
        parts.engine.load_dense_state(torch.load(os.path.join(best_dir, "model.pt"), map_location="cpu",
                                                 weights_only=True))
        if parts.sharded:
            parts.table.load(best_dir)
    test = evaluate("test", int(cfg.scaleout.test_max_cases) or None)
    valid = evaluate("valid", vmax)  # the cases that chose the best epoch (eval.valid_max_cases; 0: all)
    result = {"best_epoch": state["best_epoch"], "epochs": int(state["epoch"]) - 1, "global_step": state["global_step"],
              "seconds": round(state["elapsed"], 2), "valid": valid, "test": test, "output_dir": out_dir,
              "loss": str(cfg.loss.name), "world_size": W, "table_sharded": parts.sharded,
              "engine": type(parts.engine).__name__, "restored_from": restored_from, "restore_source": source}
    if rank == 0:
        with open(os.path.join(out_dir, "final.json"), "w") as fh:
            json.dump(result, fh, indent=1)
    figures = {"final_loss": last_loss, "step_losses": step_losses, "train_seconds": train_seconds,
               "phase_seconds": phases, "global_batch": data.B, "table_bytes": parts.nbytes(), "rss_stages": rss,
               "peak_rss_per_rank": [int(v) for v in coll.all_gather_varlen(
                   torch.tensor([_peak_rss()], dtype=torch.long), run.table_group)[0]]}
    return {**result, **figures}

