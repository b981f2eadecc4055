"""Helpers for the merge-search tests: small pools of real ptm checkpoints and eval sets."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

TINY = dict(vocab_size=259, embed_dim=32, num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
            max_seq_len=128, dtype="float32")


def write_checkpoint(path: str, params: dict, model: dict) -> str:
    """A ptm model checkpoint dir: params/ (Orbax) + ptm/metadata."""
    import orbax.checkpoint as ocp

    from ptm.ckpt import format as ckpt_format

    ck = ocp.StandardCheckpointer()
    ck.save(os.path.join(os.path.abspath(path), "params"), params)
    ck.wait_until_finished()
    meta = {"model": model, "step": 1, "tokenizer": "byte", "data": {}, "provenance": {}}
    ckpt_format.write_meta(path, meta)
    return path


def make_pool(root, n: int = 3, seed: int = 0, base: bool = True, model: dict | None = None) -> dict:
    """n members = base + distinct random task vectors, so merges differ measurably."""
    from ptm.model.config import ModelConfig
    from ptm.model.llama import abstract_params

    model = dict(model or TINY)
    rng = np.random.default_rng(seed)
    # random float32 tensors of the model's shapes (no flax init: it compiles, and values don't matter here)
    pre = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(np.float32),
                       abstract_params(ModelConfig(**model)))
    out = {"members": [], "base": None, "model": model}
    if base:
        out["base"] = write_checkpoint(str(root / "base"), pre, model)
    for i in range(n):
        p = jax.tree.map(lambda a: (a + 0.05 * rng.standard_normal(a.shape)).astype(a.dtype), pre)
        out["members"].append(write_checkpoint(str(root / f"m{i}"), p, model))
    return out


def write_choice_evalset(path, tasks=("alpha", "beta"), n=6, seed=0) -> str:
    """Multiple-choice items (log-likelihood scored, so random tiny models get non-degenerate scores)."""
    rng = np.random.default_rng(seed)
    os.makedirs(path, exist_ok=True)
    for t in tasks:
        with open(os.path.join(path, f"{t}.jsonl"), "w") as f:
            for i in range(n):
                a, b = (str(x) for x in rng.integers(0, 99, 2))
                item = {"task": t, "messages": [{"role": "user", "content": f"{t} {i}: pick"}],
                        "choices": [a, b + "x"], "reference": a, "scorer": "multiple_choice",
                        "id": f"{t}/{i}"}
                f.write(json.dumps(item) + "\n")
    return str(path)
