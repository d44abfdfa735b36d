"""MIPS indexes: ExactIndex / FaissIndex / BucketIndex against brute force."""
from __future__ import annotations

import faiss
import pytest
import torch

from scalerec.retrieval import BucketIndex, ExactIndex, FaissIndex, brute_force_topk, make_index

faiss.omp_set_num_threads(1)


def _recall(ids: torch.Tensor, ref: torch.Tensor) -> float:
    hit = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, ref))
    return hit / ref.numel()


def _clustered_table(C=20000, d=32, n_clusters=100, seed=0):
    """Items around ``n_clusters`` centres (norms vary), queries near random centres: where IVF works."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_clusters, d, generator=g) * 3
    assign = torch.randint(0, n_clusters, (C + 1,), generator=g)
    table = centres[assign] + torch.randn(C + 1, d, generator=g)
    table[0] = 0
    q = centres[torch.randint(0, n_clusters, (300,), generator=g)] + torch.randn(300, d, generator=g)
    return table, q


@pytest.fixture(scope="module")
def gaussian():
    g = torch.Generator().manual_seed(1)
    table = torch.randn(3001, 16, generator=g)
    q = torch.randn(64, 16, generator=g)
    # histories of varied length, some ids repeated, padded tensor form too
    hist = [torch.randint(1, 3001, (int(n),), generator=g) for n in torch.randint(0, 40, (64,), generator=g)]
    H = max(len(h) for h in hist)
    padded = torch.zeros(64, H, dtype=torch.long)
    for r, h in enumerate(hist):
        padded[r, : len(h)] = h
    return table, q, hist, padded


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_equals_brute_force(gaussian, dtype):
    table, q, _, _ = gaussian
    table, q = table.to(dtype), q.to(dtype)
    ref_s, ref_i = brute_force_topk(q, table, 10)
    # small tiles and query blocks so the running top-k crosses many tile boundaries
    s, i = ExactIndex(table, tile_size=257, query_batch=13).search(q, 10)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s)
    assert s.dtype == dtype and i.dtype == torch.int64


def test_exact_with_exclusions_equals_brute_force(gaussian):
    table, q, hist, padded = gaussian
    # exclude the true top items of some queries so the exclusion actually changes the answer
    top_s, top_i = brute_force_topk(q, table, 5)
    hist = [torch.cat([h, top_i[r, : r % 5]]) for r, h in enumerate(hist)]
    ref_s, ref_i = brute_force_topk(q, table, 10, exclude=hist)
    assert not torch.equal(ref_i, brute_force_topk(q, table, 10)[1])
    idx = ExactIndex(table, tile_size=300, query_batch=7)
    s, i = idx.search(q, 10, exclude=hist)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s)
    for r, h in enumerate(hist):
        assert not set(i[r].tolist()) & set(h.tolist())
    # padded-tensor form gives the same result as the list form
    padded2 = torch.zeros(64, max(len(h) for h in hist), dtype=torch.long)
    for r, h in enumerate(hist):
        padded2[r, : len(h)] = h
    s2, i2 = idx.search(q, 10, exclude=padded2)
    assert torch.equal(i2, i)


def test_exact_never_returns_padding_and_reports_exhausted_catalog():
    table = torch.randn(6, 4)
    table[0] = 100.0  # the padding row would win every query if it were a candidate
    q = torch.randn(3, 4)
    s, i = ExactIndex(table, tile_size=2).search(q, 5)
    assert (i >= 1).all() and sorted(i[0].tolist()) == [1, 2, 3, 4, 5]
    # excluding 3 of 5 items leaves 2: the other slots are empty (-1, -inf)
    s, i = ExactIndex(table, tile_size=2).search(q, 4, exclude=[[1, 2, 3]] * 3)
    assert (i[:, :2] >= 4).all() and (i[:, 2:] == -1).all() and torch.isinf(s[:, 2:]).all()


def test_faiss_flat_equals_exact(gaussian):
    table, q, hist, padded = gaussian
    ref_s, ref_i = ExactIndex(table).search(q, 10)
    idx = FaissIndex("Flat", table)
    s, i = idx.search(q, 10)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=1e-5)
    ref_s, ref_i = ExactIndex(table).search(q, 10, exclude=padded)
    s, i = idx.search(q, 10, exclude=padded)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s, rtol=1e-5, atol=1e-5)


def test_ivf_recall_on_clustered_table():
    table, q = _clustered_table()
    _, ref = brute_force_topk(q, table, 10)
    # stated operating point: IVF256,Flat with nprobe=16 (of 256 lists) on 20k clustered items
    idx = FaissIndex("IVF256,Flat", table, nprobe=16)
    _, ids = idx.search(q, 10)
    assert _recall(ids, ref) >= 0.9
    # nprobe=1 must be worse than nprobe=16 (the parameter really reaches FAISS)
    _, ids1 = idx.set_params(nprobe=1).search(q, 10)
    assert _recall(ids1, ref) < _recall(ids, ref)
    # nprobe = nlist visits every list: exact
    _, ids_all = idx.set_params(nprobe=256).search(q, 10)
    assert torch.equal(ids_all, ref)


def test_ivfpq_and_hnsw_run_and_find_neighbours():
    table, q = _clustered_table(C=12000, d=16)
    _, ref = brute_force_topk(q, table, 10)
    _, ids = FaissIndex("IVF64,PQ8", table, nprobe=16).search(q, 10)
    assert _recall(ids, ref) >= 0.6  # 8-byte codes: approximate (0.71 measured), far above chance (10/12000)
    _, ids = FaissIndex("HNSW32", table, efSearch=128).search(q, 10)
    assert _recall(ids, ref) >= 0.9


def test_refresh_sees_updated_rows():
    table, q = _clustered_table(C=5000)
    for idx in (ExactIndex(table), FaissIndex("Flat", table), FaissIndex("IVF32,Flat", table, nprobe=32),
                FaissIndex("HNSW32", table), BucketIndex(table, n_buckets=32, bucket_size=64, n_probe=32)):
        new = table.clone()
        targets = torch.tensor([17, 4242])
        new[targets[0]] = q[0] * 10  # now the best item for query 0 by far
        new[targets[1]] = q[1] * 10
        _, before = idx.search(q[:2], 1)
        assert before[0, 0] != 17 or before[1, 0] != 4242
        idx.refresh(new)
        s, after = idx.search(q[:2], 1)
        assert after[:, 0].tolist() == targets.tolist(), type(idx).__name__
        torch.testing.assert_close(s[:, 0], (q[:2] * new[targets]).sum(1), rtol=1e-4, atol=1e-3)


def test_exact_index_reads_live_parameter():
    emb = torch.nn.Embedding(101, 8, padding_idx=0)
    idx = ExactIndex(emb)
    q = torch.randn(1, 8)
    with torch.no_grad():
        emb.weight[55] = q[0] * 100  # in-place update, as an optimizer step does
    assert idx.search(q, 1)[1].item() == 55


def test_bucket_index_is_exact_when_it_probes_everything(gaussian):
    table, q, hist, _ = gaussian
    # buckets of the whole catalog: every query sees every item, so the result is exact
    idx = BucketIndex(table, n_buckets=4, bucket_size=3000, n_probe=1)
    ref_s, ref_i = brute_force_topk(q, table, 10, exclude=hist)
    s, i = idx.search(q, 10, exclude=hist)
    assert torch.equal(i, ref_i)
    torch.testing.assert_close(s, ref_s)
    # small buckets: approximate; every returned id is a real item with its true score
    idx = BucketIndex(table, n_buckets=64, bucket_size=32, n_probe=4)
    s, i = idx.search(q, 10)
    ok = i > 0
    assert ok.any()
    torch.testing.assert_close(s[ok], (q.unsqueeze(1) * table[i.clamp(min=0)]).sum(-1)[ok])
    assert len(set(i[0][i[0] > 0].tolist())) == int((i[0] > 0).sum())  # no duplicates


@pytest.mark.parametrize("factory", ["Foo", "IVFx,Flat", "IVF16,PQ7"])
def test_invalid_factory_string_is_a_clear_error(factory):
    table = torch.randn(2000, 32)
    with pytest.raises(ValueError, match="invalid FAISS factory string"):
        FaissIndex(factory, table)


def test_k_larger_than_catalog_is_a_clear_error():
    table = torch.randn(11, 4)  # C = 10
    for idx in (ExactIndex(table), FaissIndex("Flat", table), BucketIndex(table, n_buckets=2, bucket_size=5, n_probe=1)):
        with pytest.raises(ValueError, match=r"k=11 exceeds the catalog size C=10"):
            idx.search(torch.randn(2, 4), 11)
        assert idx.search(torch.randn(2, 4), 10)[1].shape == (2, 10)


def test_bad_inputs_are_clear_errors():
    table = torch.randn(11, 4)
    with pytest.raises(RuntimeError, match="build"):
        FaissIndex("Flat").search(torch.randn(2, 4), 1)
    with pytest.raises(ValueError, match=r"queries must be \[N, 4\]"):
        ExactIndex(table).search(torch.randn(2, 5), 1)
    with pytest.raises(ValueError, match="exclude contains item id 11 > C=10"):
        ExactIndex(table).search(torch.randn(1, 4), 1, exclude=[[11]])
    with pytest.raises(ValueError, match="nprobe is an IVF parameter"):
        FaissIndex("Flat", table, nprobe=4)
    with pytest.raises(ValueError, match="needs at least nlist=64"):
        FaissIndex("IVF64,Flat", table)


def test_make_index():
    table = torch.randn(50, 8)
    assert isinstance(make_index("exact", table), ExactIndex)
    assert isinstance(make_index("bucket", table, n_buckets=4, bucket_size=8, n_probe=2), BucketIndex)
    idx = make_index("HNSW16", table, efSearch=32)
    assert isinstance(idx, FaissIndex) and idx.search(torch.randn(3, 8), 4)[1].shape == (3, 4)


def test_gpu_request_without_gpu_faiss_falls_back_to_cpu(monkeypatch):
    import scalerec.retrieval.faiss_index as fi

    monkeypatch.setattr(fi, "faiss_has_gpu", lambda: False)
    table = torch.randn(101, 8)
    with pytest.warns(UserWarning, match="no GPU support"):
        idx = FaissIndex("Flat", table, device="cuda")
    assert not idx.on_gpu
    q = torch.randn(3, 8)
    assert torch.equal(idx.search(q, 5)[1], brute_force_topk(q, table, 5)[1])
