"""`ptm toy OUT_DIR [--seed N] [--size NAME=N ...]`: generate the built-in toy suite (also
`python -m ptm.toy OUT_DIR ...`). The toy checkpoint pool is `ptm search build-pool`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ptm.errors import ConfigError


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ptm.toy.suite import DEFAULT_SIZES

    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", action="append", default=[], metavar="NAME=N",
                   help=f"override a size ({', '.join(f'{k}={v}' for k, v in DEFAULT_SIZES.items())})")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("toy", help="generate the built-in toy skill suite (docs/toy-suite.md)",
                       description="Generate the built-in toy suite.")
    add_arguments(p)
    p.set_defaults(func=generate)


def parse_sizes(specs: list[str]) -> dict[str, int]:
    sizes = {}
    for s in specs:
        k, sep, v = s.partition("=")
        if not sep or not v.strip().isdigit():
            raise ConfigError(f"--size {s!r}: expected NAME=N")
        sizes[k.strip()] = int(v)
    return sizes


def generate(args: argparse.Namespace) -> int:
    """Write the suite and list its files with their record counts."""
    from ptm.toy.suite import generate_suite

    manifest = generate_suite(args.out_dir, seed=args.seed, sizes=parse_sizes(args.size))
    for path, n in manifest["counts"].items():
        print(f"{n:6d}  {Path(args.out_dir) / path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ptm.errors import PtmError

    p = argparse.ArgumentParser(prog="python -m ptm.toy", description="Generate the built-in toy suite.")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return generate(args)
    except PtmError as e:
        print(f"ptm.toy: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
