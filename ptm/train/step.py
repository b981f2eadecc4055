"""The jitted, sharded train step: gradient accumulation, masked loss, AdamW update."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ptm.model.config import ModelConfig
from ptm.model.llama import abstract_params, forward
from ptm.model.sharding import param_shardings
from ptm.parallel.mesh import DEFAULT_RULES, Rules, batch_sharding

TrainState = dict[str, Any]  # {"step": int32 scalar, "params": tree, "opt_state": tree}

LOSS_NORMALIZATIONS = ("token_mean", "microbatch_mean", "sum")


def token_losses(params, cfg: ModelConfig, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy [B, S] (fp32) and the loss mask."""
    logits = forward(params, cfg, batch["inputs"], batch["positions"], batch["segment_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return losses, batch["loss_mask"].astype(jnp.float32)


def make_train_step(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum_steps: int = 1,
    loss_normalization: str = "token_mean",
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Build `step(state, batch) -> (state, metrics)` for a global batch [B, S] split into `grad_accum_steps`.

    loss_normalization (it changes results; see docs/training.md):
      token_mean      mean over the assistant tokens of the whole global batch (independent of accumulation);
      microbatch_mean mean over each microbatch's assistant tokens, averaged over microbatches (HF Trainer style);
      sum             sum over all assistant tokens of the global batch.
    """
    if loss_normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"loss_normalization={loss_normalization!r}; choose one of {LOSS_NORMALIZATIONS}")
    accum = int(grad_accum_steps)

    def micro_loss(params, micro):
        losses, mask = token_losses(params, cfg, micro)
        total = jnp.sum(losses * mask)
        count = jnp.sum(mask)
        if loss_normalization == "microbatch_mean":
            objective = total / jnp.maximum(count, 1.0) / accum
        else:
            objective = total
        return objective, (total, count)

    grad_fn = jax.grad(micro_loss, has_aux=True)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        params = state["params"]
        b = batch["inputs"].shape[0]
        if b % accum:
            raise ValueError(f"global batch {b} not divisible by grad_accum_steps={accum}")
        micro = jax.tree.map(lambda x: x.reshape((accum, b // accum) + x.shape[1:]), batch)

        def body(carry, mb):
            g_acc, tot, cnt = carry
            g, (t, c) = grad_fn(params, mb)
            return (jax.tree.map(jnp.add, g_acc, g), tot + t, cnt + c), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        (grads, total, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
        if loss_normalization == "token_mean":
            grads = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        metrics = {
            "loss": total / jnp.maximum(count, 1.0),
            "loss_tokens": count,
            "grad_norm": optax.global_norm(grads),
        }
        return {"step": state["step"] + 1, "params": new_params, "opt_state": opt_state}, metrics

    return step


def _opt_state_shardings(opt_abstract, params_abstract, p_shard, mesh: Mesh):
    """Optimizer-state leaves that mirror a parameter get its sharding; everything else is replicated."""
    by_path = {}
    for (path, leaf), sh in zip(
        jax.tree_util.tree_flatten_with_path(params_abstract)[0],
        jax.tree.leaves(p_shard, is_leaf=lambda x: isinstance(x, NamedSharding)),
        strict=True,
    ):
        by_path[jax.tree_util.keystr(path)] = (leaf.shape, sh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def pick(path, leaf):
        ks = jax.tree_util.keystr(path)
        for pk, (shape, sh) in by_path.items():
            if ks.endswith(pk) and tuple(leaf.shape) == tuple(shape):
                return sh
        return replicated

    return jax.tree_util.tree_map_with_path(pick, opt_abstract)


def state_shardings(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rules: Rules = DEFAULT_RULES
) -> tuple[TrainState, TrainState]:
    """(abstract state as ShapeDtypeStructs carrying shardings, tree of shardings) — no memory allocated."""
    params_abs = abstract_params(cfg)
    p_shard = param_shardings(cfg, mesh, rules)
    opt_abs = jax.eval_shape(optimizer.init, params_abs)
    o_shard = _opt_state_shardings(opt_abs, params_abs, p_shard, mesh)
    shardings = {"step": NamedSharding(mesh, PartitionSpec()), "params": p_shard, "opt_state": o_shard}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": params_abs, "opt_state": opt_abs}
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    return abstract, shardings


def jit_train_step(
    cfg: ModelConfig, optimizer: optax.GradientTransformation, mesh: Mesh, rules: Rules = DEFAULT_RULES, **kw
):
    """The step jitted with explicit in/out shardings and the state donated."""
    _, shardings = state_shardings(cfg, optimizer, mesh, rules)
    bsh = batch_sharding(mesh, rules)
    step = make_train_step(cfg, optimizer, **kw)

    jitted = jax.jit(step, in_shardings=(shardings, bsh), out_shardings=(shardings, None), donate_argnums=0)

    def run(state, batch):
        # Activation constraints (nn.with_logical_constraint) need the mesh and rules in context when tracing.
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
            return jitted(state, batch)

    run.jitted = jitted  # for AOT lowering (tools/aot_check.py)
    return run


def init_state(
    cfg: ModelConfig,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    seed: int,
    rules: Rules = DEFAULT_RULES,
    params=None,
) -> TrainState:
    """A fresh sharded state; `params` (e.g. from another run) replaces the random init."""
    from ptm.model.llama import init_params

    _, shardings = state_shardings(cfg, optimizer, mesh, rules)

    def make(rng):
        p = init_params(cfg, rng) if params is None else params
        return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": optimizer.init(p)}

    if params is None:
        return jax.jit(make, out_shardings=shardings)(jax.random.key(seed))
    params = jax.device_put(params, shardings["params"])
    return jax.jit(
        lambda p: {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": optimizer.init(p)},
        out_shardings=shardings,
    )(params)
