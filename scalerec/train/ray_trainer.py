"""Scale-out training: Ray Train ``TorchTrainer`` workers, DeepSpeed for the dense part, a row-sharded table.

Each worker:

* wraps the dense SASRec part (transformer blocks, positional embeddings, norms) with
  ``deepspeed.initialize`` and the ZeRO stage of a DeepSpeed JSON config (gloo + ``DS_ACCELERATOR=cpu`` on
  CPU, NCCL on GPU);
* holds its shard of the item table (``ShardedItemTable``) outside DeepSpeed, with its own row-sparse
  optimizer; input rows are fetched from their owners, the loss is one of the distributed losses;
* reads its slice of every global batch (the global batch does not depend on W);
* reports metrics and a checkpoint through ``ray.train.report``: every table shard with its optimizer state,
  the DeepSpeed engine state, the dense weights consolidated (``dense.pt``, loadable at any W), the data
  position and the config. A run resumes from ``ray.train.get_checkpoint()`` — after a worker failure
  (``FailureConfig``), or when the same ``RunConfig(name, storage_path)`` is run again, at any W.

Randomness is a function of (seed, global step, rank): dropout differs per rank, the loss's sampling (SCE
directions, negatives) is the same on every rank, so a resumed run continues exactly.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from scalerec.train.scaleout_defaults import SCALEOUT_DEFAULTS  # the `scaleout:` config section

ZERO_STAGES = (0, 1, 2, 3)


class ScaleOutConfigError(ValueError):
    pass


# ------------------------------------------------------------------------------------------- configuration
def with_scaleout_defaults(cfg: DictConfig) -> DictConfig:
    """``cfg`` plus the ``scaleout`` section's defaults (keys already in cfg win)."""
    base = OmegaConf.create(SCALEOUT_DEFAULTS)
    merged = OmegaConf.merge(base, cfg)
    return merged


def load_scaleout_config(path: str | None, overrides: Sequence[str] = ()) -> DictConfig:
    """The training config (``scalerec.train.config``, which includes the ``scaleout`` section)."""
    from scalerec.train.config import ConfigError, load_config

    try:
        return load_config(path, overrides)
    except ConfigError as exc:
        raise ScaleOutConfigError(str(exc)) from None


def deepspeed_config(cfg: DictConfig, world_size: int) -> dict:
    """The DeepSpeed JSON of ``scaleout.deepspeed.config`` with the batch, lr and ZeRO stage filled in."""
    sc = cfg.scaleout.deepspeed
    path = str(sc.config)
    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), path)
    if not os.path.exists(path):
        raise ScaleOutConfigError(f"scaleout.deepspeed.config: file not found: {sc.config}")
    with open(path) as f:
        ds = json.load(f)
    ds.setdefault("zero_optimization", {})
    if sc.zero_stage is not None:
        ds["zero_optimization"]["stage"] = sc.zero_stage
    stage = ds["zero_optimization"].get("stage", 0)
    if stage not in ZERO_STAGES:
        raise ScaleOutConfigError(f"scaleout.deepspeed.zero_stage (or zero_optimization.stage in {path}) must be "
                                  f"one of {ZERO_STAGES}, got {stage!r}")
    B = int(cfg.trainer.batch_size)
    ds["train_micro_batch_size_per_gpu"] = max(1, B // world_size)
    ds["train_batch_size"] = ds["train_micro_batch_size_per_gpu"] * world_size
    ds["gradient_accumulation_steps"] = 1
    ds["zero_allow_untested_optimizer"] = True  # a torch.optim.Adam passed in (no CUDA/CPU-Adam build needed)
    ds.setdefault("steps_per_print", 10**9)
    return ds


def validate_scaleout(cfg: DictConfig, num_items: int, cluster_cpus: float | None) -> None:
    W = int(cfg.trainer.workers)
    so = cfg.scaleout
    if W > num_items:
        raise ScaleOutConfigError(f"trainer.workers ({W}) is larger than the catalog (C = {num_items} items)")
    if so.table.dtype not in ("fp32", "bf16"):
        raise ScaleOutConfigError(f"scaleout.table.dtype must be fp32 or bf16, got {so.table.dtype!r}")
    if so.table.optimizer not in ("adagrad", "adam", "sgd"):
        raise ScaleOutConfigError(f"scaleout.table.optimizer must be adagrad, adam or sgd, got {so.table.optimizer!r}")
    from scalerec.losses.distributed import DISTRIBUTED_LOSSES

    if W > 1 and cfg.loss.name not in DISTRIBUTED_LOSSES:
        raise ScaleOutConfigError(f"loss.name {cfg.loss.name!r} has no row-sharded version; with trainer.workers > 1 "
                                  f"use one of {sorted(DISTRIBUTED_LOSSES)}")
    deepspeed_config(cfg, W)
    from scalerec.losses import get_loss

    get_loss(str(cfg.loss.name), **(OmegaConf.to_container(cfg.loss.params, resolve=True) or {}))
    need = W * float(so.ray.cpus_per_worker)
    if cluster_cpus is not None and need > cluster_cpus:
        raise ScaleOutConfigError(f"trainer.workers ({W}) x scaleout.ray.cpus_per_worker ({so.ray.cpus_per_worker}) "
                                  f"= {need:g} CPUs, but the Ray cluster has {cluster_cpus:g}")


# ------------------------------------------------------------------------------------------- data
class DataSource:
    """A real dataset (materialised, each worker reads its slice) or a streamed synthetic catalog."""

    def __init__(self, cfg: DictConfig):
        path = str(cfg.data.path)
        B, L, seed = int(cfg.trainer.batch_size), int(cfg.model.maxlen), int(cfg.trainer.seed)
        if path.startswith("synthetic:"):
            from scalerec.data.synthetic import parse_spec

            self.synthetic = parse_spec(path)
            self.num_items = self.synthetic.items
            self._steps = self.synthetic.num_batches(B)
            self.dataset = None
        else:
            from scalerec.data.sharding import ShardedSequences
            from scalerec.train.loop import dataset_from_config

            self.synthetic = None
            self.dataset = dataset_from_config(cfg)
            self.num_items = self.dataset.num_items
            self.reader = ShardedSequences(self.dataset.train, B, L, seed)
            self._steps = self.reader.num_batches()
        self.B, self.L = B, L
        cap = int(cfg.trainer.max_steps_per_epoch)
        self.steps_per_epoch = min(self._steps, cap) if cap > 0 else self._steps

    def batches(self, epoch: int, start: int, rank: int, world: int):
        it = (self.synthetic.batches(self.B, self.L, epoch, start, rank, world) if self.synthetic is not None
              else self.reader.batches(epoch, start, rank, world))
        for step, x, y in it:
            if step >= self.steps_per_epoch:
                return
            yield step, x, y

    def eval_set(self, split: str, max_cases: int | None):
        if self.synthetic is not None:
            return self.synthetic.eval_set(split, max_cases)
        ev = self.dataset.eval_set(split)
        if max_cases:
            from scalerec.data.dataset import EvalSet

            ev = EvalSet(ev.users[:max_cases], ev.inputs[:max_cases], ev.targets[:max_cases])
        return ev

    def popularity(self) -> torch.Tensor | None:
        if self.dataset is None:
            return None  # synthetic ids are in popularity order: the snake layout balances them
        counts = np.zeros(self.num_items + 1, np.int64)
        for s in self.dataset.train:
            np.add.at(counts, s, 1)
        return torch.from_numpy(counts)


# ------------------------------------------------------------------------------------------- model
class DenseSASRec(torch.nn.Module):
    """SASRec without its item table: input rows come from the row-sharded table (``encode(item_embeddings=)``)."""

    def __init__(self, cfg: DictConfig):
        super().__init__()
        from scalerec.train.checkpoint import build_model

        self.sasrec = build_model(cfg, 1)  # a 2-row placeholder table, frozen and unused
        self.sasrec.item_emb.weight.requires_grad_(False)
        self.maxlen = self.sasrec.maxlen

    def forward(self, seqs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return self.sasrec.encode(seqs, item_embeddings=rows)


@torch.no_grad()
def sharded_evaluate(encode, table, evset, ks: Sequence[int], batch_size: int, maxlen: int) -> dict:
    """Full-ranking HR/NDCG/MRR@k over a row-sharded table (the rule of ``scalerec.eval``: history excluded,
    rank = number of items scoring strictly above the target). Each rank encodes its slice of every batch;
    every rank scores all queries against its own rows; one all-reduce of the counts gives the ranks."""
    from scalerec.data.batching import pad_left
    from scalerec.eval.metrics import metrics_from_ranks
    from scalerec.models import collectives as coll

    W, r = table.world_size, table.rank
    ranks = []
    for s in range(0, len(evset), batch_size):
        hist = evset.inputs[s : s + batch_size]
        mine = hist[r::W]
        seqs = torch.from_numpy(pad_left(mine if mine else [np.zeros(1, np.int64)], maxlen))
        q = encode(seqs, table.lookup(seqs))[:, -1].float()
        q = q[: len(mine)]
        Q, sizes = coll.all_gather_varlen(q.contiguous(), table.group)
        order = np.concatenate([np.arange(len(hist))[k::W] for k in range(W)])
        tgt = torch.from_numpy(np.asarray(evset.targets[s : s + batch_size])[order]).long()
        hq = [hist[j] for j in order]
        t_s = (Q * table.gather_replicated(tgt)).sum(1)
        cnt = torch.zeros(len(order), dtype=torch.long)
        for lo, hi, rows in table.tiles(65536):
            beats = Q @ rows.t() > t_s.unsqueeze(1)
            # the target never beats itself (its tiled score may round above t_s), as in scalerec.eval
            beats &= tgt.unsqueeze(1) != table.local_ids(lo, hi).unsqueeze(0)
            cnt += beats.sum(1)
        coll.all_reduce(cnt, "sum", table.group)
        # the history (minus the target) does not count: subtract those items that scored above the target
        pairs = [(j, h) for j, hs in enumerate(hq) for h in np.unique(hs) if h != tgt[j] and h > 0]
        if pairs:
            pj = torch.tensor([p[0] for p in pairs])
            ph = torch.tensor([int(p[1]) for p in pairs])
            hrows = table.gather_replicated(ph)
            above = ((Q[pj] * hrows).sum(1) > t_s[pj]).long()
            cnt -= torch.zeros_like(cnt).index_add_(0, pj, above)
        ranks.append(cnt.numpy())
    out = metrics_from_ranks(np.concatenate(ranks), ks)
    out["cases"] = len(evset)
    return out


# ------------------------------------------------------------------------------------------- the worker
def latest_complete_checkpoint(run_dir: str) -> str | None:
    """The newest checkpoint directory of a run whose state and every table shard were written."""
    import glob

    best, best_step = None, -1
    for d in glob.glob(os.path.join(run_dir, "checkpoint_*")):
        try:
            with open(os.path.join(d, "state.json")) as f:
                st = json.load(f)
        except (OSError, ValueError):
            continue
        shards = glob.glob(os.path.join(d, f"table-rank*-of-{st['world_size']:05d}.pt"))
        if len(shards) == st["world_size"] and os.path.exists(os.path.join(d, "dense.pt")) \
                and st["global_step"] > best_step:
            best, best_step = d, st["global_step"]
    return best


_PHASES = ("lookup", "forward", "loss", "backward", "dense_step", "table_step")


def _log(msg: str) -> None:
    print(f"[scalerec worker] {msg}", flush=True)


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss_all(group) -> list[int]:
    """Peak resident set size (bytes) of every rank's process, gathered on every rank."""
    import resource

    from scalerec.models import collectives as coll

    mine = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024], dtype=torch.long)
    return [int(v) for v in coll.all_gather_varlen(mine, group)[0]]


def train_loop_per_worker(config: dict) -> dict:
    import torch.distributed as dist

    t_enter = time.time()
    cfg = OmegaConf.create(config["cfg"])
    so = cfg.scaleout
    use_gpu = bool(so.ray.use_gpu)
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    torch.set_num_threads(max(1, int(so.threads_per_worker)))
    import deepspeed
    import ray.train
    from ray.train import Checkpoint

    from scalerec.losses import get_loss
    from scalerec.models.sharded_table import ShardedItemTable

    ctx = ray.train.get_context()
    W, rank = ctx.get_world_size(), ctx.get_world_rank()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")
    table_group = dist.new_group(backend="gloo") if W > 1 else None
    seed = int(cfg.trainer.seed)
    t_import = time.time()
    data = DataSource(cfg)
    t_data = time.time()
    torch.manual_seed(seed)
    dense = DenseSASRec(cfg)
    sdict = cfg.scaleout.table
    table = ShardedItemTable(data.num_items, int(cfg.model.hidden), group=table_group, layout=str(sdict.layout),
                             popularity=data.popularity() if sdict.layout == "popularity" else None,
                             dtype=str(sdict.dtype), optimizer=str(sdict.optimizer), lr=float(sdict.lr),
                             init_std=sdict.init_std, seed=seed)
    state = {"epoch": 1, "step": 0, "global_step": 0, "best": -1.0, "best_epoch": 0, "bad_epochs": 0,
             "valid": {}, "test": {}, "elapsed": 0.0, "world_size": W, "restored_from": None,
             "restore_source": None}
    ckpt, source = ray.train.get_checkpoint(), "ray"
    if ckpt is None:
        # a checkpoint written but not yet registered by the controller when a worker died is still complete
        # in storage; use the newest complete one of this run (local storage only)
        found = latest_complete_checkpoint(str(config["storage"]))
        if found:
            ckpt, source = Checkpoint.from_directory(found), "storage"
    if ckpt is None and str(cfg.trainer.resume):  # start a new run from another run's checkpoint (any W)
        ckpt, source = Checkpoint.from_directory(str(cfg.trainer.resume)), "trainer.resume"
    state["restore_source"] = source if ckpt is not None else None
    same_world = False
    if ckpt is not None:
        with ckpt.as_directory() as d:
            with open(os.path.join(d, "state.json")) as f:
                saved = json.load(f)
            dense.load_state_dict(torch.load(os.path.join(d, "dense.pt"), weights_only=True))
            table.load(d)
            same_world = saved["world_size"] == W and os.path.isdir(os.path.join(d, "ds"))
            state.update(saved, world_size=W, restored_from=saved["global_step"], restore_source=source)
            _log(f"rank {rank}/{W}: restored step {saved['global_step']} (saved at W={saved['world_size']})")
    params = [p for p in dense.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=float(cfg.trainer.lr), betas=tuple(cfg.trainer.betas),
                           weight_decay=float(cfg.trainer.weight_decay))
    engine, _, _, _ = deepspeed.initialize(model=dense, optimizer=opt, model_parameters=params,
                                           config=deepspeed_config(cfg, W))
    if ckpt is not None and same_world:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, "ds"), tag="ds", load_module_strict=False)
    rss_stages = {"after_setup": _peak_rss()}
    if rank == 0:
        _log(f"setup: imports + process group {t_import - t_enter:.1f}s, data {t_data - t_import:.1f}s, "
             f"table + DeepSpeed engine {time.time() - t_data:.1f}s")
    loss_params = OmegaConf.to_container(cfg.loss.params, resolve=True) if cfg.loss.params is not None else {}
    loss_fn = get_loss(str(cfg.loss.name), **(loss_params or {}))
    ks = sorted({int(k) for k in cfg.eval.ks} | {10})
    vmax = int(cfg.eval.valid_max_cases) or None
    every = int(so.checkpoint_every)
    fail_marker = os.path.join(str(config["storage"]), ".fail_injected")

    def encode(seqs, rows):
        return engine.module(seqs, rows)

    def evaluate(split, max_cases):
        engine.module.eval()
        m = sharded_evaluate(encode, table, data.eval_set(split, max_cases), ks, int(cfg.eval.batch_size),
                             int(cfg.model.maxlen))
        engine.module.train()
        return m

    def report(metrics: dict, with_ckpt: bool):
        if not with_ckpt:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as d:
            table.save(d)
            engine.save_checkpoint(os.path.join(d, "ds"), tag="ds")
            if rank == 0:
                torch.save(engine.module.state_dict(), os.path.join(d, "dense.pt"))
                with open(os.path.join(d, "state.json"), "w") as f:
                    json.dump({k: v for k, v in state.items() if k not in ("restored_from", "restore_source")}, f)
                with open(os.path.join(d, "config.yaml"), "w") as f:
                    f.write(OmegaConf.to_yaml(cfg))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))

    engine.module.train()
    t0 = time.time() - float(state["elapsed"])
    epochs = int(cfg.trainer.epochs)
    stop = False
    last_loss = float("nan")
    step_losses: list[tuple[int, float]] = []  # (global step, loss) of this attempt
    train_seconds = 0.0  # time in training steps of this attempt (no evaluation, no checkpoints)
    phases = dict.fromkeys(_PHASES, 0.0)  # where the step time goes (this rank)
    while state["epoch"] <= epochs and not stop:
        epoch = int(state["epoch"])
        losses = []
        for step, x, y in data.batches(epoch, int(state["step"]), rank, W):
            g = int(state["global_step"])
            if g == int(so.fail_at_step) and rank == min(1, W - 1) and not os.path.exists(fail_marker):
                open(fail_marker, "w").close()
                _log(f"rank {rank}: injected failure at step {g}")
                time.sleep(5)  # let the controller collect the last report (a real crash may lose it: see below)
                os._exit(1)
            t_step = time.perf_counter()
            torch.manual_seed((seed * 1_000_003 + g) * 64 + rank)  # dropout: differs per rank
            rows = table.lookup(x)
            t1 = time.perf_counter()
            h = engine(x, rows)
            mask = y > 0
            t2 = time.perf_counter()
            torch.manual_seed(seed * 7_919 + g)  # the loss's sampling: the same on every rank
            loss = loss_fn(h[mask], table, y[mask])
            t3 = time.perf_counter()
            engine.backward(loss * W)  # DeepSpeed averages the dense gradients over W; the loss is the global mean
            t4 = time.perf_counter()
            engine.step()
            t5 = time.perf_counter()
            table.step(grad_scale=1.0 / W)
            t6 = time.perf_counter()
            for k, dt_ in zip(_PHASES, (t1 - t_step, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                phases[k] += dt_
            train_seconds += t6 - t_step
            rss_stages.setdefault("after_first_step", _peak_rss())
            last_loss = float(loss.detach())
            losses.append(last_loss)
            step_losses.append((g, last_loss))
            state["step"], state["global_step"] = step + 1, g + 1
            if g % 20 == 0 and rank == 0:
                _log(f"epoch {epoch} step {step + 1}/{data.steps_per_epoch} loss {last_loss:.4f} "
                     f"({time.time() - t0:.1f}s)")
            if every and state["global_step"] % every == 0 and state["step"] < data.steps_per_epoch:
                state["elapsed"] = time.time() - t0
                report({"epoch": epoch, "global_step": state["global_step"], "loss": last_loss}, True)
        # end of epoch: validate, keep the test metrics of the best epoch, checkpoint
        rss_stages.setdefault("after_training_steps", _peak_rss())
        valid = evaluate("valid", vmax)
        rss_stages.setdefault("after_eval", _peak_rss())
        state["valid"] = valid
        if valid["NDCG@10"] > state["best"]:
            state["best"], state["best_epoch"], state["bad_epochs"] = valid["NDCG@10"], epoch, 0
            state["test"] = evaluate("test", int(so.test_max_cases) or None)
        else:
            state["bad_epochs"] += 1
            stop = int(cfg.trainer.patience) > 0 and state["bad_epochs"] >= int(cfg.trainer.patience)
        state["epoch"], state["step"] = epoch + 1, 0
        state["elapsed"] = time.time() - t0
        budget = float(cfg.trainer.time_budget_s)
        stop = stop or (budget > 0 and state["elapsed"] > budget)
        metrics = {"epoch": epoch, "global_step": state["global_step"], "loss": float(np.mean(losses)) if losses
                   else last_loss, "valid_NDCG@10": valid["NDCG@10"], "valid_HR@10": valid["HR@10"],
                   "best_epoch": state["best_epoch"], "test": state["test"], "valid": valid,
                   "seconds": state["elapsed"], "world_size": W, "restored_from": state["restored_from"]}
        if rank == 0:
            _log(f"epoch {epoch}: loss {metrics['loss']:.4f} valid NDCG@10 {valid['NDCG@10']:.4f} "
                 f"HR@10 {valid['HR@10']:.4f} ({state['elapsed']:.1f}s)")
        report(metrics, True)
    final = {"best_epoch": state["best_epoch"], "valid": state["valid"], "test": state["test"],
             "epochs": int(state["epoch"]) - 1, "global_step": state["global_step"], "seconds": state["elapsed"],
             "world_size": W, "restored_from": state["restored_from"], "restore_source": state["restore_source"],
             "final_loss": last_loss,
             "table_bytes": table.nbytes(), "step_losses": step_losses, "train_seconds": train_seconds,
             "phase_seconds": phases,
             "global_batch": data.B, "peak_rss_per_rank": _peak_rss_all(table.group), "rss_stages": rss_stages}
    if rank == 0:
        _log("final " + json.dumps({k: final[k] for k in ("best_epoch", "global_step", "seconds", "world_size")}))
        _log("step time by phase (rank 0, s): " + json.dumps({k: round(v, 3) for k, v in phases.items()}))
    return final


# ------------------------------------------------------------------------------------------- the driver
def _init_ray(cfg: DictConfig):
    import ray

    if ray.is_initialized():
        return
    address = str(cfg.scaleout.ray.address) or os.environ.get("RAY_ADDRESS", "")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        n = int(cfg.scaleout.ray.num_cpus) or os.cpu_count()
        # address="local": a new in-process cluster, never one that `ray start` left running on this machine
        ray.init(address="local", num_cpus=n, include_dashboard=False, log_to_driver=True)


def run_distributed(cfg: DictConfig) -> dict:
    """Train per ``cfg`` on ``trainer.workers`` Ray Train workers; returns the lead's ``train()`` result keys
    (``best_epoch``, ``valid``, ``test``, ``epochs``, ``seconds``, ``output_dir``) plus scale-out figures."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    cfg = with_scaleout_defaults(cfg)
    so = cfg.scaleout
    W = int(cfg.trainer.workers)
    # workers run in their own directories: hand them absolute paths of what the driver sees
    if not str(cfg.data.path).startswith("synthetic:") and os.path.exists(str(cfg.data.path)):
        cfg.data.path = os.path.abspath(str(cfg.data.path))
    if str(cfg.trainer.resume):
        if not os.path.isfile(os.path.join(str(cfg.trainer.resume), "state.json")):
            raise ScaleOutConfigError(f"trainer.resume: {cfg.trainer.resume} is not a scale-out checkpoint "
                                      "directory (no state.json)")
        cfg.trainer.resume = os.path.abspath(str(cfg.trainer.resume))
    if os.path.exists(str(so.deepspeed.config)):
        so.deepspeed.config = os.path.abspath(str(so.deepspeed.config))
    if str(cfg.data.path).startswith("synthetic:"):
        from scalerec.data.synthetic import parse_spec

        num_items = parse_spec(str(cfg.data.path)).items
    else:
        num_items = DataSource(cfg).num_items
    validate_scaleout(cfg, num_items, None)
    _init_ray(cfg)
    validate_scaleout(cfg, num_items, ray.cluster_resources().get("CPU", 0.0))
    out_dir = os.path.abspath(str(cfg.output_dir))
    storage = os.path.abspath(str(so.ray.storage_path) or os.path.join(out_dir, "ray"))
    name = str(so.ray.name) or "scalerec"
    os.makedirs(os.path.join(storage, name), exist_ok=True)
    cfg.output_dir = out_dir
    env = {"DS_ACCELERATOR": "cpu"} if not so.ray.use_gpu else {}
    env.update(OMP_NUM_THREADS=str(int(so.threads_per_worker)), MKL_NUM_THREADS=str(int(so.threads_per_worker)))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": OmegaConf.to_container(cfg, resolve=True), "storage": os.path.join(storage, name)},
        torch_config=TorchConfig(backend="nccl" if so.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=W, use_gpu=bool(so.ray.use_gpu),
                                     resources_per_worker={"CPU": float(so.ray.cpus_per_worker)}),
        run_config=RunConfig(name=name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=int(so.ray.max_failures)),
                             checkpoint_config=CheckpointConfig(num_to_keep=int(so.num_to_keep)),
                             worker_runtime_env={"env_vars": env}),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    out = dict(result.return_value or {}) if getattr(result, "return_value", None) is not None else {}
    if not out:
        m = result.metrics or {}
        out = {"best_epoch": m.get("best_epoch"), "valid": m.get("valid"), "test": m.get("test"),
               "epochs": m.get("epoch"), "global_step": m.get("global_step"), "seconds": m.get("seconds")}
    out["output_dir"] = out_dir
    out["checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "result.json"), "w") as f:
        json.dump(out, f, default=str)
    return out
