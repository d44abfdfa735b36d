import pytest
import torch

from scalerec.ops import gather_dot, gather_dot_reference


def _inputs(dtype, N=6, C=9, d=5, K=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randn(C, d, generator=g, dtype=dtype, requires_grad=True)
    idx = torch.randint(0, C, (N, K), generator=g)
    idx[0, :2] = 3  # repeated ids exercise the scatter-add
    idx[1, 0] = 3
    return x, t, idx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_and_backward_match_reference(dtype):
    x, t, idx = _inputs(dtype)
    out = gather_dot(x, t, idx)
    ref = gather_dot_reference(x, t, idx)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    g = torch.randn_like(out)
    gx, gt = torch.autograd.grad(out, (x, t), g)
    rx, rt = torch.autograd.grad(ref, (x, t), g)
    torch.testing.assert_close(gx, rx, atol=tol, rtol=tol)
    torch.testing.assert_close(gt, rt, atol=tol, rtol=tol)


def test_gradcheck_float64():
    x, t, idx = _inputs(torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: gather_dot(a, b, idx), (x, t))


def test_opcheck():
    x, t, idx = _inputs(torch.float32)
    torch.library.opcheck(torch.ops.scalerec.gather_dot.default, (x, t, idx))


def test_many_threads_same_result():
    x, t, idx = _inputs(torch.float64, N=300, C=50, d=16, K=20)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = torch.autograd.grad(gather_dot(x, t, idx).sum(), (x, t))
        torch.set_num_threads(2)
        b = torch.autograd.grad(gather_dot(x, t, idx).sum(), (x, t))
    finally:
        torch.set_num_threads(old)
    torch.testing.assert_close(a, b)


def test_bad_inputs():
    x, t, idx = _inputs(torch.float32)
    with pytest.raises(RuntimeError, match="out of range"):
        gather_dot(x, t, idx + 100)
    with pytest.raises(RuntimeError, match="d="):
        gather_dot(x[:, :3], t, idx)
    with pytest.raises(RuntimeError, match="int64"):
        gather_dot(x, t, idx.int())
