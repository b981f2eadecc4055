"""Profile the sparse methods on a few TinyLlama-shaped tensors (not a test): a quick driver for iterating.

Writes three bf16 safetensors inputs holding the first `--layers` layers of TinyLlama (88M entries each for two
layers) into --dir once, then runs `ptm merge` in-process on the mergekit YAML that tools/bench_merge.py's
--methods cases use (`bench_merge.method_yaml`: base pre, general weight 1.0, skill weight 0.3...) and
prints wall and CPU seconds (rusage; CPU is the robust figure on a shared machine), ns per entry and the load.

    python tools/bench_sparse.py --dir /tmp/sparse-bench --methods ties,dare_linear,task_arithmetic [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import resource
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_merge as B  # noqa: E402


def generate(d: str, layers: int) -> int:
    keep = tuple(f"model.layers.{i}." for i in range(layers))
    shapes = {k: v for k, v in B.hf_shapes().items() if k.startswith(keep)}
    for i, n in enumerate(["pre", "general", "skill"]):
        p = f"{d}/{n}"
        if os.path.exists(f"{p}/model.safetensors"):
            continue
        B.gen_safetensors(p, i, shapes)
        with open(f"{p}/config.json", "w") as f:
            json.dump({**B.hf_config(), "num_hidden_layers": layers}, f)
    return sum(int(np.prod(s)) for s in shapes.values())


def run(d: str, method: str, n: int, profile: bool) -> None:
    from ptm.merge import engine, mergekit_yaml

    cfg = f"{d}/{method}.yml"
    with open(cfg, "w") as f:
        f.write(B.method_yaml(method, {n: f"{d}/{n}" for n in ("pre", "general", "skill")}))
    out = f"{d}/out-{method}"
    shutil.rmtree(out, ignore_errors=True)
    recipes = mergekit_yaml.load(cfg, out=out)
    prof = cProfile.Profile() if profile else None
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    if prof:
        prof.enable()
    engine.merge(recipes, progress=False, summary=False)
    if prof:
        prof.disable()
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime
    print(f"{method}: {n / 1e6:.1f}M entries per input, wall {t1 - t0:.2f} s, CPU {cpu:.2f} s "
          f"({cpu / n * 1e9:.1f} ns/entry), load {os.getloadavg()[0]:.1f}")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(20)
    shutil.rmtree(out, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/sparse-bench")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--methods", default="ties,dare_linear,task_arithmetic")
    ap.add_argument("--profile", action="store_true", help="cProfile each merge (adds overhead)")
    a = ap.parse_args()
    n = generate(a.dir, a.layers)
    for m in a.methods.split(","):
        run(a.dir, m, n, a.profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
