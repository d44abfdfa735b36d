"""The SparseGrad ops (C++) against their pure-PyTorch references; gradients of the sparse linear op."""
import pytest
import torch

from scalerec.ops.sparse_grad import (compact_entry_ids, compact_words, sparse_linear, sparsegrad_compact_merge,
                                      sparsegrad_compact_merge_reference,
                                      sparsegrad_rotated_update_, sparsegrad_rotated_update_reference,
                                      sparsegrad_topk_grad, sparsegrad_topk_grad_reference)


def _orth(n, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=dtype))[0]


# the four product orders (csrc/sparsegrad_rotated_grad.h): both rotations through the [O, I] product (N >= O, I),
# both through the rows (N < O, I), only U_in through the rows (I <= N < O), only U_out (O <= N < I)
@pytest.mark.parametrize("N,O,I,k", [(40, 12, 7, 10), (3, 9, 16, 1), (200, 6, 5, 30), (10, 24, 6, 20),
                                     (10, 6, 24, 20)])
@pytest.mark.parametrize("rotate", [True, False])
def test_topk_grad_matches_reference(N, O, I, k, rotate):
    torch.manual_seed(N + O)
    g, x = torch.randn(N, O, dtype=torch.float64), torch.randn(N, I, dtype=torch.float64)
    uo, ui = (_orth(O), _orth(I, seed=1)) if rotate else (None, None)
    idx, val = sparsegrad_topk_grad(g, x, uo, ui, k)
    ridx, rval = sparsegrad_topk_grad_reference(g, x, uo, ui, k)
    assert idx.shape == (k,) and val.shape == (k,)
    assert torch.equal(idx, ridx)
    torch.testing.assert_close(val, rval)
    assert bool((idx[1:] > idx[:-1]).all())  # sorted ascending, distinct


def test_topk_grad_float32_and_full_k():
    torch.manual_seed(0)
    g, x = torch.randn(64, 10), torch.randn(64, 8)
    uo, ui = _orth(10, torch.float32), _orth(8, torch.float32, 1)
    idx, val = sparsegrad_topk_grad(g, x, uo, ui, 80)
    assert torch.equal(idx, torch.arange(80))
    torch.testing.assert_close(val, (uo.t() @ g.t() @ x @ ui).flatten(), rtol=1e-5, atol=1e-5)


def test_topk_grad_rejects_bad_k_and_shapes():
    g, x = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(RuntimeError, match="k must be in"):
        sparsegrad_topk_grad(g, x, None, None, 7)
    with pytest.raises(RuntimeError, match="u_out must be"):
        sparsegrad_topk_grad(g, x, torch.eye(2), None, 1)


@pytest.mark.parametrize("pattern", ["scattered", "one_row", "one_col"])
def test_rotated_update_matches_reference(pattern):
    torch.manual_seed(1)
    O, I = 11, 7
    uo, ui = _orth(O), _orth(I, seed=2)
    w = torch.randn(O, I, dtype=torch.float64)
    idx = {"scattered": torch.tensor([0, 5, 17, 40, 76]), "one_row": torch.arange(14, 21),
           "one_col": torch.arange(3, O * I, I)}[pattern]
    delta = torch.randn(idx.numel(), dtype=torch.float64)
    a, b = w.clone(), w.clone()
    sparsegrad_rotated_update_(a, uo, ui, idx, delta)
    sparsegrad_rotated_update_reference(b, uo, ui, idx, delta)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and it is the change of W = U_out W~ U_inᵀ for a sparse change of W~
    wr = uo.t() @ w @ ui
    wr.view(-1).index_add_(0, idx, delta)
    torch.testing.assert_close(a, uo @ wr @ ui.t(), rtol=1e-10, atol=1e-10)


def test_opcheck():
    torch.manual_seed(2)
    g, x = torch.randn(20, 6, dtype=torch.float64), torch.randn(20, 5, dtype=torch.float64)
    uo, ui = _orth(6), _orth(5, seed=3)
    torch.library.opcheck(torch.ops.scalerec.sparsegrad_topk_grad.default, (g, x, uo, ui, 7))
    torch.library.opcheck(torch.ops.scalerec.sparsegrad_topk_grad.default, (g, x, None, None, 3))
    torch.library.opcheck(torch.ops.scalerec.sparsegrad_rotated_update_.default,
                          (torch.randn(6, 5, dtype=torch.float64), uo, ui, torch.tensor([1, 8, 29]),
                           torch.randn(3, dtype=torch.float64)))


def _adam_case(dtype, seed=4):
    """Three weights (rotated, rotated, plain), dense state for the first two and a compact one for the third."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 5), (5, 6), (4, 3)]
    ws = [torch.randn(o, i, generator=g, dtype=torch.float64).to(dtype) for o, i in shapes]
    uo = [_orth(6, seed=5).to(dtype), _orth(5, seed=6).to(dtype), None]
    ui = [_orth(5, seed=7).to(dtype), _orth(6, seed=8).to(dtype), None]
    idx = [torch.tensor([0, 3, 7, 29]), torch.tensor([2, 11, 12]), torch.tensor([1, 5, 10])]
    pos = [idx[0], idx[1], torch.tensor([0, 2, 4])]  # the third: places in a compact set of 6 entries
    n_state = [30, 30, 6]
    m = [torch.randn(n, generator=g, dtype=torch.float64).to(dtype) * 0.1 for n in n_state]
    v = [torch.rand(n, generator=g, dtype=torch.float64).to(dtype) * 0.01 for n in n_state]
    t = [torch.randint(0, 5, (n,), generator=g, dtype=torch.int32) for n in n_state]
    vals = [torch.randn(k.numel(), generator=g, dtype=torch.float64).to(dtype) for k in idx]
    return ws, m, v, t, pos, idx, vals, uo, ui


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_lazy_adam_op_matches_reference(dtype):
    """The fused lazy-Adam operator against its Python reference (torch._foreach_*) over several steps: step counts
    exactly, state and weights to rounding (both compute the bias corrections in float64; bfloat16 values in float32,
    rounded once); the entries outside the selection keep their state."""
    from scalerec.ops.sparse_grad import sparsegrad_lazy_adam_, sparsegrad_lazy_adam_reference

    tol = {torch.float64: dict(rtol=1e-12, atol=1e-14), torch.float32: dict(rtol=1e-5, atol=1e-7),
           torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}[dtype]
    a = _adam_case(dtype)
    b = [[x.clone() if isinstance(x, torch.Tensor) else x for x in lst] for lst in a]
    untouched = a[1][0].clone()
    for step in range(3):
        sparsegrad_lazy_adam_(*a, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
        sparsegrad_lazy_adam_reference(*b, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
        for x, y in zip(a[3], b[3]):
            assert torch.equal(x, y), step
        for lst_a, lst_b in zip(a[:3], b[:3]):  # weights, m, v
            for x, y in zip(lst_a, lst_b):
                torch.testing.assert_close(x, y, **tol)
    assert int(a[3][0][0]) >= 3
    keep = torch.ones(30, dtype=torch.bool)
    keep[a[4][0]] = False
    assert torch.equal(a[1][0][keep], untouched[keep])
    # one step's effect, by hand, on the plain (MeProp) weight: W.flat[idx] += -lr * m^ / (sqrt(v^) + eps)
    c = _adam_case(torch.float64)
    w0, m0, v0, t0 = c[0][2].clone(), c[1][2].clone(), c[2][2].clone(), c[3][2].clone()
    sparsegrad_lazy_adam_(*c, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    p, g = c[4][2], c[6][2]
    tt = (t0[p] + 1).double()
    mm = 0.9 * m0[p] + 0.1 * g
    vv = 0.999 * v0[p] + 0.001 * g * g
    want = w0.view(-1).clone()
    want[c[5][2]] += -1e-2 * (mm / (1 - 0.9 ** tt)) / ((vv / (1 - 0.999 ** tt)).sqrt() + 1e-8)
    torch.testing.assert_close(c[0][2].view(-1), want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype,step_dtype", [(torch.float64, torch.int32), (torch.float32, torch.int32),
                                              (torch.bfloat16, torch.int32), (torch.float32, torch.int16)])
def test_adam_entries_kernel_matches_reference(dtype, step_dtype):
    """The element-wise lazy-Adam kernel (the arithmetic its CUDA twin shares) against its pure-PyTorch reference,
    including step counts far along (bias corrections near 1) and entries seen for the first time (t = 0)."""
    from scalerec.ops.sparse_grad import sparsegrad_adam_entries_, sparsegrad_adam_entries_reference

    g = torch.Generator().manual_seed(9)
    S, k = 500, 64
    m = (torch.randn(S, generator=g, dtype=torch.float64) * 0.1).to(dtype)
    v = (torch.rand(S, generator=g, dtype=torch.float64) * 0.01).to(dtype)
    t = torch.randint(0, 20000, (S,), generator=g, dtype=step_dtype)
    t[:100] = 0
    pos = torch.randperm(S, generator=g)[:k]
    vals = torch.randn(k, generator=g, dtype=torch.float64).to(dtype)
    a, b = [m.clone(), v.clone(), t.clone()], [m.clone(), v.clone(), t.clone()]
    d = sparsegrad_adam_entries_(*a, pos, vals, 1e-3, 0.9, 0.999, 1e-8)
    e = sparsegrad_adam_entries_reference(*b, pos, vals, 1e-3, 0.9, 0.999, 1e-8)
    tol = {torch.float64: dict(rtol=1e-13, atol=1e-15), torch.float32: dict(rtol=1e-5, atol=1e-8),
           torch.bfloat16: dict(rtol=8e-3, atol=1e-6)}[dtype]
    assert d.dtype == dtype and a[2].dtype == step_dtype and torch.equal(a[2], b[2])
    torch.testing.assert_close(d, e, **tol)
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[1], **tol)
    outside = torch.ones(S, dtype=torch.bool)
    outside[pos] = False
    assert torch.equal(a[0][outside], m[outside]) and torch.equal(a[2][outside], t[outside])
    # bad input: one clear error each
    with pytest.raises(RuntimeError, match=r"positions must be in \[0, 500\)"):
        sparsegrad_adam_entries_(*[x.clone() for x in (m, v, t)], torch.tensor([3, 500]), vals[:2], 1e-3, 0.9, 0.999,
                                 1e-8)
    with pytest.raises(RuntimeError, match="steps must be int32 or int16"):
        sparsegrad_adam_entries_(m.clone(), v.clone(), t.long(), pos, vals, 1e-3, 0.9, 0.999, 1e-8)
    torch.library.opcheck(torch.ops.scalerec.sparsegrad_adam_entries_.default,
                          (m.clone(), v.clone(), t.clone(), pos, vals, 1e-3, 0.9, 0.999, 1e-8))


def test_step_count_dtype_is_int16_only_where_saturating_is_exact():
    """16-bit step counts stop at 32767. Where step_count_dtype allows them (Adam's betas, float32 moments), an entry
    at the cap updates bit for bit as with its true, larger int32 count, in the kernel and in the reference; for
    beta2 = 0.9999 the same cap would change the update, and step_count_dtype keeps int32 there."""
    from scalerec.ops.sparse_grad import (sparsegrad_adam_entries_, sparsegrad_adam_entries_reference,
                                          step_count_dtype)

    assert step_count_dtype(0.9, 0.999) == torch.int16
    assert step_count_dtype(0.9, 0.999, torch.bfloat16) == torch.int16
    assert step_count_dtype(0.9, 0.9999) == torch.int32
    assert step_count_dtype(0.9, 0.999, torch.float64) == torch.int32  # 0.999^32767 ~ 6e-15: not 1 in float64
    assert step_count_dtype(0.9, 0.99, torch.float64) == torch.int16
    g = torch.Generator().manual_seed(3)
    S = 64
    m = torch.randn(S, generator=g) * 0.1
    v = torch.rand(S, generator=g) * 0.01
    pos = torch.arange(0, S, 2)
    vals = torch.randn(pos.numel(), generator=g)
    top = torch.iinfo(torch.int16).max
    for fn in (sparsegrad_adam_entries_, sparsegrad_adam_entries_reference):
        for b2, same in ((0.999, True), (0.9999, False)):
            capped = [m.clone(), v.clone(), torch.full((S,), top, dtype=torch.int16)]
            true = [m.clone(), v.clone(), torch.full((S,), 50_000, dtype=torch.int32)]
            d16 = fn(*capped, pos, vals, 1e-3, 0.9, b2, 1e-8)
            d32 = fn(*true, pos, vals, 1e-3, 0.9, b2, 1e-8)
            assert bool((capped[2] == top).all()) and bool((true[2][pos] == 50_001).all())  # the cap holds
            assert torch.equal(capped[0], true[0]) and torch.equal(capped[1], true[1])
            assert torch.equal(d16, d32) == same, (fn.__name__, b2)
    # below the cap, int16 counts count like int32 ones
    a = [m.clone(), v.clone(), torch.full((S,), top - 1, dtype=torch.int16)]
    sparsegrad_adam_entries_(*a, pos, vals, 1e-3, 0.9, 0.999, 1e-8)
    assert bool((a[2][pos] == top).all()) and bool((a[2][1::2] == top - 1).all())


def test_lazy_adam_op_checks_its_lists():
    from scalerec.ops.sparse_grad import sparsegrad_lazy_adam_

    a = list(_adam_case(torch.float64))
    with pytest.raises(RuntimeError, match="one entry per weight"):
        sparsegrad_lazy_adam_(*a[:4], a[4][:2], *a[5:], lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    a[7] = [a[7][0], None, None]  # u_out without u_in for the second weight
    with pytest.raises(RuntimeError, match="both rotations or neither"):
        sparsegrad_lazy_adam_(*a, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    torch.library.opcheck(torch.ops.scalerec.sparsegrad_lazy_adam_.default,
                          tuple(_adam_case(torch.float64)) + (1e-2, 0.9, 0.999, 1e-8))


@pytest.mark.parametrize("use_reference", [False, True])
def test_sparse_linear_gradcheck_density_one(use_reference):
    """With k = out*in the sparse backward is the exact gradient w.r.t. x, W~ and b of x (U_out W~ U_inᵀ)ᵀ + b.

    The op takes W = U_out W~ U_inᵀ and returns W's gradient in the rotated basis (w.r.t. W~), so W is formed from
    W~ by a function whose backward passes that gradient through unchanged; gradcheck then compares it with the
    numerical derivative with respect to W~."""
    torch.manual_seed(3)
    O, I = 5, 4
    uo, ui = _orth(O), _orth(I, seed=4)
    x = torch.randn(3, 2, I, dtype=torch.float64, requires_grad=True)
    w_rot = torch.randn(O, I, dtype=torch.float64, requires_grad=True)
    b = torch.randn(O, dtype=torch.float64, requires_grad=True)

    class Unrotate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, w_rot):
            return uo @ w_rot @ ui.t()

        @staticmethod
        def backward(ctx, g):
            return g

    def f(x, w_rot, b):
        return sparse_linear(x, Unrotate.apply(w_rot), b, uo, ui, O * I, use_reference, sparse_grad=False)

    assert torch.autograd.gradcheck(f, (x, w_rot, b))
    # and the gradient really is the rotated one: without the rotations it would not match (the check can fail)
    w_rot.grad = None
    f(x, w_rot, b).sum().backward()
    plain = torch.ones(3, 2, O, dtype=torch.float64).reshape(-1, O).t() @ x.detach().reshape(-1, I)
    assert not torch.allclose(w_rot.grad, plain)


def test_sparse_linear_gradient_is_topk_of_rotated_gradient():
    torch.manual_seed(4)
    O, I, k = 6, 5, 4
    uo, ui = _orth(O), _orth(I, seed=5)
    x = torch.randn(7, I, dtype=torch.float64)
    w = torch.randn(O, I, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(7, O, dtype=torch.float64)
    y = sparse_linear(x, w, None, uo, ui, k)
    y.backward(gy)
    assert w.grad.is_sparse
    dense = uo.t() @ gy.t() @ x @ ui
    got = w.grad.to_dense()
    top = torch.topk(dense.abs().flatten(), k).indices
    mask = torch.zeros(O * I, dtype=torch.bool)
    mask[top] = True
    torch.testing.assert_close(got.flatten()[mask], dense.flatten()[mask])
    assert bool((got.flatten()[~mask] == 0).all())


@pytest.mark.parametrize("use_reference", [False, True])
def test_sparse_linear_skips_zero_gradient_rows_exactly(use_reference):
    """Rows of grad_y that are exactly zero (all but [CLS]) are dropped before the GEMMs: the selected entries,
    their values and the bias/input gradients are those of the full computation."""
    torch.manual_seed(6)
    N, O, I, k = 12, 9, 7, 11
    uo, ui = _orth(O, seed=7), _orth(I, seed=8)
    x = torch.randn(3, N // 3, I, dtype=torch.float64, requires_grad=True)
    w = torch.randn(O, I, dtype=torch.float64, requires_grad=True)
    b = torch.randn(O, dtype=torch.float64, requires_grad=True)
    gy = torch.randn(3, N // 3, O, dtype=torch.float64)
    gy[:, 1:] = 0  # three rows in four carry no gradient (as all but [CLS]): they are dropped before the GEMMs
    y = sparse_linear(x, w, b, uo, ui, k, use_reference=use_reference)
    y.backward(gy)
    idx, val = sparsegrad_topk_grad_reference(gy.reshape(N, O), x.detach().reshape(N, I), uo, ui, k)
    got = w.grad.coalesce()
    assert torch.equal(got.indices()[0] * I + got.indices()[1], idx)
    torch.testing.assert_close(got.values(), val, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.grad, gy.reshape(N, O).sum(0))
    torch.testing.assert_close(x.grad, gy @ w.detach())
    # all rows zero: nothing to drop, the gradient is k zero entries
    w.grad = None
    sparse_linear(x.detach(), w, None, uo, ui, k).backward(torch.zeros(3, N // 3, O,
                                                                                                  dtype=torch.float64))
    assert w.grad.coalesce().values().abs().sum() == 0


def _topk_abs_with_ties(v: torch.Tensor, k: int):
    """Reference selection: every |v| above the k-th largest, then ties at it in index order."""
    a = v.float().abs()
    thr = torch.topk(a, k).values[-1]
    above = (a > thr).nonzero().flatten()
    ties = (a == thr).nonzero().flatten()[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


@pytest.mark.parametrize("case", ["float32", "bfloat16_ties", "sample_bound_too_high"])
def test_topk_grad_large_matrix_selection(case):
    """Matrices large enough for the sampled threshold (O*I >= 65,536): exact selection, ties in index order, and
    the fallback when the sample's bound lets fewer than k entries through."""
    torch.manual_seed(9)
    O, I = 512, 256
    n = O * I
    if case == "float32":
        G, k = torch.randn(O, I), 1000
    elif case == "bfloat16_ties":
        G, k = torch.randn(O, I).bfloat16(), 3000  # 8-bit mantissas: many equal magnitudes
    else:  # the sampled positions all hold the largest value, but there are fewer of them than k
        G, k = torch.rand(O, I) * 0.01, 10000
        G.view(-1)[:: n // 8192] = 10.0
    eye = torch.eye(O, dtype=G.dtype)
    idx, val = sparsegrad_topk_grad(eye, G, None, None, k)  # grad_outᵀ x with grad_out = I is x itself
    want = _topk_abs_with_ties(G.flatten(), k)
    assert torch.equal(idx, want)
    assert torch.equal(val, G.flatten()[want])


@pytest.mark.parametrize("O,I", [(512, 256), (20, 30)])  # the sampled path and the full one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_grad_ranks_nan_first(O, I, dtype):
    """NaN entries of the gradient rank above every magnitude, as in torch.topk (a plain `>` in nth_element is no
    strict weak order with NaNs: undefined behaviour); the rest are the largest magnitudes, ties in index order."""
    torch.manual_seed(3)
    G = torch.randn(O, I).to(dtype)
    G[O // 3, I // 2] = float("nan")
    eye = torch.eye(O, dtype=dtype)
    # grad_outᵀ x with grad_out = I: x itself, except that 0 * NaN spreads the NaN over its column
    P = G.clone()
    P[:, I // 2] = float("nan")
    k = O + 40
    idx, val = sparsegrad_topk_grad(eye, G, None, None, k)
    a = P.flatten().float().abs()
    a[a.isnan()] = float("inf")  # no infinities in G: the NaNs rank first
    want = _topk_abs_with_ties(a, k)
    assert torch.equal(idx, want)
    assert int(val.isnan().sum()) == O and torch.equal(val.isnan(), P.flatten()[want].isnan())
    assert torch.equal(val[~val.isnan()], P.flatten()[want][~P.flatten()[want].isnan()])
    only = torch.full((O, I), float("nan"), dtype=dtype)  # all NaN: the first k by index
    assert torch.equal(sparsegrad_topk_grad(eye, only, None, None, 40)[0], torch.arange(40))


def _compact_state(known, capacity, n, seed=0, step_dtype=torch.int32):
    """A compact lazy-Adam state of a weight with ``n`` entries and the given capacity holding the ids ``known``
    (random moments and step counts in slots [0, len(known)), zeros after) and their bitmap."""
    g = torch.Generator().manual_seed(seed)
    c = len(known)
    words = compact_words(torch.tensor(sorted(known), dtype=torch.long), n)
    m, v, t = torch.zeros(capacity), torch.zeros(capacity), torch.zeros(capacity, dtype=step_dtype)
    m[:c], v[:c] = torch.randn(c, generator=g), torch.rand(c, generator=g)
    t[:c] = torch.randint(1, 50, (c,), generator=g, dtype=step_dtype)
    return words, m, v, t


def _compact_merge_cases(dtype, step_dtype=torch.int32):
    """(words, m, v, t, keys, n) cases: empty set, partly full, all keys known, all new, one that fills the buffer
    exactly, keys below / between / above the known ids and at word edges (63, 64, 127, n - 1), no keys, whole
    words without a new entry, and random ones."""
    k = lambda *ids: torch.tensor(ids, dtype=dtype)  # noqa: E731
    st = lambda known, cap, n=300, seed=0: _compact_state(known, cap, n, seed, step_dtype)  # noqa: E731
    cases = [
        (*st([], 5), k(3, 9, 40), 300),
        (*st([4, 8, 30], 8), k(0, 8, 9, 31), 300),
        (*st([4, 8, 30], 4), k(4, 8, 30), 300),
        (*st([4, 8, 30], 6), k(1, 5, 31), 300),           # fills the buffer exactly
        (*st([10, 20], 6), k(0, 1, 2, 3), 300),
        (*st([10, 20], 3), k(), 300),
        (*st([63, 64, 200], 9, n=201), k(0, 62, 64, 127, 128, 199, 200), 201),
        (*st([0], 2, n=1), k(0), 1),
        (*st(list(range(0, 256, 3)), 120, n=256), k(3, 6, 129, 130), 256),  # words 0 and 3 keep their entries
    ]
    g = torch.Generator().manual_seed(1)
    for r in range(20):
        n_ids = 300 if r % 2 else 1000
        known = torch.randperm(n_ids, generator=g)[:int(torch.randint(0, 60 if r % 2 else 700, (1,), generator=g))]
        keys = torch.randperm(n_ids, generator=g)[:int(torch.randint(0, 50, (1,), generator=g))].sort().values
        cases.append((*st(known.tolist(), len(known) + 50, n=n_ids, seed=r), keys.to(dtype), n_ids))
    return cases


@pytest.mark.parametrize("dtype,step_dtype", [(torch.int32, torch.int32), (torch.int64, torch.int32),
                                              (torch.int32, torch.int16)])
def test_compact_merge_matches_reference(dtype, step_dtype):
    """The C++ merge of a step's selection into a compact lazy-Adam state equals its reference, sets the keys' bits,
    keeps the state in ascending id order with zero room after it, carries each known entry's state, zeroes the new
    ones' and returns each key's slot and the merged size."""
    for words, m, v, t, keys, n in _compact_merge_cases(dtype, step_dtype):
        out = sparsegrad_compact_merge(words, m, v, t, keys, n)
        ref = sparsegrad_compact_merge_reference(words, m, v, t, keys, n)
        for a, b in zip(out, ref):
            assert torch.equal(a, b)
        words2, m2, v2, t2, pos, count = out
        assert pos.dtype == torch.long and t2.dtype == step_dtype and count.dtype == torch.long and count.dim() == 0
        known = compact_entry_ids(words, n).tolist()
        union = sorted(set(known) | set(keys.tolist()))
        assert compact_entry_ids(words2, n).tolist() == union and int(count) == len(union)
        assert [union[i] for i in pos.tolist()] == keys.tolist()
        for i, e in enumerate(union):
            if e in known:
                j = known.index(e)
                assert (m2[i], v2[i], t2[i]) == (m[j], v[j], t[j])
            else:
                assert (m2[i], v2[i], t2[i]) == (0, 0, 0)
        assert not m2[len(union):].any() and not v2[len(union):].any() and not t2[len(union):].any()
        assert m.numel() == m2.numel() and words.numel() == words2.numel()  # the capacity is the caller's


def test_compact_words_round_trip():
    ids = torch.tensor([0, 1, 62, 63, 64, 127, 128, 250])
    words = compact_words(ids, 251)
    assert words.dtype == torch.long and words.numel() == 4 and int(words[0]) == (1 | 2 | 1 << 62) - 2**63
    assert torch.equal(compact_entry_ids(words, 251), ids)
    with pytest.raises(ValueError, match=r"ids must be in \[0, 251\)"):
        compact_words(torch.tensor([251]), 251)


def test_compact_merge_rejects_bad_input():
    words, m, v, t = _compact_state([4, 8], 3, 100)
    for merge in (sparsegrad_compact_merge, sparsegrad_compact_merge_reference):
        with pytest.raises(RuntimeError, match="entry set is full"):
            merge(words, m, v, t, torch.tensor([1, 5], dtype=torch.int32), 100)
        with pytest.raises(RuntimeError, match="strictly ascending"):
            merge(words, m, v, t, torch.tensor([5, 1], dtype=torch.int32), 100)
        with pytest.raises(RuntimeError, match=r"must be in \[0, 100\)"):
            merge(words, m, v, t, torch.tensor([-1], dtype=torch.int32), 100)
        with pytest.raises(RuntimeError, match=r"must be in \[0, 100\)"):
            merge(words, m, v, t, torch.tensor([100]), 100)
        with pytest.raises(RuntimeError, match="ceil"):
            merge(words, m, v, t, torch.tensor([1]), 200)
        bad = words.clone()
        bad[1] |= 1 << 40  # entry 104 of a weight with 100 entries
        with pytest.raises(RuntimeError, match="bits set at or beyond n"):
            merge(bad, m, v, t, torch.tensor([1]), 100)
        many = compact_words(torch.tensor([1, 2, 3, 4]), 100)  # 4 entries in buffers of 3
        with pytest.raises(RuntimeError, match="more entries than the buffers|entry set is full"):
            merge(many, m, v, t, torch.tensor([], dtype=torch.long), 100)
    with pytest.raises(RuntimeError, match="one length"):
        sparsegrad_compact_merge(words, m[:2], v, t, torch.tensor([1], dtype=torch.int32), 100)
    with pytest.raises(RuntimeError, match="words must be int64"):
        sparsegrad_compact_merge(words.int(), m, v, t, torch.tensor([1], dtype=torch.int32), 100)


@pytest.mark.parametrize("live_rows", [[0, 40], list(range(0, 64, 2)), list(range(60)), list(range(64))])
def test_backward_with_mostly_zero_output_gradient_rows(live_rows):
    """The CPU backward drops the all-zero rows of grad_y before the weight-gradient GEMMs when at most 7/8 of the
    rows are live (padding; a classifier's last MLP, live at [CLS] only); a lower bound from 8 columns skips the full
    check when more are. The selection is that of the full gradient whether rows were dropped (2 or 32 live of 64)
    or not (60 or 64 live)."""
    from scalerec.ops.sparse_grad import _live_rows, rotated_weight_grad_reference, sparse_linear

    g = torch.Generator().manual_seed(len(live_rows))
    N, O, I, k = 64, 24, 16, 40
    x = torch.randn(N, I, generator=g, dtype=torch.float64)
    w = torch.randn(O, I, generator=g, dtype=torch.float64, requires_grad=True)
    uo = torch.linalg.qr(torch.randn(O, O, generator=g, dtype=torch.float64))[0]
    ui = torch.linalg.qr(torch.randn(I, I, generator=g, dtype=torch.float64))[0]
    gy = torch.zeros(N, O, dtype=torch.float64)
    gy[live_rows] = torch.randn(len(live_rows), O, generator=g, dtype=torch.float64)
    live = _live_rows(gy)
    if len(live_rows) <= 56:
        assert live is not None and live.nonzero().flatten().tolist() == sorted(live_rows)
    else:
        assert live is None
    cls = torch.zeros(N, O, dtype=torch.float64)  # rows 0, 16, 32, 48 live: one [CLS] per 16-token sequence
    cls[::16] = 1.0
    assert _live_rows(cls).nonzero().flatten().tolist() == [0, 16, 32, 48]
    assert _live_rows(torch.zeros(N, O)) is None  # nothing live: nothing to drop to
    nan = torch.zeros(N, O, dtype=torch.float64)
    nan[5, O - 1] = float("nan")  # beyond the 8-column look, and NaN: live, so it reaches the gradient
    nan[9] = 1.0
    assert _live_rows(nan).nonzero().flatten().tolist() == [5, 9]
    sparse_linear(x, w, None, uo, ui, k).backward(gy)
    full = rotated_weight_grad_reference(gy, x, uo, ui).flatten()
    want = torch.topk(full.abs(), k).indices.sort().values
    got = w.grad.coalesce()
    flat = got.indices()[0] * I + got.indices()[1]
    assert torch.equal(flat, want)
    torch.testing.assert_close(got.values(), full[want], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rotated", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_topk_grad_coo_forms(rotated, dtype):
    """sparsegrad_topk_grad_coo: the selection of sparsegrad_topk_grad as a [3, k] index (rows, columns, flat ids),
    int32 keys and the values, equal to its reference; indices[:2] is the COO index of the top-k gradient."""
    from scalerec.ops.sparse_grad import sparsegrad_topk_grad_coo, sparsegrad_topk_grad_coo_reference

    g = torch.Generator().manual_seed(11)
    N, O, I, k = 40, 24, 18, 37
    go = torch.randn(N, O, generator=g, dtype=torch.float64).to(dtype)
    x = torch.randn(N, I, generator=g, dtype=torch.float64).to(dtype)
    uo = torch.linalg.qr(torch.randn(O, O, generator=g, dtype=torch.float64))[0].to(dtype) if rotated else None
    ui = torch.linalg.qr(torch.randn(I, I, generator=g, dtype=torch.float64))[0].to(dtype) if rotated else None
    ind, keys, val = sparsegrad_topk_grad_coo(go, x, uo, ui, k)
    idx, v2 = sparsegrad_topk_grad(go, x, uo, ui, k)
    assert ind.shape == (3, k) and ind.dtype == torch.long and keys.dtype == torch.int32
    assert torch.equal(ind[2], idx) and torch.equal(ind[0] * I + ind[1], idx) and torch.equal(keys.long(), idx)
    assert torch.equal(val, v2)
    if dtype == torch.float64:  # the reference's selection agrees where there are no near-ties
        r_ind, r_keys, r_val = sparsegrad_topk_grad_coo_reference(go, x, uo, ui, k)
        assert torch.equal(ind, r_ind) and torch.equal(keys, r_keys)
        torch.testing.assert_close(val, r_val, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.scalerec.sparsegrad_topk_grad_coo.default, (go, x, uo, ui, k))
