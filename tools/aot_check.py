#!/usr/bin/env python
"""Prove a TPU configuration by compiling it, without a TPU (deviceless AOT with libtpu).

Each plan is a set of gin files (+ bindings) exactly as given to `ptm train`, plus a slice topology; this
lowers and compiles the real `ptm.train.step` train step with NamedShardings on a compile-only TPU mesh and
reports per-device HBM (compiler's memory_analysis) against the usable HBM per device (v3: 15.48 GiB per core;
DEVICE_SPECS for v4/v5e/v5p/v6e), analytic FLOPs per step (cost_analysis counts a scanned layer body once, so it
cannot be used) and the step time a given MFU implies at the device's peak. `--attention` compiles each plan
with each `ModelConfig.attention` setting (ptm/model/attention.py). `RESOURCE_EXHAUSTED` from the compiler is a
verdict, not a crash. It can also compile a device-side sharded merge of one full tensor set (task arithmetic over
all parameters, bf16 in and out, fp32 math).

Needs `pip install "jax[tpu]==<your jax version>"` (libtpu). CPU use is unaffected: set JAX_PLATFORMS=cpu.

  python tools/aot_check.py --plan v3-32            # one of PLANS (the paper's 7B run on each slice)
  python tools/aot_check.py --all --json out.json   # every plan
  python tools/aot_check.py --plan v3-32 --plan v5e-32 --attention reference --attention blockwise \
      --attention splash                              # each plan with each attention implementation
  python tools/aot_check.py --gin_file models/tiny.gin --gin_file runs/base.gin --gin_file meshes/v3-8.gin \
      --topology v3-8 --gin "DataConfig.seq_len=128" --gin "DataConfig.global_batch_size=16"
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

# libtpu takes a host-wide lock file for real chips; compile-only use touches no chip, so let several
# checks (and other users on the machine) run at once. Must be set before libtpu loads.
for _k, _v in {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_SKIP_MDS_QUERY": "1",
    "TPU_WORKER_HOSTNAMES": "localhost",
    "TPU_ACCELERATOR_TYPE": "v3-8",
}.items():
    os.environ.setdefault(_k, _v)

GIB = 1024**3
V3_USABLE_HBM_BYTES = int(
    15.48 * GIB
)  # per TensorCore (= JAX device): 16 GiB minus what the runtime reserves
# Cloud TPU docs: 123 TFLOP/s bf16 peak per v3 chip; a chip has two TensorCores, each one JAX device.
V3_PEAK_FLOPS_PER_DEVICE = 123e12 / 2

# Slice name (cores) -> libtpu topology name (chips; 2 devices per chip). libtpu rejects "v3-32" etc.
V3_TOPOLOGIES = {
    "v3-8": "v3:2x2",
    "v3-32": "v3:4x4",
    "v3-64": "v3:4x8",
    "v3-128": "v3:8x8",
    "v3-256": "v3:8x16",
    "v3-512": "v3:16x16",
}
# Newer generations (one JAX device per chip on v5e; the compile-only v4 topology has 2 devices per chip).
TOPOLOGIES = {**V3_TOPOLOGIES, "v5e-16": "v5e:4x4", "v5e-32": "v5e:4x8", "v4-32": "v4:2x2x4"}

# Per JAX device, by device_kind: (usable HBM as the compiler reports it in RESOURCE_EXHAUSTED messages with
# libtpu 0.0.42.1, peak dense bf16 FLOP/s from the Cloud TPU docs divided by the devices per chip).
DEVICE_SPECS = {
    "TPU v3": (V3_USABLE_HBM_BYTES, V3_PEAK_FLOPS_PER_DEVICE),
    "TPU v4": (int(15.25 * GIB), 275e12 / 2),
    "TPU v5 lite": (int(15.75 * GIB), 197e12),
    "TPU v5": (int(95.74 * GIB), 459e12),
    "TPU v6 lite": (int(31.25 * GIB), 918e12),
}


@dataclass
class Plan:
    """One configuration to prove: what `ptm train` would run with these gin files, on `topology`."""

    name: str
    topology: str
    gin_files: list[str]
    bindings: list[str] = field(default_factory=list)


# The paper's run (Llama 2 7B, context 4096, global batch 128, bf16 compute, fp32 master weights + AdamW,
# full remat) on each v3 slice: the mesh and gradient accumulation come from gin/meshes/v3-*.gin. v5e-32 has
# as many devices (16 GiB each) as v3-32 and takes the same mesh file.
PAPER_GIN = ["models/llama2_7b.gin", "runs/base.gin"]
PLANS = {
    name: Plan(name, name, [*PAPER_GIN, f"meshes/{name}.gin"])
    for name in ("v3-8", "v3-32", "v3-128", "v3-256")
}
PLANS["v5e-32"] = Plan("v5e-32", "v5e-32", [*PAPER_GIN, "meshes/v3-32.gin"])


@dataclass
class Resolved:
    model: Any  # ModelConfig
    mesh: Any  # MeshConfig
    optimizer: Any  # OptimizerConfig
    rules: Any
    global_batch: int
    seq_len: int
    grad_accum: int


def resolve_plan(plan: Plan) -> Resolved:
    """Parse the plan's gin files + bindings exactly as `ptm train` does and read what `train` would get."""
    import gin
    from ptm import config
    from ptm.parallel.mesh import DEFAULT_RULES, MeshConfig
    from ptm.train.optimizer import OptimizerConfig

    config.parse(plan.gin_files, plan.bindings)
    b = gin.get_bindings("train")
    gin.clear_config()
    if "model" not in b or "data" not in b:
        raise ValueError(f"{plan.name}: gin files {plan.gin_files} bind no train.model / train.data")
    return Resolved(
        model=b["model"],
        mesh=b.get("mesh", MeshConfig()),
        optimizer=b.get("optimizer", OptimizerConfig()),
        rules=b.get("rules", DEFAULT_RULES),
        global_batch=b["data"].global_batch_size,
        seq_len=b["data"].seq_len,
        grad_accum=int(b.get("grad_accum_steps", 1)),
    )


def compile_only_devices(topology: str):
    """The devices of a TPU topology that exist only for compilation (needs libtpu, no TPU)."""
    try:
        from jax.experimental import topologies
    except ImportError as e:  # pragma: no cover
        raise RuntimeError(f"jax.experimental.topologies unavailable: {e}") from e
    name = TOPOLOGIES.get(topology, topology)
    return topologies.get_topology_desc(topology_name=name, platform="tpu").devices


def libtpu_available() -> tuple[bool, str]:
    """(ok, reason): whether deviceless TPU compilation works in this environment."""
    try:
        import libtpu  # noqa: F401
    except ImportError:
        return False, 'libtpu is not installed (pip install "jax[tpu]==<jax version>")'
    try:
        compile_only_devices("v3:2x2")
    except Exception as e:  # noqa: BLE001 - report whatever libtpu says
        return False, f"libtpu cannot build a compile-only v3 topology: {e}"
    return True, ""


def device_specs(device) -> tuple[int, float]:
    """(usable HBM bytes, peak bf16 FLOP/s) of one compile-only device; v3's figures for unknown kinds."""
    return DEVICE_SPECS.get(device.device_kind, DEVICE_SPECS["TPU v3"])


def with_attention(plan: Plan, attention: str | None) -> Plan:
    """The plan with `ModelConfig.attention` bound (named `PLAN@ATTENTION`)."""
    if not attention:
        return plan
    return dataclasses.replace(
        plan, name=f"{plan.name}@{attention}", bindings=[*plan.bindings, f"ModelConfig.attention='{attention}'"]
    )


def _memory(compiled) -> dict[str, int]:
    ma = compiled.memory_analysis()
    out = {
        k: int(getattr(ma, k + "_size_in_bytes", 0) or 0)
        for k in ("argument", "output", "alias", "temp", "generated_code")
    }
    # Donated state aliases its output: count those bytes once.
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"] + out["generated_code"]
    return out


def _verdict_from_error(e: Exception) -> tuple[str, str]:
    msg = str(e)
    if "RESOURCE_EXHAUSTED" in msg:
        first = next((ln.strip() for ln in msg.splitlines() if "RESOURCE_EXHAUSTED" in ln), msg[:300])
        return "RESOURCE_EXHAUSTED", first[:400]
    raise e


def check_train(plan: Plan) -> dict[str, Any]:
    """Compile the real train step for `plan` on compile-only TPU devices; return memory/FLOPs/verdict."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from ptm.model.attention import resolve as resolve_attention
    from ptm.model.llama import flops_per_token, param_count
    from ptm.parallel.mesh import batch_sharding, data_parallel_size, make_mesh
    from ptm.train.optimizer import make_optimizer
    from ptm.train.step import jit_train_step, state_shardings

    r = resolve_plan(plan)
    cfg = r.model
    devices = compile_only_devices(plan.topology)
    mesh = make_mesh(r.mesh, devices)
    dp = data_parallel_size(mesh, r.rules)
    micro = r.global_batch // r.grad_accum
    if r.global_batch % r.grad_accum or micro % dp:
        raise ValueError(
            f"{plan.name}: global batch {r.global_batch} / accum {r.grad_accum} = {micro} "
            f"must be divisible by the data-parallel size {dp}"
        )
    opt = make_optimizer(r.optimizer, total_steps=1000)
    # Abstract state (eval_shape) is built outside the compile-only mesh context (see NOTES.md).
    abstract, _ = state_shardings(cfg, opt, mesh, r.rules)
    bsh = batch_sharding(mesh, r.rules)
    shape = (r.global_batch, r.seq_len)
    batch = {
        k: jax.ShapeDtypeStruct(shape, dt, sharding=bsh)
        for k, dt in (
            ("inputs", jnp.int32),
            ("targets", jnp.int32),
            ("loss_mask", jnp.float32),
            ("segment_ids", jnp.int32),
            ("positions", jnp.int32),
        )
    }
    step = jit_train_step(cfg, opt, mesh, r.rules, grad_accum_steps=r.grad_accum)

    n_dev = len(devices)
    hbm, peak = device_specs(devices[0])
    tokens = r.global_batch * r.seq_len
    flops = flops_per_token(cfg, r.seq_len) * tokens
    res: dict[str, Any] = {
        "plan": plan.name,
        "topology": TOPOLOGIES.get(plan.topology, plan.topology),
        "device_kind": devices[0].device_kind,
        "devices": n_dev,
        "gin_files": plan.gin_files,
        "bindings": plan.bindings,
        "mesh": dict(zip(("data", "fsdp", "tensor"), mesh.devices.shape, strict=True)),
        "params": param_count(cfg),
        "global_batch": r.global_batch,
        "seq_len": r.seq_len,
        "grad_accum": r.grad_accum,
        "seqs_per_device_per_micro": micro // dp,
        "remat": cfg.remat,
        "attention": cfg.attention,
        # What the attention setting becomes on this device for the training shapes (auto, fallbacks).
        "attention_impl": resolve_attention(
            cfg.attention, q_len=r.seq_len, kv_len=r.seq_len, cached=False, dtype=cfg.dtype,
            head_dim=cfg.head_dim, device=devices[0],
        ),
        "model_flops_per_step": flops,
        "hbm_limit_bytes": hbm,
        "peak_flops_per_device": peak,
        # Step time if the slice ran at 100% of peak; divide by the MFU you expect (or measure).
        "ideal_step_s": flops / (n_dev * peak),
    }
    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(r.rules):
            compiled = step.jitted.lower(abstract, batch).compile()
    except Exception as e:  # noqa: BLE001 - only RESOURCE_EXHAUSTED is a verdict; others re-raise
        res["verdict"], res["error"] = _verdict_from_error(e)
        res["compile_s"] = time.perf_counter() - t0
        return res
    res["compile_s"] = time.perf_counter() - t0
    mem = _memory(compiled)
    res["memory_bytes"] = mem
    res["verdict"] = "fits" if mem["peak"] <= hbm else "over HBM"
    return res


def check_merge(plan: Plan, n_skills: int = 1) -> dict[str, Any]:
    """Compile task arithmetic G + sum_k w_k (S_k - pre) over the full parameter tree, each tensor sharded
    like the training params (bf16 inputs and output, fp32 math): one tensor set merged on the device mesh."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from ptm.model.llama import abstract_params
    from ptm.model.sharding import param_shardings
    from ptm.parallel.mesh import make_mesh

    r = resolve_plan(plan)
    cfg = r.model
    devices = compile_only_devices(plan.topology)
    mesh = make_mesh(r.mesh, devices)
    shard = param_shardings(cfg, mesh, r.rules)
    tree = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16, sharding=s), abstract_params(cfg), shard
    )

    def merge(general, pre, skills, weights):
        def one(g, p, *ss):
            acc = g.astype(jnp.float32)
            for k, s in enumerate(ss):
                acc = acc + weights[k] * (s.astype(jnp.float32) - p.astype(jnp.float32))
            return acc.astype(jnp.bfloat16)

        return jax.tree.map(one, general, pre, *skills)

    w = jax.ShapeDtypeStruct((n_skills,), jnp.float32)
    jitted = jax.jit(merge, out_shardings=shard)
    t0 = time.perf_counter()
    hbm, _ = device_specs(devices[0])
    res: dict[str, Any] = {
        "plan": plan.name + ":merge",
        "devices": len(devices),
        "inputs": 2 + n_skills,
        "hbm_limit_bytes": hbm,
    }
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(r.rules):
            compiled = jitted.lower(tree, tree, [tree] * n_skills, w).compile()
    except Exception as e:  # noqa: BLE001
        res["verdict"], res["error"] = _verdict_from_error(e)
        return res
    res["compile_s"] = time.perf_counter() - t0
    res["memory_bytes"] = _memory(compiled)
    res["verdict"] = "fits" if res["memory_bytes"]["peak"] <= hbm else "over HBM"
    return res


def format_result(r: dict[str, Any], mfus: tuple[float, ...] = (0.3, 0.5)) -> str:
    lines = [f"== {r['plan']}: {r['verdict']}"]
    if "mesh" in r:
        m = r["mesh"]
        lines.append(
            f"   {r['topology']} ({r['devices']} devices), mesh data={m['data']} fsdp={m['fsdp']} "
            f"tensor={m['tensor']}, {r['params'] / 1e9:.2f}B params, batch {r['global_batch']} x "
            f"{r['seq_len']} (accum {r['grad_accum']}, {r['seqs_per_device_per_micro']} seq/device/micro"
            f"), remat={r['remat']}, attention={r['attention']} ({r['attention_impl']})"
        )
    if "memory_bytes" in r:
        mb = r["memory_bytes"]
        lines.append(
            f"   HBM per device: {mb['peak'] / GIB:.2f} GiB of {r['hbm_limit_bytes'] / GIB:.2f} GiB "
            f"(arguments {mb['argument'] / GIB:.2f}, temporaries {mb['temp'] / GIB:.2f}, "
            f"outputs {mb['output'] / GIB:.2f}, aliased {mb['alias'] / GIB:.2f})"
        )
    if "error" in r:
        lines.append(f"   compiler: {r['error']}")
    if "model_flops_per_step" in r:
        tf = r["model_flops_per_step"] / 1e12
        proj = ", ".join(f"{r['ideal_step_s'] / u:.1f} s at {u:.0%} MFU" for u in mfus)
        lines.append(
            f"   model FLOPs/step {tf:,.0f} TFLOP (6N+attention, no remat); peak "
            f"{r['peak_flops_per_device'] / 1e12:.1f} TFLOP/s/device; step {r['ideal_step_s']:.1f} s "
            f"at 100% MFU, {proj}"
        )
    if "compile_s" in r:
        lines.append(f"   compiled in {r['compile_s']:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", action="append", choices=sorted(PLANS), help="a named plan (repeatable)")
    ap.add_argument("--all", action="store_true", help="every named plan")
    ap.add_argument(
        "--gin_file", action="append", default=[], help="ad-hoc plan: gin files (as for ptm train)"
    )
    ap.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE", help="extra gin binding")
    ap.add_argument(
        "--topology", default="v3-8", help="ad-hoc plan: v3-8 .. v3-512 or a libtpu name (v3:2x2)"
    )
    ap.add_argument(
        "--attention",
        action="append",
        default=[],
        help="ModelConfig.attention for every plan (repeatable: each plan is compiled once per setting): "
        "reference | blockwise[:Q[xK]] | splash | cudnn | auto",
    )
    ap.add_argument("--merge", action="store_true", help="also compile a sharded merge of one tensor set")
    ap.add_argument("--json", help="write all results to this JSON file")
    args = ap.parse_args(argv)

    plans = [
        dataclasses.replace(PLANS[n], bindings=list(args.gin))
        for n in (sorted(PLANS) if args.all else (args.plan or []))
    ]
    if args.gin_file:
        plans.append(
            Plan(f"{'+'.join(args.gin_file)}@{args.topology}", args.topology, args.gin_file, args.gin)
        )
    if not plans:
        ap.error("give --plan, --all or --gin_file")
    if args.attention:
        from ptm.model.config import parse_attention

        for a in args.attention:
            try:
                parse_attention(a)
            except ValueError as e:
                ap.error(str(e))
        plans = [with_attention(p, a) for p in plans for a in args.attention]
    ok, why = libtpu_available()
    if not ok:
        print(f"aot_check: {why}", file=sys.stderr)
        return 2
    results = []
    for p in plans:
        r = check_train(p)
        print(format_result(r), flush=True)
        results.append(r)
        if args.merge:
            m = check_merge(p)
            print(format_result(m), flush=True)
            results.append(m)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    return 0 if all(r["verdict"] in ("fits", "RESOURCE_EXHAUSTED", "over HBM") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
