"""The frozen model sharded over Ray workers (ZeRO-3 over gloo, scalerec.llm.sharded): equality with the unsharded
fit, the job contract in sharded mode, bad input."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

torch = pytest.importorskip("torch")
pytest.importorskip("deepspeed")
ray = pytest.importorskip("ray")

from scalerec.llm.fit_config import FitConfig  # noqa: E402
from scalerec.llm.model import LoadedLM  # noqa: E402
from scalerec.llm.model_config import RandomWeights, build_unsharded, load_model_config  # noqa: E402

TINY = dict(model_type="llama", vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=40, tie_word_embeddings=True,
            bos_token_id=1, eos_token_id=2)


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _token_lists(n: int, length, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [length] * n if isinstance(length, int) else length
    return [torch.randint(3, TINY["vocab_size"], (ln,), generator=g).tolist() for ln in lens]


def _unsharded_fit(monkeypatch, lm, toks, mode, n_vec, cfg, shared_m=None):
    """The library's fitter on the whole model, with its per-step per-text losses (a spy on text_losses)."""
    import scalerec.llm.fitting as fitting

    calls = []
    real = fitting.text_losses

    def spy(logits, tgt, c):
        out = real(logits, tgt, c)
        calls.append(out[1].detach().double().clone())
        return out

    monkeypatch.setattr(fitting, "text_losses", spy)
    active_log = [torch.ones(len(toks), dtype=torch.bool)]

    def on_step(step, best_accuracy, active, seconds, best_vectors=None):
        active_log.append(active.clone())

    if mode == "one-step":
        res = fitting.fit_one_step(lm, toks, cfg, shared_m=shared_m, on_step=on_step)
    else:
        res = fitting.fit_ar(lm, toks, n_mem=n_vec, config=cfg, on_step=on_step)
    losses = [[] for _ in toks]
    for s, plain in enumerate(calls):  # the step's batch: the texts active before it, in order
        for j, i in enumerate(active_log[s].nonzero().flatten().tolist()):
            losses[i].append(float(plain[j]))
    return res, losses


@pytest.fixture(scope="module")
def tiny_group(ray_local):
    """2 Ray actors in one gloo group, each holding half of every parameter of a tiny float64 Llama."""
    from scalerec.llm.sharded_job import ModelSource, start_group, stop_group

    config = load_model_config(TINY)
    actors = start_group(2, ModelSource(config=config, weights="random", tokenizer=None, name="tiny", seed=3,
                                        dtype="float64"))
    model = build_unsharded(config, RandomWeights(3), torch.float64)
    lm = LoadedLM(model=model, tokenizer=None, name="tiny", device=torch.device("cpu"), dtype=torch.float64,
                  sink_id=1)
    yield actors, lm
    stop_group(actors)


@pytest.mark.parametrize("mode", ["one-step", "ar", "shared-m"])
def test_sharded_fit_equals_unsharded_float64(tiny_group, monkeypatch, mode):
    """2 gloo ranks, model partitioned: per-step losses, vectors and decoded ids = the unsharded fit (float64)."""
    from scalerec.llm.decoding import decode
    from scalerec.llm.sharded_job import fit_on_group

    actors, lm = tiny_group
    shared = torch.randn(32, generator=torch.Generator().manual_seed(5)) * 0.5 if mode == "shared-m" else None
    fmode = "ar" if mode == "ar" else "one-step"
    n_vec = 2 if mode == "one-step" else 1
    toks = _token_lists(4, [6, 9, 6, 9], seed=1)          # mixed lengths: padded batches
    cfg = FitConfig(max_steps=50, restart_patience=20, lr=0.1)  # a short patience: restarts happen
    sharded, sh_losses = fit_on_group(actors, toks, fmode, n_vec, cfg, batch_size=2, shared_m=shared)
    # the same texts in the batches the ranks formed (rank r: texts r, r + 2), unsharded: bit for bit
    for r in range(2):
        sub, sub_losses = _unsharded_fit(monkeypatch, lm, toks[r::2], fmode, n_vec, cfg, shared)
        for j, i in enumerate(range(r, 4, 2)):
            assert sharded[i].steps == sub[j].steps and len(sh_losses[i]) == sharded[i].steps
            assert max(abs(a - b) for a, b in zip(sh_losses[i], sub_losses[j])) <= 1e-8
            torch.testing.assert_close(sharded[i].vectors, sub[j].vectors, rtol=0, atol=1e-8)
    # all four in one unsharded batch (other padding): the same fit; the reported loss is a float32 mean over
    # the padded row, whose summation order follows the padding: measured 1-2 float32 ulps (9.5e-7 at 4.5)
    ref, ref_losses = _unsharded_fit(monkeypatch, lm, toks, fmode, n_vec, cfg, shared)
    for i in range(4):
        s, r = sharded[i], ref[i]
        assert (s.steps, s.restarts, s.accuracy) == (r.steps, r.restarts, r.accuracy)
        torch.testing.assert_close(s.vectors, r.vectors, rtol=0, atol=1e-8)
        for a, b in zip(sh_losses[i], ref_losses[i]):
            assert abs(a - b) <= 4 * 2.0 ** -23 * abs(b), (i, a, b)
    assert sum(r.restarts for r in ref) >= 1  # the restart path was exercised
    lens = [len(t) for t in toks]
    got = decode(lm, torch.stack([s.vectors for s in sharded]), lens, mode=fmode, shared_m=shared)
    want = decode(lm, torch.stack([r.vectors for r in ref]), lens, mode=fmode, shared_m=shared)
    assert got == want
