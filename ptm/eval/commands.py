"""`ptm eval`: score checkpoints (or an in-memory merge recipe) on an eval suite; print tables, write JSON."""

from __future__ import annotations

import argparse
import json
import math
import sys

from etils import epath

from ptm.errors import ConfigError, PtmError


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval",
        help="evaluate checkpoints on an eval suite",
        description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "checkpoints", nargs="*", metavar="CKPT", help="run dir, step dir, or merge output (local or gs://)"
    )
    p.add_argument(
        "--suite",
        nargs="+",
        required=True,
        metavar="DIR_OR_FILE",
        help="eval-set JSONL files or directories of them",
    )
    p.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="TOML",
        help="also evaluate this merge recipe, merged in memory (never written)",
    )
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'byte' or a tokenizer path (default: the checkpoint's metadata, else 'byte')",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt (pass@k needs >= k)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--mesh",
        default=None,
        metavar="DATA,FSDP,TENSOR",
        help="shard like training over a data x fsdp x tensor mesh (-1 = remaining devices)",
    )
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--items", action="store_true", help="include every item's output in the JSON")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_eval)


def _mesh(spec: str | None):
    if spec is None:
        return None
    from ptm.parallel.mesh import MeshConfig, make_mesh

    try:
        data, fsdp, tensor = (int(x) for x in spec.split(","))
    except ValueError:
        raise ConfigError(f"--mesh {spec!r}: expected three integers DATA,FSDP,TENSOR, e.g. 1,-1,1") from None
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor))


def _tokenizer_spec(args, meta: dict | None) -> str:
    if args.tokenizer:
        return args.tokenizer
    meta = meta or {}
    return meta.get("tokenizer") or (meta.get("provenance") or {}).get("tokenizer") or "byte"


def _recipe_models(path: str):
    """Yield (name, params, ModelConfig, meta) for each merge of a recipe file (a sweep gives several),
    merged in memory by the merge engine and never written."""
    try:
        from ptm.merge import recipe as R
        from ptm.merge.engine import merge_to_tree
    except ImportError as e:
        raise PtmError(f"--recipe {path}: the merge engine is not available in this build ({e})") from None
    from ptm.ckpt import format as ckpt_format

    recipes = R.load(path)
    for i, rec in enumerate(recipes):
        metas = R.input_metas(rec)
        meta = next((m for m in metas.values() if m and m.get("model")), None)
        if meta is None:
            raise ConfigError(f"{path}: no input has ptm/metadata with a model config; cannot evaluate")
        config = ckpt_format.model_config(meta, path)
        name = rec.name or (path if len(recipes) == 1 else f"{path}[{i}]")
        yield name, merge_to_tree(rec), config, {**meta, "provenance": {"recipe": path, **rec.to_dict()}}


def format_table(name: str, result) -> str:
    rows = [("task", "category", "scorer", "n", "score", "other metrics")]
    for t in result.tasks.values():
        extra = ", ".join(f"{k}={v:.4g}" for k, v in t.metrics.items() if k not in ("score", "tokens"))
        arrow = "" if t.higher_is_better else " (lower is better)"
        rows.append((t.task, t.category, t.scorer, str(t.n_items), f"{t.score:.4f}{arrow}", extra))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    lines = [f"== {name}"]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])
    for cat, v in result.categories.items():
        lines.append(f"{'avg ' + cat:<{widths[0]}}  {v:.4f}")
    if not math.isnan(result.macro_average):
        lines.append(f"{'macro average':<{widths[0]}}  {result.macro_average:.4f}")
    c = result.counts
    lines.append(
        f"{c['items']} items in {result.elapsed_s:.2f}s: {result.examples_per_s:.1f} examples/s "
        f"({c['generated_tokens']} tokens generated, {c['new_compiled_shapes']} new compiled shapes)"
    )
    return "\n".join(lines)


def run_eval(args) -> int:
    from ptm.ckpt.params import load_checkpoint, read_model_config
    from ptm.data.tokenizers import load_tokenizer
    from ptm.eval.decode import GenerationConfig
    from ptm.eval.evalset import load_suite
    from ptm.eval.harness import check_vocab, evaluate

    if not args.checkpoints and not args.recipe:
        raise ConfigError("nothing to evaluate: give checkpoint paths and/or --recipe")
    if args.out and epath.Path(args.out).exists() and not args.force:
        raise ConfigError(f"{args.out}: already exists (use --force to overwrite)")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.num_samples < 1:
        raise ConfigError("--batch-size, --max-new-tokens and --num-samples must be positive")
    from ptm.toy import checkers as toy_checkers

    toy_checkers.register()  # built-in checkers the CLI offers (the eval library itself never imports toy)
    items = load_suite(args.suite)  # fail on a bad suite before loading any model
    from ptm.parallel.spmd import cli_mesh, is_writer  # SPMD: join the cluster; one mesh over every host

    mesh = cli_mesh(args.mesh)
    gen = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        num_samples=args.num_samples,
        seed=args.seed,
        stop=tuple(args.stop),
    )

    def models():
        for name in args.checkpoints:  # check the vocab from the metadata before reading any tensor
            config, meta = read_model_config(name)
            check_vocab(config, load_tokenizer(_tokenizer_spec(args, meta)), name)
            yield ("checkpoint", name, *load_checkpoint(name, mesh))
        for path in args.recipe:
            for name, params, config, meta in _recipe_models(path):
                yield "recipe", name, params, config, meta

    results = []
    for kind, name, params, config, meta in models():
        tok = load_tokenizer(_tokenizer_spec(args, meta))
        res = evaluate(
            params,
            config,
            tok,
            items,
            batch_size=args.batch_size,
            mesh=mesh,
            generation=gen,
            keep_items=args.items,
            progress=not args.no_progress,
            where=name,
        )
        if is_writer():
            print(format_table(name, res), flush=True)
        results.append({"model": name, "kind": kind, **res.to_dict()})
        del params
    if args.out and is_writer():
        out = epath.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"suite": [str(s) for s in args.suite], "results": results}, indent=1))
        print(f"wrote {out}", file=sys.stderr)
    return 0
