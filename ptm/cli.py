"""The `ptm` command: a thin layer over library functions (each area registers its own subcommands)."""

from __future__ import annotations

import argparse
import importlib
import sys

from ptm.errors import PtmError

# Each module has `register(subparsers)`; its subcommands set `func(args) -> int`.
_COMMAND_MODULES = [
    "ptm.train.commands",
    "ptm.merge.commands",
    "ptm.eval.commands",
    "ptm.search.commands",
    "ptm.toy.commands",
    "ptm.experiment.commands",
    "ptm.convert.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # area not present in this build
                continue
            raise
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from ptm.config import split_gin_flags

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        bindings, argv = split_gin_flags(argv)
    except PtmError as e:
        print(f"ptm: error: {e}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(argv)
    if bindings and not getattr(args, "_accepts_gin", False):
        print(f"ptm {args.command}: error: --gin.* flags are only accepted by `ptm train`", file=sys.stderr)
        return 2
    args.gin_bindings = bindings
    try:
        return int(args.func(args) or 0)
    except PtmError as e:
        print(f"ptm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ptm {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
