"""The ``scalerec`` command.

Each subcommand lives next to the code it drives, in a module exposing ``add_parser(subparsers)``, which
registers the subcommand and sets ``func`` (called with the parsed args, returns an exit code). Modules are
imported lazily, so ``scalerec info`` does not pay for importing Ray or transformers.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module that defines it
COMMANDS: dict[str, str] = {
    "train": "scalerec.train.commands",
    "evaluate": "scalerec.train.commands",
    "plan": "scalerec.train.commands",
    "info": "scalerec.data.commands",
    "recommend": "scalerec.retrieval.commands",
    "encode": "scalerec.llm.commands",
    "decode": "scalerec.llm.commands",
    "llm-plan": "scalerec.llm.llm_plan",
    "finetune": "scalerec.peft.commands",
}


class UserError(Exception):
    """An error caused by the user's input (bad file, bad config); printed without a traceback."""


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="scalerec", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = None
    if argv:
        first = next((a for a in argv if not a.startswith("-")), None)
        if first in COMMANDS:
            wanted = COMMANDS[first]
    seen: set[str] = set()
    for module in dict.fromkeys(COMMANDS.values()):
        if wanted is not None and module != wanted:
            continue
        if module in seen:
            continue
        seen.add(module)
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name and module.startswith(exc.name):
                continue  # that part of scalerec is not installed / not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    from scalerec.extras import MissingExtra

    try:
        return int(args.func(args) or 0)
    except MissingExtra as exc:  # one line naming the extra to install
        print(exc, file=sys.stderr)
        return 1
    except (UserError, ValueError, FileNotFoundError) as exc:
        print(f"scalerec {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
