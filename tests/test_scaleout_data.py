"""Synthetic huge catalogs, per-worker sharded reading and the `scalerec plan` memory model (no Ray)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from scalerec.data.sharding import ShardedSequences
from scalerec.data.synthetic import SyntheticCatalog, parse_spec
from scalerec.train.plan import plan


def test_synthetic_sequences_are_deterministic_streamed_and_structured():
    cat = parse_spec("synthetic:items=1e8,users=1e6,clusters=1000,seed=3")
    assert cat.items == 10**8 and cat.users == 10**6
    a, b = cat.sequence(123_456), cat.sequence(123_456)
    assert np.array_equal(a, b) and a.min() >= 1 and a.max() <= 10**8  # O(length) work for any C
    assert not np.array_equal(a, cat.sequence(123_457))
    small = SyntheticCatalog(items=5000, users=400, clusters=20, seed=1)
    pop = small.popularity(400)
    assert pop[1:500].sum() > 3 * pop[-499:].sum()  # Zipf: low ids are popular
    # latent clusters: consecutive items mostly share a cluster or move to the next one
    s = np.concatenate([small.sequence(u) for u in range(50)])
    c = (s - 1) % 20
    same_or_next = np.mean((c[1:] == c[:-1]) | (c[1:] == (c[:-1] + 1) % 20))
    assert same_or_next > 0.8
    with pytest.raises(ValueError, match="unknown key 'itemz'"):
        parse_spec("synthetic:itemz=10")
    with pytest.raises(ValueError, match="clusters"):
        SyntheticCatalog(items=10, clusters=20)


def test_workers_read_disjoint_slices_of_the_same_global_batch():
    cat = SyntheticCatalog(items=1000, users=50, clusters=10, len=8)
    full = list(cat.batches(16, 12, epoch=2))
    parts = [list(cat.batches(16, 12, epoch=2, rank=r, world_size=2)) for r in range(2)]
    assert len(full) == len(parts[0]) == len(parts[1]) == 4
    def seqs_of(*xs):  # left padding may differ (each worker trims to its own longest sequence)
        return sorted(tuple(v for v in r.tolist() if v) for x in xs for r in x)

    for (s, x, y), (_, x0, _), (_, x1, _) in zip(full, *parts):
        assert seqs_of(x0, x1) == seqs_of(x) and len(x0) + len(x1) == len(x)
    # resuming at batch 2 gives the same batches without generating the earlier ones
    assert all(torch.equal(a[1], b[1]) for a, b in zip(full[2:], cat.batches(16, 12, epoch=2, start=2)))
    seqs = [np.arange(1, n + 2) for n in range(1, 30)]
    rd = ShardedSequences(seqs, 8, 10, seed=0)
    g = [x for _, x, _ in rd.batches(epoch=0)]
    w = [[x for _, x, _ in rd.batches(epoch=0, rank=r, world_size=3)] for r in range(3)]
    for k in range(rd.num_batches()):
        assert sorted(map(tuple, g[k].tolist())) == sorted(map(tuple, torch.cat([w[r][k] for r in range(3)]).tolist()))


def test_plan_components_and_errors():
    one, two = plan(10**7, 64, 1, "sce", "bf16"), plan(10**7, 64, 2, "sce", "bf16")
    assert one["table"] == 10**7 * 64 * 2 and one["optimizer_state"] == 4 * 10**7
    assert (two["table"] + two["optimizer_state"]) / (one["table"] + one["optimizer_state"]) == pytest.approx(0.5)
    assert plan(10**6, 64, 2, "sce", "fp32", "adam")["optimizer_state"] == 8 * 64 * 500_000
    assert plan(10**6, 64, 2, "ce")["loss_workspace"] > plan(10**6, 64, 2, "sce")["loss_workspace"]
    with pytest.raises(ValueError, match="--workers"):
        plan(3, 8, 4)
    with pytest.raises(ValueError, match="--zero-stage"):
        plan(100, 8, 1, zero_stage=5)
    out = subprocess.run([sys.executable, "-m", "scalerec.cli", "plan", "--items", "1e8", "--workers", "2",
                          "--dtype", "bf16", "--memory-gb", "24", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["per_rank"]["table"] == 64 * 10**8 and res["fits"] is True
    info = subprocess.run([sys.executable, "-m", "scalerec.cli", "info", "synthetic:items=1e7,users=1e6", "--json"],
                          capture_output=True, text=True)
    assert info.returncode == 0 and json.loads(info.stdout.strip().splitlines()[-1])["items"] == 10**7
