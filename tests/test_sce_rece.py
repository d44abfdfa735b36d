"""SCE and RECE losses: the C++ path against the pure-PyTorch reference given the same random state."""
import pytest
import torch

from scalerec.losses import get_loss, loss_defaults
from scalerec.losses.rece import default_n_buckets as rece_default_n_buckets
from scalerec.losses.rece import rece
from scalerec.losses.sce import default_n_buckets, sce, sce_directions


def _inputs(N=40, C=60, d=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, d, generator=g, dtype=dtype).requires_grad_()
    table = torch.randn(C + 1, d, generator=g, dtype=dtype).requires_grad_()
    targets = torch.randint(1, C + 1, (N,), generator=g)
    return hidden, table, targets


def _loss_and_grads(fn, hidden, table, targets):
    h = hidden.detach().clone().requires_grad_()
    t = table.detach().clone().requires_grad_()
    loss = fn(h, t, targets)
    return (loss, *torch.autograd.grad(loss, (h, t)))


def _assert_close_scaled(a_list, b_list, rtol):
    for a, b in zip(a_list, b_list):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=rtol * b.abs().max().item())


@pytest.mark.parametrize("mix_x", [False, True])
def test_sce_cpp_matches_reference_same_generator_float64(mix_x):
    hidden, table, targets = _inputs()
    params = dict(n_buckets=5, bucket_size_x=9, bucket_size_y=12, mix_x=mix_x)
    out = _loss_and_grads(
        lambda h, t, y: sce(h, t, y, generator=torch.Generator().manual_seed(7), **params), hidden, table, targets
    )
    ref = _loss_and_grads(
        lambda h, t, y: sce(h, t, y, impl="reference", generator=torch.Generator().manual_seed(7), **params),
        hidden,
        table,
        targets,
    )
    _assert_close_scaled(out, ref, 1e-10)
    assert torch.count_nonzero(out[2][0]) == 0  # the padding row is never a candidate


@pytest.mark.parametrize("impl", ["cpp", "reference"])
def test_sce_sparse_grad_equals_dense(impl):
    hidden, table, targets = _inputs(N=50, C=300, d=8, seed=2)
    params = dict(n_buckets=6, bucket_size_x=10, bucket_size_y=20, impl=impl)
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    dense = _loss_and_grads(lambda h, t, y: sce(h, t, y, generator=gen(), **params), hidden, table, targets)
    sparse = _loss_and_grads(lambda h, t, y: sce(h, t, y, generator=gen(), sparse_grad=True, **params),
                             hidden, table, targets)
    assert sparse[2].is_sparse and not dense[2].is_sparse
    touched = sparse[2].coalesce().indices()[0]
    assert 0 < touched.numel() < table.size(0) and 0 not in touched.tolist()
    _assert_close_scaled(sparse[:2], dense[:2], 1e-12)
    _assert_close_scaled([sparse[2].to_dense()], [dense[2]], 1e-12)
    # the rows outside the touched set get no gradient in the dense version either
    outside = torch.ones(table.size(0), dtype=torch.bool)
    outside[touched] = False
    assert torch.count_nonzero(dense[2][outside]) == 0


def test_sce_cpp_matches_float64_reference_float32_with_directions():
    hidden, table, targets = _inputs(N=300, C=2000, d=16, dtype=torch.float32, seed=1)
    dirs = sce_directions(hidden.double(), 30, generator=torch.Generator().manual_seed(3))
    out = _loss_and_grads(lambda h, t, y: sce(h, t, y, directions=dirs.float(), bucket_size_y=64), hidden, table, targets)
    ref = _loss_and_grads(
        lambda h, t, y: sce(h, t, y, directions=dirs, bucket_size_y=64, impl="reference"),
        hidden.double(),
        table.double(),
        targets,
    )
    _assert_close_scaled(out, ref, 1e-5)


def test_sce_with_whole_buckets_is_full_ce():
    # every query in every bucket and every item a candidate: SCE reduces to the exact full-catalog CE
    hidden, table, targets = _inputs(N=15, C=20)
    ce = _loss_and_grads(get_loss("ce"), hidden, table, targets)
    for impl in ("cpp", "reference"):
        s = _loss_and_grads(
            get_loss("sce", n_buckets=3, bucket_size_x=15, bucket_size_y=20, impl=impl), hidden, table, targets
        )
        _assert_close_scaled(s, ce, 1e-10)


def test_sce_defaults_and_bucket_sizes():
    assert loss_defaults("sce")["bucket_size_y"] == 256
    assert default_n_buckets(8192) == int(2 * 8192**0.5) == 181
    hidden, table, targets = _inputs(N=30, C=40)
    torch.manual_seed(0)
    a = get_loss("sce")(hidden, table, targets)  # b_x, b_y clipped to N, C
    torch.manual_seed(0)
    b = get_loss("sce", impl="reference")(hidden, table, targets)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=0)


def test_sce_bad_params():
    hidden, table, targets = _inputs(N=10, C=12)
    with pytest.raises(ValueError, match="impl"):
        get_loss("sce", impl="x")(hidden, table, targets)
    with pytest.raises(ValueError, match="n_buckets"):
        get_loss("sce", n_buckets=0)(hidden, table, targets)
    with pytest.raises(ValueError, match="bucket_size"):
        get_loss("sce", bucket_size_y=0)(hidden, table, targets)
    with pytest.raises(ValueError, match="directions"):
        sce(hidden, table, targets, directions=torch.randn(3, 5, dtype=torch.float64))


@pytest.mark.parametrize("rounds, n_extra", [(1, 1), (2, 0)])
def test_rece_cpp_matches_reference_same_generator_float64(rounds, n_extra):
    hidden, table, targets = _inputs()
    params = dict(n_buckets=4, n_extra_chunks=n_extra, rounds=rounds)
    out, ref = (
        _loss_and_grads(
            lambda h, t, y, impl=impl: rece(h, t, y, impl=impl, generator=torch.Generator().manual_seed(3), **params),
            hidden,
            table,
            targets,
        )
        for impl in ("cpp", "reference")
    )
    _assert_close_scaled(out, ref, 1e-10)
    assert torch.count_nonzero(out[2][0]) == 0


def test_rece_cpp_matches_float64_reference_float32_with_directions():
    hidden, table, targets = _inputs(N=300, C=2000, d=16, dtype=torch.float32, seed=1)
    dirs = torch.randn(2, 12, 16, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    out = _loss_and_grads(lambda h, t, y: rece(h, t, y, directions=dirs.float()), hidden, table, targets)
    ref = _loss_and_grads(
        lambda h, t, y: rece(h, t, y, directions=dirs, impl="reference"), hidden.double(), table.double(), targets
    )
    _assert_close_scaled(out, ref, 1e-5)


def test_rece_one_bucket_is_full_ce_and_defaults():
    hidden, table, targets = _inputs(N=15, C=20)
    ce = _loss_and_grads(get_loss("ce"), hidden, table, targets)
    _assert_close_scaled(_loss_and_grads(get_loss("rece", n_buckets=1, rounds=2), hidden, table, targets), ce, 1e-10)
    assert rece_default_n_buckets(8192, 10**6, 1) == int((4 * 8192 * 3) ** 0.5)
    assert rece_default_n_buckets(5, 10**6, 1) == 5  # never more buckets than queries or items
    assert loss_defaults("rece")["n_extra_chunks"] == 1 and loss_defaults("rece")["rounds"] == 1


def test_rece_bad_params():
    hidden, table, targets = _inputs(N=10, C=12)
    for params, msg in [({"impl": "x"}, "impl"), ({"rounds": 0}, "rounds"), ({"n_extra_chunks": -1}, "n_extra")]:
        with pytest.raises(ValueError, match=msg):
            get_loss("rece", **params)(hidden, table, targets)
    with pytest.raises(ValueError, match="directions"):
        rece(hidden, table, targets, directions=torch.randn(3, 5, dtype=torch.float64))
