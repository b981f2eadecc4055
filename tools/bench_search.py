"""Benchmark: merge-search candidates per minute, in memory vs through disk.

Same pool, same candidate weights, same eval items in every mode:
  memory  — `ptm search`'s path: the pool resident on the devices, one jitted weighted sum, evaluate in
            process;
  engine  — write each candidate with the merge engine (`ptm.merge.engine.merge`), load it back, evaluate
            in process (warm compile caches: the best a disk-based loop can do inside one process);
  cli     — what a user without `ptm search` runs: `ptm merge ... --out DIR`, then `ptm eval DIR`, per
            candidate.

  python tools/bench_search.py --pool runs/search_toy/runs/{general,science,safety,coding} \
      --val runs/search_toy/suite/eval/validation --tasks copy,science,safety_harmful --n 8 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", nargs="+", required=True)
    ap.add_argument("--val", required=True, help="eval files/dir")
    ap.add_argument("--tasks", help="comma list of tasks to keep (default: all)")
    ap.add_argument("--max-items", type=int, default=None, help="items per task")
    ap.add_argument("--n", type=int, default=8, help="candidates per mode")
    ap.add_argument("--n-cli", type=int, default=3, help="candidates for the (slow) CLI mode; 0 skips it")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args(argv)

    from ptm.ckpt.params import load_checkpoint
    from ptm.data.tokenizers import load_tokenizer
    from ptm.eval.evalset import load_suite, write_eval_file
    from ptm.eval.harness import evaluate
    from ptm.merge import engine
    from ptm.search.pool import Pool
    from ptm.search.space import Space
    from ptm.toy import checkers as toy_checkers

    toy_checkers.register()  # the toy suite's coding items (if --val is the toy suite) name its checker

    tmp = tempfile.mkdtemp(prefix="bench_search_")
    try:
        items = load_suite(args.val)
        if args.tasks:
            keep = set(args.tasks.split(","))
            items = [it for it in items if it.task in keep]
        if args.max_items:
            seen: dict[str, int] = {}
            items = [it for it in items if (seen.__setitem__(it.task, seen.get(it.task, 0) + 1)
                                            or seen[it.task] <= args.max_items)]
        evdir = os.path.join(tmp, "eval")
        for task in sorted({it.task for it in items}):
            write_eval_file(os.path.join(evdir, f"{task}.jsonl"), [it for it in items if it.task == task])
        t0 = time.perf_counter()
        pool = Pool(args.pool)
        load_s = time.perf_counter() - t0
        cfg = pool.model_config()
        tok = load_tokenizer(pool.tokenizer)
        space = Space(n=pool.n)
        rng = np.random.default_rng(0)
        cands = [space.weights(rng.standard_normal(space.dim)) for _ in range(max(args.n, args.n_cli) + 1)]

        def ev(params):
            return evaluate(params, cfg, tok, items, batch_size=args.batch_size,
                            max_new_tokens=args.max_new_tokens, num_examples=0).macro_average

        # warm-up (compiles the merge and every eval shape once; not timed)
        ev(pool.merge(cands[-1], space))
        res: dict[str, dict] = {"pool": pool.members, "items": len(items), "pool_load_s": load_s}

        merge_s, eval_s, scores = [], [], []
        for w in cands[: args.n]:
            t = time.perf_counter()
            p = pool.merge(w, space)
            import jax

            jax.block_until_ready(p)
            merge_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            scores.append(ev(p))
            eval_s.append(time.perf_counter() - t)
        res["memory"] = _stats(merge_s, eval_s)
        mem_scores = scores

        merge_s, eval_s, scores = [], [], []
        for i, w in enumerate(cands[: args.n]):
            out = os.path.join(tmp, f"engine{i}")
            t = time.perf_counter()
            engine.merge(pool.recipe(w, space, out), progress=False)
            params, _, _ = load_checkpoint(out)
            merge_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            scores.append(ev(params))
            eval_s.append(time.perf_counter() - t)
            shutil.rmtree(out)
        res["engine"] = _stats(merge_s, eval_s)
        res["same_scores_memory_vs_engine"] = bool(np.allclose(mem_scores, scores, rtol=0, atol=0))

        if args.n_cli:
            merge_s, eval_s = [], []
            for i, w in enumerate(cands[: args.n_cli]):
                out = os.path.join(tmp, f"cli{i}")
                cmd = [sys.executable, "-m", "ptm.cli", "merge", "--method", "linear", "--no-progress",
                       "--out", out,
                       "--omega", ",".join(repr(float(x)) for x in w[0])]
                for m in pool.members:
                    cmd += ["--model", m]
                t = time.perf_counter()
                _check(subprocess.run(cmd, capture_output=True, text=True))
                merge_s.append(time.perf_counter() - t)
                t = time.perf_counter()
                ev_cmd = [sys.executable, "-m", "ptm.cli", "eval", out, "--suite", evdir, "--no-progress",
                          "--batch-size", str(args.batch_size), "--max-new-tokens", str(args.max_new_tokens),
                          "--out", os.path.join(tmp, f"cli{i}.json")]
                _check(subprocess.run(ev_cmd, capture_output=True, text=True))
                eval_s.append(time.perf_counter() - t)
                shutil.rmtree(out)
            res["cli"] = _stats(merge_s, eval_s)
        for k in ("engine", "cli"):
            if k in res:
                res[f"speedup_vs_{k}"] = res["memory"]["candidates_per_min"] / res[k]["candidates_per_min"]
                res[f"merge_speedup_vs_{k}"] = res[k]["merge_s"] / max(res["memory"]["merge_s"], 1e-9)
        print(json.dumps(res, indent=1))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _check(r: subprocess.CompletedProcess) -> None:
    if r.returncode:
        raise SystemExit(f"{' '.join(r.args[:4])} ... failed ({r.returncode}):\n{r.stderr[-2000:]}")


def _stats(merge_s: list[float], eval_s: list[float]) -> dict:
    per = float(np.mean(np.add(merge_s, eval_s)))
    return {"n": len(merge_s), "merge_s": float(np.mean(merge_s)), "eval_s": float(np.mean(eval_s)),
            "candidate_s": per, "candidates_per_min": 60.0 / per}


if __name__ == "__main__":
    sys.exit(main())
