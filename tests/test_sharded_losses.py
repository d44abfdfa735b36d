"""Row-sharded table + sharded losses: W = 1, 2, 3 ranks equal one process (float64, 1e-8), every layout.

One spawn per world size runs every case on every layout (spawning costs seconds on 2 cores); the
single-process references are the registry's own losses on the dense table. W = 1 runs in this process.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalerec.losses import get_loss
from scalerec.models.sharded_table import LAYOUTS, ShardedItemTable, ShardLayout

C, D = 203, 16
SIZES = {1: (60,), 2: (37, 23), 3: (25, 11, 24)}  # ragged per-rank query counts: the gathers must handle them
CASES = [
    ("ce", {"tile": 32}),
    ("ce", {"impl": "reference"}),
    ("ce_sampled", {"num_negatives": 40}),
    ("ce_sampled", {"num_negatives": 5, "sampling": "in_batch"}),
    ("sce", {"n_buckets": 8, "bucket_size_x": 12, "bucket_size_y": 24, "tile": 16}),
    ("sce", {"n_buckets": 6, "bucket_size_x": 20, "bucket_size_y": 50, "mix_x": True}),
    ("sce", {"bucket_size_y": 130, "impl": "reference"}),  # n_b = b_x = 2 sqrt(N); b_y > one shard
    ("sce", {"n_buckets": 2, "bucket_size_x": 30, "bucket_size_y": 40}),  # fewer buckets than ranks at W = 3
    ("rece", {"n_extra_chunks": 1}),  # default n_buckets from N and C
    ("rece", {"n_buckets": 7, "n_extra_chunks": 0, "rounds": 3, "impl": "reference"}),
]
TOL = {"atol": 1e-8, "rtol": 1e-8}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(C + 1, D, generator=g, dtype=torch.float64) * 0.5
    table[0] = 0
    hidden = torch.randn(60, D, generator=g, dtype=torch.float64)
    targets = torch.randint(1, C + 1, (60,), generator=g)
    seqs = torch.randint(0, C + 1, (60, 5), generator=g)
    return table, hidden, targets, seqs


def _pop():
    return torch.arange(C + 1, 0, -1).double()


def _run_rank(rank, world, out_dir):
    """Every case on every layout as rank ``rank`` of ``world`` (W = 1: no process group)."""
    table_d, hidden, targets, seqs = _data()
    lo = sum(SIZES[world][:rank])
    sl = slice(lo, lo + SIZES[world][rank])
    results = {}
    for layout in LAYOUTS:
        pop = _pop() if layout == "popularity" else None
        for i, (name, params) in enumerate(CASES):
            table = ShardedItemTable(C, D, weight=table_d, layout=layout, popularity=pop, dtype="fp64")
            h = hidden[sl].clone().requires_grad_(True)
            torch.manual_seed(100 + i)
            loss = get_loss(name, **params)(h, table, targets[sl])
            loss.backward()
            results[(layout, i)] = (loss.detach(), h.grad, table.dense_grad(), table.layout)
        table = ShardedItemTable(C, D, weight=table_d, layout=layout, popularity=pop, dtype="fp64")
        rows = table.lookup(seqs[sl])
        (rows * torch.arange(1.0, D + 1, dtype=torch.float64)).pow(2).sum().backward()
        results[(layout, "lookup")] = (rows.detach(), table.dense_grad())
        results[(layout, "eval")] = _sharded_eval(table)
    # one optimizer step of each kind, then a checkpoint for the resume-on-another-W test
    for opt in ("adagrad", "adam"):
        table = ShardedItemTable(C, D, weight=table_d, layout="snake", optimizer=opt, lr=0.1, dtype="fp64")
        for step in range(2):
            rows = table.lookup(seqs[sl][:, step:])
            rows.sum().backward()
            table.step(grad_scale=0.5)
        results[opt] = table.to_dense()
        table.save(os.path.join(out_dir, opt))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _worker(rank, world, port, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    _run_rank(rank, world, out_dir)
    dist.destroy_process_group()


def _eval_case():
    from scalerec.data.dataset import EvalSet
    from scalerec.models import SASRec

    torch.manual_seed(0)
    model = SASRec(C, maxlen=8, hidden=D, num_blocks=1, dropout=0.0).double().eval()
    g = torch.Generator().manual_seed(1)
    hist = [torch.randint(1, C + 1, (int(n),), generator=g).numpy() for n in torch.randint(1, 9, (40,), generator=g)]
    tg = torch.randint(1, C + 1, (40,), generator=g).numpy()
    tg[:5] = [h[0] for h in hist[:5]]  # repeat consumption: a target inside its own history
    return model, EvalSet(torch.arange(40).numpy(), hist, tg)


def _sharded_eval(table):
    from scalerec.eval import evaluate_table

    model, ev = _eval_case()
    table = ShardedItemTable(C, D, weight=model.item_emb.weight, layout=table.layout.kind, dtype="fp64",
                             popularity=_pop() if table.layout.kind == "popularity" else None, group=table.group)
    return evaluate_table(lambda s: model.encode(s, table.lookup(s))[:, -1], table, ev, [1, 5, 10], 16, 8, tile=37)


@pytest.fixture(scope="module", params=[1, 2, 3])
def ranks(request, tmp_path_factory):
    W = request.param
    out = tmp_path_factory.mktemp(f"w{W}")
    if W == 1:
        _run_rank(0, 1, str(out))
    else:
        mp.spawn(_worker, args=(W, _free_port(), str(out)), nprocs=W, join=True)
    return W, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(W)], out


@pytest.mark.parametrize("case", range(len(CASES)))
def test_sharded_loss_equals_single_process(ranks, case):
    W, res, _ = ranks
    name, params = CASES[case]
    table_d, hidden, targets, _ = _data()
    t = table_d.clone().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    torch.manual_seed(100 + case)
    ref = get_loss(name, **params)(h, t, targets)
    ref.backward()
    assert t.grad.abs().sum() > 0
    for layout in LAYOUTS:
        got = [r[(layout, case)] for r in res]
        for loss, *_ in got:
            torch.testing.assert_close(loss, ref.detach(), **TOL, msg=f"{name} {layout} W={W}")
        torch.testing.assert_close(torch.cat([g[1] for g in got]), h.grad, **TOL)
        # each row's gradient lives only on its owner; their sum is the dense gradient
        torch.testing.assert_close(sum(g[2] for g in got), t.grad, **TOL)
        owners = got[0][3].owner(torch.arange(1, C + 1))
        for r in range(W):
            assert torch.all(got[r][2][1:][owners != r] == 0)


def test_lookup_fetches_rows_and_returns_gradients(ranks):
    W, res, _ = ranks
    table_d, _, _, seqs = _data()
    t = table_d.clone().requires_grad_(True)
    rows = torch.nn.functional.embedding(seqs, t, padding_idx=0)
    (rows * torch.arange(1.0, D + 1, dtype=torch.float64)).pow(2).sum().backward()
    for layout in LAYOUTS:
        torch.testing.assert_close(torch.cat([r[(layout, "lookup")][0] for r in res]), rows.detach())
        torch.testing.assert_close(sum(r[(layout, "lookup")][1] for r in res), t.grad)


def test_sharded_evaluation_equals_full_ranking(ranks):
    from scalerec.eval import evaluate

    W, res, _ = ranks
    model, ev = _eval_case()
    ref = evaluate(model, ev, "test", [1, 5, 10], batch_size=16)
    assert ref["HR@10"] > 0 and ref["COV@10"] > 0
    for layout in LAYOUTS:
        for r in res:
            got = r[(layout, "eval")]
            for k in ("HR@1", "HR@5", "NDCG@10", "MRR@10", "COV@1", "COV@5", "COV@10"):
                assert got[k] == pytest.approx(ref[k], abs=1e-12), (layout, k)


@pytest.mark.parametrize("opt", ["adagrad", "adam"])
def test_row_sparse_optimizer_and_resume_on_one_worker(ranks, opt):
    W, res, out = ranks
    table_d, _, _, seqs = _data()
    one = ShardedItemTable(C, D, weight=table_d, optimizer=opt, lr=0.1, dtype="fp64")  # W = 1: a dense table
    for step in range(2):
        one.lookup(seqs[:, step:]).sum().backward()
        one.step(grad_scale=0.5)
    dense1 = one.to_dense()
    for r in res:
        torch.testing.assert_close(r[opt], dense1, **TOL)
    touched = torch.unique(seqs[seqs > 0])
    untouched = torch.ones(C + 1, dtype=torch.bool)
    untouched[touched] = False
    untouched[0] = False
    assert torch.equal(dense1[untouched], table_d[untouched])  # row-sparse: untouched rows never move
    assert not torch.allclose(dense1[touched], table_d[touched])
    # the 2-rank checkpoint loads on 1 rank (another layout too) with the same rows and optimizer state
    back = ShardedItemTable(C, D, optimizer=opt, layout="block", dtype="fp64")
    back.load(str(out / opt))
    torch.testing.assert_close(back.to_dense(), dense1)
    for k in one.state:
        ref = one.state[k]
        got = torch.zeros_like(ref)
        got[one.layout.local_index(back.local_ids())] = back.state[k]
        torch.testing.assert_close(got, ref)
    assert back.steps == one.steps == 2


def test_layout_balances_zipf_traffic():
    n = 100_000
    pop = 1.0 / torch.arange(1, n + 1).double() ** 0.8  # Zipf, ids in popularity order
    block = ShardLayout(n, 8, "block").load_imbalance(pop)
    snake = ShardLayout(n, 8, "snake").load_imbalance(pop)
    assert block > 3.0 and snake < 1.15 and snake < ShardLayout(n, 8, "cyclic").load_imbalance(pop)
    shuffled = pop[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    lay = ShardLayout(n, 8, "popularity", popularity=shuffled)
    assert abs(lay.load_imbalance(shuffled) - snake) < 1e-9  # sorting by popularity recovers the snake deal
    sizes = [lay.shard_size(r) for r in range(8)]
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
    ids = torch.arange(1, n + 1)
    for kind in ("cyclic", "snake", "block", "popularity"):  # shard_ids and (owner, local_index) are inverse maps
        lay = ShardLayout(n, 8, kind, popularity=shuffled)
        for r in range(8):
            s = lay.shard_ids(r)
            assert torch.all(lay.owner(s) == r) and torch.equal(lay.local_index(s), torch.arange(s.numel()))
        assert torch.equal(torch.sort(torch.cat([lay.shard_ids(r) for r in range(8)])).values, ids)


def test_bad_configs_name_the_field():
    with pytest.raises(ValueError, match="trainer.workers"):
        ShardLayout(3, 4)
    with pytest.raises(ValueError, match="table.optimizer"):
        ShardedItemTable(10, 4, optimizer="rmsprop")
    with pytest.raises(ValueError, match="table.dtype"):
        ShardedItemTable(10, 4, dtype="fp8")
    with pytest.raises(ValueError, match="target ids"):
        get_loss("ce")(torch.randn(2, 4), ShardedItemTable(10, 4), torch.tensor([1, 11]))
    with pytest.raises(ValueError, match="impl must be one of"):
        get_loss("ce", impl="blockwise")(torch.randn(2, 4), ShardedItemTable(10, 4), torch.tensor([1, 2]))


def test_bf16_storage_and_init_independent_of_world_size():
    a = ShardedItemTable(1000, 8, dtype="bf16", seed=3)
    assert a.weight.dtype == torch.bfloat16 and a.nbytes()["table"] == 1000 * 8 * 2
    full = a.to_dense()
    assert full.dtype == torch.float32 and torch.all(full[0] == 0)
    b = ShardedItemTable(1000, 8, dtype="fp32", seed=3, layout="block")
    torch.testing.assert_close(b.to_dense().to(torch.bfloat16).float(), full)
    # W = 1 accepts every registered loss (dense fallback), gradients land in the row-sparse optimizer
    loss = get_loss("bce")(torch.randn(6, 8, requires_grad=True), b, torch.randint(1, 1001, (6,)))
    loss.backward()
    assert b.local_grad()[0].numel() > 0


@pytest.mark.parametrize("name,params", [("ce", {"tile": 64}), ("sce", {"n_buckets": 8, "bucket_size_y": 32})])
def test_bf16_shard_is_scanned_tile_by_tile(name, params):
    """A bf16 shard gives the loss of its fp32-rounded table (the ops convert each tile on the fly)."""
    g = torch.Generator().manual_seed(5)
    table = ShardedItemTable(C, D, dtype="bf16", seed=2)
    dense = table.to_dense().clone().requires_grad_(True)  # the bf16 rows, exactly, in fp32
    h = torch.randn(50, D, generator=g)
    y = torch.randint(1, C + 1, (50,), generator=g)
    torch.manual_seed(7)
    ref = get_loss(name, **params)(h, dense, y)
    torch.manual_seed(7)
    got = get_loss(name, **params)(h, table, y)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
