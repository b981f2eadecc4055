"""`ptm experiment CONFIG.toml`: run the CFT / RT / PTM study end to end (resumable), write the report."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "experiment",
        help="run the CFT/RT/PTM study of a TOML config and report it",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("config", help="experiment TOML (e.g. configs/experiments/quick.toml)")
    p.add_argument(
        "--results-dir",
        default=None,
        help="where runs, scores and the report go (default: the config's results_dir, else results/<name>)",
    )
    p.add_argument("--check", action="store_true", help="only parse and check the config, print the plan")
    p.add_argument("--progress", action="store_true", help="show per-step training progress bars")
    p.set_defaults(func=run_experiment_cmd)


def run_experiment_cmd(args) -> int:
    from ptm.experiment.config import load
    from ptm.experiment.plan import plan_runs
    from ptm.experiment.runner import Experiment
    from ptm.parallel import distributed, sync

    distributed.initialize()  # first: on a slice every worker runs this same command (one SPMD program)
    cfg = load(args.config, args.results_dir)
    if args.check:
        print(f"{cfg.source}: ok; results in {cfg.results_dir}")
        for r in plan_runs(cfg):
            srcs = ", ".join(f"{s.name}[{s.max_examples or 'all'}]" for s in r.sources)
            print(f"  train {r.id:<28} {r.kind:<8} {srcs}  init={r.init}")
        return 0
    res = Experiment(cfg, progress=args.progress and sync.is_writer()).run()
    if not sync.is_writer():
        return 0
    from ptm.experiment.report import headline

    print(f"{cfg.results_dir}/tables.md")
    print(headline(res))
    return 0
