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


# ----------------------------------------------------- the row-range backward and the fused table update

def _full_grads(hidden, table, targets, x, y, n_extra, w):
    loss = chunk_ce(hidden, table, targets, x, y, n_extra)
    return torch.autograd.grad((loss * w).sum(), (hidden, table))


@pytest.mark.parametrize("rounds", [1, 3])
@pytest.mark.parametrize("cuts", [[0, 31], [0, 1, 9, 10, 31], [0, 5, 6, 20, 31]])
def test_backward_rows_sum_to_the_full_backward(rounds, cuts):
    from scalerec.ops.chunk_ce import chunk_ce_backward_rows

    hidden, table, targets, x, y = _inputs(R=rounds)
    w = torch.randn(hidden.size(0), dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    gh_full, gt_full = _full_grads(hidden, table, targets, x, y, 1, w)
    _, lse = torch.ops.scalerec.chunk_ce(hidden.detach(), table.detach(), targets, x, y, 1)
    gh_sum = torch.zeros_like(gh_full)
    for a, b in zip(cuts, cuts[1:]):
        gh, gr = chunk_ce_backward_rows(w, hidden.detach(), table.detach(), targets, x, y, 1, lse, a, b)
        assert gr.shape == (b - a, table.size(1))
        torch.testing.assert_close(gr, gt_full[a:b], rtol=1e-10, atol=1e-12)
        gh_sum += gh
    torch.testing.assert_close(gh_sum, gh_full, rtol=1e-10, atol=1e-12)


def test_backward_rows_errors():
    from scalerec.ops.chunk_ce import chunk_ce_backward_rows

    hidden, table, targets, x, y = _inputs()
    _, lse = torch.ops.scalerec.chunk_ce(hidden.detach(), table.detach(), targets, x, y, 1)
    g = torch.ones(hidden.size(0), dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"row range \[5, 40\) must lie in \[0, C=31\]"):
        chunk_ce_backward_rows(g, hidden.detach(), table.detach(), targets, x, y, 1, lse, 5, 40)
    with pytest.raises(RuntimeError, match="row range"):
        chunk_ce_backward_rows(g, hidden.detach(), table.detach(), targets, x, y, 1, lse, 7, 3)
    torch.library.opcheck(torch.ops.scalerec.chunk_ce_backward_rows.default,
                          (g, hidden.detach(), table.detach(), targets, x, y, 1, lse, 4, 17))


@pytest.mark.parametrize("rows_per_pass", [1, 4, 1000])
def test_fused_sgd_update_equals_dense_gradient_step(rows_per_pass):
    from scalerec.ops.chunk_ce import chunk_ce_fused
    from scalerec.ops.row_update import RowSGD

    hidden, table, targets, x, y = _inputs(R=2)
    w = torch.randn(hidden.size(0), dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    gh_full, gt_full = _full_grads(hidden, table, targets, x, y, 1, w)
    t2 = table.detach().clone().requires_grad_()
    h2 = hidden.detach().clone().requires_grad_()
    loss = chunk_ce_fused(h2, t2, targets, x, y, 1, RowSGD(0.5), rows_per_pass=rows_per_pass)
    torch.testing.assert_close(loss, chunk_ce(hidden, table, targets, x, y, 1).detach())
    (loss * w).sum().backward()
    assert t2.grad is None  # no table gradient is ever stored
    torch.testing.assert_close(h2.grad, gh_full, rtol=1e-10, atol=1e-12)
    # every pass saw the pre-update rows: the result is one SGD step on the full gradient
    torch.testing.assert_close(t2.detach(), table.detach() - 0.5 * gt_full, rtol=1e-10, atol=1e-12)


def test_fused_rowwise_adagrad_matches_its_formula_and_skips_untouched_rows():
    from scalerec.losses.rece import rece
    from scalerec.ops.row_update import RowwiseAdagrad

    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(40, 6, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(200, 6, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(1, 200, (40,), generator=g)
    dirs = torch.randn(2, 5, 6, generator=g, dtype=torch.float64)
    loss = rece(hidden, table, targets, directions=dirs)
    gh, gt = torch.autograd.grad(loss, (hidden, table))
    opt = RowwiseAdagrad(200, lr=0.1)
    opt.sum[:] = 0.25  # a non-trivial prior state
    h2, t2 = hidden.detach().clone().requires_grad_(), table.detach().clone()
    rece(h2, t2, targets, directions=dirs, fused_update=opt, rows_per_pass=64).backward()
    torch.testing.assert_close(h2.grad, gh)
    touched = (gt != 0).any(1)
    assert not touched[0] and touched[1:].any()
    s = 0.25 + gt.pow(2).mean(1)
    want = table.detach() - 0.1 * gt / (s.sqrt() + 1e-10).unsqueeze(1)
    torch.testing.assert_close(t2[touched], want[touched])
    assert torch.equal(t2[~touched], table.detach()[~touched])
    torch.testing.assert_close(opt.sum[touched].double(), s[touched], rtol=1e-6, atol=1e-7)
    assert torch.all(opt.sum[~touched] == 0.25)


def test_fused_update_errors():
    from scalerec.losses.rece import rece
    from scalerec.ops.row_update import RowSGD, RowwiseAdagrad

    hidden, table, targets = torch.randn(8, 4), torch.randn(20, 4), torch.randint(1, 20, (8,))
    with pytest.raises(ValueError, match="lr must be positive"):
        RowSGD(0.0)
    with pytest.raises(ValueError, match="eps must be positive"):
        RowwiseAdagrad(10, 0.1, eps=0.0)
    with pytest.raises(ValueError, match="num_rows must be positive"):
        RowwiseAdagrad(0, 0.1)
    with pytest.raises(ValueError, match="needs impl='cpp'"):
        rece(hidden, table, targets, impl="reference", fused_update=RowSGD(0.1))
    with pytest.raises(ValueError, match="rows_per_pass must be positive"):
        rece(hidden, table, targets, fused_update=RowSGD(0.1), rows_per_pass=0)
    with pytest.raises(TypeError, match="update must be callable"):
        rece(hidden, table, targets, fused_update=3)
    loss = rece(hidden.requires_grad_(), table, targets, fused_update=RowwiseAdagrad(10, 0.1))
    with pytest.raises(ValueError, match="state was made for 10 rows"):
        loss.backward()
