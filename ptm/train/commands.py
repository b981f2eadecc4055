"""`ptm train`: gin-configured training (t5x style flags)."""

from __future__ import annotations

import argparse

from ptm.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (pretrain / sft / skill / cft / rt) from gin files",
        description="Train from gin files. Example: ptm train --gin_file=models/tiny.gin --gin_file=meshes/cpu.gin "
        "--gin_file=runs/sft.gin --gin.TRAIN_DATA=\"'data.jsonl'\" --run_dir=runs/x. Extra --gin.NAME=VALUE "
        "flags are gin bindings; later files and flags win.",
    )
    p.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable; searched in gin/)")
    p.add_argument("--run_dir", help="shorthand for --gin.train.run_dir='...'")
    p.add_argument("--print_config", action="store_true", help="print the operative config and exit")
    p.add_argument("--seqio_module", action="append", default=[], metavar="MODULE",
                   help="Python module registering seqio Tasks/Mixtures, imported before training (repeatable; "
                   "needs the `seqio` extra; same as DataConfig.seqio_modules)")
    p.set_defaults(func=run, _accepts_gin=True)


def run(args: argparse.Namespace) -> int:
    import gin
    from ptm import config

    bindings = list(getattr(args, "gin_bindings", []))
    if args.run_dir:
        bindings.append(f"train.run_dir = {args.run_dir!r}")
    if not args.gin_file and not bindings:
        raise ConfigError(
            "no gin files or bindings given (try --gin_file=models/tiny.gin --gin_file=runs/sft.gin "
            "--gin_file=runs/toy.gin)"
        )
    config.parse(args.gin_file, bindings)
    configured = gin.get_configurable("train")
    if args.seqio_module:
        from ptm.data.seqio_source import import_modules

        import_modules(args.seqio_module)
    if args.print_config:
        print(gin.config_str())
        return 0
    try:
        result = configured(config_text=gin.config_str())
    except TypeError as e:
        if "run_dir" in str(e) or "data" in str(e):
            raise ConfigError(f"missing required binding: {e} (e.g. --run_dir, DataConfig.sources)") from e
        raise
    print(
        f"ptm train: done, {result.steps} steps, final loss {result.final_loss}, "
        f"{result.wall_seconds:.1f}s -> {result.run_dir}"
    )
    return 0
