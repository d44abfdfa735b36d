"""The one trainer: W = 1 in this process and W = 2 gloo ranks (the same ``fit``) give the same per-step
losses; DeepSpeed ZeRO-2 and ZeRO-3 train, checkpoint and resume; run-level bad configs get one clear error.

The W = 2 runs are two processes of one ``torch.distributed`` gloo group started here (what a Ray Train worker
group gives ``fit`` too, without Ray's start-up cost; ``tests/test_scaleout_ray.py`` runs the Ray path)."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalerec.train.config import load_config

STEPS = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BEAUTY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "beauty", "Beauty.txt")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """The first 700 users of Beauty: real data, seconds to train."""
    with open(BEAUTY) as fh:
        lines = [next(fh) for _ in range(700)]
    p = tmp_path_factory.mktemp("data") / "beauty700.txt"
    p.write_text("".join(lines))
    return str(p)


def _cfg(data, out, *extra):
    return load_config(None, [f"data.path={data}", f"output_dir={out}", "model.maxlen=20", "model.hidden=16",
                              "model.dropout=0.0", "trainer.batch_size=64", "trainer.progress=false",
                              "trainer.threads=1", "trainer.epochs=2", "trainer.patience=0", "eval.ks=[5,10]",
                              "eval.valid_max_cases=200", "scaleout.test_max_cases=200", "scaleout.table.lr=0.05",
                              *extra])


def _worker(rank, world, port, jobs):
    from scalerec.train.context import LocalRun
    from scalerec.train.trainer import fit

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for data, out, extra, resume in jobs:
        cfg = _cfg(data, out, f"trainer.workers={world}", *extra)
        res = fit(cfg, LocalRun(out, resume), log=lambda *a: None)
        if rank == 0:
            with open(os.path.join(out, "result.json"), "w") as f:
                json.dump(res, f, default=str)
    dist.destroy_process_group()


def _spawn(world, jobs):
    mp.spawn(_worker, args=(world, _free_port(), jobs), nprocs=world, join=True)
    return [json.load(open(os.path.join(out, "result.json"))) for _, out, _, _ in jobs]


def _local(data, out, *extra, resume=None):
    from scalerec.train.context import LocalRun
    from scalerec.train.trainer import fit

    return fit(_cfg(data, out, *extra), LocalRun(out, resume), log=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_data):
    """W = 1 (plain Adam, this process) and W = 2 (DeepSpeed ZeRO-2) on the same config, plus ZeRO-3 with a
    checkpoint half way and its resume."""
    tmp = tmp_path_factory.mktemp("trainer")
    out = {}
    sharded = ["scaleout.table.sharded=true", "loss.name=sce", "loss.params.n_buckets=8",
               "loss.params.bucket_size_x=32", "loss.params.bucket_size_y=64"]
    out["w1"] = _local(small_data, str(tmp / "w1"), *sharded)
    out["w1_ce"] = _local(small_data, str(tmp / "w1_ce"), "scaleout.table.sharded=true", "loss.name=ce")
    z3 = ["scaleout.deepspeed.zero_stage=3", "trainer.max_steps_per_epoch=4"]
    jobs = [(small_data, str(tmp / "w2"), sharded, None),
            (small_data, str(tmp / "w2_ce"), ["scaleout.table.sharded=true", "loss.name=ce"], None),
            (small_data, str(tmp / "z3_first"), sharded + z3 + ["trainer.epochs=1"], None),
            (small_data, str(tmp / "z3_full"), sharded + z3, None)]
    out["w2"], out["w2_ce"], out["z3_first"], out["z3_full"] = _spawn(2, jobs)
    out["z3_resumed"], = _spawn(2, [(small_data, str(tmp / "z3_resumed"), sharded + z3,
                                    str(tmp / "z3_first" / "checkpoint"))])
    out["tmp"] = tmp
    return out


@pytest.mark.parametrize("pair", [("w1", "w2"), ("w1_ce", "w2_ce")])
def test_one_and_two_workers_give_the_same_losses(runs, pair):
    a, b = (runs[k] for k in pair)
    la, lb = [l for _, l in a["step_losses"]], [l for _, l in b["step_losses"]]
    assert len(la) == len(lb) >= STEPS
    assert a["engine"] == "AdamEngine" and b["engine"] == "DeepSpeedEngine" and b["world_size"] == 2
    for i in range(STEPS):
        assert lb[i] == pytest.approx(la[i], abs=1e-5, rel=1e-5), (i, la[:i + 1], lb[:i + 1])
    half = len(la) // 2  # two epochs of the same batches
    assert sum(la[half:]) < sum(la[:half])  # it learns
    for k in ("NDCG@10", "HR@10", "COV@10"):
        assert b["test"][k] == pytest.approx(a["test"][k], abs=2e-3), k


def test_outputs_are_the_same_for_any_worker_count(runs):
    for key in ("w1", "w2"):
        d = runs[key]["output_dir"]
        lines = [json.loads(l) for l in open(os.path.join(d, "metrics.jsonl"))]
        assert [l["epoch"] for l in lines] == [1, 2] and "COV@10" in lines[0]["valid"]
        final = json.load(open(os.path.join(d, "final.json")))
        assert final["test"]["cases"] == 200 and "COV@10" in final["test"]
        for sub in ("checkpoint", "best"):
            st = json.load(open(os.path.join(d, sub, "state.json")))
            assert st["table_sharded"] and st["world_size"] == runs[key]["world_size"]
            assert len([f for f in os.listdir(os.path.join(d, sub)) if f.startswith("table-rank")]) == st["world_size"]


def test_zero3_checkpoint_is_consolidated_and_resumes(runs):
    d = os.path.join(runs["z3_first"]["output_dir"], "checkpoint")
    sd = torch.load(os.path.join(d, "model.pt"), weights_only=True)
    # the full parameters, not ZeRO-3's empty partitions
    assert sd["pos_emb.weight"].shape == (20, 16) and sd["blocks.0.qkv.weight"].shape == (48, 16)
    assert sd["pos_emb.weight"].abs().sum() > 0
    assert os.path.isdir(os.path.join(d, "ds"))
    full, resumed = runs["z3_full"], runs["z3_resumed"]
    assert resumed["restored_from"] == runs["z3_first"]["global_step"] and resumed["restore_source"] == "trainer.resume"
    assert resumed["global_step"] == full["global_step"]
    tail = dict(full["step_losses"])
    for g, loss in resumed["step_losses"]:
        assert loss == pytest.approx(tail[g], rel=1e-5, abs=1e-6), g
    assert resumed["test"]["NDCG@10"] == pytest.approx(full["test"]["NDCG@10"], abs=1e-6)


def test_dense_table_run_resumes_exactly(tmp_path, small_data):
    """W = 1 with the local dense table: a resumed run continues as the uninterrupted one."""
    straight = _local(small_data, str(tmp_path / "s"), "trainer.epochs=2", "trainer.max_steps_per_epoch=4")
    _local(small_data, str(tmp_path / "r"), "trainer.epochs=1", "trainer.max_steps_per_epoch=4")
    resumed = _local(small_data, str(tmp_path / "r"), "trainer.epochs=2", "trainer.max_steps_per_epoch=4",
                     resume=str(tmp_path / "r" / "checkpoint"))
    assert not resumed["table_sharded"] and resumed["engine"] == "AdamEngine"
    assert dict(resumed["step_losses"]) == pytest.approx({g: l for g, l in straight["step_losses"] if g >= 4},
                                                         rel=1e-6)
    assert resumed["test"]["NDCG@10"] == pytest.approx(straight["test"]["NDCG@10"], rel=1e-6)


@pytest.mark.parametrize("extra,match", [
    (["trainer.workers=2", "scaleout.table.sharded=true", "loss.name=bce"], "has no row-sharded form"),
    (["trainer.workers=2", "trainer.engine=adam"], "trainer.engine=adam trains one process"),
    (["trainer.workers=2", "scaleout.table.sharded=false", "scaleout.deepspeed.zero_stage=3"],
     "zero_stage=3 partitions"),
    (["trainer.engine=sgd"], "trainer.engine must be one of"),
    (["scaleout.table.sharded=maybe"], "scaleout.table.sharded must be"),
    (["scaleout.table.layout=diagonal"], "scaleout.table.layout must be one of"),
    (["trainer.workers=5000"], "larger than the catalog"),
])
def test_bad_run_configs_name_the_field(small_data, tmp_path, extra, match):
    from scalerec.train.run import RunConfigError, validate_run

    with pytest.raises(RunConfigError, match=match):
        validate_run(_cfg(small_data, str(tmp_path), *extra), 1000)
