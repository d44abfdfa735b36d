import math

import pytest
import torch
import torch.nn.functional as F

from scalerec.losses import available_losses, get_loss
from scalerec.losses.gbce import gbce_beta


def _problem(N=12, C=30, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, d, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randn(C + 1, d, generator=g, dtype=dtype, requires_grad=True)
    y = torch.randint(1, C + 1, (N,), generator=g)
    return h, t, y


def naive_ce(h, t, y):
    logits = h @ t[1:].t()
    return F.cross_entropy(logits, y - 1)


def test_registry_lists_the_baselines():
    assert {"ce", "ce_full", "ce_sampled", "bce", "gbce"} <= set(available_losses())


@pytest.mark.parametrize("name,params", [("ce", {"chunk_size": 5}), ("ce", {}), ("ce_full", {})])
def test_exact_ce_matches_naive(name, params):
    h, t, y = _problem()
    loss = get_loss(name, **params)(h, t, y)
    ref = naive_ce(h, t, y)
    assert torch.allclose(loss, ref, atol=1e-10)
    g1 = torch.autograd.grad(loss, (h, t))
    g2 = torch.autograd.grad(ref, (h, t))
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, atol=1e-10)


def test_ce_chunked_gradcheck():
    h, t, y = _problem(N=5, C=7, d=3)
    assert torch.autograd.gradcheck(lambda a, b: get_loss("ce", chunk_size=2)(a, b, y), (h, t))


def test_sampled_ce_with_all_items_as_negatives_is_full_ce():
    # in-batch sampling over a batch holding every item once, without correction, equals CE over those items
    C, d = 10, 4
    g = torch.Generator().manual_seed(1)
    t = torch.randn(C + 1, d, generator=g, dtype=torch.float64)
    y = torch.arange(1, C + 1)
    h = torch.randn(C, d, generator=g, dtype=torch.float64)
    loss = get_loss("ce_sampled", sampling="in_batch", logq_correction=False)(h, t, y)
    assert torch.allclose(loss, naive_ce(h, t, y))
    # with logQ correction and unique items the counts are all 1: log(1) = 0, same value
    loss2 = get_loss("ce_sampled", sampling="in_batch")(h, t, y)
    assert torch.allclose(loss2, loss)


def test_sampled_ce_uniform_reference():
    h, t, y = _problem()
    torch.manual_seed(5)
    loss = get_loss("ce_sampled", num_negatives=7)(h, t, y)
    torch.manual_seed(5)
    neg = torch.randint(1, t.size(0), (h.size(0), 7))
    pos = (h * t[y]).sum(-1, keepdim=True)
    nl = torch.einsum("nd,nkd->nk", h, t[neg]) - math.log(7 / (t.size(0) - 1))
    nl = nl.masked_fill(neg == y[:, None], -math.inf)
    ref = -(pos[:, 0] - torch.logsumexp(torch.cat([pos, nl], 1), 1)).mean()
    assert torch.allclose(loss, ref)


def test_bce_reference():
    h, t, y = _problem()
    torch.manual_seed(3)
    loss = get_loss("bce")(h, t, y)
    torch.manual_seed(3)
    neg = torch.randint(1, t.size(0), (h.size(0), 1))[:, 0]
    ref = -(F.logsigmoid((h * t[y]).sum(-1)) + F.logsigmoid(-(h * t[neg]).sum(-1))).mean()
    assert torch.allclose(loss, ref)


def test_gbce_reference_and_beta():
    assert math.isclose(gbce_beta(256, 12101, 0.75), (256 / 12100) * (0.75 * (1 - 12100 / 256) + 12100 / 256))
    assert math.isclose(gbce_beta(5, 6, 0.0), 1.0)  # t = 0 -> plain BCE
    h, t, y = _problem()
    torch.manual_seed(4)
    loss = get_loss("gbce", num_negatives=5, t=0.5)(h, t, y)
    torch.manual_seed(4)
    neg = torch.randint(1, t.size(0), (h.size(0), 5))
    beta = gbce_beta(5, t.size(0) - 1, 0.5)
    p_pos = torch.sigmoid((h * t[y]).sum(-1)) ** beta
    p_neg = torch.sigmoid(torch.einsum("nd,nkd->nk", h, t[neg]))
    other = neg != y.unsqueeze(1)  # a negative that is the positive is dropped
    assert (~other).any()  # the small catalog makes collisions: the masking is exercised
    ref = -(torch.log(p_pos).sum() + torch.log1p(-p_neg)[other].sum()) / (h.size(0) + other.sum())
    assert torch.allclose(loss, ref)


def test_unknown_loss_and_param():
    with pytest.raises(ValueError, match="unknown loss 'nope'; allowed values: .*ce"):
        get_loss("nope")
    with pytest.raises(ValueError, match="unknown parameter.*'negatives'.*allowed: .*num_negatives"):
        get_loss("ce_sampled", negatives=3)


def test_targets_out_of_range():
    h, t, y = _problem()
    with pytest.raises(ValueError, match="target ids must lie in 1..30"):
        get_loss("ce")(h, t, torch.zeros_like(y))
