"""Attention kernels behind one switch, `ModelConfig.attention` (docs/tpu.md section 7, docs/benchmarks.md).

Every implementation computes the same thing for the decoder: causal attention of queries [B, T, H, D] over
keys/values [B, S, KVH, D] (grouped-query: query head h uses kv head h // (H // KVH)), where a query may see a
key only if both carry the same segment id, the key's segment id is not 0 (padding), and the key's index is at
most the query's index (`q_offset + t`; q_offset is the KV-cache write index, 0 without a cache).

  reference  the original code: the full [B, KVH, G, T, S] float32 score matrix and a mask. The oracle.
  blockwise  flash-style attention in plain JAX (online softmax over key blocks, custom VJP that recomputes
             the scores block by block), memory O(T x block) in forward and backward, on every backend. Blocks
             above the causal diagonal are never visited (loop bounds) and blocks masked for every row by the
             segment ids are skipped (`lax.cond`). Blocks of 512 (256 on CPU); `blockwise:N` or
             `blockwise:QxK` sets them.
  splash     the Pallas TPU splash-attention kernel with segment ids (jax.experimental.pallas.ops.tpu). It
             compiles with bf16 operands on TPU v4/v5e but not on v3 (Mosaic: "Unsupported matmul RHS type"
             for bf16), so on v3 it runs with float32 operands. On CPU it runs in Pallas interpret mode
             (slow; for testing). On GPU, for KV-cache calls and for lengths not a multiple of 128 it falls
             back to `blockwise` (logged once).
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs: causal plus the segment
             mask (jax 0.10/0.11 expose no packed-sequence offsets publicly, so the mask becomes a bias).
             Falls back to `blockwise` (logged once) off GPU, for KV-cache calls, fp32 or unsupported shapes.
  auto       splash on TPU v4+, blockwise on TPU v3, cudnn on GPU; on CPU blockwise from 256 tokens,
             reference below (measured: no faster below that). KV-cache calls: blockwise from 256 cache slots.

Outputs at padding query positions (segment 0) are not defined the same way by every implementation (the
reference averages all values there, blockwise returns 0, splash lets padding attend padding); nothing real
attends to them, so logits and gradients at real tokens do not depend on it.
"""

from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from ptm.model.config import parse_attention

log = logging.getLogger(__name__)

# auto on CPU: blockwise from this many keys on, reference below (train step of the tiny model on the 2-core CPU:
# equal speed at 128 tokens, blockwise 1.3x at 256, 1.5x at 512, 2.5x at 1024; docs/benchmarks.md).
AUTO_BLOCKWISE_MIN_LEN = 256
DEFAULT_BLOCK_Q = 512  # blockwise on TPU/GPU (MXU/tensor-core sized tiles)
DEFAULT_BLOCK_K = 512
CPU_BLOCK = 256  # blockwise on CPU: [heads, 256, 256] fp32 score tiles stay in cache (512 was 2-3x slower)
SPLASH_MIN_BLOCK = 128  # splash blocks are multiples of the 128-lane vreg width

_logged: set[str] = set()


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.warning(msg)


# ----------------------------------------------------------------------------------------------------------------
# Where the computation will run (at trace time): the concrete mesh in context (deviceless AOT compiles trace
# on a CPU host for TPU devices), else the default backend.


def target_device():
    try:
        from jax._src import mesh as mesh_lib

        m = mesh_lib.get_concrete_mesh()
        if m is not None and not m.empty:
            return m.devices.flat[0]
    except Exception:  # noqa: BLE001 - private API; the default backend is the fallback
        pass
    return jax.devices()[0]


def tpu_generation(device_kind: str) -> int | None:
    """3 for 'TPU v3', 4 for 'TPU v4', 5 for 'TPU v5 lite'/'TPU v5p', ...; None if not a TPU name."""
    kind = device_kind.lower()
    if "tpu" not in kind:
        return None
    for tok in kind.replace("tpu", " ").split():
        tok = tok.lstrip("v")
        digits = "".join(ch for ch in tok[:2] if ch.isdigit())
        if digits:
            return int(digits)
    return None


def splash_operand_dtype(device_kind: str, dtype) -> jnp.dtype:
    """The dtype splash runs in: Mosaic on TPU v3 has no bf16 matmul (measured with libtpu 0.0.42.1)."""
    gen = tpu_generation(device_kind)
    if gen is not None and gen <= 3:
        return jnp.dtype(jnp.float32)
    return jnp.dtype(dtype)


def resolve(
    name: str,
    *,
    q_len: int,
    kv_len: int,
    cached: bool,
    dtype,
    head_dim: int,
    device=None,
) -> str:
    """The implementation that will actually run for `name` with these shapes on `device` (default: the trace
    target), after the fallbacks described in the module docstring. Logs each fallback once."""
    impl, _, _ = parse_attention(name)
    dev = device if device is not None else target_device()
    platform = dev.platform
    if impl == "auto":
        short = max(q_len, kv_len) < AUTO_BLOCKWISE_MIN_LEN
        if platform == "tpu" and (tpu_generation(dev.device_kind) or 0) >= 4:
            want = "splash"
        elif platform in ("gpu", "cuda"):
            want = "cudnn"
        elif platform == "tpu":
            want = "blockwise"  # v3: no bf16 splash
        else:
            return "reference" if short else "blockwise"
        if want != "blockwise" and not _unsupported(want, q_len, kv_len, cached, dtype, head_dim, platform):
            return want
        return "reference" if cached and short else "blockwise"
    if impl in ("splash", "cudnn"):
        why = _unsupported(impl, q_len, kv_len, cached, dtype, head_dim, platform)
        if why:
            _log_once(f"attention={name!r}: {why}; using 'blockwise'")
            return "blockwise"
    return impl


def _unsupported(impl, q_len, kv_len, cached, dtype, head_dim, platform) -> str:
    if cached or q_len != kv_len:
        return f"{impl} has no KV-cache path (query length {q_len}, cache length {kv_len})"
    if impl == "splash":
        if platform not in ("tpu", "cpu"):
            return f"splash is a TPU kernel and this is a {platform.upper()}"
        if q_len % SPLASH_MIN_BLOCK:
            return f"splash needs a sequence length that is a multiple of {SPLASH_MIN_BLOCK}, got {q_len}"
        return ""
    # cudnn
    if platform not in ("gpu", "cuda"):
        return f"cudnn needs an NVIDIA GPU, the backend is {platform}"
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return f"cuDNN flash attention needs bf16/fp16 compute, got {jnp.dtype(dtype).name}"
    if head_dim % 8 or head_dim > 128:
        return f"cuDNN flash attention needs head_dim a multiple of 8 and <= 128, got {head_dim}"
    if q_len % 2:
        return f"cuDNN with a mask/bias needs an even sequence length, got {q_len}"
    return ""


# ----------------------------------------------------------------------------------------------------------------
# The entry point used by `ptm.model.llama.Attention`.


def attend(
    name: str,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segment_ids: jax.Array,
    kv_segment_ids: jax.Array,
    q_offset: jax.Array | int = 0,
    *,
    cached: bool = False,
) -> jax.Array:
    """Attention output [B, T, H, D] in q's dtype. q [B, T, H, D]; k, v [B, S, KVH, D]; segment ids [B, T] and
    [B, S]; q_offset: index of the first query among the keys (the cache index; 0 without a cache)."""
    t, d, s = q.shape[1], q.shape[3], k.shape[1]
    dev = target_device()
    impl = resolve(name, q_len=t, kv_len=s, cached=cached, dtype=q.dtype, head_dim=d, device=dev)
    _, bq, bk = parse_attention(name)
    if impl == "reference":
        return reference(q, k, v, q_segment_ids, kv_segment_ids, q_offset)
    if impl == "blockwise":
        dq, dk = (CPU_BLOCK, CPU_BLOCK) if dev.platform == "cpu" else (DEFAULT_BLOCK_Q, DEFAULT_BLOCK_K)
        return blockwise(q, k, v, q_segment_ids, kv_segment_ids, q_offset, block_q=bq or dq, block_k=bk or dk)
    if impl == "splash":
        out = splash(q, k, v, q_segment_ids, device_kind=dev.device_kind, interpret=dev.platform != "tpu")
    else:
        try:  # jax checks what cuDNN supports while tracing (NotImplementedError names the reason)
            out = cudnn(q, k, v, q_segment_ids)
        except (NotImplementedError, RuntimeError, ValueError) as e:
            _log_once(f"attention={name!r}: cuDNN refused this call ({str(e)[:200]}); using 'blockwise'")
            out = None
    if out is None:  # the kernel cannot run here (logged)
        return blockwise(q, k, v, q_segment_ids, kv_segment_ids, q_offset)
    return out


# ----------------------------------------------------------------------------------------------------------------
# reference: the original code, unchanged in its numerics.


def reference(q, k, v, q_segment_ids, kv_segment_ids, q_offset=0):
    b, t, h, hd = q.shape
    s, kvh = k.shape[1], k.shape[2]
    dt = q.dtype
    q_idx = q_offset + jnp.arange(t)
    k_idx = jnp.arange(s)
    # Same segment, causal, and never attend to padding (segment 0).
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]) & (kv_segment_ids[:, None, :] != 0)
    mask &= q_idx[None, :, None] >= k_idx[None, None, :]

    g = h // kvh
    qg = q.reshape(b, t, kvh, g, hd)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k).astype(jnp.float32) * (hd**-0.5)
    scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt)
    return jnp.einsum("bkgst,btkd->bskgd", probs, v).reshape(b, t, h, hd)


# ----------------------------------------------------------------------------------------------------------------
# blockwise: flash attention in plain JAX.


def blockwise(
    q, k, v, q_segment_ids, kv_segment_ids, q_offset=0, *, block_q: int = DEFAULT_BLOCK_Q,
    block_k: int = DEFAULT_BLOCK_K,
):
    """Flash-style attention (see module docstring). Lengths need not be multiples of the blocks (padded with
    segment 0). Fully masked query rows (padding) give 0."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    bq = min(block_q, t)
    bk = min(block_k, s)
    tp, sp = -(-t // bq) * bq, -(-s // bk) * bk
    qg = q.reshape(b, t, kvh, g, d)
    if tp != t:
        qg = jnp.pad(qg, ((0, 0), (0, tp - t), (0, 0), (0, 0), (0, 0)))
        q_segment_ids = jnp.pad(q_segment_ids, ((0, 0), (0, tp - t)))
    if sp != s:
        k = jnp.pad(k, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, 0), (0, sp - s), (0, 0), (0, 0)))
        kv_segment_ids = jnp.pad(kv_segment_ids, ((0, 0), (0, sp - s)))
    q_offset = jnp.asarray(q_offset, jnp.int32)
    out = _flash(d**-0.5, bq, bk, qg, k, v, q_segment_ids.astype(jnp.int32), kv_segment_ids.astype(jnp.int32),
                 q_offset)
    return out[:, :t].reshape(b, t, h, d)


def _block_mask(q_seg, kv_seg, q_pos, k_pos):
    """[B, bq, bk]: same segment, key not padding, causal."""
    return (
        (q_seg[:, :, None] == kv_seg[:, None, :])
        & (kv_seg[:, None, :] != 0)
        & (q_pos[None, :, None] >= k_pos[None, None, :])
    )


def _scores(qi, kj, mask, scale):
    s = jnp.einsum("bqkgd,bckd->bkgqc", qi, kj, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None, None], s, -jnp.inf)


def _flash_forward(scale, bq, bk, q, k, v, q_seg, kv_seg, q_offset):
    b, t, kvh, g, d = q.shape
    s = k.shape[1]
    nq, nk = t // bq, s // bk
    f32 = jnp.float32

    def q_block(i):
        qi = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
        si = lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)
        q_pos = q_offset + i * bq + jnp.arange(bq)
        hi = jnp.clip((q_offset + (i + 1) * bq - 1) // bk + 1, 0, nk)  # causal: later key blocks are masked

        def body(j, carry):
            kj = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
            vj = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
            sj = lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1)
            mask = _block_mask(si, sj, q_pos, j * bk + jnp.arange(bk))

            def update(carry):
                m, den, acc = carry
                sc = _scores(qi, kj, mask, scale)
                m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
                m_use = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
                p = jnp.exp(sc - m_use[..., None])
                corr = jnp.exp(m - m_use)
                den = den * corr + jnp.sum(p, axis=-1)
                pv = jnp.einsum("bkgqc,bckd->bkgqd", p.astype(v.dtype), vj, preferred_element_type=f32)
                return m_new, den, acc * corr[..., None] + pv

            return lax.cond(jnp.any(mask), update, lambda c: c, carry)

        init = (
            jnp.full((b, kvh, g, bq), -jnp.inf, f32),
            jnp.zeros((b, kvh, g, bq), f32),
            jnp.zeros((b, kvh, g, bq, d), f32),
        )
        m, den, acc = lax.fori_loop(0, hi, body, init)
        empty = den == 0.0
        o = acc / jnp.where(empty, 1.0, den)[..., None]
        lse = jnp.where(empty, 0.0, m + jnp.log(jnp.where(empty, 1.0, den)))
        return o.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse

    o, lse = lax.map(q_block, jnp.arange(nq))  # [nq, B, bq, KVH, G, D], [nq, B, KVH, G, bq]
    o = o.transpose(1, 0, 2, 3, 4, 5).reshape(b, t, kvh, g, d)
    lse = lse.transpose(1, 2, 3, 0, 4).reshape(b, kvh, g, t)
    return o, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(scale, bq, bk, q, k, v, q_seg, kv_seg, q_offset):
    return _flash_forward(scale, bq, bk, q, k, v, q_seg, kv_seg, q_offset)[0]


def _flash_fwd(scale, bq, bk, q, k, v, q_seg, kv_seg, q_offset):
    o, lse = _flash_forward(scale, bq, bk, q, k, v, q_seg, kv_seg, q_offset)
    return o, (q, k, v, q_seg, kv_seg, q_offset, o, lse)


def _flash_bwd(scale, bq, bk, res, do):
    q, k, v, q_seg, kv_seg, q_offset, o, lse = res
    b, t, kvh, g, d = q.shape
    s = k.shape[1]
    nq, nk = t // bq, s // bk
    f32 = jnp.float32
    delta = jnp.einsum("bqkgd,bqkgd->bkgq", do.astype(f32), o.astype(f32))  # rowsum(dO * O)

    def k_block(dq, j):
        kj = lax.dynamic_slice_in_dim(k, j * bk, bk, axis=1)
        vj = lax.dynamic_slice_in_dim(v, j * bk, bk, axis=1)
        sj = lax.dynamic_slice_in_dim(kv_seg, j * bk, bk, axis=1)
        k_pos = j * bk + jnp.arange(bk)
        lo = jnp.clip((j * bk - q_offset) // bq, 0, nq)  # causal: earlier query blocks see none of these keys

        def body(i, carry):
            qi = lax.dynamic_slice_in_dim(q, i * bq, bq, axis=1)
            doi = lax.dynamic_slice_in_dim(do, i * bq, bq, axis=1)
            si = lax.dynamic_slice_in_dim(q_seg, i * bq, bq, axis=1)
            mask = _block_mask(si, sj, q_offset + i * bq + jnp.arange(bq), k_pos)

            def update(carry):
                dq, dk, dv = carry
                lse_i = lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
                delta_i = lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
                p = jnp.exp(_scores(qi, kj, mask, scale) - lse_i[..., None])  # [B, KVH, G, bq, bk]
                dv = dv + jnp.einsum("bkgqc,bqkgd->bckd", p.astype(do.dtype), doi, preferred_element_type=f32)
                dp = jnp.einsum("bqkgd,bckd->bkgqc", doi, vj, preferred_element_type=f32)
                ds = (p * (dp - delta_i[..., None]) * scale)
                dk = dk + jnp.einsum("bkgqc,bqkgd->bckd", ds.astype(q.dtype), qi, preferred_element_type=f32)
                dqi = jnp.einsum("bkgqc,bckd->bqkgd", ds.astype(k.dtype), kj, preferred_element_type=f32)
                dq = lax.dynamic_update_slice_in_dim(
                    dq, lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=1) + dqi, i * bq, axis=1
                )
                return dq, dk, dv

            return lax.cond(jnp.any(mask), update, lambda c: c, carry)

        zeros = jnp.zeros((b, bk, kvh, d), f32)
        dq, dk, dv = lax.fori_loop(lo, nq, body, (dq, zeros, zeros))
        return dq, (dk, dv)

    dq, (dk, dv) = lax.scan(k_block, jnp.zeros(q.shape, f32), jnp.arange(nk))
    dk = dk.transpose(1, 0, 2, 3, 4).reshape(k.shape)
    dv = dv.transpose(1, 0, 2, 3, 4).reshape(v.shape)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------------------------------------------
# Kernels that need per-device shapes: run them under shard_map over the batch and head mesh axes.


def _local_specs(num_heads: int, num_kv_heads: int, batch: int) -> tuple[P, P] | None:
    """(spec of [B, T, H, D] arrays, spec of [B, T] arrays) under the current mesh and logical rules, or None
    if the kernel cannot be run per shard (sequence sharded, heads not divisible)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    bax, lax_, hax, dax = nn.logical_to_mesh_axes(("batch", "length", "act_heads", "head_dim"))
    if lax_ is not None or dax is not None:
        return None

    def size(ax):
        if ax is None:
            return 1
        names = (ax,) if isinstance(ax, str) else tuple(ax)
        n = 1
        for a in names:
            n *= mesh.shape[a]
        return n

    if batch % size(bax) or num_heads % size(hax) or num_kv_heads % size(hax):
        raise ValueError("unshardable")
    return P(bax, None, hax, None), P(bax, None)


def _per_shard(fn, q, k, v, seg, num_heads, num_kv_heads):
    """fn(q, k, v, seg) on each device's shard of batch and heads; None when that is impossible."""
    try:
        specs = _local_specs(num_heads, num_kv_heads, q.shape[0])
    except ValueError:
        _log_once("attention kernel: batch/heads do not divide the mesh axes; using 'blockwise'")
        return None
    if specs is None:
        return fn(q, k, v, seg)
    x, sg = specs
    return jax.shard_map(fn, in_specs=(x, x, x, sg), out_specs=x, check_vma=False)(q, k, v, seg)


def splash_block_sizes(seq_len: int):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    blk = next(bs for bs in (512, 256, 128) if seq_len % bs == 0)
    return sa.BlockSizes(
        block_q=blk, block_kv=blk, block_kv_compute=blk, block_q_dkv=blk, block_kv_dkv=blk,
        block_kv_dkv_compute=blk, block_q_dq=blk, block_kv_dq=blk,
    )


def splash(q, k, v, segment_ids, *, device_kind: str = "", interpret: bool = False):
    """Splash attention (causal + segment ids) for self-attention without a cache; q [B, T, H, D]. None if the
    mesh does not allow it."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    h, kvh, d = q.shape[2], k.shape[2], q.shape[3]
    out_dtype = q.dtype
    op_dtype = splash_operand_dtype(device_kind, q.dtype)
    if op_dtype != q.dtype:
        _log_once(f"attention='splash' on {device_kind}: running the kernel in {op_dtype.name} (no bf16 matmul)")
    if interpret:
        _log_once("attention='splash' off TPU: Pallas interpret mode (slow; meant for tests)")

    def local(q, k, v, seg):
        t = q.shape[1]
        # [B, T, H, D] -> [B, H, T, D]; splash does not scale the logits.
        qt = (q * (d**-0.5)).astype(op_dtype).transpose(0, 2, 1, 3)
        kt, vt = k.astype(op_dtype).transpose(0, 2, 1, 3), v.astype(op_dtype).transpose(0, 2, 1, 3)
        mask = sa.MultiHeadMask([sa.CausalMask((t, t))] * qt.shape[1])
        kernel = sa.make_splash_mha(
            mask, block_sizes=splash_block_sizes(t), head_shards=1, q_seq_shards=1, interpret=interpret
        )
        one = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=sa.SegmentIds(q=s1, kv=s1))
        return jax.vmap(one)(qt, kt, vt, seg).transpose(0, 2, 1, 3).astype(out_dtype)

    return _per_shard(local, q, k, v, segment_ids.astype(jnp.int32), h, kvh)


def cudnn(q, k, v, segment_ids, *, implementation: str = "cudnn"):
    """cuDNN flash attention, causal, with the segment mask (padding keys masked); q [B, T, H, D]. None if the
    mesh does not allow it. `implementation="xla"` runs the same call through XLA (for tests on CPU)."""
    h, kvh = q.shape[2], k.shape[2]

    def local(q, k, v, seg):
        mask = (seg[:, None, :, None] == seg[:, None, None, :]) & (seg[:, None, None, :] != 0)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)

    return _per_shard(local, q, k, v, segment_ids.astype(jnp.int32), h, kvh)
