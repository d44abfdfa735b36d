"""Encoding jobs: input validation, the Ray job contract (every text once, resume), the CLI, the real-model path."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_llm_common import ROOT, lm, passage_ids, tiny_model_dir  # noqa: F401  (lm is a fixture)

from scalerec.llm.jobs import JobSpec, read_outputs, read_records, run_job, shard_path


def _write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny(lm, tmp_path_factory):
    return tiny_model_dir(lm, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_read_records_names_file_line_and_field(tmp_path):
    p = _write_jsonl(tmp_path / "in.jsonl", [
        json.dumps({"id": "a", "text": "Hello there."}),
        "{not json",
        json.dumps({"id": "b"}),
        json.dumps({"id": "c", "text": ""}),
        json.dumps({"id": "d", "text": 7}),
        "",
        json.dumps({"id": "a", "text": "again"}),
        json.dumps(["x"]),
    ])
    recs = read_records(p)
    assert [r.id for r in recs] == ["a", "line-2", "b", "c", "d", "a", "line-8"]
    errs = {r.source: r.error for r in recs}
    assert errs["in.jsonl:1"] is None
    assert "in.jsonl:2" in errs["in.jsonl:2"] and "malformed JSON" in errs["in.jsonl:2"]
    assert "in.jsonl:3" in errs["in.jsonl:3"] and "missing field 'text'" in errs["in.jsonl:3"]
    assert "'text' is empty" in errs["in.jsonl:4"]
    assert "not a string" in errs["in.jsonl:5"]
    assert "duplicate id 'a'" in errs["in.jsonl:7"] and "in.jsonl:1" in errs["in.jsonl:7"]
    assert "expected a JSON object" in errs["in.jsonl:8"]
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="unknown input format"):
        read_records(_write_jsonl(tmp_path / "in.txt", ["x"]))


def _texts(n: int) -> list[str]:
    words = (ROOT / "data" / "text" / "tinyshakespeare_head.txt").read_text().split()
    return [" ".join(words[5 * i: 5 * i + 3 + i % 4]) for i in range(n)]


def test_job_two_workers_writes_every_text_once_and_records_failures(tiny, ray_local, tmp_path):
    texts = _texts(9)
    lines = [json.dumps({"id": f"t{i}", "text": t}) for i, t in enumerate(texts)]
    lines.insert(3, "{broken")
    lines.insert(6, json.dumps({"id": "empty", "text": "  "}))
    lines.insert(8, json.dumps({"id": "long", "text": " ".join(["word"] * 200)}))  # > 48 positions
    inp = _write_jsonl(tmp_path / "in.jsonl", lines)
    spec = JobSpec(model=str(tiny), input=str(inp), output=str(tmp_path / "out"), shard_size=3, batch_size=2,
                   workers=2, fit={"max_steps": 3}, max_attempts=1)
    summary = run_job(spec, progress=False)
    assert summary["shards"] == 4 and summary["written"] == 4 and summary["texts"] == 12
    rows = read_outputs(tmp_path / "out")
    assert len(rows) == 12
    assert len({r["id"] for r in rows}) == 12
    ok = {r["id"]: r for r in rows if r["status"] == "ok"}
    assert set(ok) == {f"t{i}" for i in range(9)}
    for i, t in enumerate(texts):
        r = ok[f"t{i}"]
        assert r["text"] == t and r["n_tokens"] == len(r["token_ids"]) > 0
        assert len(r["vectors"]) == 2 and len(r["vectors"][0]) == 32
        assert r["steps"] <= 3 + 100 and r["seconds"] > 0 and 0.0 <= r["accuracy"] <= 1.0  # + the polish
        assert r["attempts"] == 1 and r["stop_reason"] in ("exact", "ladder_end")
    failed = {r["id"]: r["error"] for r in rows if r["status"] == "failed"}
    assert all(r["stop_reason"] == "input_error" and r["attempts"] == 0 for r in rows if r["status"] == "failed")
    assert "malformed JSON" in failed["line-4"] and "in.jsonl:4" in failed["line-4"]
    assert "is empty" in failed["empty"]
    assert "exceed the model context of 48" in failed["long"]
    # a rerun finds everything done and fits nothing
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*.parquet")}
    again = run_job(spec, progress=False)
    assert again["written"] == 0 and again["skipped"] == 4
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out").glob("shard-*.parquet")} == mtimes
    # other settings on the same folder are refused, not mixed in
    other = JobSpec(**{**spec.__dict__, "fit": {"max_steps": 4}})
    with pytest.raises(ValueError, match="other settings"):
        run_job(other, progress=False)


def test_killed_job_resumes_without_refitting(tiny, tmp_path):
    """Kill the `scalerec encode` process (SIGKILL) once its first shard is written; the rerun does the rest."""
    inp = _write_jsonl(tmp_path / "in.jsonl", [json.dumps({"id": f"t{i}", "text": t}) for i, t in enumerate(_texts(8))])
    out = tmp_path / "out"
    # a fixed budget of 300 steps per text (the target accuracy is unreachable) keeps each shard busy a while
    cmd = [sys.executable, "-m", "scalerec.cli", "encode", "--model", str(tiny), "--input", str(inp), "--output",
           str(out), "--shard-size", "2", "--workers", "1", "--max-steps", "300", "--fit", "target_accuracy=1.01", "--max-attempts",
           "1", "--no-progress", "--json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not shard_path(out, 0).exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no shard written in 120 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    first = sorted(out.glob("shard-*.parquet"))
    assert 1 <= len(first) < 4, "the job should have been killed part way"
    kept = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in first}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["skipped"] == len(first) and summary["written"] == 4 - len(first)
    for p in first:  # finished shards untouched
        assert (p.stat().st_mtime_ns, p.read_bytes()) == kept[p.name]
    rows = read_outputs(out)
    assert sorted(r["id"] for r in rows) == sorted(f"t{i}" for i in range(8))
    assert not list(out.glob(".*tmp*"))


def test_job_and_decode_on_smollm2(lm, tmp_path):
    """The real path: `scalerec encode` fits SmolLM2 inside a Ray worker; `scalerec decode` reproduces the texts.

    Passage 1 is the hard one: the GGUF tokenizer splits its "\\n\\n" into two "\\n" tokens."""
    from scalerec.cli import main

    texts = [lm.decode_ids(passage_ids(lm, 8, i)) for i in (0, 1, 2)]
    assert "\n\n" in texts[1]
    inp = _write_jsonl(tmp_path / "in.jsonl", [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)])
    out = tmp_path / "out"
    assert main(["encode", "--model", "smollm2", "--input", str(inp), "--output", str(out), "--workers", "1",
                 "--threads", "1", "--no-progress", "--json"]) == 0
    rows = read_outputs(out)
    assert [r["status"] for r in rows] == ["ok"] * 3 and all(r["accuracy"] == 1.0 for r in rows)
    assert all(r["exact"] and r["stop_reason"] == "exact" and r["decoded_accuracy"] == 1.0 for r in rows)
    assert all(r["model"] == "smollm2" for r in rows)
    import io
    from contextlib import redirect_stdout

    from scalerec.llm import commands

    commands._LOADED[("smollm2", None, None)] = lm  # reuse the session's copy instead of loading again
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["decode", "--input", str(out), "--json"]) == 0
    summary = json.loads(buf.getvalue().strip().splitlines()[-1])
    assert summary["decoded"] == 3 and summary["exact_match_tokens"] == 1.0
    assert summary["by_length"] == {"1-16": {"exact": 3, "not_exact": 0, "failed": 0}}


def test_mixed_length_job_returns_every_row_with_its_status(tiny, ray_local, tmp_path):
    """Texts of 3 to 40 tokens and a bad line in one job: every record comes back once, with its attempts and why
    its fitting stopped; the summary counts exact / not exact / failed by length bucket."""
    from scalerec.llm.schedule import length_bucket

    words = (ROOT / "data" / "text" / "tinyshakespeare_head.txt").read_text().split()
    texts = [" ".join(words[:2]), " ".join(words[10:26]), " ".join(words[30:55])]  # 3, 23, 38 tokens
    lines = [json.dumps({"id": f"t{i}", "text": t}) for i, t in enumerate(texts)] + ["{broken"]
    inp = _write_jsonl(tmp_path / "in.jsonl", lines)
    spec = JobSpec(model=str(tiny), input=str(inp), output=str(tmp_path / "out"), shard_size=2, batch_size=2,
                   fit={"max_steps": 2, "polish_steps": 0})
    summary = run_job(spec, progress=False)
    rows = {r["id"]: r for r in read_outputs(tmp_path / "out")}
    assert sorted(rows) == ["line-4", "t0", "t1", "t2"]
    assert rows["line-4"]["status"] == "failed" and rows["line-4"]["stop_reason"] == "input_error"
    want: dict = {}
    for i in range(3):
        r = rows[f"t{i}"]
        assert r["status"] == "ok" and r["stop_reason"] in ("exact", "ladder_end")
        assert r["attempts"] == len(r["attempt_log"]) >= 1
        assert [a["attempt"] for a in r["attempt_log"]] == list(range(1, r["attempts"] + 1))
        assert r["steps"] == sum(a["steps"] for a in r["attempt_log"])
        assert r["exact"] == r["attempt_log"][-1]["exact"] == (r["stop_reason"] == "exact")
        if not r["exact"]:  # missed every rung: all three were tried
            assert r["attempts"] == 3 and r["decoded_accuracy"] < 1.0
        c = want.setdefault(length_bucket(r["n_tokens"]), {"exact": 0, "not_exact": 0, "failed": 0})
        c["exact" if r["exact"] else "not_exact"] += 1
    want["unknown"] = {"exact": 0, "not_exact": 0, "failed": 1}
    assert len({length_bucket(rows[f"t{i}"]["n_tokens"]) for i in range(3)}) == 3  # three length buckets
    assert summary["by_length"] == want
    assert summary["exact"] + summary["not_exact"] + summary["failed"] == 4


def test_encode_estimate_fits_nothing(lm, tmp_path):
    """`scalerec encode --estimate`: the expected exact rate and seconds from a calibration, no fitting, no output."""
    import io
    from contextlib import redirect_stdout

    from scalerec.cli import main
    from scalerec.llm import commands
    from scalerec.llm.estimate import write_calibration

    cal = tmp_path / "cal.json"
    write_calibration(cal, "smollm2", [
        {"mode": "one-step", "n_tokens": 8, "texts": 2, "exact": 2, "mean_seconds_per_text": 10.0, "mean_steps": 30},
        {"mode": "one-step", "n_tokens": 16, "texts": 2, "exact": 1, "mean_seconds_per_text": 30.0, "mean_steps": 90}],
        source="test")
    texts = [lm.decode_ids(passage_ids(lm, n, 0)) for n in (8, 12, 40)]
    lines = [json.dumps({"id": i, "text": t}) for i, t in enumerate(texts)] + ["{broken"]
    inp = _write_jsonl(tmp_path / "in.jsonl", lines)
    commands._LOADED[("smollm2", None, None)] = lm
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["encode", "--model", "smollm2", "--input", str(inp), "--output", str(tmp_path / "out"),
                     "--estimate", "--calibration", str(cal), "--json"]) == 0
    est = json.loads(buf.getvalue().strip().splitlines()[-1])
    n12 = len(lm.encode(texts[1]))
    rate12 = 1.0 - 0.5 * (n12 - 8) / 8
    assert est["texts"] == 4 and est["failed"] == 1 and est["uncalibrated"] == 1 and est["calibrated"] == 2
    assert est["expected_exact"] == pytest.approx(1.0 + rate12, abs=0.01)
    assert est["by_length"]["33-48"]["uncalibrated"] == 1
    assert not (tmp_path / "out").exists()
