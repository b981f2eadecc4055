"""Running the model on requests: batched KV-cache generation and log-likelihoods (jitted, sharded).

Compilation is the cost to control: prompts are left-padded to power-of-two length buckets and every batch has
the same number of rows, so a suite compiles a handful of shapes; the jitted functions are cached per
(ModelConfig, mesh) and take the params as an argument, so scoring dozens of merged models of one config
compiles once. Generation runs in jitted chunks of decode steps; between chunks the host checks EOS and stop
strings and stops the batch early when every row is finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ptm.data.tokenizers import Tokenizer
from ptm.errors import DataError
from ptm.model.config import ModelConfig
from ptm.model.llama import forward, forward_with_cache, init_cache
from ptm.parallel.mesh import DEFAULT_RULES, data_parallel_size

MIN_BUCKET = 16


# -------------------------------------------------------------------------------------- compiled functions


def _bucket(n: int, cap: int) -> int:
    b = MIN_BUCKET
    while b < n:
        b *= 2
    return min(b, max(cap, n))


def _sample(logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array) -> jax.Array:
    """One token per row from float32 logits [B, V]: greedy when temperature <= 0, else nucleus sampling."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    srt = jnp.sort(scaled, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(srt, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the top token is always kept
    threshold = jnp.min(jnp.where(keep, srt, jnp.inf), axis=-1, keepdims=True)
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    sampled = jax.vmap(jax.random.categorical)(key, filtered).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, greedy)


class _Compiled:
    """Jitted prefill / decode / log-likelihood functions for one (ModelConfig, mesh, vocab limit)."""

    def __init__(self, config: ModelConfig, mesh: Mesh | None, vocab_limit: int):
        self.config, self.mesh, self.vocab_limit = config, mesh, vocab_limit
        self.shapes: set[tuple] = set()  # shape keys seen, to report compilations
        cfg = config

        def mask_vocab(logits):
            if vocab_limit < cfg.vocab_size:  # padded model vocab: never emit ids the tokenizer lacks
                ids = jnp.arange(cfg.vocab_size)
                logits = jnp.where(ids < vocab_limit, logits, -jnp.inf)
            return logits

        def prefill(params, tokens, positions, segment_ids, cache_len):
            cache = init_cache(cfg, tokens.shape[0], cache_len)
            logits, cache = forward_with_cache(params, cfg, tokens, positions, segment_ids, cache, 0)
            return mask_vocab(logits[:, -1, :]), cache

        def decode(
            params, cache, logits, pos, cache_index, done, keys, step0, temperature, top_p, eos_id, chunk
        ):
            keys = jax.random.wrap_key_data(keys)  # fed as raw uint32 key data (host rows -> global array)

            def body(carry, i):
                cache, logits, pos, done = carry
                step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step0 + i)
                tok = _sample(logits, step_keys, temperature, top_p)
                tok = jnp.where(done, eos_id, tok)
                lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tok[:, None], axis=-1)[:, 0]
                done = done | (tok == eos_id)
                seg = jnp.ones_like(tok)[:, None]
                new_logits, cache = forward_with_cache(
                    params, cfg, tok[:, None], pos[:, None], seg, cache, cache_index + i
                )
                return (cache, mask_vocab(new_logits[:, 0, :]), pos + 1, done), (tok, lp)

            (cache, logits, pos, done), (toks, lps) = jax.lax.scan(
                body, (cache, logits, pos, done), jnp.arange(chunk)
            )
            return cache, logits, pos, done, toks.T, lps.T

        def loglik(params, inputs, targets, mask, positions, segment_ids):
            logits = forward(params, cfg, inputs, positions, segment_ids)
            logp = jax.nn.log_softmax(mask_vocab(logits), axis=-1)
            tgt = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
            greedy = (jnp.argmax(logits, axis=-1) == targets) | (mask == 0)
            return jnp.sum(tgt * mask, axis=1), jnp.all(greedy, axis=1)

        self._prefill = jax.jit(prefill, static_argnums=4)
        self._decode = jax.jit(decode, static_argnums=11, donate_argnums=1)
        self._loglik = jax.jit(loglik)
        self._all = jax.jit(jnp.all) if mesh is None else jax.jit(jnp.all, out_shardings=NamedSharding(mesh, P()))
        self._rows: dict[int, _Rows] = {}

    def _ctx(self):
        if self.mesh is None:
            return _NullCtx()
        return _MeshCtx(self.mesh)

    def rows(self, bs: int) -> _Rows:
        """The rows of a [bs, ...] batch this process feeds and reads (cached per batch size)."""
        if bs not in self._rows:
            self._rows[bs] = _Rows(self.mesh, bs)
        return self._rows[bs]

    def prefill(self, params, tokens, positions, segment_ids, cache_len):
        """Arrays already on the mesh (`_Rows.put`)."""
        self.shapes.add(("prefill", tokens.shape, cache_len))
        with self._ctx():
            return self._prefill(params, tokens, positions, segment_ids, cache_len)

    def decode(
        self, params, cache, logits, pos, cache_index, done, keys, step0, temperature, top_p, eos_id, chunk
    ):
        self.shapes.add(("decode", logits.shape, cache["k"].shape, chunk))
        with self._ctx():
            return self._decode(
                params,
                cache,
                logits,
                pos,
                jnp.int32(cache_index),
                done,
                keys,
                jnp.int32(step0),
                jnp.float32(temperature),
                jnp.float32(top_p),
                jnp.int32(eos_id),
                chunk,
            )

    def all_done(self, done) -> bool:
        """Every row of the global batch finished (one tiny collective when the batch spans processes)."""
        with self._ctx():
            return bool(np.asarray(self._all(done)))

    def loglik(self, params, inputs, targets, mask, positions, segment_ids):
        self.shapes.add(("loglik", inputs.shape))
        with self._ctx():
            return self._loglik(params, inputs, targets, mask, positions, segment_ids)


class _Rows:
    """Which rows of a [bs, ...] batch this process owns: those its devices hold under the batch sharding.

    SPMD evaluation: every process builds (pads, positions) and checks stop strings only for its own rows,
    feeds them with `put` (`make_array_from_callback` asks only for this process's shards), reads back only its
    own rows (`local`), and `gather` assembles the whole batch in global row order on every process, so every
    process ends with the same results, equal to one process computing all rows.
    """

    def __init__(self, mesh: Mesh | None, bs: int):
        self.mesh, self.bs = mesh, bs
        self.multi = mesh is not None and jax.process_count() > 1
        if mesh is None:
            rows = list(range(bs))
        else:
            idx = self.sharding(1).addressable_devices_indices_map((bs,))
            rows = sorted({r for sl in idx.values() for r in range(*sl[0].indices(bs))})
        self.rows = np.asarray(rows, np.int64)
        self.pos = np.full(bs, -1, np.int64)
        self.pos[self.rows] = np.arange(len(self.rows))
        self.spread = self._spread_order()
        self._all_rows = None
        if self.multi:
            from jax.experimental import multihost_utils

            counts = np.asarray(multihost_utils.process_allgather(np.int64(len(self.rows)))).reshape(-1)
            if len(set(counts.tolist())) != 1:
                raise DataError(f"batch of {bs} rows splits unevenly over processes: {counts.tolist()}")
            self._all_rows = np.asarray(multihost_utils.process_allgather(self.rows)).reshape(-1)

    def _spread_order(self) -> np.ndarray:
        """Global row positions in the order a short (last) batch fills them: round-robin over the devices'
        row blocks, the blocks in bit-reversed order, so any prefix spreads evenly over devices and hence over
        the processes that hold contiguous runs of them (padding rows no longer all land on the last host).
        The order depends only on the global batch sharding, so 1 x 8 and 2 x 4 devices place every item on
        the same row of the same device block: results stay bit-identical across process layouts."""
        if self.mesh is None:
            return np.arange(self.bs, dtype=np.int64)
        starts = sorted({sl[0].indices(self.bs)[0] for sl in self.sharding(1).devices_indices_map((self.bs,)).values()})
        m = self.bs // len(starts)
        bits = max(1, (len(starts) - 1).bit_length())
        rev = sorted(range(len(starts)), key=lambda b: int(f"{b:0{bits}b}"[::-1], 2))
        return np.asarray([starts[b] + j for j in range(m) for b in rev], np.int64)

    def own(self, idx: Sequence[int]) -> tuple[list[int | None], np.ndarray]:
        """This process's rows of a batch of request ids: (request id, is-real) per own row. The batch's items
        take the `spread` positions in order; the other rows are padding and repeat this process's first real
        request (None where it has none: the caller feeds a dummy), so a process never reads (tokenizes)
        another's request. Results ignore padding rows, and rows never mix, so this equals 1 process."""
        at = np.full(self.bs, -1, np.int64)
        at[self.spread[: len(idx)]] = idx
        mine = at[self.rows]
        real = mine >= 0
        fill = int(mine[real][0]) if real.any() else None
        return [int(i) if ok else fill for i, ok in zip(mine, real, strict=True)], real

    def global_max(self, value: int) -> int:
        """The largest of every process's `value` (a batch's longest row, known only to the process that has
        tokenized it)."""
        if not self.multi:
            return int(value)
        from jax.experimental import multihost_utils

        return int(np.asarray(multihost_utils.process_allgather(np.int64(value))).max())

    def sharding(self, ndim: int) -> NamedSharding:
        spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), DEFAULT_RULES)
        return NamedSharding(self.mesh, P(*spec))

    def put(self, local: np.ndarray) -> jax.Array:
        """This process's rows ([len(rows), ...], in `rows` order) -> the global [bs, ...] array on the mesh."""
        local = np.asarray(local)
        if self.mesh is None:
            return jnp.asarray(local)
        gshape = (self.bs, *local.shape[1:])
        every = np.arange(self.bs)

        def cb(index):
            return local[self.pos[every[index[0]]]][(slice(None), *index[1:])]

        return jax.make_array_from_callback(gshape, self.sharding(local.ndim), cb)

    def local(self, arr: jax.Array) -> np.ndarray:
        """This process's rows of a global batch-sharded array, in `rows` order."""
        if not self.multi:
            return np.asarray(arr)[self.rows]
        out = np.empty((len(self.rows), *arr.shape[1:]), arr.dtype)
        every = np.arange(self.bs)
        for s in arr.addressable_shards:
            out[(self.pos[every[s.index[0]]], *s.index[1:])] = np.asarray(s.data)
        return out

    def gather(self, local: np.ndarray) -> np.ndarray:
        """Every process's rows -> the whole [bs, ...] batch in row order, the same on every process."""
        if not self.multi:
            out = np.empty((self.bs, *local.shape[1:]), local.dtype)
            out[self.rows] = local
            return out
        from jax.experimental import multihost_utils

        got = np.asarray(multihost_utils.process_allgather(np.ascontiguousarray(local)))
        out = np.empty((self.bs, *local.shape[1:]), local.dtype)
        out[self._all_rows] = got.reshape(-1, *local.shape[1:])
        return out


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _MeshCtx:
    """Mesh and logical-axis rules in context while tracing, as in training (activation constraints)."""

    def __init__(self, mesh: Mesh):
        self.mesh = mesh

    def __enter__(self):
        self._a = jax.set_mesh(self.mesh)
        self._b = nn.logical_axis_rules(DEFAULT_RULES)
        self._a.__enter__()
        self._b.__enter__()
        return self

    def __exit__(self, *exc):
        self._b.__exit__(*exc)
        self._a.__exit__(*exc)
        return False


_COMPILED: dict[tuple, _Compiled] = {}


def compiled_for(config: ModelConfig, mesh: Mesh | None, vocab_limit: int) -> _Compiled:
    """The cached jitted functions for this model config (reused across calls and across checkpoints)."""
    key = (config, mesh, vocab_limit)
    if key not in _COMPILED:
        _COMPILED[key] = _Compiled(config, mesh, vocab_limit)
    return _COMPILED[key]


# -------------------------------------------------------------------------------------- generation


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # <= 0: greedy
    top_p: float = 1.0
    num_samples: int = 1
    seed: int = 0
    stop: tuple[str, ...] = ()  # stop strings for every prompt (items may add their own in meta.stop)
    chunk: int = 16  # decode steps per jitted call; the host checks for stops between chunks


@dataclass
class Generation:
    tokens: list[int]
    text: str
    finish: str  # "eos" | "stop" | "length"
    logprobs: list[float] = field(default_factory=list)  # model log p of each returned token (untempered)


def _row_keys(seed: int, row_ids: np.ndarray) -> jax.Array:
    """One PRNG key per row id (an int, or an (item, sample) pair), independent of batching: reproducible."""
    ids = np.asarray(row_ids, np.int64).reshape(len(row_ids), -1)
    keys = jnp.broadcast_to(jax.random.key(seed), (len(ids),))
    for col in ids.T:
        keys = jax.vmap(jax.random.fold_in)(keys, jnp.asarray(col % 2**32, jnp.uint32))
    return keys


def _finish(
    ids: Sequence[int],
    eos_id: int,
    max_new: int,
    stops: Sequence[str],
    tokenizer: Tokenizer,
    logprobs: Sequence[float] = (),
) -> Generation:
    ids = [int(i) for i in ids[:max_new]]
    finish = "length"
    if eos_id in ids:
        ids = ids[: ids.index(eos_id)]
        finish = "eos"
    text = tokenizer.decode(ids)
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=-1)
    if cut >= 0:
        text = text[:cut]
        finish = "stop"
    return Generation(tokens=ids, text=text, finish=finish, logprobs=[float(x) for x in logprobs[: len(ids)]])


def generate(
    params,
    config: ModelConfig,
    tokenizer: Tokenizer,
    prompts: Sequence[Sequence[int]],
    gen: GenerationConfig = GenerationConfig(),
    *,
    batch_size: int = 32,
    mesh: Mesh | None = None,
    stops: Sequence[Sequence[str]] | None = None,
    row_ids: Sequence[int] | None = None,
    sort_keys: Sequence[int] | None = None,
    progress=None,
    stats: dict | None = None,
) -> list[Generation]:
    """Continue each token-id prompt (one Generation per prompt; repeat prompts for several samples).

    `stops[i]` adds stop strings for prompt i; `row_ids[i]` (default i) seeds its sampling stream, so the same
    id gives the same sample whatever else is in the batch. Prompts longer than `max_seq_len - max_new_tokens`
    keep their last tokens. With a mesh over several processes every process passes the same arguments, works
    on its own rows of each batch and returns the same full list; `stats["host_generated_tokens"]` counts the
    tokens this process generated.

    Batches group prompts of similar length: by `sort_keys[i]` if given, else by token count. With `sort_keys`
    (which every process can compute without tokenizing, e.g. the prompt's characters) `prompts[i]` is read
    only for this process's rows, so `prompts` may be a lazy sequence that tokenizes on access: each host then
    tokenizes just its share.
    """
    n = len(prompts)
    if n == 0:
        return []
    fns = compiled_for(config, mesh, int(tokenizer.vocab_size))
    bs = _round_batch(batch_size, mesh)
    chunk = max(1, min(gen.chunk, gen.max_new_tokens))
    n_chunks = -(-gen.max_new_tokens // chunk)
    max_prompt = max(1, config.max_seq_len - n_chunks * chunk)
    row_ids = np.arange(n) if row_ids is None else np.asarray(row_ids, np.int64)
    stops = [tuple(gen.stop) + tuple(s) for s in (stops or [()] * n)]
    keys_ = [len(p) for p in prompts] if sort_keys is None else list(sort_keys)
    if sort_keys is None and min(keys_) == 0:  # checked up front where every process sees every prompt
        raise DataError("generate: empty prompt")
    order = sorted(range(n), key=lambda i: keys_[i])
    results: list[Generation | None] = [None] * n
    R = fns.rows(bs)
    local_tokens = 0
    for start in range(0, n, bs):
        idx = order[start : start + bs]
        mine, real = R.own(idx)  # this process's rows (all for one process); padding spread over devices
        ids = {i: list(prompts[i])[-max_prompt:] for i in dict.fromkeys(mine) if i is not None}  # its prompts
        if any(len(p) == 0 for p in ids.values()):
            raise DataError("generate: empty prompt")
        ids[None] = [tokenizer.eos_id]  # a dummy for a process whose rows of this batch are all padding
        plen = _bucket(R.global_max(max(len(p) for p in ids.values())), max_prompt)
        tokens = np.full((len(mine), plen), tokenizer.pad_id, np.int32)
        positions = np.zeros((len(mine), plen), np.int32)
        segs = np.zeros((len(mine), plen), np.int32)
        for r, i in enumerate(mine):  # left padding: all rows share the cache index
            p = ids[i]
            tokens[r, plen - len(p) :] = p
            positions[r, plen - len(p) :] = np.arange(len(p))
            segs[r, plen - len(p) :] = 1
        # Cache length is bucketed too, so different max_new_tokens settings often share compiled functions.
        cache_len = _bucket(plen + n_chunks * chunk, plen + n_chunks * chunk)
        logits, cache = fns.prefill(params, R.put(tokens), R.put(positions), R.put(segs), cache_len)
        pos = R.put(np.array([len(ids[i]) for i in mine], np.int32))
        done_h = ~real
        done = R.put(done_h)
        keys = R.put(np.asarray(jax.random.key_data(_row_keys(gen.seed, row_ids[[i or 0 for i in mine]]))))
        out = np.zeros((len(mine), 0), np.int32)
        out_lp = np.zeros((len(mine), 0), np.float32)
        for c in range(n_chunks):
            cache, logits, pos, done, toks, lps = fns.decode(
                params,
                cache,
                logits,
                pos,
                plen + c * chunk,
                done,
                keys,
                c * chunk,
                gen.temperature,
                gen.top_p,
                tokenizer.eos_id,
                chunk,
            )
            out = np.concatenate([out, R.local(toks)], axis=1)
            out_lp = np.concatenate([out_lp, R.local(lps)], axis=1)
            done_h = R.local(done).copy()
            if stops and any(stops[i] for i in idx):  # a stop string also finishes a row
                for r, i in enumerate(mine):
                    if (
                        real[r]
                        and not done_h[r]
                        and stops[i]
                        and _finish(out[r], tokenizer.eos_id, gen.max_new_tokens, stops[i], tokenizer).finish
                        == "stop"
                    ):
                        done_h[r] = True
            done = R.put(done_h)
            if fns.all_done(done) if R.multi else done_h.all():  # one decision for all processes
                break
        out_all, lp_all = R.gather(out), R.gather(out_lp)
        for j, i in enumerate(idx):
            r = R.spread[j]
            results[i] = _finish(
                out_all[r].tolist(), tokenizer.eos_id, gen.max_new_tokens, stops[i], tokenizer, lp_all[r].tolist()
            )
        local_tokens += sum(len(results[i].tokens) for i, ok in zip(mine, real, strict=True) if ok)
        if progress is not None:
            progress.update(len(idx))
    if stats is not None:
        stats["host_generated_tokens"] = stats.get("host_generated_tokens", 0) + local_tokens
    return results  # type: ignore[return-value]


def _round_batch(batch_size: int, mesh: Mesh | None) -> int:
    if mesh is None:
        return max(1, batch_size)
    dp = data_parallel_size(mesh, DEFAULT_RULES)
    return max(dp, -(-batch_size // dp) * dp)


# -------------------------------------------------------------------------------------- log-likelihood


def loglikelihoods(
    params,
    config: ModelConfig,
    tokenizer: Tokenizer,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 32,
    mesh: Mesh | None = None,
    sort_keys: Sequence[int] | None = None,
    progress=None,
) -> list[tuple[float, int, bool]]:
    """For each (context ids, continuation ids): (sum log p(continuation | context), its length, greedy?).

    An empty context scores the continuation from its second token (the first has nothing to condition on).
    Too long sequences keep their last `max_seq_len` tokens (the continuation first). `sort_keys` as in
    `generate`: given, `pairs[i]` is read only for this process's rows (a lazy sequence tokenizes its share).
    """
    n = len(pairs)
    if n == 0:
        return []
    fns = compiled_for(config, mesh, int(tokenizer.vocab_size))
    bs = _round_batch(batch_size, mesh)
    seqs: dict[int | None, list[int]] = {}
    starts: dict[int | None, int] = {}

    def prepare(i: int) -> None:
        ctx, cont = pairs[i]
        full = list(ctx) + list(cont)
        if len(full) < 2 or not cont:
            raise DataError("loglikelihood: need a continuation and at least two tokens in all")
        first = max(len(ctx), 1)  # index of the first scored token in `full`
        cut = max(0, len(full) - (config.max_seq_len + 1))
        seqs[i] = full[cut:]
        starts[i] = max(first - cut, 1)

    if sort_keys is None:  # every process reads every pair: sort by length, check all up front
        for i in range(n):
            prepare(i)
        keys_ = [len(seqs[i]) for i in range(n)]
    else:
        keys_ = list(sort_keys)
    order = sorted(range(n), key=lambda i: keys_[i])
    results: list[tuple[float, int, bool] | None] = [None] * n
    R = fns.rows(bs)
    for start in range(0, n, bs):
        idx = order[start : start + bs]
        mine, _ = R.own(idx)
        for i in dict.fromkeys(mine):
            if i is not None and i not in seqs:
                prepare(i)
        seqs[None], starts[None] = [tokenizer.eos_id] * 2, 1  # the dummy of an all-padding process
        slen = _bucket(R.global_max(max(len(seqs[i]) - 1 for i in mine)), config.max_seq_len)
        inputs = np.full((len(mine), slen), tokenizer.pad_id, np.int32)
        targets = np.zeros((len(mine), slen), np.int32)
        mask = np.zeros((len(mine), slen), np.float32)
        positions = np.zeros((len(mine), slen), np.int32)
        segs = np.zeros((len(mine), slen), np.int32)
        for r, i in enumerate(mine):
            s = seqs[i]
            m = len(s) - 1
            inputs[r, :m] = s[:-1]
            targets[r, :m] = s[1:]
            mask[r, starts[i] - 1 : m] = 1.0
            positions[r, :m] = np.arange(m)
            segs[r, :m] = 1
        ll, greedy = fns.loglik(params, *(R.put(a) for a in (inputs, targets, mask, positions, segs)))
        ll, greedy = R.gather(R.local(ll)), R.gather(R.local(greedy))
        ntok = R.gather(mask.sum(axis=1).astype(np.int64))
        for j, i in enumerate(idx):
            r = R.spread[j]
            results[i] = (float(ll[r]), int(ntok[r]), bool(greedy[r]))
        if progress is not None:
            progress.update(len(idx))
    return results  # type: ignore[return-value]
