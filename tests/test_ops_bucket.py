"""bucket_topk and bucket_ce (C++) against their pure-PyTorch references."""
import pytest
import torch

from scalerec.ops.bucket_ce import bucket_ce, bucket_ce_reference
from scalerec.ops.bucket_topk import bucket_topk, bucket_topk_reference


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("tile", [1, 5, 1000])
@pytest.mark.parametrize("row_start", [0, 1])
def test_topk_matches_reference(tile, row_start):
    g = _gen()
    dirs = torch.randn(7, 4, generator=g, dtype=torch.float64)
    table = torch.randn(50, 4, generator=g, dtype=torch.float64)
    v, i = bucket_topk(dirs, table, 9, row_start=row_start, tile=tile)
    rv, ri = bucket_topk_reference(dirs, table, 9, row_start=row_start)
    torch.testing.assert_close(v, rv, rtol=0, atol=1e-12)
    assert torch.equal(i, ri)  # continuous scores: no ties, so even the order agrees
    assert (i >= row_start).all()
    # values are the scores of the returned rows
    torch.testing.assert_close(v, (dirs.unsqueeze(1) * table[i]).sum(-1))


def test_topk_ties_prefer_smaller_row_and_k_equals_rows():
    table = torch.tensor([[1.0], [2.0], [2.0], [0.5], [2.0]])
    v, i = bucket_topk(torch.tensor([[1.0]]), table, 5, tile=2)
    assert i.tolist() == [[1, 2, 4, 0, 3]]
    assert v.tolist() == [[2.0, 2.0, 2.0, 1.0, 0.5]]


@pytest.mark.parametrize("tile", [40, 333, 5000])
def test_topk_many_ties_through_the_blocked_scan(tile):
    # integer scores from a small range: thousands of ties, across tiles and inside the 32-score blocks that the
    # scan tests at once; the result must be the top-k by (score desc, row id asc) exactly
    g = _gen(2)
    table = torch.randint(-3, 4, (5000, 3), generator=g).double()
    dirs = torch.randint(-2, 3, (6, 3), generator=g).double()
    v, i = bucket_topk(dirs, table, 70, row_start=1, tile=tile)
    scores = dirs @ table[1:].t()
    for b in range(dirs.size(0)):
        order = sorted(range(scores.size(1)), key=lambda j: (-scores[b, j].item(), j))[:70]
        assert i[b].tolist() == [j + 1 for j in order]
        assert v[b].tolist() == [scores[b, j].item() for j in order]


def test_topk_float32_multi_tile():
    g = _gen(1)
    dirs, table = torch.randn(33, 16, generator=g), torch.randn(20000, 16, generator=g)
    v, i = bucket_topk(dirs, table, 64, row_start=1, tile=1024)
    rv, ri = bucket_topk_reference(dirs, table, 64, row_start=1)
    torch.testing.assert_close(v, rv, rtol=1e-5, atol=1e-5)
    overlap = sum(len(set(a) & set(b)) for a, b in zip(i.tolist(), ri.tolist()))
    assert overlap >= 0.99 * i.numel()


def test_topk_opcheck_and_errors():
    dirs, table = torch.randn(3, 4), torch.randn(10, 4)
    torch.library.opcheck(torch.ops.scalerec.bucket_topk.default, (dirs, table, 4, 1, 3))
    with pytest.raises(RuntimeError, match="k must lie in"):
        bucket_topk(dirs, table, 10, row_start=1)
    with pytest.raises(RuntimeError, match="d="):
        bucket_topk(dirs, table[:, :3], 2)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        bucket_topk(dirs, table.double(), 2)


def _bucket_inputs(N=23, C=31, d=5, n_b=6, b_x=7, b_y=9, dtype=torch.float64, seed=0):
    g = _gen(seed)
    hidden = torch.randn(N, d, generator=g, dtype=dtype).requires_grad_()
    table = torch.randn(C, d, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(1, C, (N,), generator=g)
    x_ids = torch.stack([torch.randperm(N, generator=g)[:b_x] for _ in range(n_b)])
    y_ids = torch.stack([torch.randperm(C - 1, generator=g)[:b_y] + 1 for _ in range(n_b)])
    # make sure positives do occur among some buckets' items so the masking is exercised
    y_ids[0, : min(b_x, b_y)] = targets[x_ids[0, : min(b_x, b_y)]]
    return hidden, table, targets, x_ids, y_ids


def _check_against_reference(args, rtol):
    """The op (in the inputs' dtype) against the float64 reference: ``rtol`` relative to each tensor's scale."""
    hidden, table, rest = args[0], args[1], args[2:]
    h64, t64 = hidden.detach().double().requires_grad_(), table.detach().double().requires_grad_()
    loss, cov = bucket_ce(hidden, table, *rest)
    rloss, rcov = bucket_ce_reference(h64, t64, *rest)
    assert torch.equal(cov, rcov) and 0 < cov.sum() < hidden.size(0)
    w = torch.randn(hidden.size(0), generator=_gen(5), dtype=torch.float64)
    g = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), (hidden, table))
    rg = torch.autograd.grad((rloss * w).sum(), (h64, t64))
    for a, b in zip((loss, *g), (rloss, *rg)):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * b.abs().max().item())
    return g


def test_bucket_ce_matches_reference_float64():
    args = _bucket_inputs()
    g = _check_against_reference(args, 1e-10)
    table, y_ids, targets, x_ids = args[1], args[4], args[2], args[3]
    touched = torch.zeros(table.size(0), dtype=torch.bool)
    touched[y_ids.reshape(-1)] = True
    touched[targets[x_ids.reshape(-1)]] = True
    assert torch.count_nonzero(g[1][~touched]) == 0  # gradient only in the touched rows


def test_bucket_ce_matches_reference_float32():
    args = _bucket_inputs(N=200, C=500, d=16, n_b=20, b_x=30, b_y=40, dtype=torch.float32, seed=3)
    _check_against_reference(args, 1e-5)


def test_bucket_ce_gradcheck_and_opcheck():
    hidden, table, targets, x_ids, y_ids = _bucket_inputs(N=8, C=10, d=3, n_b=3, b_x=4, b_y=5)
    assert torch.autograd.gradcheck(lambda h, t: bucket_ce(h, t, targets, x_ids, y_ids)[0], (hidden, table))
    torch.library.opcheck(torch.ops.scalerec.bucket_ce.default, (hidden, table, targets, x_ids, y_ids))


def test_bucket_ce_errors():
    hidden, table, targets, x_ids, y_ids = _bucket_inputs()
    h, t = hidden.detach(), table.detach()
    with pytest.raises(RuntimeError, match="x_ids"):
        bucket_ce(h, t, targets, x_ids + 100, y_ids)
    with pytest.raises(RuntimeError, match="y_ids"):
        bucket_ce(h, t, targets, x_ids, y_ids - 100)
    with pytest.raises(RuntimeError, match="same B"):
        bucket_ce(h, t, targets, x_ids[:2], y_ids)
    with pytest.raises(RuntimeError, match="int64"):
        bucket_ce(h, t, targets, x_ids.int(), y_ids)
