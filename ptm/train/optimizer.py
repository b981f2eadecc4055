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


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup over ceil(warmup_ratio * total) steps, then linear decay to 0 at `total_steps`."""
    total = max(int(total_steps), 1)
    warmup = min(int(round(cfg.warmup_ratio * total)), total - 1) if cfg.warmup_ratio > 0 else 0
    decay = optax.linear_schedule(cfg.learning_rate, 0.0, max(total - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.learning_rate, warmup), decay], [warmup])


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    def decay_mask(params):
        # Decay matrices and embeddings; not RMSNorm scales (named `*norm*` in the param tree).
        return jax.tree_util.tree_map_with_path(
            lambda path, p: cfg.decay_norms or "norm" not in jax.tree_util.keystr(path), params
        )

    parts = []
    if cfg.grad_clip_norm and cfg.grad_clip_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip_norm))
    parts.append(optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=decay_mask))
    return optax.chain(*parts)
