import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ptm.model.llama import (
    ModelConfig,
    abstract_params,
    forward,
    forward_with_cache,
    init_cache,
    init_params,
    logical_axes,
    param_count,
)

CFG = ModelConfig(
    dtype="float32",
    vocab_size=61,
    embed_dim=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
)

EXPECTED = {
    "embed.embedding": ((61, 32), ("vocab", "embed")),
    "layers.attention_norm.scale": ((3, 32), ("layers", "norm")),
    "layers.attention.wq": ((3, 32, 4, 8), ("layers", "embed", "heads", "head_dim")),
    "layers.attention.wk": ((3, 32, 2, 8), ("layers", "embed", "kv_heads", "head_dim")),
    "layers.attention.wv": ((3, 32, 2, 8), ("layers", "embed", "kv_heads", "head_dim")),
    "layers.attention.wo": ((3, 4, 8, 32), ("layers", "heads", "head_dim", "embed")),
    "layers.mlp_norm.scale": ((3, 32), ("layers", "norm")),
    "layers.mlp.w_gate": ((3, 32, 48), ("layers", "embed", "mlp")),
    "layers.mlp.w_up": ((3, 32, 48), ("layers", "embed", "mlp")),
    "layers.mlp.w_down": ((3, 48, 32), ("layers", "mlp", "embed")),
    "final_norm.scale": ((32,), ("norm",)),
    "lm_head.kernel": ((32, 61), ("embed", "vocab")),
}


def _flat(tree):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
    )[0]:
        out[".".join(p.key for p in path)] = leaf
    return out


def test_param_names_shapes_and_logical_axes_are_the_documented_contract():
    params = _flat(abstract_params(CFG))
    axes = _flat(logical_axes(CFG))
    assert set(params) == set(EXPECTED)
    for name, (shape, ax) in EXPECTED.items():
        assert params[name].shape == shape, name
        assert params[name].dtype == jnp.float32, name
        assert tuple(axes[name]) == ax, name
    assert param_count(CFG) == sum(int(np.prod(s)) for s, _ in EXPECTED.values())


def test_tied_embeddings_drop_lm_head_and_use_embedding():
    cfg = ModelConfig(**{**CFG.to_dict(), "tie_embeddings": True})
    p = init_params(cfg, jax.random.key(0))
    assert "lm_head" not in p
    toks = jnp.array([[1, 2, 3]])
    logits = forward(p, cfg, toks, jnp.arange(3)[None], jnp.ones((1, 3), jnp.int32))
    assert logits.shape == (1, 3, 61)


def _inputs(b=2, s=12, seed=1):
    toks = jax.random.randint(jax.random.key(seed), (b, s), 0, CFG.vocab_size)
    pos = jnp.tile(jnp.arange(s), (b, 1))
    return toks, pos, jnp.ones((b, s), jnp.int32)


def test_scan_and_unrolled_layers_share_params_and_outputs():
    p = init_params(CFG, jax.random.key(0))
    toks, pos, seg = _inputs()
    a = forward(p, CFG, toks, pos, seg)
    unrolled = ModelConfig(**{**CFG.to_dict(), "scan_layers": False, "remat": "full"})
    np.testing.assert_allclose(forward(p, unrolled, toks, pos, seg), a, rtol=1e-5, atol=1e-5)


def test_packed_segments_do_not_attend_to_each_other_and_positions_restart():
    p = init_params(CFG, jax.random.key(0))
    a = jnp.array([5, 6, 7, 8, 9])
    b = jnp.array([10, 11, 12, 13])
    packed = jnp.concatenate([a, b, jnp.zeros(3, jnp.int32)])[None]
    seg = jnp.array([[1] * 5 + [2] * 4 + [0] * 3])
    pos = jnp.array([list(range(5)) + list(range(4)) + [0] * 3])
    out = forward(p, CFG, packed, pos, seg)
    alone_b = forward(p, CFG, b[None], jnp.arange(4)[None], jnp.ones((1, 4), jnp.int32))
    alone_a = forward(p, CFG, a[None], jnp.arange(5)[None], jnp.ones((1, 5), jnp.int32))
    np.testing.assert_allclose(out[0, 5:9], alone_b[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[0, :5], alone_a[0], rtol=1e-5, atol=1e-5)
    # Changing the first example changes nothing in the second.
    packed2 = packed.at[0, 2].set(40)
    out2 = forward(p, CFG, packed2, pos, seg)
    np.testing.assert_array_equal(out2[0, 5:9], out[0, 5:9])
    assert not np.allclose(out2[0, 2:5], out[0, 2:5])


def test_kv_cache_decoding_equals_full_recomputation_with_left_padding():
    p = init_params(CFG, jax.random.key(0))
    toks, _, _ = _inputs(b=2, s=10)
    # Row 0 has 3 left-padding slots.
    seg = jnp.array([[0, 0, 0] + [1] * 7, [1] * 10])
    pos = jnp.array([[0, 0, 0] + list(range(7)), list(range(10))])
    full = forward(p, CFG, toks, pos, seg)
    cache = init_cache(CFG, 2, 16, dtype="float32")
    logits, cache = forward_with_cache(p, CFG, toks[:, :6], pos[:, :6], seg[:, :6], cache, 0)
    outs = [logits]
    for t in range(6, 10):
        lt, cache = forward_with_cache(
            p, CFG, toks[:, t : t + 1], pos[:, t : t + 1], seg[:, t : t + 1], cache, t
        )
        outs.append(lt)
    inc = jnp.concatenate(outs, axis=1)
    np.testing.assert_allclose(inc[0, 3:], full[0, 3:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(inc[1], full[1], rtol=1e-4, atol=1e-4)


def test_bf16_compute_keeps_fp32_params_and_logits_close():
    p = init_params(CFG, jax.random.key(0))
    toks, pos, seg = _inputs()
    bf = ModelConfig(**{**CFG.to_dict(), "dtype": "bfloat16"})
    lb = forward(p, bf, toks, pos, seg)
    lf = forward(p, CFG, toks, pos, seg)
    assert lb.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(lb - lf))) < 0.1 * float(jnp.max(jnp.abs(lf)))


def test_gqa_equals_mha_with_repeated_kv_heads():
    """Grouped-query attention == multi-head attention whose K/V heads are each repeated per group."""
    p = init_params(CFG, jax.random.key(0))
    mha = ModelConfig(**{**CFG.to_dict(), "num_kv_heads": 4})
    g = CFG.num_heads // CFG.num_kv_heads
    p2 = jax.tree.map(lambda x: x, p)
    for k in ("wk", "wv"):
        p2["layers"]["attention"][k] = jnp.repeat(p["layers"]["attention"][k], g, axis=2)
    toks, pos, seg = _inputs()
    np.testing.assert_allclose(
        forward(p2, mha, toks, pos, seg), forward(p, CFG, toks, pos, seg), rtol=1e-5, atol=1e-5
    )


def test_invalid_config_is_rejected():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="unknown ModelConfig fields"):
        ModelConfig.from_dict({"embed_dims": 3})
