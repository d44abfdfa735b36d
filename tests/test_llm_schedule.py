"""The length rule and the escalation ladder (scalerec/llm/schedule.py), the estimate (scalerec/llm/estimate.py), on a
tiny float64 Llama: the rule's documented settings per length, escalation recorded attempt by attempt, the cost cap."""
from __future__ import annotations

import json

import pytest
import torch

from test_llm_static import tiny_lm

from scalerec.llm.fit_config import FitConfig
from scalerec.llm.schedule import LADDER, attempt_settings, encode_texts, length_bucket, rule_settings

# The table of docs/llm.md ("Defaults and escalation"): N -> (max_steps, restart_patience, grow_from, polish_steps,
# polish_max_wrong) of the first attempt.
DOC_ONE_STEP = {8: (400, 100, None, 100, 1), 16: (400, 100, None, 100, 1), 17: (600, 400, None, 200, 2),
                32: (600, 400, None, 200, 2), 48: (900, None, None, 300, 2), 64: (1200, None, None, 400, 3),
                96: (3000, None, None, 400, 3), 128: (3000, None, None, 400, 4), 300: (3000, None, None, 400, 4)}
DOC_AR = {16: (400, 100, None, 100, 1), 32: (1000, None, None, 200, 2), 48: (1500, None, 16, 400, 3),
          64: (2500, None, 16, 400, 3), 96: (3000, None, 16, 400, 4), 128: (3000, None, 16, 400, 4)}
KEYS = ("max_steps", "restart_patience", "grow_from", "polish_steps", "polish_max_wrong")


@pytest.mark.parametrize("mode,table", [("one-step", DOC_ONE_STEP), ("ar", DOC_AR)])
def test_rule_gives_the_documented_settings_per_length(mode, table):
    for n, want in table.items():
        s = attempt_settings(n, mode, 1)
        assert tuple(s[k] for k in KEYS) == want, (mode, n)
        assert s["seed"] == 0
        FitConfig(**s)  # every row is a valid config


def test_ladder_rungs_and_user_settings():
    # one-step, 64 tokens: rung 2 = a fresh seed, 1.5x the steps, warm growth from N/4; rung 3 = 2x, polish doubled
    s2, s3 = attempt_settings(64, "one-step", 2), attempt_settings(64, "one-step", 3)
    assert (s2["seed"], s2["max_steps"], s2["grow_from"], s2["polish_steps"]) == (1, 1800, 16, 400)
    assert (s3["seed"], s3["max_steps"], s3["grow_from"], s3["polish_steps"], s3["polish_max_wrong"]) == \
        (2, 2400, 16, 800, 6)
    # AR keeps its own growth curriculum; short texts get growth from 8
    assert attempt_settings(64, "ar", 2)["grow_from"] == 16
    assert attempt_settings(16, "one-step", 2)["grow_from"] == 8
    assert attempt_settings(8, "one-step", 2)["grow_from"] is None
    # the user's settings hold for every attempt; their seed is the base of the ladder's seeds
    for k in (1, 2, 3):
        s = attempt_settings(40, "one-step", k, {"max_steps": 77, "seed": 5, "lr": 0.01})
        assert (s["max_steps"], s["lr"], s["seed"]) == (77, 0.01, 5 + k - 1)
    # "fixed": FitConfig's own defaults (today's behaviour) at every length
    d = FitConfig()
    assert attempt_settings(64, "ar", 1, rule="fixed")["max_steps"] == d.max_steps == 400
    assert attempt_settings(64, "ar", 1, rule="fixed")["restart_patience"] == "auto"
    with pytest.raises(ValueError, match="attempt must be 1..3"):
        attempt_settings(16, "one-step", 4)
    with pytest.raises(ValueError, match="unknown rule"):
        attempt_settings(16, "one-step", 1, rule="nope")
    assert rule_settings(10_000, "one-step")["max_steps"] == 3000
    assert [length_bucket(n) for n in (1, 16, 17, 64, 65, 129, None)] == \
        ["1-16", "1-16", "17-32", "49-64", "65-96", ">128", "unknown"]


def _toks(*lengths):
    g = torch.Generator().manual_seed(3)
    return [torch.randint(2, 64, (n,), generator=g).tolist() for n in lengths]


def test_encode_uses_the_rule_budget_per_length():
    """Unreachable target, no polish, one attempt: each text spends exactly its length's budget (400 at 8, 600 at 20)."""
    lm = tiny_lm()
    res = encode_texts(lm, _toks(8, 20), "one-step", fit={"target_accuracy": 2.0, "polish_steps": 0}, max_attempts=1)
    assert [r.steps for r in res] == [400, 600]
    assert [len(r.attempts) for r in res] == [1, 1]


@pytest.mark.parametrize("mode", ["one-step", "ar"])
def test_missed_budget_is_escalated_and_every_attempt_recorded(mode):
    lm = tiny_lm()
    toks = _toks(12)
    # 2 steps a stage cannot fit 12 tokens: every rung is tried, and each attempt is recorded
    r = encode_texts(lm, toks, mode, fit={"max_steps": 2, "polish_steps": 0})[0]
    assert [a.attempt for a in r.attempts] == [1, 2, 3] and [a.rung for a in r.attempts] == [x.name for x in LADDER]
    assert r.attempts[0].steps == 2
    assert all(a.steps == 4 for a in r.attempts[1:])  # warm growth from 8: stages 8, 12 of 2 steps each
    assert r.stop_reason == "ladder_end" and not r.exact
    assert r.steps == sum(a.steps for a in r.attempts) and r.seconds == pytest.approx(sum(a.seconds for a in r.attempts))
    assert all(not a.exact and 0 <= a.decoded_accuracy < 1 for a in r.attempts)
    # the kept result is the best attempt's (by greedy decoding)
    assert r.decoded_accuracy == max(a.decoded_accuracy for a in r.attempts)
    # a text that greedy decoding reproduces after its first attempt stops there
    easy = encode_texts(lm, _toks(3), mode)[0]
    assert easy.exact and easy.stop_reason == "exact" and len(easy.attempts) == 1 and easy.decoded_accuracy == 1.0


def test_cost_cap_stops_escalation():
    lm = tiny_lm()
    toks = _toks(12, 12)
    capped = encode_texts(lm, toks, "one-step", fit={"max_steps": 2, "polish_steps": 0}, max_seconds_per_text=1e-6)
    assert [r.stop_reason for r in capped] == ["cost_cap"] * 2 and [len(r.attempts) for r in capped] == [1, 1]
    free = encode_texts(lm, toks, "one-step", fit={"max_steps": 2, "polish_steps": 0}, max_seconds_per_text=1e6)
    assert [len(r.attempts) for r in free] == [3, 3]
    with pytest.raises(ValueError, match="max_seconds_per_text"):
        encode_texts(lm, toks, "one-step", max_seconds_per_text=0)
    with pytest.raises(ValueError, match="max_attempts"):
        encode_texts(lm, toks, "one-step", max_attempts=4)


def test_polish_max_wrong_limits_which_texts_are_polished():
    lm = tiny_lm()
    toks = _toks(12)
    base = dict(max_steps=2, restart_patience=None, polish_steps=5)
    none = encode_texts(lm, toks, "one-step", fit={**base, "polish_max_wrong": 1}, max_attempts=1)[0]
    every = encode_texts(lm, toks, "one-step", fit={**base, "polish_max_wrong": None}, max_attempts=1)[0]
    assert none.decoded_accuracy < 11 / 12  # more than one token wrong: not polished
    assert none.steps == 2 and every.steps == 7
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="polish_max_wrong"):
            FitConfig(polish_max_wrong=bad)


def test_estimate_interpolates_and_refuses_to_guess(tmp_path):
    from scalerec.llm.estimate import estimate, load_calibration, write_calibration

    cells = [{"mode": "one-step", "n_tokens": 16, "texts": 4, "exact": 4, "mean_seconds_per_text": 10.0, "mean_steps": 100},
             {"mode": "one-step", "n_tokens": 32, "texts": 4, "exact": 2, "mean_seconds_per_text": 50.0, "mean_steps": 300}]
    p = write_calibration(tmp_path / "cal.json", "tiny", cells, source="test")
    cal = load_calibration("tiny", tmp_path / "cal.json")
    assert cal == p and json.loads((tmp_path / "cal.json").read_text())["figures"]["one-step"]["16"]["exact"] == 4
    est = estimate(cal, "one-step", [8, 24, 32, 40, None])
    assert est["calibration_texts"] == {16: 4, 32: 4}
    assert est["texts"] == 5 and est["failed"] == 1 and est["uncalibrated"] == 1 and est["calibrated"] == 3
    # 8 -> (1.0, 10 s), 24 -> (0.75, 30 s), 32 -> (0.5, 50 s)
    assert est["expected_exact"] == pytest.approx(2.25) and est["expected_seconds"] == pytest.approx(90.0)
    assert est["by_length"]["17-32"]["expected_exact_rate"] == pytest.approx(0.625)
    assert est["by_length"]["33-48"]["uncalibrated"] == 1 and est["by_length"]["unknown"]["failed"] == 1
    with pytest.raises(ValueError, match="no figures for mode 'ar'"):
        estimate(cal, "ar", [8])
    with pytest.raises(FileNotFoundError, match="no calibration for model 'other'"):
        load_calibration("other", tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not 'other'"):
        write_calibration(tmp_path / "cal.json", "other", cells, source="test")
