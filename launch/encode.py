"""``ray job submit`` entrypoint for an encoding job.

    ray job submit --address http://HEAD:8265 --working-dir . -- \\
        python -m launch.encode --model smollm2 --input texts.jsonl --output /shared/out --workers 16

Inside ``ray job submit`` Ray sets ``RAY_ADDRESS`` and the job connects to that cluster; run directly, it
starts a local Ray. Same options as ``scalerec encode`` (``--help``); rerunning the same command resumes.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from scalerec.llm import commands

    parser = argparse.ArgumentParser(prog="python -m launch.encode")
    sub = parser.add_subparsers(dest="command")
    commands.add_parser(sub)
    args = parser.parse_args(["encode", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
