"""CLI: `ptm merge`, `ptm inspect`, `ptm diff` (thin wrappers over ptm.merge library functions)."""

from __future__ import annotations

import argparse

from ptm.errors import ConfigError


def _weight(s: str, flag: str = "--omega"):
    """A --omega value: a number, a comma list of numbers, or 'heuristic' (ConfigError naming the flag)."""
    if s == "heuristic":
        return s
    vals = []
    for v in s.split(","):
        try:
            vals.append(float(v))
        except ValueError:
            want = "a comma list of numbers" + (", a number or 'heuristic'" if flag == "--omega" else "")
            raise ConfigError(f"{flag} {s!r}: {v.strip()!r} is not a number (expected {want})") from None
    return vals[0] if len(vals) == 1 else vals


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("merge", help="merge checkpoints (TOML recipe or flags)")
    p.add_argument("recipe", nargs="?", help="a TOML recipe (configs/merges/*.toml) or a mergekit YAML config")
    p.add_argument(
        "--method", help="merge method (task_arithmetic, linear_interpolation, wise_ft, linear, ties, dare)"
    )
    p.add_argument("--pre", "--base", dest="pre")
    p.add_argument("--general")
    p.add_argument("--skill", action="append", dest="skills", help="repeat for several skills")
    p.add_argument("--cft")
    p.add_argument("--model", action="append", dest="models", help="repeat (linear soup)")
    p.add_argument("--omega", help="number, comma list (one per skill/model) or 'heuristic'")
    p.add_argument("--sweep", help="comma list of omegas: one output each, in one pass (--out needs {omega})")
    p.add_argument("--density", type=float)
    p.add_argument("--drop-rate", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--output-dtype")
    p.add_argument("--output-format", choices=["orbax", "safetensors"])
    p.add_argument("--allow-nonfinite", action="store_true")
    p.add_argument("--mergekit-compat", action="store_true",
                   help="mergekit's conventions (exact-k TIES and SCE select, '+' on a zero vote, L1 DARE rescale, "
                        "normalize=true)")
    p.add_argument("--out", help="output path (overrides the recipe's)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=merge_cmd)

    p = sub.add_parser("inspect", help="list a checkpoint's tensors (Orbax or safetensors)")
    p.add_argument("ckpt")
    p.set_defaults(func=inspect_cmd)

    p = sub.add_parser("diff", help="per-tensor/per-layer norms and cosine of two task vectors")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--base", help="the common base (task vectors A-base, B-base)")
    p.set_defaults(func=diff_cmd)


def recipes_from_args(args: argparse.Namespace):
    from ptm.merge import recipe as R

    if args.recipe and args.recipe.endswith((".yml", ".yaml")):
        from ptm.merge import mergekit_yaml

        rs = mergekit_yaml.load(args.recipe, out=args.out)
    elif args.recipe:
        rs = R.load(args.recipe)
    else:
        if not args.method:
            raise ConfigError("give a recipe file or --method with inputs")
        d = {
            "method": args.method,
            "inputs": {
                k: getattr(args, k) for k in ("pre", "general", "skills", "cft", "models") if getattr(args, k)
            },
        }
        if args.omega is not None:
            d["omega"] = _weight(args.omega)
        if args.sweep:
            d["sweep"] = _weight(args.sweep, "--sweep")
            d["sweep"] = d["sweep"] if isinstance(d["sweep"], list) else [d["sweep"]]
        if args.out:
            d["out"] = args.out
        rs = R.from_dict(d, where="command line")
    for r in rs:
        for k in ("density", "drop_rate", "seed", "output_dtype", "output_format"):
            v = getattr(args, k)
            if v is not None:
                setattr(r, k, v)
        if args.allow_nonfinite:
            r.allow_nonfinite = True
        if args.mergekit_compat:
            r.convention = "mergekit"
    if args.recipe and args.out:
        if len(rs) > 1:
            raise ConfigError("--out with a sweep recipe: put {omega} in the recipe's out instead")
        rs[0].out = args.out
    return rs


def merge_cmd(args: argparse.Namespace) -> int:
    from ptm.merge import engine
    from ptm.parallel.cluster_env import cluster_requested

    recipes = recipes_from_args(args)
    # On a multi-host slice every worker runs this same command: join the cluster and split each tensor over all
    # processes (each reads/writes its shard; process 0 commits). Single-process runs stay unsharded and do not
    # import jax at all (its start-up is 0.6-1 s, a tenth of a 1B merge).
    mesh = None
    if cluster_requested():
        import jax

        from ptm.parallel import distributed

        distributed.initialize()
        if jax.process_count() > 1:
            import numpy as np
            from jax.sharding import Mesh

            mesh = Mesh(np.array(jax.devices()), ("shard",))
    engine.merge(recipes, overwrite=args.overwrite, progress=not args.no_progress, mesh=mesh)
    return 0


def inspect_cmd(args: argparse.Namespace) -> int:
    from ptm.merge.inspect import format_inspect

    print(format_inspect(args.ckpt))
    return 0


def diff_cmd(args: argparse.Namespace) -> int:
    from ptm.merge.inspect import diff

    print(diff(args.a, args.b, args.base).format())
    return 0
