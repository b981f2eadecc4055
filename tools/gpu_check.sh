#!/usr/bin/env bash
# GPU check: train-step throughput and MFU of a ~1B Llama (ptm/gin/models/llama_1b.gin shape) at seq 4096, bf16,
# with ModelConfig.attention = cudnn and = blockwise, on one GPU. Finishes in a few minutes (compile ~1 min per
# setting, then --steps timed steps); CI never runs it on a GPU, only its --dry-run on CPU (tests/model).
#
#   bash tools/gpu_check.sh                  # on the GPU machine, from the repository root
#   bash tools/gpu_check.sh --dry-run        # anywhere: CPU, a tiny config, seq 256 (what the test runs)
#   GPU_CHECK_DRY_RUN=1 bash tools/gpu_check.sh   # the same
#   bash tools/gpu_check.sh --batch 4 --steps 5 --attention cudnn,blockwise,reference
#
# What it needs: Python with jax (CUDA build), flax, optax, numpy, etils: the train step imports nothing else (no
# gin-config, grain, cmaes, tensorboardX, orbax). The GPU machine this was written for has no network and its own
# jax 0.11.x (CUDA 13) on Python 3.12 with flax/optax/orbax/tensorstore, so it runs as is. To use the rest of ptm
# there (`ptm train` needs gin-config, grain, cmaes, tensorboardX), prepare wheels on a machine with network,
# in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl gin-config cmaes tensorboardX grain array-record   # pure-Python ones come as py3-none-any
#   (list each wheel's own needs with: unzip -p .whl/NAME-*.whl '*/METADATA' | grep ^Requires-Dist)
# carry .whl to the GPU machine; this script installs whatever is in .whl/ (no index, no deps) into /tmp/site
# and puts it on PYTHONPATH before it starts.
#
# Output: the device, jax/cuDNN versions, and per setting: the implementation that actually ran (cudnn falls back
# to blockwise, logged, where unsupported), s/step, tokens/s, and MFU = tokens/s x flops_per_token / peak bf16
# FLOP/s of the device (table below; flops_per_token is ptm.model.llama's 6N + attention count, no remat).
set -euo pipefail

cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
ARGS=()
for a in "$@"; do
  if [[ "$a" == "--dry-run" ]]; then export GPU_CHECK_DRY_RUN=1; else ARGS+=("$a"); fi
done
if [[ "${GPU_CHECK_DRY_RUN:-0}" == "1" ]]; then
  export JAX_PLATFORMS=cpu
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A single GPU: let XLA take most of its memory up front (the default 75% is fine too), no autotune surprises.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}

exec "$PY" - "${ARGS[@]+"${ARGS[@]}"}" <<'EOF'
import argparse
import logging
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from ptm.model import attention as attn_lib
from ptm.model.config import ModelConfig, from_preset
from ptm.model.llama import flops_per_token, param_count
from ptm.parallel.mesh import MeshConfig, make_mesh
from ptm.train.optimizer import OptimizerConfig, make_optimizer
from ptm.train.step import init_state, jit_train_step

# Peak dense bf16 FLOP/s (no sparsity), by a substring of jax's device_kind; first match wins.
PEAK_BF16 = [
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),  # SXM
    ("H800", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
]

dry = os.environ.get("GPU_CHECK_DRY_RUN") == "1"
ap = argparse.ArgumentParser("gpu_check")
ap.add_argument("--attention", default="cudnn,blockwise")
ap.add_argument("--seq", type=int, default=256 if dry else 4096)
ap.add_argument("--batch", type=int, default=2 if dry else 8)
ap.add_argument("--steps", type=int, default=2 if dry else 10)
args = ap.parse_args()
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

dev = jax.devices()[0]
print(f"device: {dev.device_kind} ({dev.platform}), {jax.device_count()} device(s); jax {jax.__version__}, "
      f"python {sys.version.split()[0]}" + ("  [DRY RUN: CPU, tiny config]" if dry else ""))
if dev.platform == "gpu":
    try:
        from jax._src.lib import cuda_versions

        print(f"cuDNN {cuda_versions.cudnn_get_version()}")
    except Exception as e:  # noqa: BLE001
        print(f"cuDNN version unknown ({e})")
elif not dry:
    print("warning: no GPU found; the figures below are not GPU figures")
peak = next((p for name, p in PEAK_BF16 if name.lower() in dev.device_kind.lower()), None)

if dry:
    base = dict(vocab_size=259, embed_dim=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=384,
                max_seq_len=args.seq, dtype="bfloat16")
else:
    base = {**from_preset("llama_1b").to_dict(), "dtype": "bfloat16", "max_seq_len": args.seq}

# Packed rows: examples of 256..seq/2 tokens back to back, the rest padding (what the data pipeline produces).
rng = np.random.default_rng(0)
b, s = args.batch, args.seq
seg = np.zeros((b, s), np.int32)
pos = np.zeros((b, s), np.int32)
for r in range(b):
    at, i = 0, 1
    while at < s - 64:
        n = min(int(rng.integers(min(256, s // 4), s // 2 + 1)), s - at)
        seg[r, at:at + n], pos[r, at:at + n] = i, np.arange(n)
        at, i = at + n, i + 1
toks = rng.integers(0, base["vocab_size"], (b, s + 1), dtype=np.int32)
batch = {"inputs": toks[:, :-1], "targets": toks[:, 1:], "loss_mask": (seg != 0).astype(np.float32),
         "segment_ids": seg, "positions": pos}
print(f"batch {b} x {s} tokens, {int((seg != 0).sum())} real, {int(seg.max(axis=1).sum())} packed examples")

mesh = make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
tx = make_optimizer(OptimizerConfig(learning_rate=1e-5, warmup_ratio=0.0), 1000)
results = []
for name in args.attention.split(","):
    cfg = ModelConfig(**{**base, "attention": name})
    impl = attn_lib.resolve(name, q_len=s, kv_len=s, cached=False, dtype=cfg.dtype, head_dim=cfg.head_dim,
                            device=dev)
    print(f"\n== attention={name} (runs as {impl}); {param_count(cfg) / 1e6:,.1f}M params, remat={cfg.remat}")
    try:
        step = jit_train_step(cfg, tx, mesh)
        state = init_state(cfg, tx, mesh, seed=0)
        t0 = time.perf_counter()
        state, m = step(state, batch)
        jax.block_until_ready(m)
        print(f"   compile + first step {time.perf_counter() - t0:.1f} s, loss {float(m['loss']):.3f}")
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            state, m = step(state, batch)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
    except Exception as e:  # noqa: BLE001 - report and go on with the next setting
        print(f"   FAILED: {type(e).__name__}: {str(e)[:500]}")
        continue
    dt = float(np.median(times))
    tps = b * s / dt
    fpt = flops_per_token(cfg, s)
    mfu = tps * fpt / peak if peak else None
    mfu_s = f"{mfu:.1%}" if mfu is not None else "n/a (unknown peak)"
    print(f"   {dt:.3f} s/step (median of {len(times)}), {tps:,.0f} tokens/s, {fpt / 1e9:.3g} GFLOP/token, "
          f"MFU {mfu_s}, loss {float(m['loss']):.3f}")
    if dev.platform == "gpu":
        stats = dev.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            print(f"   peak GPU memory so far {stats['peak_bytes_in_use'] / 2**30:.1f} GiB")
    results.append((name, impl, dt, tps, mfu))
    del state, step

print("\nattention   runs as     s/step   tokens/s   MFU")
for name, impl, dt, tps, mfu in results:
    print(f"{name:<11} {impl:<11} {dt:>6.3f} {tps:>10,.0f}   {f'{mfu:.1%}' if mfu is not None else 'n/a'}")
peak_s = f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown"
print(f"peak bf16 of {dev.device_kind}: {peak_s}")
sys.exit(0 if results else 1)
EOF
