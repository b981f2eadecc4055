"""Train-step throughput: ptm (JAX) vs the same model and batch in PyTorch + transformers, on this machine.

    python tools/bench_train.py [--steps 10] [--configs tiny,small_20m] [--dtype float32]

Prints tokens/s for each and the ratio ptm / torch. Same shapes, same batch, AdamW, loss on all tokens, fp32 by
default (CPU torch has no fast bf16 matmul; `--dtype bfloat16` sets ptm's compute dtype only).
"""

from __future__ import annotations

import argparse
import os
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


def bench_ptm(cfg: ModelConfig, data: dict, steps: int) -> float:
    from ptm.parallel.mesh import MeshConfig, make_mesh
    from ptm.train.optimizer import OptimizerConfig, make_optimizer
    from ptm.train.step import init_state, jit_train_step

    mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    tx = make_optimizer(OptimizerConfig(learning_rate=1e-4, warmup_ratio=0.0), 1000)
    step = jit_train_step(cfg, tx, mesh)
    state = init_state(cfg, tx, mesh, seed=0)
    state, m = step(state, data)  # compile
    jax.block_until_ready(m)
    t = time.perf_counter()
    for _ in range(steps):
        state, m = step(state, data)
    jax.block_until_ready(m)
    return data["inputs"].size * steps / (time.perf_counter() - t)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--configs", default="tiny,small_20m")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=256)
    args = ap.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, batch {args.batch} x seq {args.seq}")
    print(f"{'config':<10} {'params':>8} {'ptm tok/s':>10} {'torch tok/s':>12} {'ptm/torch':>9}")
    for name in args.configs.split(","):
        cfg = ModelConfig(**CONFIGS[name], dtype=args.dtype)
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
