"""The one checkpoint layout of a training run (any number of workers, dense or row-sharded table).

A checkpoint is a directory:

* ``state.json`` — format, epoch / step / global step to continue from, early-stopping counters, elapsed
  training time, the world size it was written at, the dataset's identity (name, items, fingerprint);
* ``config.yaml`` — the run's config;
* ``model.pt`` — the module's full state dict (consolidated under ZeRO-3; with a dense table it holds the
  item table too);
* ``table-rankR-of-W.pt`` — with a row-sharded table, every rank's rows and their optimizer state (loadable at
  any world size and layout);
* ``item_ids.npy`` — original id of internal id i + 1 (absent for a synthetic catalog);
* optimizer state of the dense part: ``optimizer.pt`` (plain Adam) or ``ds/`` (DeepSpeed; restored at the same
  world size only — at another W the dense moments restart).

``best/`` holds the same files minus the optimizer state. Directories are written in full before they are
published (``publish``: written under a temporary name, then renamed), so a crash never leaves half of one.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import torch
from omegaconf import OmegaConf

from scalerec.models.build import build_model

FORMAT = "scalerec-checkpoint-v2"


def write_common(d: str, *, rank: int, state: dict, cfg, data_meta: dict, item_ids, dense_state: dict,
                 table=None) -> None:
    """The files of a checkpoint every rank contributes to (rank 0: state, config, model, ids; all: table)."""
    os.makedirs(d, exist_ok=True)
    if table is not None:
        table.save(d)
    if rank == 0:
        torch.save(dense_state, os.path.join(d, "model.pt"))
        if item_ids is not None:
            np.save(os.path.join(d, "item_ids.npy"), np.asarray(item_ids))
        with open(os.path.join(d, "config.yaml"), "w") as f:
            f.write(OmegaConf.to_yaml(cfg))
        with open(os.path.join(d, "state.json"), "w") as f:
            json.dump({"format": FORMAT, **state, "data": data_meta}, f)


def read_state(d: str) -> dict:
    path = os.path.join(d, "state.json")
    if not os.path.isdir(d):
        raise FileNotFoundError(f"checkpoint not found: {d} (a checkpoint is a directory, e.g. runs/x/best)")
    if not os.path.exists(path):
        raise ValueError(f"{d}: not a scalerec checkpoint (no state.json)")
    with open(path) as f:
        st = json.load(f)
    if st.get("format") != FORMAT:
        raise ValueError(f"{d}: not a {FORMAT} checkpoint (format {st.get('format')!r})")
    return st


def is_complete(d: str) -> bool:
    """Every file of the checkpoint is there (the state, the model and every table shard it names)."""
    try:
        st = read_state(d)
    except (OSError, ValueError):
        return False
    if not os.path.exists(os.path.join(d, "model.pt")):
        return False
    if st.get("table_sharded"):
        import glob

        return len(glob.glob(os.path.join(d, f"table-rank*-of-{st['world_size']:05d}.pt"))) == st["world_size"]
    return True


def check_same_data(st: dict, data_meta: dict, path: str) -> None:
    got = st["data"]
    if got["fingerprint"] != data_meta["fingerprint"]:
        raise ValueError(f"{path}: checkpoint was trained on another dataset ({got['name']}, {got['num_items']} items, "
                         f"fingerprint {got['fingerprint']}) than {data_meta['name']} ({data_meta['num_items']} items, "
                         f"fingerprint {data_meta['fingerprint']})")


def publish(tmp: str, final: str) -> None:
    """Replace ``final`` by the complete directory ``tmp`` (the old one is removed only after the rename)."""
    old = final + ".old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    if os.path.exists(old):
        shutil.rmtree(old)


def load_checkpoint(path: str):
    """A checkpoint's model for evaluation and serving: ``(SASRec with the whole item table, cfg, info)``.

    ``info`` holds ``item_ids`` (original id of internal id i + 1), ``num_items``, ``dataset_fingerprint``.
    A row-sharded table is assembled from its shards (fine for catalogs that fit one machine's memory)."""
    st = read_state(path)
    cfg = OmegaConf.load(os.path.join(path, "config.yaml"))
    n = int(st["data"]["num_items"])
    model = build_model(cfg, n)
    sd = torch.load(os.path.join(path, "model.pt"), map_location="cpu", weights_only=True)
    if st.get("table_sharded"):
        from scalerec.models.sharded_table import ShardedItemTable

        sc = cfg.scaleout.table
        table = ShardedItemTable(n, int(cfg.model.hidden), dtype=str(sc.dtype), optimizer=str(sc.optimizer),
                                 init_std=1.0, seed=0)
        table.load(path)
        sd["item_emb.weight"] = table.to_dense().float()
    model.load_state_dict(sd)
    model.eval()
    ids_path = os.path.join(path, "item_ids.npy")
    item_ids = np.load(ids_path) if os.path.exists(ids_path) else np.arange(1, n + 1)
    return model, cfg, {"item_ids": item_ids, "num_items": n, "dataset_fingerprint": st["data"]["fingerprint"],
                        "state": st}


def save_model_checkpoint(path: str, model, cfg, item_ids, name: str = "model", fingerprint: str = "") -> None:
    """A checkpoint of a model alone (no run state): what ``scalerec evaluate`` / ``recommend`` read."""
    n = int(model.num_items)
    state = {"epoch": 0, "step": 0, "global_step": 0, "world_size": 1, "table_sharded": False}
    meta = {"name": name, "num_items": n, "fingerprint": fingerprint}
    tmp = path + ".tmp"
    write_common(tmp, rank=0, state=state, cfg=cfg, data_meta=meta, item_ids=item_ids,
                 dense_state=model.state_dict())
    publish(tmp, path)
