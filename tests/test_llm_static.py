"""The fixed-shape fitting step (scalerec/llm/static_fit.py) against the eager fitter, on a tiny random Llama.

In float64 the two follow one update rule operation for operation, so they must agree bit for bit: per text the
accuracy, the steps, the restarts, the loss and the vectors — with texts that finish early, texts that restart,
fits started from given vectors and a shared ``m``. The CUDA graph replays the same step (CUDA only).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from scalerec.llm.fitting import FitConfig, fit_ar, fit_one_step
from scalerec.llm.model import LoadedLM


def tiny_lm(device: str = "cpu") -> LoadedLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
                      initializer_range=0.3)  # large weights: sharp logits, so short texts fit in a few steps
    model = LlamaForCausalLM(cfg).to(device=device, dtype=torch.float64).eval().requires_grad_(False)
    return LoadedLM(model=model, tokenizer=None, name="tiny", device=torch.device(device), dtype=torch.float64,
                    sink_id=1)


def texts(*lengths: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(2, 64, (n,), generator=g).tolist() for n in lengths]


def fit(lm, mode, toks, cfg, **kw):
    return fit_one_step(lm, toks, cfg, **kw) if mode == "one-step" else fit_ar(lm, toks, 1, cfg, **kw)


def assert_same(got, ref):
    assert [(r.accuracy, r.steps, r.restarts, r.loss) for r in got] == \
        [(r.accuracy, r.steps, r.restarts, r.loss) for r in ref]
    for a, b in zip(got, ref):
        torch.testing.assert_close(a.vectors, b.vectors, rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["one-step", "ar"])
def test_static_step_is_the_eager_fit(mode):
    lm = tiny_lm()
    toks = texts(2, 6, 10) if mode == "ar" else texts(3, 6, 10)
    base = dict(max_steps=80, restart_patience=15, lr=0.2)
    ref = fit(lm, mode, toks, FitConfig(step_mode="eager", **base))
    # the paths this must cover: a text that finishes before the others, and restarts
    assert ref[0].accuracy == 1.0 and ref[0].steps < 80 and max(r.steps for r in ref) == 80
    assert sum(r.restarts for r in ref) >= 2
    calls, done = [], []
    got = fit(lm, mode, toks, FitConfig(step_mode="static", sync_every=7, **base),
              on_step=lambda **kw: calls.append(kw), progress=lambda **kw: done.append(kw))
    assert_same(got, ref)
    # the host looks in every sync_every steps: on_step with the steps so far, best accuracies that never fall,
    # every text finished once in progress
    assert [c["step"] for c in calls] == list(range(7, 7 * len(calls) + 1, 7)) and calls[-1]["step"] >= 80
    acc = torch.stack([c["best_accuracy"] for c in calls])
    assert bool((acc[1:] >= acc[:-1]).all()) and int(calls[-1]["active"].sum()) == 0
    torch.testing.assert_close(calls[-1]["best_vectors"].cpu().float(), torch.stack([r.vectors for r in ref]))
    assert sum(d["n_done"] for d in done) == 3 and sum(d["tokens"] for d in done) == sum(map(len, toks))
    assert all(r.seconds > 0 for r in got)


def test_static_step_from_given_vectors_and_with_a_shared_m():
    lm = tiny_lm()
    toks = texts(3, 6, 10)
    base = dict(max_steps=40, restart_patience=10, lr=0.2)
    start = fit_one_step(lm, toks, FitConfig(max_steps=10, lr=0.2, step_mode="eager"))
    init = torch.stack([r.vectors for r in start])
    ref = fit_one_step(lm, toks, FitConfig(step_mode="eager", **base), init=init)
    assert sum(r.restarts for r in ref) >= 1  # restarts from given vectors add noise to them
    assert_same(fit_one_step(lm, toks, FitConfig(step_mode="static", sync_every=4, **base), init=init), ref)
    m = start[2].vectors[1]
    ref = fit_one_step(lm, toks, FitConfig(step_mode="eager", **base), shared_m=m)
    got = fit_one_step(lm, toks, FitConfig(step_mode="static", sync_every=40, **base), shared_m=m)
    assert got[0].vectors.shape == (1, 32)
    assert_same(got, ref)


def test_step_mode_settings_are_checked():
    lm = tiny_lm()
    for bad in ("fast", None, 1):
        with pytest.raises(ValueError, match="step_mode"):
            FitConfig(step_mode=bad)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="sync_every"):
            FitConfig(sync_every=bad)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        fit_one_step(lm, texts(3), FitConfig(step_mode="graph"))
    with pytest.raises(ValueError, match="record_history needs step_mode 'eager'"):
        fit_one_step(lm, texts(3), FitConfig(step_mode="static"), record_history=True)
    # "auto" is the eager loop on a CPU: record_history works
    assert len(fit_one_step(lm, texts(3), FitConfig(max_steps=5), record_history=True)[0].history) >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("mode", ["one-step", "ar"])
def test_cuda_graph_replays_the_same_fit(mode):
    import warnings

    lm = tiny_lm("cuda")
    toks = texts(2, 6, 10) if mode == "ar" else texts(3, 6, 10)
    base = dict(max_steps=80, restart_patience=15, lr=0.2)
    static = fit(lm, mode, toks, FitConfig(step_mode="static", sync_every=7, **base))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fit(lm, mode, toks, FitConfig(step_mode="graph", sync_every=7, **base))
        auto = fit(lm, mode, toks, FitConfig(sync_every=7, **base))  # "auto" is the graph on CUDA
    # a failed capture would fall back to the uncaptured step with this warning: the capture must work
    assert not [w for w in caught if "could not be captured" in str(w.message)], [str(w.message) for w in caught]
    # The same step at the same shapes, replayed: what the uncaptured static step computes, bit for bit
    assert_same(got, static)
    assert_same(auto, static)
    # The eager loop runs other shapes on CUDA (only the active texts), so cuBLAS rounds the float64 logits
    # differently in the last bits; the fitter casts them to float32 for the loss and keeps the vectors in float32,
    # and 80 Adam steps amplify that rounding (measured on an H200: loss 1.4e-6 apart, vectors 7.7e-5). The fits
    # must still take the same course: the same accuracy, steps and restarts per text.
    eager = fit(lm, mode, toks, FitConfig(step_mode="eager", **base))
    assert [(r.accuracy, r.steps, r.restarts) for r in got] == [(r.accuracy, r.steps, r.restarts) for r in eager]
    for a, b in zip(got, eager):
        assert abs(a.loss - b.loss) <= 1e-5 * abs(b.loss)
        torch.testing.assert_close(a.vectors, b.vectors, rtol=0, atol=5e-4)


def test_token_margins_and_the_margin_loss():
    from scalerec.llm.fit_step import text_losses, token_margins

    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64)
    tgt = torch.randint(0, 7, (2, 5), generator=g)
    tgt[1, 3:] = -100  # padding
    marg = token_margins(logits, tgt)
    for b in range(2):
        for i in range(5):
            if tgt[b, i] == -100:
                assert marg[b, i] == float("inf")
                continue
            own = logits[b, i, tgt[b, i]]
            other = torch.cat([logits[b, i, :tgt[b, i]], logits[b, i, tgt[b, i] + 1:]]).max()
            assert marg[b, i] == own - other
            assert (marg[b, i] > 0) == (logits[b, i].argmax() == tgt[b, i])
    tau = 0.3
    loss, plain, acc = text_losses(logits, tgt, FitConfig(margin_tau=tau))
    for b, n in ((0, 5), (1, 3)):
        m = marg[b, :n]
        torch.testing.assert_close(loss[b], tau * torch.logsumexp(-m / tau, 0))
        # a soft maximum of the negated margins: between the worst one and it plus tau * log(n)
        assert -m.min() <= loss[b] <= -m.min() + tau * torch.log(torch.tensor(float(n), dtype=torch.float64))
    # it ranks the states by itself (not by CE); the accuracy is the CE loss's
    ce_loss, ce_plain, ce_acc = text_losses(logits, tgt, FitConfig())
    torch.testing.assert_close(plain, loss)
    torch.testing.assert_close(acc, ce_acc)
    assert acc[1] == (marg[1, :3] > 0).float().mean()
    torch.testing.assert_close(ce_loss, ce_plain)
    for bad in (-0.1, float("nan"), float("inf"), "0.2", True):
        with pytest.raises(ValueError, match="margin_tau"):
            FitConfig(margin_tau=bad)


@pytest.mark.parametrize("mode", ["one-step", "ar"])
def test_margin_loss_raises_the_smallest_margin_and_both_steps_agree(mode):
    """The margin loss polishes a fit from its vectors (the use it is for): a few small steps raise the text's
    smallest token margin, and the static step follows the eager one bit for bit with it too."""
    from scalerec.llm.fit_step import fit_logits, token_margins
    from scalerec.llm.inputs import n_sink

    lm = tiny_lm()
    toks = texts(12)
    start = fit(lm, mode, toks, FitConfig(max_steps=30, lr=0.2, restart_patience=0, step_mode="eager"))
    init = torch.stack([r.vectors for r in start])

    def smallest_margin(vectors):
        x = vectors.to(torch.float64).unsqueeze(0)
        tgt = torch.tensor([toks[0]])
        prev = None if mode == "one-step" else lm.embedding(tgt[:, :-1])
        return float(token_margins(fit_logits(lm, x, mode, len(toks[0]), tok_prev=prev), tgt).min())

    cfg = dict(max_steps=10, lr=0.01, restart_patience=0, margin_tau=0.1, target_accuracy=1.01)
    ref = fit(lm, mode, toks, FitConfig(step_mode="eager", **cfg), init=init)
    assert smallest_margin(ref[0].vectors) > smallest_margin(init[0]) + 1e-3
    assert_same(fit(lm, mode, toks, FitConfig(step_mode="static", sync_every=3, **cfg), init=init), ref)


def test_polish_steps_polish_the_texts_left_short():
    """FitConfig.polish_steps: after the fit, the texts it left short get the margin-loss fit of polish_config from
    their best vectors (the same as running it by hand); the better result counts and the steps add up; on_step
    sees the whole batch and progress counts every text once."""
    from scalerec.llm.fitting import polish_config

    lm = tiny_lm()
    toks = texts(3, 8, 12)
    base = FitConfig(max_steps=6, lr=0.2, restart_patience=0, step_mode="eager")
    first = fit_one_step(lm, toks, base)
    short = [j for j, r in enumerate(first) if r.accuracy < 1.0]
    assert short  # the first fit leaves texts short
    cfg = dataclasses.replace(base, polish_steps=40, polish_lr=0.01, polish_tau=0.2)
    pcfg = polish_config(cfg)
    assert (pcfg.margin_tau, pcfg.lr, pcfg.max_steps, pcfg.warmup_steps, pcfg.restart_patience, pcfg.polish_steps) == \
        (0.2, 0.01, 40, 0, 0, 0)
    by_hand = fit_one_step(lm, [toks[j] for j in short], pcfg, init=torch.stack([first[j].vectors for j in short]))
    calls, done = [], []
    got = fit_one_step(lm, toks, cfg, on_step=lambda **kw: calls.append(kw), progress=lambda **kw: done.append(kw))
    assert sum(d["n_done"] for d in done) == 3
    assert all(c["best_vectors"].shape[0] == 3 and c["best_accuracy"].shape == (3,) for c in calls)
    assert len(calls) == max(r.steps for r in first) + max(r.steps for r in by_hand)
    for j, r in enumerate(got):
        if j not in short:
            assert (r.accuracy, r.steps, r.loss) == (first[j].accuracy, first[j].steps, first[j].loss)
            continue
        h = by_hand[short.index(j)]
        better = h if h.accuracy > first[j].accuracy else first[j]
        assert (r.accuracy, r.loss, r.steps) == (better.accuracy, better.loss, first[j].steps + h.steps)
        torch.testing.assert_close(r.vectors, better.vectors, rtol=0, atol=0)
    assert any(by_hand[i].accuracy > first[j].accuracy for i, j in enumerate(short))  # the polish did something
    for bad in (dict(polish_steps=-1), dict(polish_steps=2.0), dict(polish_lr=0), dict(polish_tau=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FitConfig(**bad)
