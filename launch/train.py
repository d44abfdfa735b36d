"""Entry point for real training runs: ``python -m launch.train CONFIG [key=value ...]``.

With ``RAY_ADDRESS`` set (``ray job submit`` sets it) the run joins that cluster; without it a local Ray is
started in-process (the embedded default). ``trainer.workers=1`` trains in one process with the same config.
The last line printed is one JSON object with the final metrics, so a job's logs hold them. Joining a
cluster with token authentication on that refuses this process ends with one line naming the variables to
set (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``); jobs from ``ray job submit`` inherit the head's and need none.

    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 ray job submit --address http://HEAD:8265 \\
        --runtime-env launch/runtime_env.yaml \\
        -- python -m launch.train launch/configs/beauty_distributed.yaml data.path=/shared/Beauty.txt

(the cluster recipe with authentication: docs/scaleout.md)
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from launch.cluster_auth import refusal, refusal_in


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML config (see launch/configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.workers=2")
    args = p.parse_args(argv)
    from scalerec.train.config import load_config
    from scalerec.train.run import RunConfigError, train

    try:
        cfg = load_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"launch.train: error: {exc}", file=sys.stderr)
        return 2
    on_ray = int(cfg.trainer.workers) > 1 or bool(str(cfg.scaleout.ray.address))
    address = str(cfg.scaleout.ray.address) or os.environ.get("RAY_ADDRESS", "")
    refused = refusal(address) if on_ray else None  # a cluster that wants a token this process lacks
    if refused:
        print(f"launch.train: error: {refused}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)  # trainer.workers > 1 or a Ray address: Ray Train workers; else this process
    except RunConfigError as exc:
        print(f"launch.train: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        refused = refusal_in(exc, address) if on_ray and address else None
        if not refused:
            raise
        print(f"launch.train: error: {refused}", file=sys.stderr)
        return 2
    print(json.dumps({"final": result}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
