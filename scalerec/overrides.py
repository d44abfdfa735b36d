"""``KEY=VALUE`` settings from the command line (``--fit lr=0.01``, ``rece:n_buckets=32,rounds=3``).

A value is read as JSON when it parses (numbers, ``true``/``false``/``null``, lists) and kept as a string
otherwise (``schedule=cosine``).
"""
from __future__ import annotations

import json
from collections.abc import Iterable


def parse_key_values(items: Iterable[str], what: str = "--fit") -> dict:
    """``["lr=0.01", "schedule=cosine"]`` -> ``{"lr": 0.01, "schedule": "cosine"}``; ``what`` names the option in
    the error for an item without ``=``."""
    out: dict = {}
    for kv in items:
        key, eq, value = kv.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{what} {kv!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value.strip()
    return out
