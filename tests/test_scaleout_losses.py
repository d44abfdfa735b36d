"""Row-sharded table + distributed losses: W = 2 gloo workers equal one process (fp32, 1e-5).

One spawn of two processes runs every case (spawning costs seconds on 2 cores); the single-process
references are the registry's own losses on the dense table.
"""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from scalerec.losses import get_loss
from scalerec.models.sharded_table import ShardedItemTable, ShardLayout

C, D = 203, 16
SIZES = (37, 23)  # ragged per-rank query counts: the gathers must handle them
CASES = [
    ("ce", {"tile": 32}),
    ("ce_sampled", {"num_negatives": 40}),
    ("ce_sampled", {"num_negatives": 5, "sampling": "in_batch"}),
    ("sce", {"n_buckets": 8, "bucket_size_x": 12, "bucket_size_y": 24, "tile": 16}),
    ("sce", {"n_buckets": 6, "bucket_size_x": 20, "bucket_size_y": 50, "mix_x": True}),
    ("sce", {"bucket_size_y": 130, "impl": "reference"}),  # n_b = b_x = 2 sqrt(N); b_y > one shard
    ("rece", {"n_extra_chunks": 1}),  # default n_buckets from N and C
    ("rece", {"n_buckets": 7, "n_extra_chunks": 0, "rounds": 3, "impl": "reference"}),
]
# RECE's chunks cut buckets by item order: the single-process order (bucket, then id) is the sharded order
# (bucket, rank, local row) when ranks hold contiguous id ranges, so RECE runs on the block layout
LAYOUT_OF = {"rece": "block"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(C + 1, D, generator=g) * 0.5
    table[0] = 0
    hidden = torch.randn(sum(SIZES), D, generator=g)
    targets = torch.randint(1, C + 1, (sum(SIZES),), generator=g)
    seqs = torch.randint(0, C + 1, (sum(SIZES), 5), generator=g)
    return table, hidden, targets, seqs


def _worker(rank, world, port, layout, out_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    table_d, hidden, targets, seqs = _data()
    lo = sum(SIZES[:rank])
    sl = slice(lo, lo + SIZES[rank])
    pop = torch.arange(C + 1, 0, -1).float() if layout == "popularity" else None
    results = {"layout": ShardLayout(C, 2, layout, popularity=pop)}
    for i, (name, params) in enumerate(CASES):
        lay = LAYOUT_OF.get(name, layout)
        table = ShardedItemTable(C, D, weight=table_d, layout=lay, popularity=pop)
        h = hidden[sl].clone().requires_grad_(True)
        torch.manual_seed(100 + i)
        try:
            loss = get_loss(name, **params)(h, table, targets[sl])
        except ValueError as exc:  # reported by the test of this case (the other cases still run)
            results[(name, i)] = str(exc)
            continue
        loss.backward()
        results[(name, i)] = (loss.detach(), h.grad, table.dense_grad(), table.layout)
    # input lookup: rows fetched from owners, gradients sent back
    table = ShardedItemTable(C, D, weight=table_d, layout=layout, popularity=pop)
    rows = table.lookup(seqs[sl])
    (rows * torch.arange(1.0, D + 1)).pow(2).sum().backward()
    results["lookup"] = (rows.detach(), table.dense_grad())
    # one optimizer step of each kind, then a checkpoint for the resume-on-another-W test
    for opt in ("adagrad", "adam"):
        table = ShardedItemTable(C, D, weight=table_d, layout=layout, popularity=pop, optimizer=opt, lr=0.1)
        for step in range(2):
            rows = table.lookup(seqs[sl][:, step:])
            rows.sum().backward()
            table.step(grad_scale=0.5)
        results[opt] = table.to_dense()
        table.save(os.path.join(out_dir, opt))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _sum_ranks(a, b):
    return a + b


@pytest.fixture(scope="module", params=["snake", "popularity"])
def two_ranks(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"w2-{request.param}")
    mp.spawn(_worker, args=(2, _free_port(), request.param, str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)], out


@pytest.mark.parametrize("case", range(len(CASES)))
def test_distributed_loss_equals_single_process(two_ranks, case):
    res, _ = two_ranks
    name, params = CASES[case]
    table_d, hidden, targets, _ = _data()
    t = table_d.clone().requires_grad_(True)
    h = hidden.clone().requires_grad_(True)
    torch.manual_seed(100 + case)
    ref = get_loss(name, **params)(h, t, targets)
    ref.backward()
    assert not isinstance(res[0][(name, case)], str), res[0][(name, case)]
    (l0, gh0, gt0, lay), (l1, gh1, gt1, _) = res[0][(name, case)], res[1][(name, case)]
    assert torch.allclose(l0, ref.detach(), atol=1e-5, rtol=1e-5), (name, l0, ref)
    assert torch.allclose(l1, ref.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([gh0, gh1]), h.grad, atol=1e-5, rtol=1e-5)
    # each row's gradient lives only on its owner; their sum is the dense gradient
    torch.testing.assert_close(gt0 + gt1, t.grad, atol=1e-5, rtol=1e-5)
    assert t.grad.abs().sum() > 0
    owners = lay.owner(torch.arange(1, C + 1))
    assert torch.all(gt0[1:][owners == 1] == 0) and torch.all(gt1[1:][owners == 0] == 0)


def test_lookup_fetches_rows_and_returns_gradients(two_ranks):
    res, _ = two_ranks
    table_d, _, _, seqs = _data()
    t = table_d.clone().requires_grad_(True)
    rows = torch.nn.functional.embedding(seqs, t, padding_idx=0)
    (rows * torch.arange(1.0, D + 1)).pow(2).sum().backward()
    torch.testing.assert_close(torch.cat([res[0]["lookup"][0], res[1]["lookup"][0]]), rows.detach())
    torch.testing.assert_close(res[0]["lookup"][1] + res[1]["lookup"][1], t.grad)


@pytest.mark.parametrize("opt", ["adagrad", "adam"])
def test_row_sparse_optimizer_and_resume_on_one_worker(two_ranks, opt):
    res, out = two_ranks
    table_d, _, _, seqs = _data()
    one = ShardedItemTable(C, D, weight=table_d, optimizer=opt, lr=0.1)  # W = 1: the plain dense table
    for step in range(2):
        one.lookup(seqs[:, step:]).sum().backward()
        one.step(grad_scale=0.5)
    dense1 = one.to_dense()
    torch.testing.assert_close(res[0][opt], dense1, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(res[1][opt], dense1, atol=1e-6, rtol=1e-6)
    touched = torch.unique(seqs[seqs > 0])
    untouched = torch.ones(C + 1, dtype=torch.bool)
    untouched[touched] = False
    untouched[0] = False
    assert torch.equal(dense1[untouched], table_d[untouched])  # row-sparse: untouched rows never move
    assert not torch.allclose(dense1[touched], table_d[touched])
    # the 2-rank checkpoint loads on 1 rank (another layout too) with the same rows and optimizer state
    back = ShardedItemTable(C, D, optimizer=opt, layout="block")
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


def test_sharded_evaluate_matches_full_ranking_evaluate():
    from scalerec.data.dataset import EvalSet
    from scalerec.eval import evaluate
    from scalerec.models import SASRec
    from scalerec.train.ray_trainer import sharded_evaluate

    torch.manual_seed(0)
    model = SASRec(C, maxlen=8, hidden=D, num_blocks=1, dropout=0.0).eval()
    g = torch.Generator().manual_seed(1)
    hist = [torch.randint(1, C + 1, (int(n),), generator=g).numpy() for n in torch.randint(1, 9, (40,), generator=g)]
    tg = torch.randint(1, C + 1, (40,), generator=g).numpy()
    tg[:5] = [h[0] for h in hist[:5]]  # repeat consumption: a target inside its own history
    ev = EvalSet(torch.arange(40).numpy(), hist, tg)
    ref = evaluate(model, ev, "test", [1, 5, 10], batch_size=16)
    table = ShardedItemTable(C, D, weight=model.item_emb.weight, layout="snake")
    got = sharded_evaluate(lambda s, rows: model.encode(s, item_embeddings=rows), table, ev, [1, 5, 10], 16, 8)
    for k in ("HR@1", "HR@5", "NDCG@10", "MRR@10"):
        assert got[k] == pytest.approx(ref[k], abs=1e-9), k
    assert ref["HR@10"] > 0
