"""The CUDA kernels against the pure-PyTorch references (values and gradients), on the GPU.

Runs only where torch sees a GPU and the extension was built with its CUDA kernels (``setup.py`` compiles
``csrc/cuda`` when a CUDA torch and toolkit are present); on a CPU-only machine the whole module is skipped
here, while the same ops' CPU kernels are tested in the other ``test_ops_*`` files. ``make cuda-check``
compiles the CUDA sources with nvcc even without a GPU.
"""
import copy
import pytest
import torch

from scalerec.ops._lib import has_cuda_kernels
from test_ops_sparsegrad import _compact_merge_cases

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not has_cuda_kernels(),
    reason="needs a GPU and the extension's CUDA kernels",
)

DEV = "cuda"


def _grads(out, inputs, seed=1):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(out.device)
    return torch.autograd.grad((out * w.to(out.dtype)).sum(), inputs)


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _close(a, b, tol):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    torch.testing.assert_close(a, b, rtol=tol, atol=tol * max(b.abs().max().item(), 1.0))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_gather_dot_cuda(dtype, tol):
    from scalerec.ops.gather_dot import gather_dot, gather_dot_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, 16, generator=g, dtype=dtype)
    table = torch.randn(101, 16, generator=g, dtype=dtype)
    idx = torch.randint(0, 101, (37, 9), generator=g)
    xc, tc = _leaf(x.to(DEV)), _leaf(table.to(DEV))
    xr, tr = _leaf(x.double()), _leaf(table.double())
    out, ref = gather_dot(xc, tc, idx.to(DEV)), gather_dot_reference(xr, tr, idx)
    _close(out, ref, tol)
    for a, b in zip(_grads(out, (xc, tc)), _grads(ref, (xr, tr))):
        _close(a, b, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("row_start,tile", [(1, 64), (0, 4096)])
def test_blockwise_ce_cuda(dtype, tol, row_start, tile):
    from scalerec.ops.blockwise_ce import blockwise_ce, blockwise_ce_reference

    g = torch.Generator().manual_seed(1)
    h = torch.randn(45, 24, generator=g, dtype=dtype)
    t = torch.randn(1000, 24, generator=g, dtype=dtype)
    y = torch.randint(1, 1000, (45,), generator=g)
    hc, tc = _leaf(h.to(DEV)), _leaf(t.to(DEV))
    hr, tr = _leaf(h.double()), _leaf(t.double())
    out = blockwise_ce(hc, tc, y.to(DEV), row_start=row_start, tile=tile)
    ref = blockwise_ce_reference(hr, tr, y, row_start=row_start)
    _close(out, ref, tol)
    for a, b in zip(_grads(out, (hc, tc)), _grads(ref, (hr, tr))):
        _close(a, b, tol)


@pytest.mark.parametrize("row_start", [0, 1])
def test_bucket_topk_cuda(row_start):
    from scalerec.ops.bucket_topk import bucket_topk, bucket_topk_reference

    g = torch.Generator().manual_seed(2)
    dirs = torch.randn(7, 16, generator=g, dtype=torch.float64)
    table = torch.randn(5000, 16, generator=g, dtype=torch.float64)
    v, i = bucket_topk(dirs.to(DEV), table.to(DEV), 33, row_start=row_start, tile=512)
    rv, ri = bucket_topk_reference(dirs, table, 33, row_start=row_start)
    _close(v, rv, 1e-12)
    assert torch.equal(i.cpu(), ri)
    # all scores tied: k distinct rows of the range (the CUDA kernel does not order ties by row id)
    tied = torch.ones(300, 4, dtype=torch.float64)
    v, i = bucket_topk(torch.ones(2, 4, dtype=torch.float64, device=DEV), tied.to(DEV), 5, row_start=row_start)
    assert torch.all(v == 4.0)
    for row in i.cpu().tolist():
        assert len(set(row)) == 5 and all(row_start <= r < 300 for r in row)


def test_bucket_ce_cuda():
    from scalerec.ops.bucket_ce import bucket_ce, bucket_ce_reference

    g = torch.Generator().manual_seed(3)
    N, C, d, n_b, b_x, b_y = 40, 300, 8, 6, 11, 17
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    t = torch.randn(C, d, generator=g, dtype=torch.float64)
    y = torch.randint(1, C, (N,), generator=g)
    x_ids = torch.stack([torch.randperm(N, generator=g)[:b_x] for _ in range(n_b)])
    y_ids = torch.stack([torch.randperm(C - 1, generator=g)[:b_y] + 1 for _ in range(n_b)])
    y_ids[0, :b_x] = y[x_ids[0]]  # some candidates equal the positive: masked
    hc, tc = _leaf(h.to(DEV)), _leaf(t.to(DEV))
    hr, tr = _leaf(h), _leaf(t)
    loss, cov = bucket_ce(hc, tc, y.to(DEV), x_ids.to(DEV), y_ids.to(DEV))
    rloss, rcov = bucket_ce_reference(hr, tr, y, x_ids, y_ids)
    assert torch.equal(cov.cpu(), rcov)
    _close(loss[cov], rloss[rcov], 1e-10)
    w = torch.randn(int(rcov.sum()), generator=g, dtype=torch.float64)
    ga = torch.autograd.grad((loss[cov] * w.to(DEV)).sum(), (hc, tc))
    gb = torch.autograd.grad((rloss[rcov] * w).sum(), (hr, tr))
    for a, b in zip(ga, gb):
        _close(a, b, 1e-10)


@pytest.mark.parametrize("n_extra", [0, 1])
def test_chunk_ce_cuda(n_extra):
    from test_ops_chunk_ce import _inputs  # the CPU tests' chunk layout (random permutations as buckets)

    from scalerec.ops.chunk_ce import chunk_ce, chunk_ce_reference

    h, t, y, xc, yc = _inputs(N=50, C=200, d=8, R=2, K=5, seed=4)
    hc, tc = _leaf(h.to(DEV)), _leaf(t.to(DEV))
    hr, tr = _leaf(h), _leaf(t)
    out = chunk_ce(hc, tc, y.to(DEV), xc.to(DEV), yc.to(DEV), n_extra)
    ref = chunk_ce_reference(hr, tr, y, xc, yc, n_extra)
    _close(out, ref, 1e-10)
    for a, b in zip(_grads(out, (hc, tc)), _grads(ref, (hr, tr))):
        _close(a, b, 1e-10)


@pytest.mark.parametrize("rotated", [True, False])
def test_sparsegrad_ops_cuda(rotated):
    from scalerec.ops.sparse_grad import (rotated_weight_grad_reference, sparsegrad_rotated_update_,
                                          sparsegrad_rotated_update_reference, sparsegrad_topk_grad)

    g = torch.Generator().manual_seed(5)
    T, o, i, k = 64, 48, 32, 50
    go = torch.randn(T, o, generator=g, dtype=torch.float64)
    x = torch.randn(T, i, generator=g, dtype=torch.float64)
    uo = torch.linalg.qr(torch.randn(o, o, generator=g, dtype=torch.float64))[0] if rotated else None
    ui = torch.linalg.qr(torch.randn(i, i, generator=g, dtype=torch.float64))[0] if rotated else None
    on = (lambda a: a.to(DEV) if a is not None else None)
    idx, val = sparsegrad_topk_grad(go.to(DEV), x.to(DEV), on(uo), on(ui), k)
    dense = rotated_weight_grad_reference(go, x, uo, ui).flatten()
    ref_idx = torch.topk(dense.abs(), k).indices.sort().values
    assert torch.equal(idx.cpu(), ref_idx)
    _close(val, dense[ref_idx], 1e-10)
    if rotated:
        w = torch.randn(o, i, generator=g, dtype=torch.float64)
        delta = torch.randn(k, generator=g, dtype=torch.float64)
        got = sparsegrad_rotated_update_(w.clone().to(DEV), uo.to(DEV), ui.to(DEV), idx, delta.to(DEV))
        ref = sparsegrad_rotated_update_reference(w.clone(), uo, ui, ref_idx, delta)
        _close(got, ref, 1e-10)


def _topk_abs_ties_in_index_order(v: torch.Tensor, k: int) -> torch.Tensor:
    """Every |v| above the k-th largest, then the ties at it in index order (the CPU kernel's rule), ascending."""
    a = v.double().abs()
    thr = torch.topk(a, k).values[-1]
    above = (a > thr).nonzero().flatten()
    ties = (a == thr).nonzero().flatten()[: k - above.numel()]
    return torch.cat([above, ties]).sort().values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,k", [((1536, 384), 5898), ((37, 53), 1), ((37, 53), 37 * 53), ((37, 53), 37 * 53 - 1),
                                     ((300, 41), 700), ((64, 64), 2048)])
def test_radix_select_on_cuda(dtype, shape, k):
    """The CUDA selection (radix select over the magnitudes' bits, csrc/cuda/sparsegrad.cu) against the reference
    rule, on matrices full of ties (values on a coarse grid, both signs): the same k entries, ascending, with their
    signed values, for every dtype; k = 1 and k = all entries; sizes that do not fill the last 2,048-entry chunk;
    and the COO forms of the same selection (sparsegrad_topk_grad_coo)."""
    from scalerec.ops.sparse_grad import sparsegrad_topk_grad, sparsegrad_topk_grad_coo

    g = torch.Generator().manual_seed(k)
    O, I = shape
    G = ((torch.randn(O, I, generator=g, dtype=torch.float64) * 4).round() / 4).to(dtype)
    if dtype == torch.float32 and k == 5898:
        G = torch.randn(O, I, generator=g)  # also a case without ties
    eye = torch.eye(O, dtype=dtype)  # grad_outᵀ x with grad_out = I is x itself (exact in every dtype)
    idx, val = sparsegrad_topk_grad(eye.to(DEV), G.to(DEV), None, None, k)
    want = _topk_abs_ties_in_index_order(G.flatten(), k)
    assert idx.dtype == torch.long and torch.equal(idx.cpu(), want)
    assert torch.equal(val.cpu(), G.flatten()[want])
    if dtype != torch.float16:  # the CPU kernel (float32, float64, bfloat16) takes the same entries
        assert torch.equal(idx.cpu(), sparsegrad_topk_grad(eye, G, None, None, k)[0])
    ind, keys, v2 = sparsegrad_topk_grad_coo(eye.to(DEV), G.to(DEV), None, None, k)  # the same, in its COO forms
    assert ind.shape == (3, k) and keys.dtype == torch.int32
    assert torch.equal(ind[2].cpu(), want) and torch.equal((ind[0] * I + ind[1]).cpu(), want)
    assert torch.equal(keys.long().cpu(), want) and torch.equal(v2.cpu(), val.cpu())


def test_torch_topk_selection_switch_on_cuda(monkeypatch):
    """SCALEREC_SPARSEGRAD_SELECT=torch (at::topk + sort, kept for comparison) selects the same entries when there
    are no ties; an unknown value is a clear error."""
    from scalerec.ops.sparse_grad import sparsegrad_topk_grad, sparsegrad_topk_grad_coo

    g = torch.Generator().manual_seed(3)
    go, x = torch.randn(200, 96, generator=g), torch.randn(200, 80, generator=g)
    uo = torch.linalg.qr(torch.randn(96, 96, generator=g))[0]
    ui = torch.linalg.qr(torch.randn(80, 80, generator=g))[0]
    args = [t.to(DEV) for t in (go, x, uo, ui)]
    radix = sparsegrad_topk_grad(*args, 300)
    monkeypatch.setenv("SCALEREC_SPARSEGRAD_SELECT", "torch")
    torch_sel = sparsegrad_topk_grad(*args, 300)
    assert torch.equal(radix[0], torch_sel[0]) and torch.equal(radix[1], torch_sel[1])
    coo_torch = sparsegrad_topk_grad_coo(*args, 300)
    monkeypatch.setenv("SCALEREC_SPARSEGRAD_SELECT", "radix")
    coo_radix = sparsegrad_topk_grad_coo(*args, 300)
    assert all(torch.equal(a, b) for a, b in zip(coo_radix, coo_torch))
    assert torch.equal(coo_radix[0][2], radix[0])
    monkeypatch.setenv("SCALEREC_SPARSEGRAD_SELECT", "bogus")
    with pytest.raises(RuntimeError, match="SCALEREC_SPARSEGRAD_SELECT"):
        sparsegrad_topk_grad(*args, 300)


def test_losses_on_cuda_match_cpu():
    """SCE, RECE and the exact blockwise CE give the same loss and gradients on the GPU as on the CPU."""
    from scalerec.losses.ce import ce_loss
    from scalerec.losses.rece import rece
    from scalerec.losses.sce import sce

    g = torch.Generator().manual_seed(6)
    N, C, d = 96, 2000, 16
    h = torch.randn(N, d, generator=g, dtype=torch.float64)
    t = torch.randn(C + 1, d, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(1, C + 1, (N,), generator=g)
    dirs = torch.randn(8, d, generator=g, dtype=torch.float64)
    rdirs = torch.randn(2, 8, d, generator=g, dtype=torch.float64)
    cases = {
        "sce": lambda hh, tt, yy: sce(hh, tt, yy, directions=dirs.to(hh.device), bucket_size_x=24,
                                      bucket_size_y=64),
        "rece": lambda hh, tt, yy: rece(hh, tt, yy, n_extra_chunks=1, directions=rdirs.to(hh.device)),
        "ce": lambda hh, tt, yy: ce_loss(hh, tt, yy),
    }
    for name, fn in cases.items():
        hc, tc = _leaf(h.to(DEV)), _leaf(t.to(DEV))
        hr, tr = _leaf(h), _leaf(t)
        a, b = fn(hc, tc, y.to(DEV)), fn(hr, tr, y)
        _close(a, b, 1e-9)
        for ga, gb in zip(torch.autograd.grad(a, (hc, tc)), torch.autograd.grad(b, (hr, tr))):
            _close(ga, gb, 1e-9)


def test_sparsegrad_layer_on_cuda():
    """A SparseGrad layer on the GPU: exact before training, exactly k rotated entries change per step."""
    from scalerec.peft.layers import SparseGradLinear
    from scalerec.peft.sparsegrad import SparseGradOptimizer

    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48).to(DEV)
    lin_copy = copy.deepcopy(lin)
    x = torch.randn(20, 32, device=DEV)
    y0 = lin(x).detach()
    uo = torch.linalg.qr(torch.randn(48, 48))[0]
    ui = torch.linalg.qr(torch.randn(32, 32))[0]
    model = torch.nn.Sequential(SparseGradLinear(lin, uo, ui, k=40))
    torch.testing.assert_close(model(x).detach(), y0, atol=1e-5, rtol=1e-5)
    layer = model[0]
    opt = SparseGradOptimizer(model, lr=1e-2, sparse_lr=1e-2)
    w0 = layer.rotated_weight.double()
    model(x).pow(2).sum().backward()
    sel = layer.weight.grad.coalesce().to_dense() != 0
    opt.step()
    change = (layer.rotated_weight.double() - w0).abs()  # round-off of the float32 W outside the k entries
    assert int(sel.sum()) == 40 and torch.equal(change > 1e-4, sel)
    st = opt.state[layer.weight]
    assert "words" in st and st["words"].is_cuda and int(st["t"].count_nonzero()) == 40  # "auto": compact (bitmap)
    # the same step with the dense layout gives the same weights
    model2 = torch.nn.Sequential(SparseGradLinear(lin_copy, uo, ui, k=40))
    opt2 = SparseGradOptimizer(model2, lr=1e-2, sparse_lr=1e-2, state_layout="dense")
    model2(x).pow(2).sum().backward()
    opt2.step()
    assert torch.equal(model2[0].weight, layer.weight)


def test_fused_lazy_adam_on_cuda_matches_the_reference():
    """The one-call lazy-Adam operator on the GPU (its ATen calls dispatch to the CUDA kernels, the rotated update
    to sparsegrad_rotated_update_'s) against its Python reference there and on the CPU."""
    from scalerec.ops.sparse_grad import sparsegrad_lazy_adam_, sparsegrad_lazy_adam_reference

    g = torch.Generator().manual_seed(3)
    shapes = [(48, 32), (32, 48), (16, 8)]
    ws = [torch.randn(o, i, generator=g) for o, i in shapes]
    uo = [torch.linalg.qr(torch.randn(o, o, generator=g))[0] for o, _ in shapes[:2]] + [None]
    ui = [torch.linalg.qr(torch.randn(i, i, generator=g))[0] for _, i in shapes[:2]] + [None]
    idx = [torch.randperm(o * i, generator=g)[:20].sort().values for o, i in shapes]
    vals = [torch.randn(20, generator=g) for _ in shapes]
    state = [[torch.rand(o * i, generator=g) * s for o, i in shapes] for s in (0.1, 0.01)]
    steps = [torch.randint(0, 4, (o * i,), generator=g, dtype=torch.int32) for o, i in shapes]

    def case(dev):
        on = lambda ts: [None if t is None else t.clone().to(dev) for t in ts]  # noqa: E731
        return [on(ws), on(state[0]), on(state[1]), on(steps), on(idx), on(idx), on(vals), on(uo), on(ui)]

    fused, ref, cpu = case(DEV), case(DEV), case("cpu")
    for _ in range(2):
        sparsegrad_lazy_adam_(*fused, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
        sparsegrad_lazy_adam_reference(*ref, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
        sparsegrad_lazy_adam_reference(*cpu, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    for a, b, c in zip(fused[:4], ref[:4], cpu[:4]):
        for x, y, z in zip(a, b, c):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(x.cpu(), z, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("group_mb", [None, "0", "generic"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_lazy_adam_on_cuda_matches_the_reference(monkeypatch, dtype, group_mb):
    """The CUDA lazy-Adam operator updates the weights that share their bases together (one zero matrix of all
    their changes, one GEMM through U_out for the group, one through U_in per weight): against the Python reference
    on the CPU, with two groups (3 and 2 weights sharing bases: the same tensors on the device), a MeProp weight, a
    weight with no entries, repeated indices in one weight (summed), two square weights whose bases are one matrix
    and its transposed view in either order (same storage, other strides: two groups), and groups split one weight
    at a time (SCALEREC_SPARSEGRAD_GROUP_MB=0); the per-weight loop (SCALEREC_SPARSEGRAD_LAZY_ADAM=generic) too."""
    from scalerec.ops.sparse_grad import sparsegrad_lazy_adam_, sparsegrad_lazy_adam_reference

    if group_mb == "generic":  # the per-weight loop, kept for comparison
        monkeypatch.setenv("SCALEREC_SPARSEGRAD_LAZY_ADAM", "generic")
    elif group_mb is not None:
        monkeypatch.setenv("SCALEREC_SPARSEGRAD_GROUP_MB", group_mb)
    g = torch.Generator().manual_seed(8)
    orth = lambda n: torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].to(dtype)  # noqa: E731
    ua, va, ub, vb, q = orth(24), orth(16), orth(16), orth(24), orth(12)
    shapes = [(24, 16)] * 3 + [(16, 24)] * 2 + [(10, 7), (24, 16), (12, 12), (12, 12)]
    uo = ["ua", "ua", "ua", "ub", "ub", None, "ua", "q", "qT"]
    ui = ["va", "va", "va", "vb", "vb", None, "va", "qT", "q"]
    ks = [30, 5, 40, 17, 33, 9, 0, 20, 25]
    ws = [torch.randn(o, i, generator=g, dtype=torch.float64).to(dtype) for o, i in shapes]
    idx = [torch.randperm(o * i, generator=g)[:k].sort().values for (o, i), k in zip(shapes, ks)]
    idx[1] = torch.tensor([3, 3, 50, 51, 51])  # repeated entries add up (as index_add does)
    pos = [i.clone() for i in idx]
    pos[1] = torch.tensor([0, 1, 2, 3, 4])  # distinct state slots
    vals = [torch.randn(k, generator=g, dtype=torch.float64).to(dtype) for k in ks]
    ms = [torch.rand(o * i, generator=g, dtype=torch.float64).to(dtype) * 0.1 for o, i in shapes]
    vs = [torch.rand(o * i, generator=g, dtype=torch.float64).to(dtype) * 0.01 for o, i in shapes]
    ts = [torch.randint(0, 4, (o * i,), generator=g, dtype=torch.int32) for o, i in shapes]

    def case(dev):
        on = lambda xs: [None if x is None else x.clone().to(dev) for x in xs]  # noqa: E731
        bases = {n: b.clone().to(dev) for n, b in dict(ua=ua, va=va, ub=ub, vb=vb, q=q).items()}  # one copy each
        bases["qT"] = bases["q"].t()  # a view: q's storage, other strides
        named = lambda xs: [None if x is None else bases[x] for x in xs]  # noqa: E731
        return [on(ws), on(ms), on(vs), on(ts), on(pos), on(idx), on(vals), named(uo), named(ui)]

    gpu, cpu = case(DEV), case("cpu")
    for _ in range(2):
        sparsegrad_lazy_adam_(*gpu, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
        sparsegrad_lazy_adam_reference(*cpu, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, c in zip(gpu[:4], cpu[:4]):
        for x, z in zip(a, c):
            torch.testing.assert_close(x.cpu(), z, **tol)
    assert torch.equal(gpu[0][6].cpu(), ws[6])  # no entries: untouched


@pytest.mark.parametrize("dtype,step_dtype", [(torch.float32, torch.int32), (torch.bfloat16, torch.int32),
                                              (torch.float32, torch.int16)])
def test_adam_entries_kernel_on_cuda(dtype, step_dtype):
    """The element-wise lazy-Adam kernel on the GPU against its pure-PyTorch reference on the CPU, 16-bit step
    counts at their cap included (they stay there)."""
    from scalerec.ops.sparse_grad import sparsegrad_adam_entries_, sparsegrad_adam_entries_reference

    g = torch.Generator().manual_seed(10)
    S, k = 4000, 700
    m = (torch.randn(S, generator=g) * 0.1).to(dtype)
    v = (torch.rand(S, generator=g) * 0.01).to(dtype)
    t = torch.randint(0, 20000, (S,), generator=g, dtype=step_dtype)
    t[:500] = 0
    t[500:600] = torch.iinfo(step_dtype).max
    pos = torch.randperm(S, generator=g)[:k]
    vals = torch.randn(k, generator=g).to(dtype)
    a = [x.clone().to(DEV) for x in (m, v, t)]
    b = [m.clone(), v.clone(), t.clone()]
    d = sparsegrad_adam_entries_(*a, pos.to(DEV), vals.to(DEV), 1e-3, 0.9, 0.999, 1e-8)
    e = sparsegrad_adam_entries_reference(*b, pos, vals, 1e-3, 0.9, 0.999, 1e-8)
    tol = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=8e-3, atol=1e-6)
    assert a[2].dtype == step_dtype and torch.equal(a[2].cpu(), b[2])
    assert bool((a[2][500:600] == torch.iinfo(step_dtype).max).all())
    for x, y in zip((d, a[0], a[1]), (e, b[0], b[1])):
        torch.testing.assert_close(x.cpu(), y, **tol)


@pytest.mark.parametrize("dtype,step_dtype", [(torch.int32, torch.int32), (torch.int64, torch.int32),
                                              (torch.int32, torch.int16)])
def test_compact_merge_on_cuda_matches_cpu(dtype, step_dtype):
    """The sync-free CUDA merge of new entries into a compact lazy-Adam state (bitmap + slots in id order) equals
    the CPU kernel (and so its reference) on random sets: empty, partly full, keys all known, all new, keys at word
    edges, whole words without new entries, and a merge that fills the buffer."""
    from scalerec.ops.sparse_grad import sparsegrad_compact_merge

    for *tensors, n in _compact_merge_cases(dtype, step_dtype):
        cpu = sparsegrad_compact_merge(*tensors, n)
        gpu = sparsegrad_compact_merge(*[x.to(DEV) for x in tensors], n)
        for a, b in zip(cpu, gpu):
            assert b.device.type == "cuda" and torch.equal(a, b.cpu())


def test_compact_and_dense_state_train_alike_on_cuda():
    """On the GPU the compact state and the dense one give the same weights over several steps with moving
    selections, the compact set grew, and its optimizer steps after the first run without a host sync (the sets'
    sizes reach the host by a non-blocking copy, taken when its event has completed: torch's sync debug mode
    raises on any synchronising call)."""
    from scalerec.peft.layers import SparseGradLinear
    from scalerec.peft.sparsegrad import SparseGradOptimizer

    torch.manual_seed(1)
    lin = torch.nn.Linear(32, 48).to(DEV)
    uo = torch.linalg.qr(torch.randn(48, 48))[0]
    ui = torch.linalg.qr(torch.randn(32, 32))[0]
    models = {lay: torch.nn.Sequential(SparseGradLinear(copy.deepcopy(lin), uo, ui, k=40)) for lay in ("compact", "dense")}
    opts = {lay: SparseGradOptimizer(m, lr=1e-2, sparse_lr=1e-2, state_layout=lay, slack_steps=1)
            for lay, m in models.items()}
    for step in range(8):
        x = torch.randn(20, 32, device=DEV)
        for lay, m in models.items():
            m(x).pow(2).sum().backward()
            if step > 0:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opts[lay].step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
            opts[lay].zero_grad()
    assert torch.equal(models["compact"][0].weight, models["dense"][0].weight)
    st = opts["compact"].state[models["compact"][0].weight]
    assert int(st["t"].count_nonzero()) > 40 and st["m"].numel() > 40
    torch.cuda.synchronize()
    opts["compact"]._take_sizes()
    assert opts["compact"].size_reads >= 1 and int(st["count"]) <= st["bound"] <= st["m"].numel()
