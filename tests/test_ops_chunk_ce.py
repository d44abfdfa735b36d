"""chunk_ce (C++, RECE's chunked CE) against the pure-PyTorch reference in the paper's formulation."""
import pytest
import torch

from scalerec.ops.chunk_ce import bucket_argmax, chunk_ce, chunk_ce_reference


def _inputs(N=23, C=31, d=5, R=2, K=4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g, dtype=dtype).requires_grad_()
    table = torch.randn(C, d, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(1, C, (N,), generator=g)
    cx, cy = -(-N // K), -(-(C - 1) // K)
    xs, ys = [], []
    for _ in range(R):  # random permutations stand in for the bucket sort; row 0 of the table is left out
        x = torch.full((K * cx,), -1, dtype=torch.long)
        x[:N] = torch.randperm(N, generator=g)
        y = torch.full((K * cy,), -1, dtype=torch.long)
        y[: C - 1] = torch.randperm(C - 1, generator=g) + 1
        xs.append(x.view(K, cx))
        ys.append(y.view(K, cy))
    return hidden, table, targets, torch.stack(xs), torch.stack(ys)


def _compare(args, n_extra, rtol):
    hidden, table, rest = args[0], args[1], args[2:]
    h64, t64 = hidden.detach().double().requires_grad_(), table.detach().double().requires_grad_()
    loss = chunk_ce(hidden, table, *rest, n_extra)
    ref = chunk_ce_reference(h64, t64, *rest, n_extra)
    w = torch.randn(hidden.size(0), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = torch.autograd.grad((loss * w.to(loss.dtype)).sum(), (hidden, table))
    rg = torch.autograd.grad((ref * w).sum(), (h64, t64))
    for a, b in zip((loss, *g), (ref, *rg)):
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=rtol * b.abs().max().item())
    return g


@pytest.mark.parametrize("n_extra", [0, 1, 2])
@pytest.mark.parametrize("rounds", [1, 3])
def test_matches_reference_float64(n_extra, rounds):
    args = _inputs(R=rounds)
    g = _compare(args, n_extra, 1e-10)
    assert torch.count_nonzero(g[1][0]) == 0  # row 0 is in no chunk: never a candidate


def test_matches_reference_float32():
    _compare(_inputs(N=300, C=3000, d=16, R=2, K=20, dtype=torch.float32, seed=2), 1, 1e-5)


def test_single_chunk_is_full_ce():
    hidden, table, targets, x, y = _inputs(R=2, K=1)
    full = torch.logsumexp(hidden @ table[1:].t(), 1) - (hidden * table[targets]).sum(-1)
    torch.testing.assert_close(chunk_ce(hidden, table, targets, x, y, 0), full, rtol=1e-10, atol=1e-10)


def test_gradcheck_and_opcheck():
    hidden, table, targets, x, y = _inputs(N=7, C=9, d=3, R=2, K=3)
    assert torch.autograd.gradcheck(lambda h, t: chunk_ce(h, t, targets, x, y, 1), (hidden, table))
    torch.library.opcheck(torch.ops.scalerec.chunk_ce.default, (hidden, table, targets, x, y, 1))


def test_errors():
    hidden, table, targets, x, y = _inputs()
    h, t = hidden.detach(), table.detach()
    dup = x.clone()
    dup[0, 0, 0] = dup[0, 0, 1]
    with pytest.raises(RuntimeError, match="occurs twice"):
        chunk_ce(h, t, targets, dup, y, 1)
    with pytest.raises(RuntimeError, match="y_chunks"):
        chunk_ce(h, t, targets, x, y + 100, 1)
    with pytest.raises(RuntimeError, match="same R and K"):
        chunk_ce(h, t, targets, x[:, :2], y, 1)
    with pytest.raises(RuntimeError, match="n_extra"):
        chunk_ce(h, t, targets, x, y, -1)


def test_bucket_argmax_streams_exactly():
    g = torch.Generator().manual_seed(0)
    dirs, table = torch.randn(6, 4, generator=g), torch.randn(100, 4, generator=g)
    assert torch.equal(bucket_argmax(dirs, table, row_start=1, tile=7), (table[1:] @ dirs.t()).argmax(1))
