"""Single-process training loop: SASRec + any registered loss, early stopping on validation NDCG@10."""
from __future__ import annotations

import json
import os
import random
import time

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from scalerec.data import load_dataset
from scalerec.data.batching import iterate_batches, num_batches
from scalerec.eval import evaluate
from scalerec.losses import get_loss
from scalerec.train.checkpoint import build_model, check_same_dataset, read_checkpoint, save_checkpoint


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dataset_from_config(cfg: DictConfig):
    d = cfg.data
    return load_dataset(d.path, None if d.format == "auto" else d.format, split=d.split,
                        min_item_count=int(d.min_item_count), min_user_count=int(d.min_user_count),
                        temporal_quantile=float(d.temporal_quantile))


def loss_from_config(cfg: DictConfig):
    params = OmegaConf.to_container(cfg.loss.params, resolve=True) if cfg.loss.params is not None else {}
    return get_loss(cfg.loss.name, **(params or {}))


def train(cfg: DictConfig, resume: str | None = None, dataset=None, log=print) -> dict:
    """Train per ``cfg``; returns ``{"best_epoch", "valid", "test", "epochs", "seconds", "output_dir"}``."""
    if int(cfg.trainer.workers) > 1:
        from scalerec.train.ray_trainer import run_distributed  # scale-out path (Ray Train + DeepSpeed)

        return run_distributed(cfg)
    tr = cfg.trainer
    if int(tr.threads) > 0:
        torch.set_num_threads(int(tr.threads))
    seed_everything(int(tr.seed))
    os.makedirs(cfg.output_dir, exist_ok=True)
    dataset = dataset if dataset is not None else dataset_from_config(cfg)
    model = build_model(cfg, dataset.num_items)
    opt = torch.optim.Adam(model.parameters(), lr=float(tr.lr), betas=tuple(tr.betas), weight_decay=float(tr.weight_decay))
    loss_fn = loss_from_config(cfg)
    ks = [int(k) for k in cfg.eval.ks]
    if 10 not in ks:
        ks.append(10)
    ckpt_path = os.path.join(cfg.output_dir, "checkpoint.pt")
    best_path = os.path.join(cfg.output_dir, "best.pt")
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")

    start_epoch, best, best_epoch, bad_epochs, elapsed = 1, -1.0, 0, 0, 0.0
    if resume:
        payload = read_checkpoint(resume)
        check_same_dataset(payload, dataset, resume)
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        st = payload["train_state"]
        start_epoch, best, best_epoch, bad_epochs, elapsed = (st["epoch"] + 1, st["best"], st["best_epoch"],
                                                              st["bad_epochs"], st["elapsed"])
        torch.set_rng_state(payload["rng"]["torch"])
        np.random.set_state(payload["rng"]["numpy"])
        random.setstate(payload["rng"]["python"])
        log(f"resumed from {resume} at epoch {start_epoch}")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    valid_cases = int(cfg.eval.valid_max_cases) or None
    n_batches = num_batches(dataset.train, int(tr.batch_size))
    max_steps = int(tr.max_steps_per_epoch) or n_batches
    epoch = start_epoch - 1
    for epoch in range(start_epoch, int(tr.epochs) + 1):
        if bad_epochs > int(tr.patience):
            break
        model.train()
        t0 = time.perf_counter()
        rng = np.random.default_rng(int(tr.seed) * 1_000_003 + epoch)
        batches = iterate_batches(dataset.train, int(tr.batch_size), int(cfg.model.maxlen), rng)
        total = min(max_steps, n_batches)
        if tr.progress:
            from tqdm import tqdm

            batches = tqdm(batches, total=total, desc=f"epoch {epoch}", unit="batch", leave=False)
        loss_sum, steps = 0.0, 0
        for inputs, targets in batches:
            if steps >= max_steps:
                break
            hidden = model.encode(inputs)
            mask = targets > 0
            loss = loss_fn(hidden[mask], model.item_table, targets[mask])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.item_emb.weight[0].zero_()  # the padding row stays zero
            loss_sum += loss.item()
            steps += 1
            if tr.progress and steps % 10 == 0:
                batches.set_postfix(loss=f"{loss_sum / steps:.4f}")
        train_s = time.perf_counter() - t0
        elapsed += train_s
        record = {"epoch": epoch, "loss": loss_sum / max(steps, 1), "train_seconds": round(train_s, 3), "steps": steps}
        if epoch % int(tr.eval_every) == 0 or epoch == int(tr.epochs):
            valid = evaluate(model, dataset, "valid", ks, int(cfg.eval.batch_size), max_cases=valid_cases)
            record["valid"] = {k: round(v, 6) for k, v in valid.items()}
            if valid["NDCG@10"] > best:
                best, best_epoch, bad_epochs = valid["NDCG@10"], epoch, 0
                save_checkpoint(best_path, model=model, optimizer=None, epoch=epoch, cfg=cfg, dataset=dataset,
                                metrics=record)
            else:
                bad_epochs += 1
        with open(metrics_path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        log(f"epoch {epoch}: loss {record['loss']:.4f}  valid NDCG@10 "
            f"{record.get('valid', {}).get('NDCG@10', float('nan')):.4f}  ({train_s:.1f}s)")
        save_checkpoint(ckpt_path, model=model, optimizer=opt, epoch=epoch, cfg=cfg, dataset=dataset, metrics=record,
                        extra={"train_state": {"epoch": epoch, "best": best, "best_epoch": best_epoch,
                                               "bad_epochs": bad_epochs, "elapsed": elapsed}})
        if float(tr.time_budget_s) and elapsed >= float(tr.time_budget_s):
            log(f"time budget {tr.time_budget_s}s reached after epoch {epoch}")
            break

    if os.path.exists(best_path):
        model.load_state_dict(read_checkpoint(best_path)["model"])
    test = evaluate(model, dataset, "test", ks, int(cfg.eval.batch_size))
    valid = evaluate(model, dataset, "valid", ks, int(cfg.eval.batch_size))
    result = {"best_epoch": best_epoch, "epochs": epoch, "seconds": round(elapsed, 2), "valid": valid, "test": test,
              "output_dir": cfg.output_dir, "loss": cfg.loss.name}
    with open(os.path.join(cfg.output_dir, "final.json"), "w") as fh:
        json.dump(result, fh, indent=1)
    return result
