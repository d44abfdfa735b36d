import json
import os

import pytest
import torch

from scalerec.cli import main as cli
from scalerec.models import SASRec
from scalerec.train.config import ConfigError, load_config
from scalerec.train.run import train


@pytest.fixture
def small_data(tmp_path, beauty_path):
    """The first 600 users of Beauty: real data, seconds to train."""
    with open(beauty_path) as fh:
        lines = [next(fh) for _ in range(600)]
    p = tmp_path / "beauty600.txt"
    p.write_text("".join(lines))
    return str(p)


def small_cfg(data, out, *extra):
    return load_config(None, [f"data.path={data}", f"output_dir={out}", "model.maxlen=20", "model.hidden=16",
                              "trainer.batch_size=64", "trainer.progress=false", "trainer.threads=1",
                              "eval.ks=[5,10]", *extra])


def test_sasrec_trimmed_batch_equals_full_width():
    torch.manual_seed(0)
    m = SASRec(50, maxlen=10, hidden=8, dropout=0.0).eval()
    seqs = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3, 4, 5], [0, 0, 0, 0, 1, 2, 3, 4, 5, 6]])
    full = m.encode(seqs)
    trimmed = m.encode(seqs[:, 4:])
    torch.testing.assert_close(full[:, 4:], trimmed)
    assert torch.isfinite(full).all()
    # causality: changing a later item does not change earlier states
    seqs2 = seqs.clone()
    seqs2[1, 9] = 7
    torch.testing.assert_close(m.encode(seqs2)[:, :9], full[:, :9])


def test_train_evaluate_resume(tmp_path, small_data):
    out = str(tmp_path / "run")
    cfg = small_cfg(small_data, out, "trainer.epochs=2", "trainer.patience=5")
    res = train(cfg, log=lambda *a: None)
    assert res["epochs"] == 2 and res["best_epoch"] in (1, 2)
    assert 0.0 <= res["test"]["NDCG@10"] <= res["test"]["HR@10"] <= 1.0
    lines = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert [l["epoch"] for l in lines] == [1, 2]
    assert lines[1]["loss"] < lines[0]["loss"]  # it learns

    # resuming epoch 2's checkpoint for one more epoch == a straight 3-epoch run (same seed)
    cfg3 = small_cfg(small_data, str(tmp_path / "straight"), "trainer.epochs=3", "trainer.patience=5")
    straight = train(cfg3, log=lambda *a: None)
    cfg_r = small_cfg(small_data, out, "trainer.epochs=3", "trainer.patience=5")
    resumed = train(cfg_r, resume=os.path.join(out, "checkpoint"), log=lambda *a: None)
    last_straight = [json.loads(l) for l in open(tmp_path / "straight" / "metrics.jsonl")][-1]
    last_resumed = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))][-1]
    assert last_resumed["epoch"] == 3
    assert last_resumed["loss"] == pytest.approx(last_straight["loss"], rel=1e-6)
    assert resumed["test"]["NDCG@10"] == pytest.approx(straight["test"]["NDCG@10"], rel=1e-6)

    # `scalerec evaluate` reproduces the test metrics of the best checkpoint
    rc = cli(["evaluate", os.path.join(out, "best"), "--json"])
    assert rc == 0


def test_cli_evaluate_json(tmp_path, small_data, capsys):
    out = str(tmp_path / "run")
    rc = cli(["train", "--json", "launch/configs/beauty_demo.yaml", f"data.path={small_data}", f"output_dir={out}",
              "trainer.epochs=1", "model.maxlen=10", "model.hidden=8", "trainer.progress=false"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rc = cli(["evaluate", os.path.join(out, "best"), "--json"])
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and metrics["NDCG@10"] == pytest.approx(result["test"]["NDCG@10"])


def test_checkpoint_from_another_dataset(tmp_path, small_data, ml100k_path, capsys):
    out = str(tmp_path / "run")
    train(small_cfg(small_data, out, "trainer.epochs=1"), log=lambda *a: None)
    rc = cli(["evaluate", os.path.join(out, "best"), "--data", ml100k_path])
    assert rc == 2
    assert "trained on another dataset" in capsys.readouterr().err


@pytest.mark.parametrize(
    "override,match",
    [
        ("loss.name=nope", "loss.name 'nope' is unknown; allowed values: .*ce_sampled"),
        ("model.maxlen=0", "model.maxlen must be a positive number"),
        ("trainer.batch_size=-3", "trainer.batch_size must be a positive number"),
        ("trainer.epoch=3", "epoch"),
        ("data.split=random", "data.split must be 'loo' or 'temporal'"),
    ],
)
def test_bad_config_values(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("launch/configs/beauty_demo.yaml", [override])


def test_cli_reports_bad_config(capsys):
    assert cli(["train", "launch/configs/beauty_demo.yaml", "model.maxlen=0"]) == 2
    assert "model.maxlen must be a positive number" in capsys.readouterr().err


def test_unknown_loss_param_is_an_error(tmp_path, small_data):
    cfg = small_cfg(small_data, str(tmp_path / "r"), "loss.name=ce_sampled", "loss.params.negatives=4")
    with pytest.raises(ValueError, match="unknown parameter"):
        train(cfg, log=lambda *a: None)
