"""partial_lse: values against the pure-PyTorch reference, gradcheck in float64, the backward from a given
(global) log-sum-exp, a bf16 shard, an empty shard, and clear errors."""
import pytest
import torch

from scalerec.ops.partial_lse import partial_lse, partial_lse_backward, partial_lse_reference


def _data(n=7, c=23, d=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(c, d, generator=g, dtype=dtype)


@pytest.mark.parametrize("tile", [1, 4, 100])
def test_values_match_reference(tile):
    h, s = _data()
    torch.testing.assert_close(partial_lse(h, s, tile), partial_lse_reference(h, s))


def test_gradcheck_float64():
    h, s = _data(4, 9, 3)
    h.requires_grad_(True)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a, b: partial_lse(a, b, 4), (h, s))


def test_backward_from_a_global_lse_sums_to_the_whole():
    """Two shards' backward from the global lse add up to the gradient of the whole table's log-sum-exp."""
    h, s = _data(6, 20, 4)
    g = torch.rand(6, dtype=torch.float64)
    hh, ss = h.clone().requires_grad_(True), s.clone().requires_grad_(True)
    (partial_lse_reference(hh, ss) * g).sum().backward()
    lse = torch.logsumexp(torch.stack([partial_lse(h, s[:11], 3), partial_lse(h, s[11:], 3)]), 0)
    gh1, gs1 = partial_lse_backward(g, h, s[:11], lse, 3)
    gh2, gs2 = partial_lse_backward(g, h, s[11:], lse, 5)
    torch.testing.assert_close(gh1 + gh2, hh.grad)
    torch.testing.assert_close(torch.cat([gs1, gs2]), ss.grad)


def test_bf16_shard_and_empty_shard():
    h, s = _data(dtype=torch.float32)
    sb = s.to(torch.bfloat16)
    torch.testing.assert_close(partial_lse(h, sb, 4), partial_lse_reference(h, sb.float()))
    assert torch.all(partial_lse(h, s[:0], 4) == float("-inf"))


def test_bad_inputs_are_clear():
    h, s = _data()
    with pytest.raises(RuntimeError, match="hidden has d=5 but shard has d=4"):
        partial_lse(h, s[:, :4], 4)
    with pytest.raises(RuntimeError, match="tile must be positive"):
        partial_lse(h, s, 0)
    with pytest.raises(RuntimeError, match="shard must have hidden's dtype"):
        partial_lse(h, s.float(), 4)
