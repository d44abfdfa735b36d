"""``scalerec encode --estimate``: the expected exact rate and seconds per text of a file, before fitting.

A calibration is the figures ``benchmarks/llm_defaults.py --calibration-out`` measured for the default settings (the
length rule and the escalation ladder, scalerec/llm/schedule.py) on held-out passages of a model: per mode and text
length, the texts fitted, how many greedy decoding reproduced exactly and the mean seconds per text, with the
machine and command they came from. The bundled ones live in ``scalerec/llm/calibration/<model>.json``.

The estimate of a text of N tokens interpolates linearly between the two calibrated lengths around N (the nearest one
below the smallest); above the largest calibrated length there is no figure: such texts are counted as
``uncalibrated``, never guessed. Seconds are those of the calibration's machine and threads.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

CALIBRATION_DIR = Path(__file__).resolve().parent / "calibration"


def calibration_path(model_name: str) -> Path:
    return CALIBRATION_DIR / (model_name.replace("/", "_").replace(os.sep, "_") + ".json")


def write_calibration(path: str | os.PathLike, model: str, cells: list[dict], source: str,
                      date: str | None = None) -> dict:
    """Merge benchmark cells (``mode``, ``n_tokens``, ``texts``, ``exact``, ``mean_seconds_per_text``, ``mean_steps``)
    into the calibration file at ``path`` (a cell replaces the same mode and length of an earlier run)."""
    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() else {"model": model, "figures": {}}
    if data.get("model") != model:
        raise ValueError(f"{p}: a calibration of {data.get('model')!r}, not {model!r}")
    stamp = {"source": source, "date": date or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "machine": f"{_cpu_name()}, {os.cpu_count()} cores"}
    for c in cells:
        data["figures"].setdefault(c["mode"], {})[str(c["n_tokens"])] = {
            "texts": c["texts"], "exact": c["exact"], "seconds_per_text": c["mean_seconds_per_text"],
            "steps_per_text": c["mean_steps"], **stamp}
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def load_calibration(model_name: str, path: str | os.PathLike | None = None) -> dict:
    p = Path(path) if path else calibration_path(model_name)
    if not p.exists():
        raise FileNotFoundError(f"no calibration for model {model_name!r} ({p}); measure one with "
                                f"`python benchmarks/llm_defaults.py --model … --calibration-out {p}`")
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("figures"), dict):
        raise ValueError(f"{p}: not a calibration file (a 'figures' object expected)")
    return data


def _point(fig: dict, n: int) -> tuple[float, float] | None:
    """(exact rate, seconds per text) at ``n`` tokens from one mode's figures, or None above the calibrated range."""
    pts = sorted((int(k), v["exact"] / v["texts"], float(v["seconds_per_text"])) for k, v in fig.items() if v["texts"])
    if not pts or n > pts[-1][0]:
        return None
    if n <= pts[0][0]:
        return pts[0][1], pts[0][2]
    for (n0, r0, s0), (n1, r1, s1) in zip(pts, pts[1:]):
        if n0 <= n <= n1:
            w = (n - n0) / (n1 - n0)
            return r0 + w * (r1 - r0), s0 + w * (s1 - s0)
    return None


def estimate(calibration: dict, mode: str, lengths: list[int | None]) -> dict:
    """The expected outcome of a job over texts of these token counts (None: a record that will fail), overall and
    by length bucket (scalerec.llm.schedule.length_bucket)."""
    from .schedule import length_bucket

    fig = calibration["figures"].get(mode)
    if not fig:
        raise ValueError(f"the calibration of {calibration.get('model')!r} has no figures for mode {mode!r} "
                         f"(has: {sorted(calibration['figures'])})")
    buckets: dict[str, dict] = {}
    tot = {"texts": 0, "failed": 0, "uncalibrated": 0, "expected_exact": 0.0, "expected_seconds": 0.0}
    for n in lengths:
        b = buckets.setdefault(length_bucket(n), {"texts": 0, "failed": 0, "uncalibrated": 0, "expected_exact": 0.0,
                                                 "expected_seconds": 0.0})
        for d in (b, tot):
            d["texts"] += 1
        pt = None if n is None else _point(fig, n)
        if n is None:
            for d in (b, tot):
                d["failed"] += 1
        elif pt is None:
            for d in (b, tot):
                d["uncalibrated"] += 1
        else:
            for d in (b, tot):
                d["expected_exact"] += pt[0]
                d["expected_seconds"] += pt[1]
    for d in list(buckets.values()) + [tot]:
        k = d["texts"] - d["failed"] - d["uncalibrated"]
        d["calibrated"] = k
        d["expected_exact_rate"] = round(d["expected_exact"] / k, 3) if k else None
        d["expected_seconds_per_text"] = round(d["expected_seconds"] / k, 1) if k else None
        d["expected_exact"] = round(d["expected_exact"], 2)
        d["expected_seconds"] = round(d["expected_seconds"], 1)
    calibrated = sorted(int(k) for k in fig)
    return {"mode": mode, "model": calibration.get("model"), "calibrated_lengths": calibrated,
            "calibration_texts": {n: fig[str(n)]["texts"] for n in calibrated}, **tot,
            "by_length": dict(sorted(buckets.items(), key=lambda kv: _bucket_order(kv[0])))}


def _bucket_order(name: str) -> int:
    if name == "unknown":
        return 10 ** 9
    return int(name.lstrip(">").split("-")[0])
