"""AdamW with linear warmup and linear decay to zero (the Tulu / Merge-to-Learn recipe)."""

from __future__ import annotations

from dataclasses import dataclass

import jax
import optax


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 2e-5
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # 0 disables clipping
    decay_norms: bool = False  # weight decay on RMSNorm scales (off, as usual)


def _warmup_linear_decay(count, peak, warmup, total):
    """lr at optimizer step `count`: 0 -> peak over `warmup` steps, then linear to 0 at `total`."""
    import jax.numpy as jnp

    count = jnp.asarray(count, jnp.float32)
    up = peak * count / jnp.maximum(warmup, 1.0)
    down = peak * jnp.maximum(total - count, 0.0) / jnp.maximum(total - warmup, 1.0)
    return jnp.where(count < warmup, up, down)


def warmup_steps(cfg: OptimizerConfig, total_steps: int) -> int:
    total = max(int(total_steps), 1)
    return min(int(round(cfg.warmup_ratio * total)), total - 1) if cfg.warmup_ratio > 0 else 0


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over round(warmup_ratio * total) steps, then linear decay to 0 at `total_steps`."""
    w, t = float(warmup_steps(cfg, total_steps)), float(max(int(total_steps), 1))
    return lambda count: _warmup_linear_decay(count, cfg.learning_rate, w, t)


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """AdamW (+ global-norm clipping) whose schedule parameters live in the optimizer *state*.

    `optax.inject_hyperparams` keeps peak lr, warmup and total steps as arrays in the state, so the compiled train
    step does not depend on the run's length: runs of different lengths share one compilation (and the persistent
    compilation cache), which matters when a study trains dozens of small runs.
    """

    def decay_mask(params):
        # Decay matrices and embeddings; not RMSNorm scales (named `*norm*` in the param tree).
        return jax.tree_util.tree_map_with_path(
            lambda path, p: cfg.decay_norms or "norm" not in jax.tree_util.keystr(path), params
        )

    def chain(learning_rate, warmup, total):
        parts = []
        if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
            parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
        sched = lambda count: _warmup_linear_decay(count, learning_rate, warmup, total)
        parts.append(
            optax.adamw(
                sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=decay_mask
            )
        )
        return optax.chain(*parts)

    return optax.inject_hyperparams(chain)(
        learning_rate=float(cfg.learning_rate),
        warmup=float(warmup_steps(cfg, total_steps)),
        total=float(max(int(total_steps), 1)),
    )
