"""A Llama-family decoder in flax.linen with logical axis names and KV-cache decoding.

RMSNorm, RoPE (HF `rotate_half` convention, so Hugging Face Llama weights need no permutation), SwiGLU MLP,
grouped-query attention, optional tied embeddings. Layers are always stacked on a leading `layers` axis (via
`nn.scan`); `scan_layers=False` fully unrolls the same scan, so the parameter tree — and the checkpoint format
the merge engine and converters rely on — does not depend on it. Parameters are fp32 (`param_dtype`), compute in
`dtype` (bf16 by default), logits and norms in fp32. The attention kernel is chosen by `ModelConfig.attention`
(reference | blockwise | splash | cudnn | auto; `ptm.model.attention`); it does not change the parameters.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ptm.model import attention
from ptm.model.config import ModelConfig

Params = dict[str, Any]

_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _dtype(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def _param(
    module: nn.Module, name: str, shape: tuple[int, ...], axes: tuple[str, ...], init, cfg: ModelConfig
):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, _dtype(cfg.param_dtype))


def _dense_init(fan_in: int):
    return nn.initializers.normal(stddev=fan_in**-0.5)


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones, self.cfg)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.norm_eps)
        return (y * scale.astype(jnp.float32)).astype(_dtype(self.cfg.dtype))


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, HF `rotate_half` layout. x: [B, S, ..., D], positions: [B, S]."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (np.arange(0, d, 2, dtype=np.float32) / d))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D/2]
    ang = ang.reshape(ang.shape[:2] + (1,) * (x.ndim - 3) + ang.shape[-1:])
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x32 = x.astype(jnp.float32)
    x1, x2 = x32[..., : d // 2], x32[..., d // 2 :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, layer_cache, cache_index):
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        e, h, kvh, hd = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        wq = _param(self, "wq", (e, h, hd), ("embed", "heads", "head_dim"), _dense_init(e), cfg)
        wk = _param(self, "wk", (e, kvh, hd), ("embed", "kv_heads", "head_dim"), _dense_init(e), cfg)
        wv = _param(self, "wv", (e, kvh, hd), ("embed", "kv_heads", "head_dim"), _dense_init(e), cfg)
        wo = _param(self, "wo", (h, hd, e), ("heads", "head_dim", "embed"), _dense_init(h * hd), cfg)

        q = jnp.einsum("bse,ehd->bshd", x, wq.astype(dt))
        k = jnp.einsum("bse,ehd->bshd", x, wk.astype(dt))
        v = jnp.einsum("bse,ehd->bshd", x, wv.astype(dt))
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", "head_dim"))
        q = rope(q, positions, cfg.rope_theta)
        k = rope(k, positions, cfg.rope_theta)

        if layer_cache is None:
            keys, values, key_seg, q_offset = k, v, segment_ids, 0
            new_cache = None
        else:
            keys = jax.lax.dynamic_update_slice_in_dim(
                layer_cache["k"], k.astype(layer_cache["k"].dtype), cache_index, axis=1
            )
            values = jax.lax.dynamic_update_slice_in_dim(
                layer_cache["v"], v.astype(layer_cache["v"].dtype), cache_index, axis=1
            )
            key_seg = jax.lax.dynamic_update_slice_in_dim(
                layer_cache["segment_ids"], segment_ids, cache_index, axis=1
            )
            new_cache = {"k": keys, "v": values, "segment_ids": key_seg}
            keys, values = keys.astype(dt), values.astype(dt)
            q_offset = cache_index

        # Same segment, causal (key index <= q_offset + query index), never attend to padding (segment 0).
        out = attention.attend(
            cfg.attention, q, keys, values, segment_ids, key_seg, q_offset, cached=layer_cache is not None
        )
        out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", "head_dim"))
        y = jnp.einsum("bshd,hde->bse", out, wo.astype(dt))
        return y, new_cache


class Mlp(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        e, m = cfg.embed_dim, cfg.mlp_dim
        w_gate = _param(self, "w_gate", (e, m), ("embed", "mlp"), _dense_init(e), cfg)
        w_up = _param(self, "w_up", (e, m), ("embed", "mlp"), _dense_init(e), cfg)
        w_down = _param(self, "w_down", (m, e), ("mlp", "embed"), _dense_init(m), cfg)
        gate = jnp.einsum("bse,em->bsm", x, w_gate.astype(dt))
        up = jnp.einsum("bse,em->bsm", x, w_up.astype(dt))
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
        return jnp.einsum("bsm,me->bse", hidden, w_down.astype(dt))


class DecoderLayer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, layer_cache, positions, segment_ids, cache_index):
        cfg = self.cfg
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        h, new_cache = Attention(cfg, name="attention")(
            RMSNorm(cfg, name="attention_norm")(x), positions, segment_ids, layer_cache, cache_index
        )
        x = x + h
        x = x + Mlp(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
        return x, new_cache


class Transformer(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions, segment_ids, cache=None, cache_index=None):
        cfg = self.cfg
        emb = Embed(cfg, name="embed")
        x = emb(tokens)

        layer_cls = DecoderLayer
        if cfg.remat != "none":
            layer_cls = nn.remat(DecoderLayer, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        layers = nn.scan(
            layer_cls,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_layers,
            unroll=1 if cfg.scan_layers else cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        x, new_cache = layers(x, cache, positions, segment_ids, cache_index)

        x = RMSNorm(cfg, name="final_norm")(x)
        logits = emb.attend(x) if cfg.tie_embeddings else LmHead(cfg, name="lm_head")(x)
        logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))
        return logits, new_cache


class Embed(nn.Module):
    cfg: ModelConfig

    def setup(self):
        self.embedding = _param(
            self,
            "embedding",
            (self.cfg.vocab_size, self.cfg.embed_dim),
            ("vocab", "embed"),
            nn.initializers.normal(stddev=1.0),
            self.cfg,
        )

    def __call__(self, tokens):
        x = jnp.take(self.embedding, tokens, axis=0).astype(_dtype(self.cfg.dtype))
        return nn.with_logical_constraint(x, ("batch", "length", "act_embed"))

    def attend(self, x):
        return jnp.einsum("bse,ve->bsv", x, self.embedding.astype(_dtype(self.cfg.dtype)))


class LmHead(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        kernel = _param(
            self,
            "kernel",
            (cfg.embed_dim, cfg.vocab_size),
            ("embed", "vocab"),
            _dense_init(cfg.embed_dim),
            cfg,
        )
        return jnp.einsum("bse,ev->bsv", x, kernel.astype(_dtype(cfg.dtype)))


# ----------------------------------------------------------------------------------------------------------------
# Functional API: plain param dicts in, arrays out.


def _dummy_inputs(batch: int = 1, seq: int = 1):
    z = jnp.zeros((batch, seq), jnp.int32)
    return z, z, jnp.ones((batch, seq), jnp.int32)


def init_boxed(config: ModelConfig, rng: jax.Array) -> Params:
    """Params with flax `Partitioned` boxes (carrying logical axis names)."""
    tokens, positions, seg = _dummy_inputs()
    return Transformer(config).init(rng, tokens, positions, seg)["params"]


def init_params(config: ModelConfig, rng: jax.Array) -> Params:
    """A plain nested dict of fp32 (param_dtype) arrays; see docs/checkpoint-format.md for names."""
    return _jitted_init(config)(rng)


@functools.lru_cache(maxsize=16)
def _jitted_init(config: ModelConfig):
    # Jitted: op-by-op initialisation of a scanned model is ~100x slower on CPU.
    return jax.jit(lambda rng: nn.unbox(init_boxed(config, rng)))


@functools.lru_cache(maxsize=16)
def abstract_params(config: ModelConfig) -> Params:
    """Shape/dtype structs of the params, without allocating anything (cached: treat as read-only)."""
    return nn.unbox(jax.eval_shape(lambda r: init_boxed(config, r), jax.random.key(0)))


@functools.lru_cache(maxsize=16)
def logical_axes(config: ModelConfig) -> Params:
    """Tree (same structure as params) of `PartitionSpec`s whose entries are logical axis names."""
    boxed = jax.eval_shape(lambda r: init_boxed(config, r), jax.random.key(0))
    return nn.get_partition_spec(boxed)


def forward(
    params: Params, config: ModelConfig, inputs: jax.Array, positions: jax.Array, segment_ids: jax.Array
) -> jax.Array:
    """Logits [B, S, V] in float32. Attention stays within a segment; segment 0 is padding."""
    logits, _ = Transformer(config).apply({"params": params}, inputs, positions, segment_ids)
    return logits


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype: str | None = None) -> Params:
    """Empty KV cache stacked over layers: k/v [L, B, T, kv_heads, head_dim], segment_ids [L, B, T]."""
    dt = _dtype(dtype or config.dtype)
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
    return {
        "k": jnp.zeros(shape, dt),
        "v": jnp.zeros(shape, dt),
        "segment_ids": jnp.zeros((config.num_layers, batch_size, max_len), jnp.int32),
    }


def forward_with_cache(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array,
    cache: Params,
    cache_index: jax.Array,
) -> tuple[jax.Array, Params]:
    """Run T new tokens [B, T] written at cache slots [cache_index, cache_index+T); returns (logits, cache)."""
    logits, new_cache = Transformer(config).apply(
        {"params": params}, tokens, positions, segment_ids, cache, jnp.asarray(cache_index, jnp.int32)
    )
    return logits, new_cache


def param_count(config: ModelConfig) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(abstract_params(config))))


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3x forward), PaLM-style accounting incl. attention."""
    c = config
    per_layer = 2 * c.embed_dim * (c.num_heads + 2 * c.num_kv_heads) * c.head_dim  # qkv
    per_layer += 2 * c.num_heads * c.head_dim * c.embed_dim  # out proj
    per_layer += 2 * 3 * c.embed_dim * c.mlp_dim  # swiglu
    per_layer += 2 * 2 * c.num_heads * c.head_dim * seq_len  # scores + weighted sum (full, non-causal count)
    fwd = c.num_layers * per_layer + 2 * c.embed_dim * c.vocab_size
    return 3.0 * fwd
