"""blockwise_ce (C++): exact CE with online log-sum-exp over catalog tiles, against the materialised reference."""
import pytest
import torch

from scalerec.losses import get_loss
from scalerec.ops.blockwise_ce import blockwise_ce, blockwise_ce_reference


def _inputs(N=37, C=53, d=8, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (scale * torch.randn(N, d, generator=g, dtype=dtype)).requires_grad_()
    table = (scale * torch.randn(C, d, generator=g, dtype=dtype)).requires_grad_()
    targets = torch.randint(1, C, (N,), generator=g)
    return hidden, table, targets


@pytest.mark.parametrize("tile", [1, 7, 64])
@pytest.mark.parametrize("row_start", [0, 1])
def test_matches_reference_float64(tile, row_start):
    hidden, table, targets = _inputs()
    w = torch.randn(hidden.size(0), dtype=torch.float64)
    out = blockwise_ce(hidden, table, targets, row_start=row_start, tile=tile)
    ref = blockwise_ce_reference(hidden, table, targets, row_start=row_start)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    g_out = torch.autograd.grad((out * w).sum(), (hidden, table))
    g_ref = torch.autograd.grad((ref * w).sum(), (hidden, table))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    if row_start == 1:  # the padding row is never a class: no gradient flows into it
        assert torch.count_nonzero(g_out[1][0]) == 0


def test_float32_large_logits_relative():
    # large-magnitude logits exercise the online max-shift; a catalog of several tiles and query blocks
    hidden, table, targets = _inputs(N=300, C=5000, d=16, dtype=torch.float32, scale=2.0)
    out = blockwise_ce(hidden, table, targets, tile=512)
    ref = blockwise_ce_reference(hidden.double(), table.double(), targets).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g_out = torch.autograd.grad(out.mean(), (hidden, table))
    h64, t64 = hidden.detach().double().requires_grad_(), table.detach().double().requires_grad_()
    g_ref = torch.autograd.grad(blockwise_ce_reference(h64, t64, targets).mean(), (h64, t64))
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-7)


def test_gradcheck():
    hidden, table, targets = _inputs(N=6, C=9, d=3)
    assert torch.autograd.gradcheck(lambda h, t: blockwise_ce(h, t, targets, tile=4), (hidden, table))


def test_opcheck():
    hidden, table, targets = _inputs(N=6, C=9, d=3)
    torch.library.opcheck(torch.ops.scalerec.blockwise_ce.default, (hidden, table, targets, 1, 4))


def test_ce_loss_uses_op_and_agrees_with_chunked_and_full():
    hidden, table, targets = _inputs(N=20, C=30, d=4)
    vals = {}
    for name, params in [("ce", {}), ("ce", {"impl": "reference", "chunk_size": 7}), ("ce_full", {})]:
        loss = get_loss(name, **params)(hidden, table, targets)
        vals[f"{name}{params}"] = (loss, *torch.autograd.grad(loss, (hidden, table)))
    first, *rest = vals.values()
    for other in rest:
        for a, b in zip(first, other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert get_loss("ce").params["impl"] == "cpp"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda h, t, y: (h[:, :2], t, y), "d="),
        (lambda h, t, y: (h, t.float(), y), "dtypes differ"),
        (lambda h, t, y: (h, t, y.int()), "int64"),
        (lambda h, t, y: (h, t, y[:3]), "targets must be"),
        (lambda h, t, y: (h, t, torch.full_like(y, 0)), "targets must lie in"),
        (lambda h, t, y: (h, t, torch.full_like(y, 99)), "targets must lie in"),
    ],
)
def test_bad_inputs_raise(mutate, message):
    hidden, table, targets = _inputs(N=5, C=9, d=3)
    h, t, y = mutate(hidden.detach(), table.detach(), targets)
    with pytest.raises(RuntimeError, match=message):
        blockwise_ce(h, t, y)


def test_bad_ce_params_raise_value_error():
    hidden, table, targets = _inputs(N=5, C=9, d=3)
    with pytest.raises(ValueError, match="impl"):
        get_loss("ce", impl="nope")(hidden, table, targets)
    with pytest.raises(ValueError, match="tile"):
        get_loss("ce", tile=0)(hidden, table, targets)
