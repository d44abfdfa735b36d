"""``ray job submit`` entrypoint for an encoding job.

    RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 ray job submit --address http://HEAD:8265 \\
        --runtime-env launch/runtime_env.yaml -- \\
        python -m launch.encode --model smollm2 --input texts.jsonl --output /shared/out --workers 16

Inside ``ray job submit`` Ray sets ``RAY_ADDRESS`` and the job connects to that cluster; run directly, it
starts a local Ray. Same options as ``scalerec encode`` (``--help``); rerunning the same command resumes.
Joining a cluster with token authentication on (``--address HOST:6379`` or ``RAY_ADDRESS``) that refuses this
process ends with one line naming the variables to set (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``); jobs from
``ray job submit`` inherit the head's and need none. The cluster recipe: docs/scaleout.md.
"""
from __future__ import annotations

import argparse
import os
import sys

from launch.cluster_auth import refusal, refusal_in


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # the cluster check comes before importing the encoder (~10 s of torch/transformers on 2 busy cores)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--address", default=None)
    pre.add_argument("--estimate", action="store_true")
    pre.add_argument("-h", "--help", action="store_true")
    known, _ = pre.parse_known_args(argv)
    address = known.address or os.environ.get("RAY_ADDRESS", "")
    refused = None if known.estimate or known.help else refusal(address)  # a cluster wanting a token we lack
    if refused:
        print(f"launch.encode: error: {refused}", file=sys.stderr)
        return 2
    from scalerec.llm import commands

    parser = argparse.ArgumentParser(prog="python -m launch.encode")
    sub = parser.add_subparsers(dest="command")
    commands.add_parser(sub)
    args = parser.parse_args(["encode", *argv])
    try:
        return int(args.func(args) or 0)
    except Exception as exc:
        refused = refusal_in(exc, address) if address else None
        if not refused:
            raise
        print(f"launch.encode: error: {refused}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
