"""Helpers for merge tests: real Orbax checkpoints and real safetensors files of small random Llama-like
trees."""

from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

from ptm.ckpt import format as ckpt_format
from ptm.ckpt.tree import flatten

BF16 = np.dtype(ml_dtypes.bfloat16)
L = 3


def random_tree(seed: int, dtype=BF16, vocab: int = 64) -> dict:
    rng = np.random.default_rng(seed)

    def r(*shape):
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)

    return {
        "embed": {"embedding": r(vocab, 16)},
        "layers": {
            "attention": {"wq": r(L, 16, 2, 8), "wo": r(L, 2, 8, 16)},
            "mlp": {"w_up": r(L, 16, 24)},
            "mlp_norm": {"scale": r(L, 16)},
        },
        "final_norm": {"scale": r(16)},
    }


def save_orbax(path, tree: dict, train_examples: int | None = None) -> str:
    import orbax.checkpoint as ocp

    ck = ocp.StandardCheckpointer()
    ck.save(f"{path}/params", tree)
    ck.wait_until_finished()
    data = {"train_examples": train_examples} if train_examples else {}
    ckpt_format.write_meta(
        path, {"model": {"vocab_size": 64, "dim": 16}, "step": 10, "data": data, "provenance": {}}
    )
    return str(path)


def save_safetensors(path, tensors: dict[str, np.ndarray]) -> str:
    """A real safetensors file written by hand (bf16 included), in HF layout `path/model.safetensors`."""
    import os

    os.makedirs(path, exist_ok=True)
    header, off, blobs = {}, 0, []
    names = {np.dtype(np.float32): "F32", BF16: "BF16", np.dtype(np.float16): "F16"}
    for n, a in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[n] = {"dtype": names[a.dtype], "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    raw = json.dumps(header).encode()
    with open(f"{path}/model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    return str(path)


def restore(path: str) -> dict[str, np.ndarray]:
    """Restore a merge output with plain Orbax (what training/eval do)."""
    import orbax.checkpoint as ocp

    return flatten(ocp.PyTreeCheckpointer().restore(f"{path}/params"))


def f32(a):
    return np.asarray(a).astype(np.float32)


@pytest.fixture
def ckpts(tmp_path):
    """pre, general, two skills and a cft checkpoint (bf16) on disk, plus their trees."""
    trees = {n: random_tree(i) for i, n in enumerate(["pre", "general", "s1", "s2", "cft"])}
    paths = {
        n: save_orbax(tmp_path / n, t, train_examples={"general": 1000, "s1": 300, "s2": 50}.get(n))
        for n, t in trees.items()
    }
    return paths, {n: flatten(t) for n, t in trees.items()}
