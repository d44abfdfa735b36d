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
    # 4 logical CPUs: the module's tiny_group holds 2 actors while a job test starts 2 more (with 2, the job's
    # actors waited for CPUs forever: a hang in the full suite)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _token_lists(n: int, length, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = [length] * n if isinstance(length, int) else length
    return [torch.randint(3, TINY["vocab_size"], (ln,), generator=g).tolist() for ln in lens]


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
def test_sharded_fit_equals_unsharded_float64(tiny_group, mode):
    """2 gloo ranks, model partitioned: per-step losses, vectors and decoded ids = the unsharded fit (float64)."""
    from scalerec.llm.decoding import decode
    from scalerec.llm.sharded import reference_fit
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
        sub, sub_losses = reference_fit(lm, toks[r::2], fmode, n_vec, cfg, shared)
        for j, i in enumerate(range(r, 4, 2)):
            assert sharded[i].steps == sub[j].steps and len(sh_losses[i]) == sharded[i].steps
            assert max(abs(a - b) for a, b in zip(sh_losses[i], sub_losses[j])) <= 1e-8
            torch.testing.assert_close(sharded[i].vectors, sub[j].vectors, rtol=0, atol=1e-8)
    # all four in one unsharded batch (other padding): the same fit; the reported loss is a float32 mean over
    # the padded row, whose summation order follows the padding: measured 1-2 float32 ulps (9.5e-7 at 4.5)
    ref, ref_losses = reference_fit(lm, toks, fmode, n_vec, cfg, shared)
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


# ----------------------------------------------------------------------------------------------
# the job contract in sharded mode

def _char_tokenizer_config(folder, max_positions: int = 40):
    """A config-only tiny Llama with a character-level tokenizer beside its config.json (no model download)."""
    import json
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>"] + sorted(set(string.printable) - set("\x0b\x0c")))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    cfg = {**TINY, "vocab_size": len(vocab), "max_position_embeddings": max_positions}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _jsonl(path, lines):
    import json

    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return path


WORDS = "to be or not to be that is the question whether tis nobler in the mind to suffer".split()


def _texts(n):
    return [" ".join(WORDS[i % 7: i % 7 + 2 + i % 3]) for i in range(n)]


@pytest.fixture(scope="module")
def char_model(tmp_path_factory):
    return _char_tokenizer_config(tmp_path_factory.mktemp("cfg") / "tiny")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["one-step", "ar", "shared-m"])
def test_sharded_job_every_text_once_failures_and_rerun(ray_local, char_model, tmp_path, mode):
    import numpy as np

    from scalerec.llm.jobs import JobSpec, read_outputs
    from scalerec.llm.sharded_job import run_sharded_job

    texts = _texts(7)
    lines = [{"id": f"t{i}", "text": t} for i, t in enumerate(texts)]
    lines.insert(2, "{broken")
    lines.insert(5, {"id": "long", "text": "x" * 60})  # 60 characters: beyond the 40-position context
    inp = _jsonl(tmp_path / "in.jsonl", lines)
    shared = None
    if mode == "shared-m":
        shared = tmp_path / "m.npy"
        np.save(shared, np.random.default_rng(0).normal(size=32).astype(np.float32))
    spec = JobSpec(model=None, input=str(inp), output=str(tmp_path / "out"), mode="ar" if mode == "ar" else "one-step",
                   shard_size=3, batch_size=2, workers=2, fit={"max_steps": 4}, shared_m=str(shared) if shared else None)
    summary = run_sharded_job(spec, model_config=str(char_model), seed=1)
    assert summary["shards"] == 3 and summary["written"] == 3 and summary["texts"] == 9
    rows = read_outputs(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == sorted([f"t{i}" for i in range(7)] + ["line-3", "long"])
    ok = {r["id"]: r for r in rows if r["status"] == "ok"}
    assert set(ok) == {f"t{i}" for i in range(7)}
    n_vec = {"one-step": 2, "ar": 1, "shared-m": 1}[mode]
    for i, t in enumerate(texts):
        r = ok[f"t{i}"]
        assert r["text"] == t and r["n_tokens"] == len(t) and r["steps"] <= 4
        assert len(r["vectors"]) == n_vec and len(r["vectors"][0]) == 32
        assert r["model"].startswith("config:")
    failed = {r["id"]: r["error"] for r in rows if r["status"] == "failed"}
    assert "in.jsonl:3" in failed["line-3"] and "malformed JSON" in failed["line-3"]
    assert "in.jsonl:6" in failed["long"] and "exceed the model context of 40" in failed["long"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*.parquet")}
    again = run_sharded_job(spec, model_config=str(char_model), seed=1)
    assert again["written"] == 0 and again["skipped"] == 3
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*.parquet")} == mtimes


@pytest.mark.slow
def test_sharded_job_killed_rank_resumes_every_text_once(ray_local, char_model, tmp_path):
    """Rank 1 SIGKILLs itself right after writing its first shard: the group is re-formed and the job completes;
    the shards written before the kill are not rewritten, every text is in exactly one row."""
    from scalerec.llm.jobs import JobSpec, read_outputs
    from scalerec.llm.sharded_job import run_sharded_job

    inp = _jsonl(tmp_path / "in.jsonl", [{"id": f"t{i}", "text": t} for i, t in enumerate(_texts(8))])
    spec = JobSpec(model=None, input=str(inp), output=str(tmp_path / "out"), shard_size=2, batch_size=1,
                   workers=2, fit={"max_steps": 3})
    summary = run_sharded_job(spec, model_config=str(char_model), kill_rank=(1, 1))
    assert summary["attempts"] == 2 and summary["written"] == 4
    first, second = summary["written_by_attempt"]
    assert len(first) >= 1 and set(first).isdisjoint(second) and sorted(first + second) == [0, 1, 2, 3]
    rows = read_outputs(tmp_path / "out")
    assert sorted(r["id"] for r in rows) == sorted(f"t{i}" for i in range(8))
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_sharded_bad_input_one_clear_error(ray_local, char_model, tmp_path):
    from scalerec.llm.jobs import JobSpec
    from scalerec.llm.sharded_job import run_sharded_job

    inp = _jsonl(tmp_path / "in.jsonl", [{"id": "a", "text": "to be"}])
    spec = JobSpec(model=str(tmp_path / "nothing-here"), input=str(inp), output=str(tmp_path / "out"), workers=2)
    with pytest.raises(ValueError, match="nothing-here: neither a model file"):
        run_sharded_job(spec)
    with pytest.raises(FileNotFoundError, match="nope.json: neither a model config file"):
        run_sharded_job(spec, model_config=str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"model_type": "gpt2"}')
    with pytest.raises(ValueError, match="bad.json: field 'model_type' is 'gpt2'"):
        run_sharded_job(spec, model_config=str(bad))
    many = JobSpec(**{**spec.__dict__, "model": None, "workers": 5})
    with pytest.raises(ValueError, match="--workers 5 × --threads 1 need 5 CPUs, the Ray cluster has 4"):
        run_sharded_job(many, model_config=str(char_model))


def test_sharded_fit_text_longer_than_context_stops_every_rank(tiny_group):
    """A text beyond the context on one rank: that rank names it, the other stops too (no rank hangs)."""
    from scalerec.llm.sharded_job import fit_on_group

    actors, _ = tiny_group
    toks = _token_lists(2, [6, 45])  # the context is 40 positions
    with pytest.raises(ray.exceptions.RayTaskError, match="rank 1: text 0: 45 tokens .* exceed the model context"):
        fit_on_group(actors, toks, "one-step", 2, FitConfig(max_steps=2), batch_size=1)
    # the group is still usable afterwards
    res, _ = fit_on_group(actors, _token_lists(2, 5), "one-step", 2, FitConfig(max_steps=2), batch_size=1)
    assert [r.steps for r in res] == [2, 2]
