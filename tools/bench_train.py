"""Train-step throughput: ptm (JAX) vs the same model and batch in PyTorch + transformers, on this machine.

    python tools/bench_train.py [--steps 10] [--configs tiny,small_20m] [--dtype float32] [--attention blockwise]

Prints tokens/s for each and the ratio ptm / torch. Same shapes, same batch, AdamW, loss on all tokens, fp32 by
default (CPU torch has no fast bf16 matmul; `--dtype bfloat16` sets ptm's compute dtype only).

Attention sweep (ptm only; each point in a fresh process so that its peak RSS is its own):

    python tools/bench_train.py --sweep --configs tiny --attention reference,blockwise \
        --seqs 512,1024,2048,4096 --batch 1 --steps 3

prints tokens/s, the process's peak RSS (VmHWM) and the step's own share of it (peak minus the RSS after the
state was built and before the first step) for each sequence length and attention setting.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ptm.model.config import ModelConfig  # noqa: E402
from ptm.model.llama import param_count  # noqa: E402

CONFIGS = {
    "tiny": dict(
        vocab_size=259, embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384
    ),
    "small_20m": dict(
        vocab_size=32000, embed_dim=256, num_layers=6, num_heads=8, num_kv_heads=4, head_dim=32, mlp_dim=768
    ),
}


def batch(cfg: ModelConfig, b: int, s: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, (b, s + 1), dtype=np.int32)
    return {
        "inputs": toks[:, :-1],
        "targets": toks[:, 1:],
        "loss_mask": np.ones((b, s), np.float32),
        "segment_ids": np.ones((b, s), np.int32),
        "positions": np.tile(np.arange(s, dtype=np.int32), (b, 1)),
    }


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def bench_ptm(cfg: ModelConfig, data: dict, steps: int, stats: dict | None = None) -> float:
    from ptm.parallel.mesh import MeshConfig, make_mesh
    from ptm.train.optimizer import OptimizerConfig, make_optimizer
    from ptm.train.step import init_state, jit_train_step

    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_ratio=0.0), 1000)
    step = jit_train_step(cfg, tx, mesh)
    state = init_state(cfg, tx, mesh, seed=0)
    jax.block_until_ready(state)
    rss_before = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    state, m = step(state, data)  # compile
    jax.block_until_ready(m)
    first = time.perf_counter() - t0
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, data)
    jax.block_until_ready(m)
    tps = data["inputs"].size * steps / (time.perf_counter() - t)
    if stats is not None:
        stats.update(
            rss_before_mb=rss_before / 1024,
            peak_rss_mb=_rss_kb("VmHWM") / 1024,
            compile_and_first_step_s=first,
            loss=float(m["loss"]),
        )
    return tps


def bench_torch(cfg: ModelConfig, data: dict, steps: int) -> float | None:
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        return None
    torch.set_num_threads(os.cpu_count() or 1)
    hf = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.embed_dim,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(hf).float().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    inputs = torch.from_numpy(data["inputs"].astype(np.int64))
    labels = torch.from_numpy(data["targets"].astype(np.int64))

    def one():
        logits = model(input_ids=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one()
    t = time.perf_counter()
    for _ in range(steps):
        one()
    return data["inputs"].size * steps / (time.perf_counter() - t)


def _point(args) -> None:
    """One sweep point in this process: print a JSON line."""
    cfg = ModelConfig(**CONFIGS[args.configs], dtype=args.dtype, attention=args.attention, max_seq_len=args.seq)
    stats: dict = {}
    tps = bench_ptm(cfg, batch(cfg, args.batch, args.seq), args.steps, stats)
    print(json.dumps({"config": args.configs, "attention": args.attention, "seq": args.seq, "batch": args.batch,
                      "tokens_per_s": tps, **stats}), flush=True)


def sweep(args) -> None:
    seqs = [int(x) for x in args.seqs.split(",")]
    attns = args.attention.split(",")
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {args.batch}, {args.steps} timed steps, "
          f"dtype {args.dtype}; each point a fresh process")
    print(f"{'config':<10} {'seq':>5} {'attention':<16} {'tok/s':>8} {'peak RSS':>9} {'step RSS':>9} {'loss':>7}")
    rows = []
    for name in args.configs.split(","):
        for seq in seqs:
            for a in attns:
                cmd = [sys.executable, __file__, "--_point", "--configs", name, "--attention", a, "--seq", str(seq),
                       "--batch", str(args.batch), "--steps", str(args.steps), "--dtype", args.dtype]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode:
                    print(f"{name:<10} {seq:>5} {a:<16} failed: {p.stderr.strip().splitlines()[-1:]}", flush=True)
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
                rows.append(r)
                print(f"{name:<10} {seq:>5} {a:<16} {r['tokens_per_s']:>8.0f} {r['peak_rss_mb']:>7.0f}MB "
                      f"{r['peak_rss_mb'] - r['rss_before_mb']:>7.0f}MB {r['loss']:>7.3f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--configs", default="tiny,small_20m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--attention", default="reference", help="ModelConfig.attention (comma list with --sweep)")
    ap.add_argument("--sweep", action="store_true", help="ptm only: every --seqs x --attention, RSS per point")
    ap.add_argument("--seqs", default="512,1024,2048,4096")
    ap.add_argument("--json", help="--sweep: write the points here")
    ap.add_argument("--_point", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._point:
        return _point(args)
    if args.sweep:
        return sweep(args)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {args.batch} x seq {args.seq}, "
          f"attention {args.attention}")
    print(f"{'config':<10} {'params':>8} {'ptm tok/s':>10} {'torch tok/s':>12} {'ptm/torch':>9}")
    for name in args.configs.split(","):
        cfg = ModelConfig(**CONFIGS[name], dtype=args.dtype, attention=args.attention)
        data = batch(cfg, args.batch, args.seq)
        p = bench_ptm(cfg, data, args.steps)
        t = bench_torch(cfg, data, args.steps)
        ratio = f"{p / t:.2f}" if t else "n/a"
        print(
            f"{name:<10} {param_count(cfg) / 1e6:>7.1f}M {p:>10.0f} {t or float('nan'):>12.0f} {ratio:>9}",
            flush=True,
        )


if __name__ == "__main__":
    main()
