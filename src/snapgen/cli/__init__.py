"""``snapgen`` command line. Thin: parses arguments and calls library functions.

Each command module (``generate``, ``train``, ``model``, ``search``, ``deploy``, ``data``, ``eval``) has a
``register(subparsers)`` that adds its commands; :func:`main` is the one place where errors become messages.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import data, deploy, generate, model, search, train
from . import eval as eval_

__all__ = ["build_parser", "main"]

# (module, its commands) in the order ``snapgen --help`` lists them; no names = all of the module's commands
_REGISTRY = [
    (model, ("info",)),
    (train, ("train", "distill")),
    (generate, ()),
    (eval_, ()),
    (model, ("extract", "combine-adapters")),
    (deploy, ("export", "quantize")),
    (train, ("consolidate",)),
    (deploy, ("bench",)),
    (data, ()),
    (train, ("plan",)),
    (search, ()),
]

# errors the library raises with a message for the user: one line, exit status 2, no traceback
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, TypeError, ImportError)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="snapgen", description="SnapGen++ diffusion transformers for edge devices")
    sub = parser.add_subparsers(dest="command", required=True)
    for module, names in _REGISTRY:
        module.register(sub, *names)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except USER_ERRORS as e:
        print(f"snapgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
