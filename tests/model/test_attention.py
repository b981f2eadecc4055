"""ModelConfig.attention: blockwise / splash (Pallas interpret mode) / cudnn (its fallback and mask logic) against
the reference attention, op by op, through the whole model (forward, gradients, KV-cache decoding) and in a short
training run.

Tolerances (float32 compute; padding positions excluded, see ptm/model/attention.py):
  attention op, blockwise or splash vs reference:  |diff| <= 1e-5 (outputs and q/k/v gradients of magnitude ~1-5)
  whole model logits and parameter gradients:      rtol 1e-4, atol 1e-5 (blockwise), 1e-4 (splash)
  bf16 compute, logits:                            max |diff| <= 3% of max |logit| (bf16 has 3 significant digits)
  cached greedy decoding:                          same tokens; logits within 1e-4
  10 training steps:                               every step's loss within 1e-4 relative
"""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ptm.model import attention as A
from ptm.model.config import ModelConfig, from_spec, parse_attention
from ptm.model.llama import forward, forward_with_cache, init_cache, init_params

CFG = ModelConfig(
    dtype="float32",
    vocab_size=61,
    embed_dim=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_dim=48,
)
BLK = "blockwise:8x16"  # small blocks so that tiny sequences span several blocks (and end in a partial one)


def with_attn(cfg: ModelConfig, attention: str, **kw) -> ModelConfig:
    return dataclasses.replace(cfg, attention=attention, **kw)


def packed_batch(lengths_per_row, s, vocab, seed=0):
    """Rows of packed examples (segment ids 1, 2, ...; positions restart) with trailing padding (segment 0)."""
    rng = np.random.default_rng(seed)
    b = len(lengths_per_row)
    seg = np.zeros((b, s), np.int32)
    pos = np.zeros((b, s), np.int32)
    for r, lens in enumerate(lengths_per_row):
        at = 0
        for i, n in enumerate(lens):
            seg[r, at : at + n] = i + 1
            pos[r, at : at + n] = np.arange(n)
            at += n
    toks = rng.integers(0, vocab, (b, s), dtype=np.int32)
    return jnp.asarray(toks), jnp.asarray(pos), jnp.asarray(seg)


def _real(seg):
    return np.asarray(seg) != 0


# ----------------------------------------------------------------------------------------------------------------
# configuration


def test_attention_setting_is_validated_and_passes_through_gin_and_toml():
    assert CFG.attention == "reference"
    for name in ("reference", "blockwise", "splash", "cudnn", "auto", "blockwise:256", "blockwise:128x512"):
        assert ModelConfig(attention=name).attention == name
    assert parse_attention("blockwise:128x512") == ("blockwise", 128, 512)
    assert parse_attention("blockwise:64") == ("blockwise", 64, 64)
    assert parse_attention("splash") == ("splash", None, None)
    for bad in ("flash", "splash:128", "blockwise:", "blockwise:0", "blockwise:8x8x8", "blockwise:ax8", ""):
        with pytest.raises(ValueError, match="attention"):
            ModelConfig(attention=bad)
    # The parameter tree does not depend on it.
    assert "attention" not in CFG.shape_dict()
    assert from_spec({"preset": "tiny", "attention": "blockwise"}, "test").attention == "blockwise"

    import gin
    from ptm import config

    config.parse(["models/tiny.gin"], ["ModelConfig.attention = 'blockwise:256'"])
    try:
        assert gin.get_bindings("train")["model"].attention == "blockwise:256"
    finally:
        gin.clear_config()


def _dev(platform, kind):
    return SimpleNamespace(platform=platform, device_kind=kind)


def test_auto_and_fallbacks_pick_the_documented_implementation(caplog):
    def pick(name, dev, t=4096, s=None, cached=False, dtype="bfloat16", hd=128):
        return A.resolve(name, q_len=t, kv_len=s or t, cached=cached, dtype=dtype, head_dim=hd, device=dev)

    v3, v5e = _dev("tpu", "TPU v3"), _dev("tpu", "TPU v5 lite")
    gpu, cpu = _dev("gpu", "NVIDIA H100 80GB HBM3"), _dev("cpu", "cpu")
    assert pick("auto", v5e) == "splash" and pick("auto", _dev("tpu", "TPU v4")) == "splash"
    assert pick("auto", v3) == "blockwise"  # Mosaic has no bf16 matmul on v3
    assert pick("auto", gpu) == "cudnn"
    assert pick("auto", cpu) == "blockwise" and pick("auto", cpu, t=256) == "blockwise"
    assert pick("auto", cpu, t=128) == "reference"
    assert pick("auto", v5e, t=1000) == "blockwise"  # splash needs multiples of 128
    assert pick("auto", v5e, t=1, s=128, cached=True) == "reference"  # short cache: reference
    assert pick("auto", gpu, t=1, s=4096, cached=True) == "blockwise"
    assert pick("reference", v5e) == "reference" and pick("blockwise", gpu) == "blockwise"
    assert pick("splash", v3) == "splash"  # explicit: runs with float32 operands there
    assert A.splash_operand_dtype("TPU v3", jnp.bfloat16) == jnp.float32
    assert A.splash_operand_dtype("TPU v5 lite", jnp.bfloat16) == jnp.bfloat16
    assert A.tpu_generation("TPU v6 lite") == 6 and A.tpu_generation("cpu") is None
    A._logged.clear()
    with caplog.at_level(logging.WARNING, logger="ptm.model.attention"):
        assert pick("cudnn", cpu) == "blockwise"
        assert pick("cudnn", cpu) == "blockwise"
        assert pick("cudnn", gpu, dtype="float32") == "blockwise"
        assert pick("cudnn", gpu) == "cudnn"
        assert pick("splash", gpu) == "blockwise"
        assert pick("splash", v5e, t=1, s=4096, cached=True) == "blockwise"
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 4, msgs  # each fallback once
    assert "NVIDIA GPU" in msgs[0] and "bf16" in msgs[1] and "TPU kernel" in msgs[2] and "KV-cache" in msgs[3]


# ----------------------------------------------------------------------------------------------------------------
# the attention op


def _qkv(b, t, h, kvh, d, seed=0, s=None):
    ks = jax.random.split(jax.random.key(seed), 4)
    s = s or t
    q = jax.random.normal(ks[0], (b, t, h, d))
    k = jax.random.normal(ks[1], (b, s, kvh, d))
    v = jax.random.normal(ks[2], (b, s, kvh, d))
    return q, k, v, ks[3]


def _op_check(fn, q, k, v, seg, w, atol):
    """fn(q, k, v) vs the reference: outputs and q/k/v gradients of a weighted sum over the real positions."""
    real = _real(seg)[..., None, None]

    def run(f):
        def loss(q, k, v):
            out = f(q, k, v)
            return jnp.sum(jnp.where(real, out, 0.0) * w), out

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    g_ref, ref = run(lambda q, k, v: A.reference(q, k, v, seg, seg))
    g_new, out = run(fn)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=atol, rtol=0)
    for a, b in zip(g_new, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=atol, rtol=0)


@pytest.mark.parametrize(
    "h,kvh,bq,bk",
    [(4, 2, 8, 8), (4, 2, 5, 7), (4, 2, 64, 64), (4, 4, 16, 8), (4, 1, 8, 16)],
    ids=["gqa-8x8", "gqa-5x7", "gqa-one-block", "mha-16x8", "mqa-8x16"],
)
def test_blockwise_op_equals_reference_forward_and_gradients(h, kvh, bq, bk):
    # 37 tokens: three packed examples + padding in row 0, one example + padding in row 1.
    _, _, seg = packed_batch([[10, 15, 8], [30]], 37, 2)
    q, k, v, kw = _qkv(2, 37, h, kvh, 8)
    w = jax.random.normal(kw, q.shape)
    _op_check(lambda q, k, v: A.blockwise(q, k, v, seg, seg, block_q=bq, block_k=bk), q, k, v, seg, w, 1e-5)


def test_blockwise_op_with_a_query_offset_equals_reference():
    """The KV-cache case: a few queries at positions [off, off + T) against a longer key sequence."""
    _, _, seg = packed_batch([[25, 12], [37]], 40, 2)
    q, k, v, _ = _qkv(2, 40, 4, 2, 8)
    ref_fn = jax.jit(lambda qs, ss, off: A.reference(qs, k, v, ss, seg, off))
    blk_fn = jax.jit(lambda qs, ss, off: A.blockwise(qs, k, v, ss, seg, off, block_q=4, block_k=8))
    for off, t in ((20, 1), (33, 7)):
        qs, ss = q[:, off : off + t], seg[:, off : off + t]
        ref = ref_fn(qs, ss, jnp.int32(off))
        out = blk_fn(qs, ss, jnp.int32(off))
        real = _real(ss)[..., None, None]
        np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=1e-5, rtol=0)


def test_blockwise_memory_grows_linearly_with_sequence_length():
    """Compiled forward+backward of the op on CPU: the reference's temporaries grow with T^2, blockwise's with T."""

    def temp(fn, t):
        sd = jax.ShapeDtypeStruct
        args = (sd((1, t, 4, 32), jnp.float32), sd((1, t, 2, 32), jnp.float32), sd((1, t, 2, 32), jnp.float32),
                sd((1, t), jnp.int32))
        g = jax.jit(jax.grad(lambda q, k, v, s: fn(q, k, v, s).sum(), argnums=(0, 1, 2)))
        return g.lower(*args).compile().memory_analysis().temp_size_in_bytes

    ref = lambda q, k, v, s: A.reference(q, k, v, s, s)
    blk = lambda q, k, v, s: A.blockwise(q, k, v, s, s, block_q=256, block_k=256)
    r1, r4 = temp(ref, 1024), temp(ref, 4096)
    b1, b4 = temp(blk, 1024), temp(blk, 4096)
    assert r4 > 12 * r1  # quadratic: the [T, T] scores
    assert b4 < 2 * b1  # blocks of 256 x 256 plus O(T) vectors
    assert b4 < r4 / 50


def test_cudnn_call_masks_like_the_reference():
    """The cuDNN branch's mask and layout, run through jax.nn.dot_product_attention's XLA implementation."""
    _, _, seg = packed_batch([[10, 15, 8], [30]], 37, 2)
    q, k, v, _ = _qkv(2, 37, 4, 2, 8)
    real = _real(seg)[..., None, None]
    out = jax.jit(lambda q, k, v: A.cudnn(q, k, v, seg, implementation="xla"))(q, k, v)
    ref = jax.jit(lambda q, k, v: A.reference(q, k, v, seg, seg))(q, k, v)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), atol=1e-5)


def test_splash_in_pallas_interpret_mode_equals_reference():
    """jax 0.10.2 runs the TPU splash kernel (forward and its backward kernels) in Pallas interpret mode on CPU."""
    _, _, seg = packed_batch([[100, 120], [256]], 256, 2)
    q, k, v, kw = _qkv(2, 256, 4, 2, 16)
    w = jax.random.normal(kw, q.shape)
    _op_check(lambda q, k, v: A.splash(q, k, v, seg, interpret=True), q, k, v, seg, w, 1e-5)


# ----------------------------------------------------------------------------------------------------------------
# the whole model


def _loss(cfg, toks, pos, seg):
    def f(p):
        logits = forward(p, cfg, toks, pos, seg)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], toks[:, 1:])
        return jnp.sum(ce * (seg[:, 1:] != 0)), logits

    return f


def test_model_forward_and_gradients_blockwise_equal_reference():
    toks, pos, seg = packed_batch([[10, 15, 8], [30]], 37, CFG.vocab_size)
    params = init_params(CFG, jax.random.key(0))
    real = _real(seg)[..., None]
    outs, grads = {}, {}
    for a in ("reference", BLK):
        grads[a], outs[a] = jax.jit(jax.grad(_loss(with_attn(CFG, a), toks, pos, seg), has_aux=True))(params)
    np.testing.assert_allclose(np.where(real, outs[BLK], 0), np.where(real, outs["reference"], 0), rtol=1e-4,
                               atol=1e-5)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(grads[BLK])[0],
                            jax.tree.leaves(grads["reference"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))


def test_model_bf16_blockwise_is_within_bf16_noise_of_reference():
    toks, pos, seg = packed_batch([[20, 17], [37]], 37, CFG.vocab_size, seed=3)
    params = init_params(CFG, jax.random.key(0))
    real = _real(seg)[..., None]
    ref = jax.jit(lambda p: forward(p, with_attn(CFG, "reference", dtype="bfloat16"), toks, pos, seg))(params)
    blk = jax.jit(lambda p: forward(p, with_attn(CFG, BLK, dtype="bfloat16"), toks, pos, seg))(params)
    diff = np.max(np.abs(np.where(real, blk - ref, 0)))
    assert diff <= 0.03 * float(np.max(np.abs(ref))), diff


def test_model_splash_interpret_under_a_mesh_equals_reference():
    """Through the model on 4 devices (batch over fsdp=2, heads over tensor=2): the kernel runs per shard in
    shard_map, as on a TPU slice."""
    import flax.linen as nn

    from ptm.parallel.mesh import DEFAULT_RULES, MeshConfig, make_mesh

    toks, pos, seg = packed_batch([[60, 50], [128]], 128, CFG.vocab_size, seed=5)
    params = init_params(CFG, jax.random.key(0))
    real = _real(seg)[..., None]
    ref = jax.jit(lambda p: forward(p, CFG, toks, pos, seg))(params)
    fn = jax.jit(lambda p: forward(p, with_attn(CFG, "splash"), toks, pos, seg))
    with jax.set_mesh(make_mesh(MeshConfig(1, 2, 2), devices=jax.devices()[:4])), nn.logical_axis_rules(DEFAULT_RULES):
        assert "manual_computation" in fn.lower(params).as_text()  # shard_map
        out = fn(params)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), rtol=1e-4, atol=1e-4)


def test_model_cudnn_falls_back_to_blockwise_on_cpu(caplog):
    toks, pos, seg = packed_batch([[10, 15, 8], [30]], 37, CFG.vocab_size)
    params = init_params(CFG, jax.random.key(0))
    A._logged.clear()
    with caplog.at_level(logging.WARNING, logger="ptm.model.attention"):
        out = jax.jit(lambda p: forward(p, with_attn(CFG, "cudnn"), toks, pos, seg))(params)
    assert any("cudnn needs an NVIDIA GPU" in r.getMessage() for r in caplog.records)
    real = _real(seg)[..., None]
    ref = jax.jit(lambda p: forward(p, CFG, toks, pos, seg))(params)
    np.testing.assert_allclose(np.where(real, out, 0), np.where(real, ref, 0), rtol=1e-4, atol=1e-5)


def _greedy(cfg, params, toks, pos, seg, n_new, cache_len):
    """Prefill, then n_new greedy tokens one at a time through the KV cache; (tokens [B, n], logits [B, n, V]).
    One jitted function for every call: chunk and cache index are traced, as in the eval harness."""
    b, t = toks.shape
    call = jax.jit(lambda p, tok, ps, sg, c, i: forward_with_cache(p, cfg, tok, ps, sg, c, i))
    cache = init_cache(cfg, b, cache_len, dtype="float32")
    # The prompt in two chunks: the second one (4 tokens) attends to the first through the cache.
    _, cache = call(params, toks[:, :-4], pos[:, :-4], seg[:, :-4], cache, 0)
    logits, cache = call(params, toks[:, -4:], pos[:, -4:], seg[:, -4:], cache, t - 4)
    last, next_pos = logits[:, -1], pos[:, -1] + 1
    out_toks, out_logits = [], []
    for i in range(n_new):
        tok = jnp.argmax(last, axis=-1).astype(jnp.int32)[:, None]
        out_toks.append(tok)
        out_logits.append(last)
        logits, cache = call(params, tok, next_pos[:, None] + i, jnp.ones_like(tok), cache, t + i)
        last = logits[:, 0]
    return jnp.concatenate(out_toks, axis=1), jnp.stack(out_logits, axis=1)


def test_cached_greedy_decoding_blockwise_equals_reference():
    params = init_params(CFG, jax.random.key(1))
    toks = jax.random.randint(jax.random.key(2), (2, 9), 0, CFG.vocab_size)
    seg = jnp.array([[0, 0, 0] + [1] * 6, [1] * 9])  # row 0 left-padded
    pos = jnp.array([[0, 0, 0] + list(range(6)), list(range(9))])
    ref_t, ref_l = _greedy(CFG, params, toks, pos, seg, 6, 24)
    blk_t, blk_l = _greedy(with_attn(CFG, "blockwise:4x8"), params, toks, pos, seg, 6, 24)
    np.testing.assert_array_equal(blk_t, ref_t)
    np.testing.assert_allclose(blk_l, ref_l, rtol=1e-4, atol=1e-4)


def test_training_run_blockwise_reaches_the_same_losses():
    """10 steps of the real jitted train step (4 devices: fsdp 2 x tensor 2) on packed batches with padding."""
    from ptm.parallel.mesh import MeshConfig, make_mesh
    from ptm.train.optimizer import OptimizerConfig, make_optimizer
    from ptm.train.step import init_state, jit_train_step

    mesh = make_mesh(MeshConfig(1, 2, 2), devices=jax.devices()[:4])
    tx = make_optimizer(OptimizerConfig(learning_rate=3e-3, warmup_ratio=0.0), 100)
    rng = np.random.default_rng(0)
    batches = []
    for i in range(10):
        lens = [[int(rng.integers(5, 16)) for _ in range(3)] for _ in range(4)]
        toks, pos, seg = packed_batch([lens_[: 1 + (r + i) % 3] for r, lens_ in enumerate(lens)], 48,
                                      CFG.vocab_size, seed=i)
        toks = jnp.asarray(np.asarray(toks) % 7)  # a learnable distribution: the loss must go down
        batches.append({"inputs": toks, "targets": jnp.roll(toks, -1, axis=1), "positions": pos,
                        "segment_ids": seg, "loss_mask": (seg != 0).astype(jnp.float32)})
    losses = {}
    for a in ("reference", BLK):
        cfg = with_attn(CFG, a)
        step = jit_train_step(cfg, tx, mesh)
        state = init_state(cfg, tx, mesh, seed=0)
        losses[a] = []
        for batch in batches:
            state, m = step(state, batch)
            losses[a].append(float(m["loss"]))
    np.testing.assert_allclose(losses[BLK], losses["reference"], rtol=1e-4)
    assert losses[BLK][-1] < losses[BLK][0] - 0.5
