"""Evaluation through an index (exact or approximate, recall reported) and the ``recommend`` command."""
from __future__ import annotations

import json

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from scalerec.cli import main as cli_main
from scalerec.data.dataset import EvalSet
from scalerec.eval import evaluate, metrics_from_ranks
from scalerec.eval.approx import evaluate_with_index
from scalerec.models import SASRec
from scalerec.train.checkpoint import save_model_checkpoint

faiss.omp_set_num_threads(1)
torch.set_num_threads(1)

C, D, MAXLEN = 3000, 16, 20


@pytest.fixture(scope="module")
def model_and_cases():
    torch.manual_seed(0)
    model = SASRec(C, maxlen=MAXLEN, hidden=D, num_blocks=1, num_heads=1, dropout=0.0)
    with torch.no_grad():  # clustered item table so that IVF has structure to exploit
        centres = torch.randn(30, D) * 2
        model.item_emb.weight[1:] = centres[torch.randint(0, 30, (C,))] + 0.5 * torch.randn(C, D)
    model.eval()
    rng = np.random.default_rng(0)
    inputs = [rng.integers(1, C + 1, size=int(rng.integers(1, 15))) for _ in range(200)]
    targets = rng.integers(1, C + 1, size=200)
    targets[:20] = [h[-1] for h in inputs[:20]]  # some targets repeat the last history item
    return model, EvalSet(np.arange(200), inputs, targets.astype(np.int64))


def _float64_ranks(model, cases):
    """Reference ranks: items strictly above the target in float64, history (minus the target) excluded."""
    from scalerec.data.batching import pad_left

    with torch.no_grad():
        q = model.last_hidden(torch.from_numpy(pad_left(cases.inputs, MAXLEN))).double()
    s = q @ model.item_table.detach().double().t()
    s[:, 0] = float("-inf")
    ranks = []
    for i, (h, t) in enumerate(zip(cases.inputs, cases.targets)):
        row = s[i].clone()
        row[h[h != t]] = float("-inf")
        ranks.append(int((row > row[t]).sum()))
    return np.array(ranks)


def test_exact_index_evaluation_matches_float64_reference(model_and_cases):
    model, cases = model_and_cases
    ks = (1, 5, 10, 50)
    ref = metrics_from_ranks(_float64_ranks(model, cases), ks)
    out = evaluate_with_index(model, cases, "exact", ks=ks, batch_size=37)
    for k in ks:
        for m in ("HR", "NDCG", "MRR"):
            assert out[f"{m}@{k}"] == pytest.approx(ref[f"{m}@{k}"], abs=1e-12), (m, k)
            assert out[f"exact/{m}@{k}"] == pytest.approx(ref[f"{m}@{k}"], abs=1e-12)
        assert out[f"recall@{k}"] == 1.0
    assert out["cases"] == 200
    # the tiled evaluate() agrees up to float32 rounding of the target's own score (a rank off by one)
    ev = evaluate(model, cases, ks=ks, batch_size=64)
    assert ev["HR@50"] == pytest.approx(out["HR@50"], abs=0.02)


def test_approximate_index_evaluation_reports_recall(model_and_cases):
    model, cases = model_and_cases
    flat = evaluate_with_index(model, cases, "Flat", ks=(10,))
    assert flat["recall@10"] == 1.0 and flat["NDCG@10"] == pytest.approx(flat["exact/NDCG@10"])
    ivf = evaluate_with_index(model, cases, "IVF64,Flat", ks=(10,), nprobe=1)
    assert 0.0 < ivf["recall@10"] < 1.0  # one list of 64: approximate, and the loss of recall is reported
    assert ivf["exact/NDCG@10"] == pytest.approx(flat["exact/NDCG@10"])
    full = evaluate_with_index(model, cases, "IVF64,Flat", ks=(10,), nprobe=64)
    assert full["recall@10"] == 1.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, model_and_cases):
    model, _ = model_and_cases
    d = tmp_path_factory.mktemp("ckpt")
    cfg = OmegaConf.create({"model": {"maxlen": MAXLEN, "hidden": D, "num_blocks": 1, "num_heads": 1, "dropout": 0.0}})
    item_ids = np.arange(C, dtype=np.int64) * 7 + 1000  # original ids differ from internal ones
    path = str(d / "best")
    save_model_checkpoint(path, model, cfg, item_ids, fingerprint="test")
    return path, item_ids


def test_recommend_cli_writes_topk_in_original_ids(tmp_path, checkpoint, model_and_cases, capsys):
    path, item_ids = checkpoint
    model, _ = model_and_cases
    users = tmp_path / "users.txt"  # user_seq format, original ids; one unknown item (999999)
    users.write_text("7 1000 1007 1014\n8 1700 999999\n9 999999\n")
    out = tmp_path / "rec.jsonl"
    rc = cli_main(["recommend", path, "--users", str(users), "--k", "5", "--output", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["users"] == 2 and summary["skipped_users"] == 1 and summary["unknown_items"] == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["user"] for r in rows] == [7, 8]
    # expected: exact top-5 of the model's state, history excluded, mapped to original ids
    hist = [np.array([1, 2, 3]), np.array([101])]
    from scalerec.data.batching import pad_left
    from scalerec.retrieval import brute_force_topk

    with torch.no_grad():
        q = model.last_hidden(torch.from_numpy(pad_left(hist, MAXLEN)))
        s, ids = brute_force_topk(q, model.item_table.detach(), 5, exclude=hist)
    for r, exp_ids, exp_s in zip(rows, ids, s):
        assert r["items"] == item_ids[exp_ids.numpy() - 1].tolist()
        np.testing.assert_allclose(r["scores"], exp_s.numpy(), rtol=1e-5, atol=1e-5)
    assert not set(rows[0]["items"]) & {1000, 1007, 1014}


def test_recommend_parquet_with_ivf_and_history_included(tmp_path, checkpoint):
    path, item_ids = checkpoint
    users = tmp_path / "users.csv"
    users.write_text("user,item,timestamp\n1,1007,2\n1,1000,1\n2,1014,5\n")
    out = tmp_path / "rec.parquet"
    rc = cli_main(["recommend", path, "--users", str(users), "--k", "10", "--index", "IVF32,Flat", "--nprobe", "32",
                   "--include-history", "--output", str(out)])
    assert rc == 0
    t = pq.read_table(out).to_pylist()
    assert [r["user"] for r in t] == [1, 2]
    assert all(len(r["items"]) == 10 and len(r["scores"]) == 10 for r in t)
    assert all(r["scores"] == sorted(r["scores"], reverse=True) for r in t)
    assert set(t[0]["items"]) <= set(item_ids.tolist())


def test_recommend_bad_inputs(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    users = tmp_path / "u.txt"
    users.write_text("1 1000\n")
    assert cli_main(["recommend", path, "--users", str(users), "--output", str(tmp_path / "x.csv")]) == 2
    assert "must end with .parquet or .jsonl" in capsys.readouterr().err
    assert cli_main(["recommend", path, "--users", str(users), "--k", str(C + 1),
                     "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "exceeds the checkpoint's catalog size" in capsys.readouterr().err
    assert cli_main(["recommend", path, "--users", str(users), "--index", "IVF,Bad",
                     "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "invalid FAISS factory string" in capsys.readouterr().err
