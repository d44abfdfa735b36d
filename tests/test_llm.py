"""Fitting and decoding on the real SmolLM2-135M (one-step, AR, batching, shared m, bad input)."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from test_llm_common import lm, passage_ids  # noqa: F401  (lm is a fixture)

from scalerec.llm import FitConfig, decode_ar, decode_one_step, fit_ar, fit_one_step


class _CountForwards:
    def __init__(self, module):
        self.n = 0
        self.h = module.register_forward_hook(self)

    def __call__(self, *a):
        self.n += 1

    def close(self):
        self.h.remove()


def test_model_is_frozen(lm):
    assert not lm.model.training
    assert all(not p.requires_grad for p in lm.model.parameters())
    assert lm.dtype == torch.float32 and lm.hidden_size == 576 and lm.max_positions >= 2048
    assert lm.decode_ids(lm.encode("To be, or not to be")) == "To be, or not to be"


def test_converted_gguf_is_cached_and_loads_identically(lm, tmp_path, monkeypatch):
    """The GGUF's float32 conversion is cached: the second load comes from the cache, in a fraction of the time,
    with the same weights bit for bit, the same tokenizer and the same logits."""
    import time

    from scalerec.llm import load_causal_lm
    from scalerec.llm.model import gguf_cache_dir, resolve_model

    where, gguf = resolve_model("smollm2")
    monkeypatch.setenv("SCALEREC_MODEL_CACHE", str(tmp_path / "cache"))
    entry = gguf_cache_dir(where, gguf)
    assert entry.parent == tmp_path / "cache" and entry.name.startswith(gguf[:-len(".gguf")])
    ref = lm
    if lm.source != "gguf":  # the session's copy came from a cache itself: convert once more for the reference
        monkeypatch.setenv("SCALEREC_MODEL_CACHE", "off")
        ref = load_causal_lm("smollm2", dtype="float32", device="cpu")
        assert ref.source == "gguf"
        monkeypatch.setenv("SCALEREC_MODEL_CACHE", str(tmp_path / "cache"))
    from scalerec.llm.model import _write_cache

    _write_cache(entry, ref.model, ref.tokenizer)
    assert not [p for p in entry.parent.iterdir() if p.name.startswith(".")]  # no temp dir left
    t = time.perf_counter()
    got = load_causal_lm("smollm2", dtype="float32", device="cpu")
    assert got.source == "cache" and time.perf_counter() - t < 20
    a, b = ref.model.state_dict(), got.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert got.model.lm_head.weight.data_ptr() == got.model.get_input_embeddings().weight.data_ptr()  # still tied
    text = "To be, or not to be: that is the question.\n\nKING LEAR:"
    assert got.encode(text) == ref.encode(text) and got.sink_id == ref.sink_id and got.name == ref.name
    x = torch.tensor([ref.encode(text)])
    with torch.no_grad():
        assert torch.equal(got.model(x).logits, ref.model(x).logits)
    monkeypatch.setenv("SCALEREC_MODEL_CACHE", "off")
    assert gguf_cache_dir(where, gguf) is None


def test_inputs_start_with_the_sink_token(lm):
    from scalerec.llm.inputs import n_sink, one_step_inputs

    assert lm.sink_id == lm.tokenizer.bos_token_id is not None and n_sink(lm) == 1
    e, m = torch.randn(3, 1, 576), torch.randn(3, 1, 576)
    x = one_step_inputs(lm, e, m, 5)
    assert x.shape == (3, 6, 576)
    torch.testing.assert_close(x[:, 0], lm.embedding.weight[lm.sink_id].expand(3, 576))
    torch.testing.assert_close(x[:, 1], e[:, 0])
    torch.testing.assert_close(x[:, 2:], m.expand(3, 4, 576))


def test_one_step_fits_16_tokens_and_decodes_in_one_forward(lm):
    toks = passage_ids(lm, 16, 0)
    cfg = FitConfig()
    res = fit_one_step(lm, [toks], cfg)[0]
    assert res.accuracy == 1.0, (res.accuracy, res.steps)
    assert res.steps < cfg.max_steps and res.seconds > 0 and res.vectors.shape == (2, 576)
    counter = _CountForwards(lm.model)
    try:
        out = decode_one_step(lm, res.vectors, 16)
    finally:
        counter.close()
    assert counter.n == 1
    assert out == [toks]


def test_ar_fits_16_tokens_and_decodes(lm):
    toks = passage_ids(lm, 16, 0)
    res = fit_ar(lm, [toks], n_mem=1)[0]
    assert res.accuracy == 1.0, (res.accuracy, res.steps)
    assert res.vectors.shape == (1, 576)
    assert decode_ar(lm, res.vectors, 16) == [toks]


def test_batch_of_different_lengths_fits_each_text_independently(lm):
    """Texts of 4 and 8 tokens in one batch: the short one stops early, and neither is changed by the other."""
    short, long_ = passage_ids(lm, 4, 0), passage_ids(lm, 8, 0)
    cfg = FitConfig()
    both = fit_one_step(lm, [short, long_], cfg, record_history=True)
    assert [r.accuracy for r in both] == [1.0, 1.0]
    assert both[0].steps < both[1].steps  # the short text left the batch first
    assert [len(r.history) for r in both] == [r.steps for r in both]
    dec = decode_one_step(lm, torch.stack([r.vectors for r in both]), [4, 8])
    assert dec == [short, long_]
    # Independence is checked against lone fits in float64, below. In float32 the batched and the lone fit drift
    # apart by ~1e-4 within 10 steps (batch shapes round differently, and Adam turns rounding-level gradients into
    # full-size steps), so their per-step token accuracies can differ where an argmax is nearly tied (a
    # clean-clone CI run with 2 threads failed on this test). In float64 there
    # is no rounding to amplify: the batched fit IS the lone fit, step for step (every step's token accuracy)
    # and vector for vector. A 30-step budget keeps the float64 fits short: the 4-token text is exact after ~19
    # steps and leaves the batch; the 8-token one (~50 steps in float64) goes on alone to the budget.
    lm64 = dataclasses.replace(lm, model=copy.deepcopy(lm.model).to(torch.float64), dtype=torch.float64)
    cfg64 = FitConfig(max_steps=30)
    both64 = fit_one_step(lm64, [short, long_], cfg64, record_history=True)
    assert both64[0].accuracy == 1.0 and both64[0].steps < both64[1].steps == 30
    for got, toks in zip(both64, (short, long_)):
        ref = fit_one_step(lm64, [toks], cfg64, record_history=True)[0]
        assert got.steps == ref.steps and got.accuracy == ref.accuracy
        assert got.history == ref.history
        torch.testing.assert_close(got.vectors, ref.vectors, atol=1e-4, rtol=1e-4)
    del lm64


def test_shared_m_leaves_one_vector_per_text(lm):
    from scalerec.llm import fit_shared_m

    corpus = [passage_ids(lm, 6, i) for i in range(2, 6)]
    shared = fit_shared_m(lm, corpus, steps=100)  # the e fit below then needs ~56 steps of its 400
    assert shared.m.shape == (576,)
    new = passage_ids(lm, 6, 0)
    res = fit_one_step(lm, [new], shared_m=shared.m)[0]
    assert res.vectors.shape == (1, 576)
    assert res.accuracy == 1.0
    assert decode_one_step(lm, res.vectors, 6, shared_m=shared.m) == [new]


def test_bad_input_is_a_clear_error(lm):
    with pytest.raises(ValueError, match="text 1: empty"):
        fit_one_step(lm, ["fine", "   "])
    with pytest.raises(ValueError, match="text 0: empty"):
        fit_ar(lm, [[]])
    too_long = [1] * (lm.max_positions + 1)
    with pytest.raises(ValueError, match=f"exceed the model context of {lm.max_positions}"):
        fit_one_step(lm, [too_long])
    with pytest.raises(ValueError, match="exceed the model context"):
        fit_ar(lm, [[1] * lm.max_positions], n_mem=1)
    grow = FitConfig(grow_from=2)  # checked on the whole texts before the first (short) stage
    with pytest.raises(ValueError, match="text 1: empty"):
        fit_one_step(lm, [[1, 2, 3], []], grow)
    with pytest.raises(ValueError, match="exceed the model context"):
        fit_ar(lm, [[1, 2, 3], [1] * lm.max_positions], n_mem=1, config=grow)
    with pytest.raises(ValueError, match="vectors must be"):
        decode_one_step(lm, torch.zeros(2, 7), 4)


def test_restart_patience_grows_with_the_text_length():
    from scalerec.llm.fitting import restart_patience_for

    auto = FitConfig()
    assert auto.restart_patience == "auto"
    assert [restart_patience_for(auto, n) for n in (4, 16, 32, 64, 128)] == [100, 100, 400, 1600, 6400]
    assert restart_patience_for(FitConfig(restart_patience=250), 128) == 250
    assert restart_patience_for(FitConfig(restart_patience=None), 8) is None
    assert restart_patience_for(FitConfig(restart_patience=0), 8) is None
    for bad in (-1, "sometimes", 1.5, True):
        with pytest.raises(ValueError, match="restart_patience"):
            FitConfig(restart_patience=bad)


def test_prefix_stages_and_grow_from_validation():
    from scalerec.llm.fitting import prefix_stages

    assert prefix_stages(16, None) == [16] and prefix_stages(16, 0) == [16] and prefix_stages(6, 8) == [6]
    assert prefix_stages(16, 4) == [4, 8, 16]
    assert prefix_stages(20, 8) == [8, 16, 20]
    assert prefix_stages(128, 16) == [16, 32, 64, 128]
    for bad in (-1, 2.5, "16", True):
        with pytest.raises(ValueError, match="grow_from"):
            FitConfig(grow_from=bad)


@pytest.mark.parametrize("mode", ["one-step", "ar"])
def test_growing_fit_warm_starts_each_stage_from_the_last(lm, mode):
    """grow_from=4: a 3-token text is fitted in one stage, a 12-token text through prefixes of 4, 8 and 12 tokens;
    each stage starts from the vectors that reproduce the previous prefix, so its first step already gets that
    prefix right (causal reading), and the result counts the steps of all its stages."""
    short, long_ = passage_ids(lm, 3, 0), passage_ids(lm, 12, 1)
    cfg = FitConfig(grow_from=4)
    done, steps = [], []
    hooks = dict(record_history=True, progress=lambda **kw: done.append(kw), on_step=lambda **kw: steps.append(kw))
    fit = (lambda t: fit_one_step(lm, t, cfg, **hooks)) if mode == "one-step" else \
        (lambda t: fit_ar(lm, t, n_mem=1, config=cfg, **hooks))
    res = fit([short, long_])
    # on_step: once per step of each stage (counted from 1 in each), best accuracies never fall within a stage and
    # are all 1.0 at a stage's last step
    starts = [i for i, kw in enumerate(steps) if kw["step"] == 1]
    assert len(starts) == 3 and starts[0] == 0
    for a, b in zip(starts, starts[1:] + [len(steps)]):
        stage = steps[a:b]
        assert [kw["step"] for kw in stage] == list(range(1, len(stage) + 1))
        acc = torch.stack([kw["best_accuracy"] for kw in stage])
        assert bool((acc[1:] >= acc[:-1]).all()) and bool((acc[-1] == 1.0).all())
        assert int(stage[-1]["active"].sum()) == 0 and all(kw["seconds"] > 0 for kw in stage)
    assert [r.accuracy for r in res] == [1.0, 1.0]
    assert [r.token_ids for r in res] == [short, long_]
    assert [len(r.history) for r in res] == [r.steps for r in res]
    # on_step also hands over the best vectors so far (to save a long fit's progress): at the last step of the last
    # stage (the long text alone) they are the vectors the fit returns
    assert torch.equal(steps[-1]["best_vectors"][-1].float().cpu(), res[1].vectors)
    # the stages end where the (per-stage) fit reached accuracy 1.0
    ends = [i for i, a in enumerate(res[1].history) if a == 1.0]
    assert len(ends) == 3 and ends[-1] == len(res[1].history) - 1, res[1].history
    # stage 2 (8 tokens) starts from stage 1's exact 4-token vectors: >= 4 of 8 right at its first step; stage 3
    # (12 tokens) starts with >= 8 of 12 right
    assert res[1].history[ends[0] + 1] >= 4 / 8 and res[1].history[ends[1] + 1] >= 8 / 12
    assert res[0].steps == len(res[0].history) and max(res[0].history) == 1.0
    assert sum(d["n_done"] for d in done) == 2 and sum(d["tokens"] for d in done) == 15
    if mode == "one-step":
        assert decode_one_step(lm, torch.stack([r.vectors for r in res]), [3, 12]) == [short, long_]
    else:
        assert [decode_ar(lm, r.vectors, n)[0] for r, n in zip(res, (3, 12))] == [short, long_]
