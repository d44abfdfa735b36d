"""SCE with FAISS candidates (``sce_faiss``): equals full CE when every item is a candidate, takes the hardest
negatives, mixes uniform ones, refreshes on schedule."""
from __future__ import annotations

import faiss
import pytest
import torch
import torch.nn.functional as F

from scalerec.losses import get_loss
from scalerec.losses import sce_faiss as sf
from scalerec.retrieval import brute_force_topk

faiss.omp_set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_states():
    sf.reset_states()
    yield
    sf.reset_states()


def _data(C=300, d=16, N=40, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(C + 1, d, generator=g, dtype=dtype)
    table[0] = 0
    hidden = torch.randn(N, d, generator=g, dtype=dtype)
    targets = torch.randint(1, C + 1, (N,), generator=g)
    return hidden.requires_grad_(), table.requires_grad_(), targets


@pytest.mark.parametrize("index", ["Flat", "exact"])
def test_all_items_as_candidates_equals_full_ce(index):
    hidden, table, targets = _data()
    C = table.size(0) - 1
    loss = get_loss("sce_faiss", index=index, num_negatives=C - 1)(hidden, table, targets)
    gh, gt = torch.autograd.grad(loss, (hidden, table))
    ref = F.cross_entropy(hidden @ table[1:].t(), targets - 1)
    rh, rt = torch.autograd.grad(ref, (hidden, table))
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(gh, rh)
    torch.testing.assert_close(gt, rt)


def test_negatives_are_the_hardest_items_without_the_positive():
    hidden, table, targets = _data(C=500)
    K = 20
    loss = get_loss("sce_faiss", index="Flat", num_negatives=K)(hidden, table, targets)
    with torch.no_grad():
        _, neg = brute_force_topk(hidden, table, K, exclude=targets.view(-1, 1))
    pos = (hidden * table[targets]).sum(-1, keepdim=True)
    logits = torch.cat([pos, torch.einsum("nd,nkd->nk", hidden, table[neg])], 1)
    ref = F.cross_entropy(logits, torch.zeros(len(targets), dtype=torch.long))
    torch.testing.assert_close(loss, ref)
    # hard negatives give a larger loss than as many uniform ones (they are the top of the softmax)
    torch.manual_seed(0)
    uni = get_loss("ce_sampled", num_negatives=K, logq_correction=False)(hidden, table, targets)
    assert loss > uni


def test_uniform_mix_matches_manual_and_masks_the_positive():
    hidden, table, targets = _data(C=30, N=64)  # small C: uniform draws hit the positive often
    K, U = 5, 40
    torch.manual_seed(123)
    loss = get_loss("sce_faiss", index="Flat", num_negatives=K, num_uniform=U)(hidden, table, targets)
    torch.manual_seed(123)
    uni = torch.randint(1, 31, (64, U))
    assert (uni == targets.unsqueeze(1)).any()
    with torch.no_grad():
        _, hard = brute_force_topk(hidden, table, K, exclude=targets.view(-1, 1))
    neg = torch.cat([hard, uni], 1)
    pos = (hidden * table[targets]).sum(-1, keepdim=True)
    nl = torch.einsum("nd,nkd->nk", hidden, table[neg]).masked_fill(neg == targets.unsqueeze(1), float("-inf"))
    ref = F.cross_entropy(torch.cat([pos, nl], 1), torch.zeros(64, dtype=torch.long))
    torch.testing.assert_close(loss, ref)


def test_refresh_schedule_and_stale_selection():
    hidden, table, targets = _data(C=400)
    emb = torch.nn.Embedding.from_pretrained(table.detach().clone(), freeze=False)
    fn = get_loss("sce_faiss", index="Flat", num_negatives=10, refresh_every=3)
    q = hidden.detach()[:1]
    for step in range(7):
        fn(hidden, emb.weight, targets)
        if step == 0:
            st = sf._STATES[next(iter(sf._STATES))]
            with torch.no_grad():  # an in-place change, as an optimizer step makes
                emb.weight[77] = q[0] * 50
        if step in (0, 1):  # refreshed only after 3 steps: the index still has the old row 77
            assert st.index.search(q, 1)[1].item() != 77
    s = sf.stats()
    assert len(s) == 1 and s[0]["steps"] == 7 and s[0]["builds"] == 1 and s[0]["refreshes"] == 2
    assert s[0]["refresh_seconds"] > 0 and s[0]["seconds_per_refresh"] > 0
    assert st.index.search(q, 1)[1].item() == 77  # after the refresh the index sees the new row


@pytest.mark.parametrize("index,params", [("IVF16,Flat", {"nprobe": 4, "retrain_every": 1, "refresh_every": 1}),
                                          ("HNSW16", {"efSearch": 32}),
                                          ("bucket", {"index_params": {"n_buckets": 16, "bucket_size": 64}})])
def test_approximate_indexes_train(index, params):
    hidden, table, targets = _data(C=2000, N=64)
    fn = get_loss("sce_faiss", index=index, num_negatives=32, num_uniform=8, **params)
    for _ in range(2):  # the second step refreshes (and, for IVF here, retrains)
        loss = fn(hidden, table, targets)
        gh, gt = torch.autograd.grad(loss, (hidden, table))
        assert torch.isfinite(loss) and gh.abs().sum() > 0 and gt.abs().sum() > 0
        assert gt[0].abs().sum() == 0  # the padding row is never a candidate
    (st,) = sf.stats()
    assert st["steps"] == 2 and st["builds"] + st["refreshes"] >= 1


def test_bad_params_are_clear_errors():
    hidden, table, targets = _data()
    with pytest.raises(ValueError, match="unknown parameter"):
        get_loss("sce_faiss", num_negative=3)
    with pytest.raises(ValueError, match="num_negatives must be >= 1"):
        get_loss("sce_faiss", num_negatives=0)(hidden, table, targets)
    with pytest.raises(ValueError, match="invalid FAISS factory string"):
        get_loss("sce_faiss", index="IVF,Nope")(hidden, table, targets)
