"""Entry point for real training runs: ``python -m launch.train CONFIG [key=value ...]``.

With ``RAY_ADDRESS`` set (``ray job submit`` sets it) the run joins that cluster; without it a local Ray is
started in-process (the embedded default). ``trainer.workers=1`` trains in one process with the same config.
The last line printed is one JSON object with the final metrics, so a job's logs hold them.

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env-json '{"excludes": [".git", ".venv", "data", "runs", "checkpoints"]}' \\
        -- python -m launch.train launch/configs/beauty_distributed.yaml trainer.epochs=2
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.train", description=__doc__.splitlines()[0])
    p.add_argument("config", help="YAML config (see launch/configs/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.workers=2")
    args = p.parse_args(argv)
    from scalerec.train.ray_trainer import ScaleOutConfigError, load_scaleout_config, run_distributed

    try:
        cfg = load_scaleout_config(args.config, args.overrides)
    except (ValueError, FileNotFoundError) as exc:
        print(f"launch.train: error: {exc}", file=sys.stderr)
        return 2
    try:
        if int(cfg.trainer.workers) > 1 or cfg.scaleout.ray.address:
            result = run_distributed(cfg)
        else:
            from scalerec.train.loop import train

            result = train(cfg)
    except ScaleOutConfigError as exc:
        print(f"launch.train: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"final": result}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
