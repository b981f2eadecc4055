"""Learnability and mergeability probe for the toy suite: the runs behind docs/toy-suite.md's probe table.

Pretrains theta_pre, instruction-tunes theta_G on G, trains one skill model theta_D per skill from theta_pre,
then scores (validation split, greedy) theta_G, each theta_D, task arithmetic theta_G + w * (theta_D - theta_pre)
and linear interpolation theta_pre + w * tau_D + (1 - w) * tau_G over a few w. Runs are cached under --out by
their settings, so probes that share theta_pre or theta_G reuse it. Prints one `TRAIN` line per run and one
`EVAL` line per model (scores in %, gen = mean of the five general tasks).

    python tools/probe_toy.py p8 --embed 256 --mlp 768 --batch 8 --pre 12,2e-3 --g 6,1e-3 --sk 10,1e-3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ptm.ckpt.params import load_checkpoint  # noqa: E402
from ptm.data.pipeline import DataConfig, SourceConfig  # noqa: E402
from ptm.data.tokenizers import load_tokenizer  # noqa: E402
from ptm.eval.evalset import load_suite  # noqa: E402
from ptm.eval.harness import evaluate  # noqa: E402
from ptm.model.config import ModelConfig  # noqa: E402
from ptm.parallel.mesh import MeshConfig  # noqa: E402
from ptm.toy import checkers as toy_checkers  # noqa: E402
from ptm.toy import suite as toy  # noqa: E402
from ptm.train.loop import train  # noqa: E402
from ptm.train.optimizer import OptimizerConfig  # noqa: E402

GENERAL = ["copy", "reverse", "sort", "lookup", "world_qa"]
SKILL_TASKS = {"coding": ["coding"], "safety": ["safety_harmful", "safety_benign"], "science": ["science"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("tag", help="label printed on every EVAL line")
    p.add_argument("--out", default="/tmp/ptm_probe", help="suites and runs are cached here")
    p.add_argument("--sizes", default="pretrain=3200,general=800,science=600,safety=400,coding=400,eval=32")
    p.add_argument("--tokenizer", choices=("suite", "byte"), default="suite")
    p.add_argument("--embed", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--mlp", type=int, default=384)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--pre", default="12,2e-3", help="theta_pre: EPOCHS,LR")
    p.add_argument("--g", default="6,1e-3", help="theta_G: EPOCHS,LR")
    p.add_argument("--sk", default="10,1e-3", help="each theta_D: EPOCHS,LR")
    p.add_argument("--skills", default="coding,safety,science")
    p.add_argument("--omegas", default="0.5,1.0")
    a = p.parse_args()

    sizes = {k: int(v) for k, v in (kv.split("=") for kv in a.sizes.split(","))}
    suite = f"{a.out}/suite_v{toy.VERSION}_{hashlib.md5(a.sizes.encode()).hexdigest()[:8]}"
    toy.generate_suite(suite, seed=0, sizes=sizes)
    tok_spec = "byte" if a.tokenizer == "byte" else f"{suite}/{toy.TOKENIZER_FILE}"
    tok = load_tokenizer(tok_spec)
    cfg = ModelConfig(vocab_size=tok.vocab_size, embed_dim=a.embed, num_layers=a.layers, num_heads=4,
                      num_kv_heads=2, head_dim=a.embed // 4, mlp_dim=a.mlp, max_seq_len=128, dtype="float32")
    runs = f"{a.out}/runs/{os.path.basename(suite)}_{a.tokenizer}_{a.embed}x{a.layers}x{a.mlp}_b{a.batch}"

    def run(name: str, files: list[str], init: str | None, spec: str) -> str:
        epochs, lr = int(spec.split(",")[0]), float(spec.split(",")[1])
        d = f"{runs}/{name}_{epochs}_{lr}" + (f"_from_{os.path.basename(init)}" if init else "")
        if not os.path.exists(f"{d}/run.json"):
            t = time.perf_counter()
            data = DataConfig(sources=[SourceConfig(path=f"{suite}/{f}", name=f.split(".")[0]) for f in files],
                              seq_len=128, global_batch_size=a.batch, num_epochs=epochs, seed=0, pack=True)
            res = train(d, data=data, model=cfg, optimizer=OptimizerConfig(learning_rate=lr, warmup_ratio=0.03),
                        mesh=MeshConfig(fsdp=-1), tokenizer=tok_spec, init_from=init, save_every=10**6,
                        progress=False)
            print(f"TRAIN {name}: {res.steps} steps, loss {res.final_loss:.3f}, {time.perf_counter() - t:.0f} s",
                  flush=True)
        return d

    by_task: dict[str, list] = {}
    toy_checkers.register()  # the coding items name the toy_lisp checker
    for it in load_suite(f"{suite}/eval/validation"):
        by_task.setdefault(it.task, []).append(it)

    def score(params, tasks: list[str], label: str) -> None:
        r = evaluate(params, cfg, tok, [i for t in tasks for i in by_task[t]], batch_size=64, max_new_tokens=24)
        s = {k: round(100 * v.score) for k, v in r.tasks.items()}
        gen = np.mean([s[t] for t in GENERAL])
        print(f"EVAL {a.tag} {label:24s} gen={gen:5.1f} " + " ".join(f"{k}={v}" for k, v in s.items()), flush=True)

    def params(d: str):
        return jax.tree.map(np.asarray, load_checkpoint(d)[0])

    pre = run("pre", ["pretrain.jsonl"], None, a.pre)
    gen_run = run("G", ["general.jsonl"], pre, a.g)
    p_pre, p_g = params(pre), params(gen_run)
    skills = a.skills.split(",")
    score(p_g, GENERAL + [t for s in skills for t in SKILL_TASKS[s]], "theta_G")
    for s in skills:
        p_d = params(run(f"skill_{s}", [f"{s}.jsonl"], pre, a.sk))
        score(p_d, GENERAL + SKILL_TASKS[s], f"theta_D {s}")
        for w in map(float, a.omegas.split(",")):
            ta = jax.tree.map(lambda g, d, p, w=w: g + w * (d - p), p_g, p_d, p_pre)
            score(ta, GENERAL + SKILL_TASKS[s], f"TA {s} w={w}")
            li = jax.tree.map(lambda g, d, p, w=w: p + w * (d - p) + (1 - w) * (g - p), p_g, p_d, p_pre)
            score(li, GENERAL + SKILL_TASKS[s], f"LI {s} w={w}")


if __name__ == "__main__":
    main()
