"""Benchmark the merge engine on TinyLlama-shaped checkpoints (not a test).

Generates three random bf16 Llama checkpoints of TinyLlama shape (~2.2 GB each) as safetensors (HF names) and
Orbax (ptm names), then times, in fresh subprocesses with peak RSS and peak private (anonymous) RSS sampled
from
/proc: (a) ptm task arithmetic omega=0.3 from safetensors, (b) the same from Orbax, (c) a 5-omega sweep,
(d) mergekit (dtype float32, out_dtype bfloat16) if installed, (e) the I/O floor (read 3 inputs, write 1
output).

    python tools/bench_merge.py --dir /tmp/ptm-bench [--keep] [--cases abcdefg] [--skip-mergekit]
        [--mergekit /tmp/mkvenv/bin/mergekit-yaml] [--generate-only] [--methods ties,dare_linear,iso_c]

(g) is (b) from training checkpoints with uncompressed params (`RunCheckpointer(compress_params=False)`, the
default since issue 17); (b) and (g) write safetensors like (a), so only the input differs. Every case reports
wall and CPU seconds (CPU time is the robust figure on a shared machine), page faults and the load average.

Orbax inputs are written by the training checkpointer (chunked); case (d) also reports how far ptm's and
mergekit's outputs agree (`agreement`). Needs ~25 GB of disk in --dir; deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

HIDDEN, LAYERS, INTER, HEADS, KV, VOCAB = 2048, 22, 5632, 32, 4, 32000
HEAD_DIM = HIDDEN // HEADS


def hf_shapes() -> dict[str, tuple[int, ...]]:
    s = {
        "model.embed_tokens.weight": (VOCAB, HIDDEN),
        "model.norm.weight": (HIDDEN,),
        "lm_head.weight": (VOCAB, HIDDEN),
    }
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        s.update(
            {
                p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
                p + "self_attn.k_proj.weight": (KV * HEAD_DIM, HIDDEN),
                p + "self_attn.v_proj.weight": (KV * HEAD_DIM, HIDDEN),
                p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                p + "mlp.gate_proj.weight": (INTER, HIDDEN),
                p + "mlp.up_proj.weight": (INTER, HIDDEN),
                p + "mlp.down_proj.weight": (HIDDEN, INTER),
                p + "input_layernorm.weight": (HIDDEN,),
                p + "post_attention_layernorm.weight": (HIDDEN,),
            }
        )
    return s


def ptm_shapes() -> dict[str, tuple[int, ...]]:
    from ptm.ckpt.tree import shapes as shapes_of
    from ptm.model.config import ModelConfig

    return shapes_of(ModelConfig(vocab_size=VOCAB, embed_dim=HIDDEN, num_layers=LAYERS, num_heads=HEADS,
                                 num_kv_heads=KV, head_dim=HEAD_DIM, mlp_dim=INTER, tie_embeddings=False))


def hf_config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }


def _rand(rng, shape):
    import ml_dtypes

    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)).astype(ml_dtypes.bfloat16)


def gen_safetensors(path: str, seed: int, shapes: dict[str, tuple[int, ...]] | None = None) -> None:
    """`path`/model.safetensors: random bf16 tensors of `shapes` (default: the whole TinyLlama-shaped model)."""
    import struct

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = hf_shapes() if shapes is None else shapes
    header, off = {}, 0
    for n, s in shapes.items():
        nb = int(np.prod(s)) * 2
        header[n] = {"dtype": "BF16", "shape": list(s), "data_offsets": [off, off + nb]}
        off += nb
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(f"{path}/model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for s in shapes.values():
            f.write(_rand(rng, s).tobytes())


def gen_orbax(path: str, seed: int, compress: bool = True) -> float:
    """A ptm run dir written by the training checkpointer (so with its chunked save arguments), params zstd
    compressed or not; returns the seconds the (synchronous) save took."""
    from ptm.ckpt import format as ckpt_format
    from ptm.ckpt.tree import nest
    from ptm.train.checkpoint import RunCheckpointer

    rng = np.random.default_rng(seed + 100)
    tree = nest({n: _rand(rng, s) for n, s in ptm_shapes().items()})
    ck = RunCheckpointer(path, save_every=1, async_save=False, compress_params=compress)
    meta = ckpt_format.make_meta({}, step=0, provenance={"bench": True})
    t0 = time.perf_counter()
    ck.save(0, {"params": tree, "opt_state": {"count": np.zeros((), np.int32)}}, None, meta, force=True)
    ck.manager.wait_until_finished()
    took = time.perf_counter() - t0
    ck.manager.close()
    return took


def agreement(a: str, b: str) -> dict[str, float]:
    """Compare two bf16 safetensors outputs: elements that differ, and elements that differ by more than one
    bf16 rounding step (|x - y| > the bf16 spacing at max(|x|, |y|))."""
    from ptm.ckpt.stores import SafetensorsStore

    sa, sb = SafetensorsStore(a), SafetensorsStore(b)
    ta, tb = sa.tensors(), sb.tensors()
    if set(ta) != set(tb):
        return {"tensor_sets_differ": 1.0}
    n = diff = over = 0
    worst = 0.0
    for name in ta:
        x = np.asarray(sa.read(name, ()), np.float32).ravel()
        y = np.asarray(sb.read(name, ()), np.float32).ravel()
        d = np.abs(x - y)
        m = np.maximum(np.abs(x), np.abs(y))
        step = np.ldexp(np.float32(1), np.frexp(m)[1] - 8)  # bf16 spacing (8 significant bits) at m
        n += x.size
        diff += int(np.count_nonzero(d))
        over += int(np.count_nonzero(d > step))
        worst = max(worst, float(d.max()))
    return {
        "elements": n,
        "differ": diff,
        "differ_frac": diff / n,
        "differ_more_than_1_bf16_step": over,
        "max_abs_diff": worst,
    }


def measure(cmd: list[str], env: dict | None = None) -> dict[str, float]:
    """Wall time, CPU time (user + sys, from the child's rusage: robust to other jobs' load), minor page faults,
    peak RSS (VmHWM) and peak anonymous RSS (private memory; file-backed input pages excluded)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    anon = hwm = 0
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        try:
            with open(f"/proc/{p.pid}/status") as f:
                for line in f:
                    if line.startswith("RssAnon:"):
                        anon = max(anon, int(line.split()[1]) * 1024)
                    elif line.startswith("VmHWM:"):
                        hwm = max(hwm, int(line.split()[1]) * 1024)
        except (FileNotFoundError, ProcessLookupError):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    err = p.stderr.read().decode()
    if p.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{err[-3000:]}")
    out = {"wall_s": wall, "cpu_s": ru.ru_utime + ru.ru_stime, "minor_faults_m": ru.ru_minflt / 1e6,
           "peak_rss_gb": hwm / 1e9, "peak_private_gb": anon / 1e9, "load": os.getloadavg()[0]}
    print(json.dumps({"cmd": " ".join(cmd[-4:]), **out}), file=sys.stderr, flush=True)  # survives an interrupt
    return out


def ptm_merge(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "ptm.cli", "merge", "--no-progress", *args]


def io_floor(inputs: list[str], outs: list[str]) -> None:
    """Read every input once and write one input-sized file per output, made durable (fsync) as ptm's
    outputs are: the least any merge with these inputs and outputs must do."""
    buf = bytearray(64 << 20)
    for f in inputs:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    size = os.path.getsize(inputs[0])
    for out in outs:
        with open(out, "wb") as fh:
            left = size
            while left > 0:
                fh.write(memoryview(buf)[: min(left, len(buf))])
                left -= len(buf)
            fh.flush()
            os.fsync(fh.fileno())


PTM_ONLY = {"tsv", "iso_c", "iso_cts", "lines", "metagpt"}
DENSITY = {"ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"}


PAIR_T = {"slerp": 0.3, "nearswap": 0.001}  # methods of base_model -> one other model, by a global `t`
GLOBAL = {"sce": "select_topk: 0.5"}  # global parameters some methods need


def method_yaml(method: str, st: dict) -> str:
    """The bench's mergekit YAML for `method`: base pre, general weight 1.0 and skill weight 0.3 (density 0.5
    where the method has one); slerp and nearswap go from general to skill by t."""
    head = f"merge_method: {method}\ndtype: float32\nout_dtype: bfloat16\n"
    if method in PAIR_T:
        return (head + f"base_model: {st['general']}\nparameters:\n  t: {PAIR_T[method]}\nmodels:\n"
                f"  - model: {st['general']}\n  - model: {st['skill']}\n")
    dens = "\n      density: 0.5" if method in DENSITY else ""
    glob = f"parameters:\n  {GLOBAL[method]}\n" if method in GLOBAL else ""
    return (head + f"base_model: {st['pre']}\n{glob}models:\n"
            f"  - model: {st['general']}\n    parameters:\n      weight: 1.0{dens}\n"
            f"  - model: {st['skill']}\n    parameters:\n      weight: 0.3{dens}\n")


def method_case(method: str, d: str, st: dict, mergekit: str | None, warm) -> dict:
    """One method on the bench, float32 math, bf16 out: mergekit methods run from the same YAML (`method_yaml`)
    in both tools (`ptm merge cfg.yml`), ptm-only ones from flags. Returns the measured cases."""
    out, res = f"{d}/out-m", {}
    if method in PTM_ONLY:
        shutil.rmtree(out, ignore_errors=True)
        warm(st)
        res[f"m_{method}_ptm"] = measure(ptm_merge(["--method", method, "--pre", st["pre"], "--skill",
                                                    st["general"], "--skill", st["skill"], "--output-dtype",
                                                    "bfloat16", "--out", out]))
        shutil.rmtree(out, ignore_errors=True)
        return res
    cfg = f"{d}/mk-{method}.yml"
    with open(cfg, "w") as f:
        f.write(method_yaml(method, st))
    shutil.rmtree(out, ignore_errors=True)
    warm(st)
    res[f"m_{method}_ptm"] = measure(ptm_merge([cfg, "--out", out]))
    if mergekit and shutil.which(mergekit):
        shutil.rmtree(f"{out}-mk", ignore_errors=True)
        warm(st)
        res[f"m_{method}_mergekit"] = measure([mergekit, cfg, f"{out}-mk", "--lazy-unpickle"])
        res[f"m_{method}_ratio_wall"] = {"ptm/mergekit": res[f"m_{method}_ptm"]["wall_s"]
                                         / res[f"m_{method}_mergekit"]["wall_s"]}
        if method not in ("dare_linear", "dare_ties", "della", "della_linear"):
            res[f"m_{method}_agreement"] = agreement(out, f"{out}-mk")
        shutil.rmtree(f"{out}-mk", ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/ptm-bench")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--mergekit", default="mergekit-yaml", help="mergekit-yaml executable (e.g. from a venv)")
    ap.add_argument("--cases", default="abcdef", help="which cases to run (letters)")
    ap.add_argument("--generate-only", action="store_true")
    ap.add_argument("--methods", default="", help="mergekit methods to time in ptm and mergekit from one YAML "
                    "(e.g. ties,dare_linear), and ptm-only methods (tsv, iso_c, iso_cts: ptm only)")
    ap.add_argument("--io-floor-child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--io-floor-outputs", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.io_floor_child:
        k = a.io_floor_outputs
        io_floor(a.io_floor_child[:-1], [f"{a.io_floor_child[-1]}.{i}" for i in range(k)])
        return 0
    d = a.dir
    os.makedirs(d, exist_ok=True)
    names = ["pre", "general", "skill"]
    for i, n in enumerate(names):
        if not os.path.exists(f"{d}/st/{n}/model.safetensors"):
            print(f"generating safetensors {n}", file=sys.stderr)
            gen_safetensors(f"{d}/st/{n}", i)
        for sub, comp in (("ox", True), ("oxu", False)):
            if not os.path.exists(f"{d}/{sub}/{n}/checkpoints/0/ptm/metadata"):
                took = gen_orbax(f"{d}/{sub}/{n}", i, comp)
                size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(f"{d}/{sub}/{n}") for f in fs)
                print(f"generated orbax {n} ({'zstd' if comp else 'uncompressed'} params): save {took:.1f} s, "
                      f"{size / 1e9:.2f} GB, load {os.getloadavg()[0]:.1f}", file=sys.stderr)
        with open(f"{d}/st/{n}/config.json", "w") as f:
            json.dump(hf_config(), f)  # mergekit reads the architecture from config.json
    if a.generate_only:
        return 0
    st = {n: f"{d}/st/{n}" for n in names}
    ox = {n: f"{d}/ox/{n}" for n in names}
    oxu = {n: f"{d}/oxu/{n}" for n in names}
    res: dict[str, dict] = {}

    def clean(p):
        shutil.rmtree(p, ignore_errors=True)

    def inputs(src):
        return ["--pre", src["pre"], "--general", src["general"], "--skill", src["skill"]]

    def warm(src):  # warm the page cache before each case (the peer numbers in NOTES.md are warm-cache numbers)
        subprocess.run(
            ["cat", *[os.path.join(r, f) for v in src.values() for r, _, fs in os.walk(v) for f in fs]],
            stdout=subprocess.DEVNULL,
            check=True,
        )
        # ... and write back what the previous case left dirty (mergekit does not fsync its 2.2 GB): otherwise
        # the next case's own writes queue behind it on the disk (seen: the same ptm merge 5.7 s or 10.2 s)
        os.sync()

    common = ["--method", "task_arithmetic", "--omega", "0.3", "--output-dtype", "bfloat16"]
    if "a" in a.cases or "d" in a.cases:
        clean(f"{d}/out-a")
        warm(st)
        res["a_ptm_safetensors"] = measure(ptm_merge([*common, *inputs(st), "--out", f"{d}/out-a"]))
    # (b)/(g): the same merge from Orbax training checkpoints (zstd / uncompressed params), safetensors out as
    # in (a), so that only the input differs.
    for case, src in (("b", ox), ("g", oxu)):
        if case in a.cases:
            clean(f"{d}/out-{case}")
            warm(src)
            res[f"{case}_ptm_orbax{'_uncompressed' if case == 'g' else ''}"] = measure(
                ptm_merge([*common, "--output-format", "safetensors", *inputs(src), "--out", f"{d}/out-{case}"]))
            clean(f"{d}/out-{case}")
    if "c" in a.cases:
        sweep = ["0.1", "0.2", "0.3", "0.5", "1.0"]
        for w in sweep:
            clean(f"{d}/sweep-{w}")
        res["c_ptm_sweep5_safetensors"] = measure(
            ptm_merge(
                [
                    "--method",
                    "task_arithmetic",
                    "--sweep",
                    ",".join(sweep),
                    *inputs(st),
                    "--out",
                    f"{d}/sweep-{{omega}}",
                ]
            )
        )
        for w in sweep:
            clean(f"{d}/sweep-{w}")
    if "d" in a.cases and not a.skip_mergekit and shutil.which(a.mergekit):
        cfg = f"{d}/mergekit.yml"
        with open(cfg, "w") as f:
            f.write(
                f"merge_method: task_arithmetic\nbase_model: {st['pre']}\n"
                "dtype: float32\nout_dtype: bfloat16\n"
                f"parameters:\n  normalize: false\nmodels:\n  - model: {st['general']}\n    parameters:\n"
                f"      weight: 1.0\n  - model: {st['skill']}\n    parameters:\n      weight: 0.3\n"
            )
        clean(f"{d}/out-mk")
        res["d_mergekit"] = measure([a.mergekit, cfg, f"{d}/out-mk", "--lazy-unpickle"])
        res["d_agreement_ptm_vs_mergekit"] = agreement(f"{d}/out-a", f"{d}/out-mk")
        clean(f"{d}/out-mk")
    for m in [x for x in a.methods.split(",") if x]:
        res.update(method_case(m, d, st, a.mergekit if not a.skip_mergekit else None, warm))
    for case, k in (("e", 1), ("f", 5)):  # (f): the floor of a 5-output sweep
        if case not in a.cases:
            continue
        res[f"{case}_io_floor_{k}_out"] = measure(
            [
                sys.executable,
                __file__,
                "--io-floor-outputs",
                str(k),
                "--io-floor-child",
                *[f"{st[n]}/model.safetensors" for n in names],
                f"{d}/floor.bin",
            ]
        )
        for i in range(k):
            clean(f"{d}/floor.bin.{i}")
    ratios = {}
    a_ = res.get("a_ptm_safetensors", {}).get("wall_s")
    if a_ and "c_ptm_sweep5_safetensors" in res:
        ratios["sweep5 / one merge"] = res["c_ptm_sweep5_safetensors"]["wall_s"] / a_
    c_, e_, f_ = (res.get(k, {}).get("wall_s") for k in ("c_ptm_sweep5_safetensors", "e_io_floor_1_out",
                                                               "f_io_floor_5_out"))
    if a_ and e_:
        ratios["one merge / its io floor"] = a_ / e_
    if c_ and f_:
        ratios["sweep5 / its io floor"] = c_ / f_
    if e_ and f_:
        ratios["io floor 5 outputs / io floor 1 output"] = f_ / e_
    for k in ("b_ptm_orbax", "g_ptm_orbax_uncompressed"):
        if a_ and k in res:
            ratios[f"{k} / a (wall)"] = res[k]["wall_s"] / a_
            ratios[f"{k} / a (cpu)"] = res[k]["cpu_s"] / res["a_ptm_safetensors"]["cpu_s"]
    if a_ and "d_mergekit" in res:
        ratios["ptm / mergekit"] = a_ / res["d_mergekit"]["wall_s"]
    print(json.dumps({"load_avg": os.getloadavg(), "results": res, "ratios": ratios}, indent=1))
    clean(f"{d}/out-a")
    if not a.keep:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
