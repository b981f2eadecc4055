"""Evaluation harness: batched KV-cache generation, log-likelihoods, scoring and aggregation.

Compilation is the cost to control: prompts are left-padded to power-of-two length buckets and every batch has
the same number of rows, so a suite compiles a handful of shapes; the jitted functions are cached per
(ModelConfig, mesh) and take the params as an argument, so scoring dozens of merged models of one config
compiles once. Generation runs in jitted chunks of decode steps; between chunks the host checks EOS and stop
strings and stops the batch early when every row is finished.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ptm.ckpt.params import place_params
from ptm.data.chat import encode_prompt
from ptm.data.tokenizers import Tokenizer
from ptm.errors import CheckpointError, DataError
from ptm.eval import scorers
from ptm.eval.evalset import EvalItem, load_suite
from ptm.model.config import ModelConfig
from ptm.model.llama import forward, forward_with_cache, init_cache
from ptm.parallel.mesh import DEFAULT_RULES, data_parallel_size

MIN_BUCKET = 16
VOCAB_PAD_MULTIPLE = 128


# -------------------------------------------------------------------------------------- checks, loading


def check_vocab(config: ModelConfig, tokenizer: Tokenizer, where: str = "checkpoint") -> None:
    """The model's vocab must be the tokenizer's, optionally padded up to the next multiple of 128."""
    tv, mv = int(tokenizer.vocab_size), int(config.vocab_size)
    padded = -(-tv // VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE
    if not tv <= mv <= max(padded, tv):
        raise CheckpointError(
            f"{where}: model vocab_size={mv} does not match tokenizer {tokenizer.name!r} "
            f"(vocab_size={tv}; allowed {tv}..{max(padded, tv)}, i.e. padding to a multiple of "
            f"{VOCAB_PAD_MULTIPLE})"
        )


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

    def _ctx(self):
        if self.mesh is None:
            return _NullCtx()
        return _MeshCtx(self.mesh)

    def put(self, x: np.ndarray) -> jax.Array:
        """Host batch array -> device, batch axis over the data-parallel mesh axes."""
        if self.mesh is None:
            return jnp.asarray(x)
        spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (x.ndim - 1), DEFAULT_RULES)
        return jax.device_put(x, NamedSharding(self.mesh, P(*spec)))

    def prefill(self, params, tokens, positions, segment_ids, cache_len):
        self.shapes.add(("prefill", tokens.shape, cache_len))
        with self._ctx():
            return self._prefill(
                params, self.put(tokens), self.put(positions), self.put(segment_ids), cache_len
            )

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

    def loglik(self, params, inputs, targets, mask, positions, segment_ids):
        self.shapes.add(("loglik", inputs.shape))
        with self._ctx():
            return self._loglik(
                params, *(self.put(a) for a in (inputs, targets, mask, positions, segment_ids))
            )


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
    progress=None,
) -> list[Generation]:
    """Continue each token-id prompt (one Generation per prompt; repeat prompts for several samples).

    `stops[i]` adds stop strings for prompt i; `row_ids[i]` (default i) seeds its sampling stream, so the same
    id gives the same sample whatever else is in the batch. Prompts longer than `max_seq_len - max_new_tokens`
    keep their last tokens.
    """
    n = len(prompts)
    if n == 0:
        return []
    fns = compiled_for(config, mesh, int(tokenizer.vocab_size))
    bs = _round_batch(batch_size, mesh)
    chunk = max(1, min(gen.chunk, gen.max_new_tokens))
    n_chunks = -(-gen.max_new_tokens // chunk)
    max_prompt = max(1, config.max_seq_len - n_chunks * chunk)
    prompts = [list(p)[-max_prompt:] for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise DataError("generate: empty prompt")
    row_ids = np.arange(n) if row_ids is None else np.asarray(row_ids, np.int64)
    stops = [tuple(gen.stop) + tuple(s) for s in (stops or [()] * n)]
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * n
    for start in range(0, n, bs):
        idx = order[start : start + bs]
        rows = idx + [idx[0]] * (bs - len(idx))  # fill the last batch with copies: one shape for all batches
        plen = _bucket(max(len(prompts[i]) for i in rows), max_prompt)
        tokens = np.full((bs, plen), tokenizer.pad_id, np.int32)
        positions = np.zeros((bs, plen), np.int32)
        segs = np.zeros((bs, plen), np.int32)
        for r, i in enumerate(rows):  # left padding: all rows share the cache index
            p = prompts[i]
            tokens[r, plen - len(p) :] = p
            positions[r, plen - len(p) :] = np.arange(len(p))
            segs[r, plen - len(p) :] = 1
        # Cache length is bucketed too, so different max_new_tokens settings often share compiled functions.
        cache_len = _bucket(plen + n_chunks * chunk, plen + n_chunks * chunk)
        logits, cache = fns.prefill(params, tokens, positions, segs, cache_len)
        pos = fns.put(np.array([len(prompts[i]) for i in rows], np.int32))
        done_h = np.zeros(bs, bool)
        done_h[len(idx) :] = True
        done = fns.put(done_h)
        keys = fns.put(_row_keys(gen.seed, row_ids[rows]))
        out = np.zeros((bs, 0), np.int32)
        out_lp = np.zeros((bs, 0), np.float32)
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
            out = np.concatenate([out, np.asarray(toks)], axis=1)
            out_lp = np.concatenate([out_lp, np.asarray(lps)], axis=1)
            done_h = np.asarray(done).copy()
            if stops and any(stops[i] for i in idx):  # a stop string also finishes a row
                for r, i in enumerate(idx):
                    if (
                        not done_h[r]
                        and stops[i]
                        and _finish(out[r], tokenizer.eos_id, gen.max_new_tokens, stops[i], tokenizer).finish
                        == "stop"
                    ):
                        done_h[r] = True
            if done_h.all():
                break
            done = fns.put(done_h)
        for r, i in enumerate(idx):
            results[i] = _finish(
                out[r].tolist(), tokenizer.eos_id, gen.max_new_tokens, stops[i], tokenizer, out_lp[r].tolist()
            )
        if progress is not None:
            progress.update(len(idx))
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
    progress=None,
) -> list[tuple[float, int, bool]]:
    """For each (context ids, continuation ids): (sum log p(continuation | context), its length, greedy?).

    An empty context scores the continuation from its second token (the first has nothing to condition on).
    Too long sequences keep their last `max_seq_len` tokens (the continuation first).
    """
    n = len(pairs)
    if n == 0:
        return []
    fns = compiled_for(config, mesh, int(tokenizer.vocab_size))
    bs = _round_batch(batch_size, mesh)
    seqs, starts = [], []
    for ctx, cont in pairs:
        full = list(ctx) + list(cont)
        if len(full) < 2 or not cont:
            raise DataError("loglikelihood: need a continuation and at least two tokens in all")
        first = max(len(ctx), 1)  # index of the first scored token in `full`
        cut = max(0, len(full) - (config.max_seq_len + 1))
        seqs.append(full[cut:])
        starts.append(max(first - cut, 1))
    order = sorted(range(n), key=lambda i: len(seqs[i]))
    results: list[tuple[float, int, bool] | None] = [None] * n
    for start in range(0, n, bs):
        idx = order[start : start + bs]
        rows = idx + [idx[0]] * (bs - len(idx))
        slen = _bucket(max(len(seqs[i]) - 1 for i in rows), config.max_seq_len)
        inputs = np.full((bs, slen), tokenizer.pad_id, np.int32)
        targets = np.zeros((bs, slen), np.int32)
        mask = np.zeros((bs, slen), np.float32)
        positions = np.zeros((bs, slen), np.int32)
        segs = np.zeros((bs, slen), np.int32)
        for r, i in enumerate(rows):
            s = seqs[i]
            m = len(s) - 1
            inputs[r, :m] = s[:-1]
            targets[r, :m] = s[1:]
            mask[r, starts[i] - 1 : m] = 1.0
            positions[r, :m] = np.arange(m)
            segs[r, :m] = 1
        ll, greedy = fns.loglik(params, inputs, targets, mask, positions, segs)
        ll, greedy = np.asarray(ll), np.asarray(greedy)
        for r, i in enumerate(idx):
            results[i] = (float(ll[r]), int(mask[r].sum()), bool(greedy[r]))
        if progress is not None:
            progress.update(len(idx))
    return results  # type: ignore[return-value]


# -------------------------------------------------------------------------------------- evaluate


@dataclass
class TaskResult:
    task: str
    category: str
    scorer: str
    score: float
    metrics: dict[str, float]
    n_items: int
    higher_is_better: bool
    averaged: bool  # enters the category average
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class EvalResult:
    tasks: dict[str, TaskResult]
    categories: dict[str, float]  # mean task score per category (bounded, higher-is-better tasks only)
    macro_average: float  # mean over all such tasks
    counts: dict[str, int]
    elapsed_s: float
    examples_per_s: float
    settings: dict[str, Any]
    items: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _json_safe(x.item())
    return x


def _check_tasks(items: Sequence[EvalItem]) -> None:
    """All items of a task share its scorer and category (else its score would be meaningless)."""
    first: dict[str, EvalItem] = {}
    for it in items:
        f = first.setdefault(it.task, it)
        if (it.scorer, it.category) != (f.scorer, f.category):
            raise DataError(
                f"{it.where}: task {it.task!r} has scorer/category {it.scorer}/{it.category} here but "
                f"{f.scorer}/{f.category} at {f.where}"
            )


def evaluate(
    params,
    model_config: ModelConfig,
    tokenizer: Tokenizer,
    eval_files: str | Sequence[str] | Sequence[EvalItem],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 64,
    mesh: Mesh | None = None,
    generation: GenerationConfig | None = None,
    choice_eos: bool = True,
    keep_items: bool = False,
    num_examples: int = 2,
    progress: bool = False,
    where: str = "model",
) -> EvalResult:
    """Score `params` on an eval suite (files/dirs, or already-loaded items). JSON-ready via `.to_dict()`.

    Multiple-choice options are scored as the full assistant reply, i.e. followed by EOS (`choice_eos`), so an
    option that is a prefix of another is not favoured. Perplexity items score `reference` as raw text when
    `messages` is empty, else as the assistant reply (with EOS) after the prompt.
    """
    t0 = time.perf_counter()
    check_vocab(model_config, tokenizer, where)
    if (
        isinstance(eval_files, list | tuple)
        and eval_files
        and all(isinstance(i, EvalItem) for i in eval_files)
    ):
        items = list(eval_files)
    else:
        items = load_suite(eval_files)
    _check_tasks(items)
    gen = generation or GenerationConfig(max_new_tokens=max_new_tokens)
    if mesh is not None:
        params = place_params(params, model_config, mesh)
    fns = compiled_for(model_config, mesh, int(tokenizer.vocab_size))
    shapes_before = len(fns.shapes)

    # Build all work first so generation and log-likelihood each run as one batched stream.
    gen_prompts, gen_stops, gen_rows, gen_owner = [], [], [], []
    ll_pairs, ll_owner = [], []
    prompt_cache: dict[int, list[int]] = {}
    for k, it in enumerate(items):
        sc = scorers.get_scorer(it.scorer)
        if sc.mode != "loglik" or it.messages:
            prompt_cache[k] = encode_prompt(it.messages, tokenizer, where=it.where)
        if sc.mode == "generate":
            n = scorers.num_samples_for(sc, it.meta, gen.num_samples)
            for s in range(n):
                gen_prompts.append(prompt_cache[k])
                gen_stops.append(tuple(it.meta.get("stop", ())))
                gen_rows.append((k, s))  # stable per (item, sample): reproducible sampling
                gen_owner.append(k)
        elif sc.mode == "choice":
            eos = [tokenizer.eos_id] if choice_eos else []
            for c in it.choices or []:
                ll_pairs.append((prompt_cache[k], tokenizer.encode(c) + eos))
                ll_owner.append((k, c))
        else:
            ref = it.reference if isinstance(it.reference, str) else it.reference[0]
            if it.messages:
                ll_pairs.append((prompt_cache[k], tokenizer.encode(ref) + [tokenizer.eos_id]))
            else:
                ids = tokenizer.encode(ref)
                ctx = [tokenizer.bos_id] if tokenizer.bos_id is not None else ids[:1]
                ll_pairs.append((ctx, ids if tokenizer.bos_id is not None else ids[1:]))
            ll_owner.append((k, None))

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(gen_prompts) + len(ll_pairs), desc=f"eval {where}", unit="seq", leave=False)
    try:
        gens = generate(
            params,
            model_config,
            tokenizer,
            gen_prompts,
            gen,
            batch_size=batch_size,
            mesh=mesh,
            stops=gen_stops,
            row_ids=gen_rows,
            progress=bar,
        )
        lls = loglikelihoods(
            params, model_config, tokenizer, ll_pairs, batch_size=batch_size, mesh=mesh, progress=bar
        )
    finally:
        if bar is not None:
            bar.close()

    outputs: dict[int, list[Generation]] = {}
    for k, g in zip(gen_owner, gens, strict=True):
        outputs.setdefault(k, []).append(g)
    choice_ll: dict[int, dict[str, float]] = {}
    text_ll: dict[int, tuple[float, int]] = {}
    for (k, c), (ll, ntok, _) in zip(ll_owner, lls, strict=True):
        if c is None:
            text_ll[k] = (-ll, ntok)
        else:
            choice_ll.setdefault(k, {})[c] = ll

    per_task: dict[str, list[scorers.Metrics]] = {}
    examples: dict[str, list[dict[str, Any]]] = {}
    records = []
    for k, it in enumerate(items):
        sc = scorers.get_scorer(it.scorer)
        if sc.mode == "generate":
            texts = [g.text for g in outputs[k]]
            m = sc.fn(texts, it.reference, it.meta)
            rec = {"output": texts[0] if len(texts) == 1 else texts}
        elif sc.mode == "choice":
            lls_k = [choice_ll[k][c] for c in it.choices or []]
            m = sc.fn(lls_k, it.choices, it.reference, it.meta)
            rec = {"output": (it.choices or [])[int(np.argmax(lls_k))], "logliks": lls_k}
        else:
            m = sc.fn(*text_ll[k], it.meta)
            rec = {"nll": text_ll[k][0], "tokens": text_ll[k][1]}
        per_task.setdefault(it.task, []).append(m)
        rec = {
            "task": it.task,
            "id": it.id,
            "where": it.where,
            "reference": it.reference,
            **rec,
            "score": m.get("score"),
        }
        if len(examples.setdefault(it.task, [])) < num_examples:
            prompt = it.messages[-1]["content"] if it.messages else ""
            examples[it.task].append(
                {"prompt": prompt, **{k2: rec[k2] for k2 in ("output", "reference", "score") if k2 in rec}}
            )
        if keep_items:
            records.append(rec)

    tasks: dict[str, TaskResult] = {}
    for task, ms in per_task.items():
        it = next(i for i in items if i.task == task)
        sc = scorers.get_scorer(it.scorer)
        agg = sc.aggregate(ms)
        tasks[task] = TaskResult(
            task=task,
            category=it.category,
            scorer=it.scorer,
            score=float(agg["score"]),
            metrics=agg,
            n_items=len(ms),
            higher_is_better=sc.higher_is_better,
            averaged=sc.averaged,
            examples=examples.get(task, []),
        )
    by_cat: dict[str, list[float]] = {}
    for t in tasks.values():
        if t.averaged:
            by_cat.setdefault(t.category, []).append(t.score)
    categories = {c: float(np.mean(v)) for c, v in sorted(by_cat.items())}
    averaged = [t.score for t in tasks.values() if t.averaged]
    elapsed = time.perf_counter() - t0
    counts = {
        "items": len(items),
        "tasks": len(tasks),
        "generated_sequences": len(gen_prompts),
        "generated_tokens": int(sum(len(g.tokens) for g in gens)),
        "loglik_sequences": len(ll_pairs),
        "new_compiled_shapes": len(fns.shapes) - shapes_before,
    }
    settings = {
        "batch_size": batch_size,
        "max_new_tokens": gen.max_new_tokens,
        "temperature": gen.temperature,
        "top_p": gen.top_p,
        "num_samples": gen.num_samples,
        "seed": gen.seed,
        "choice_eos": choice_eos,
        "tokenizer": tokenizer.name,
        "mesh": None if mesh is None else dict(mesh.shape),
    }
    return EvalResult(
        tasks=dict(sorted(tasks.items())),
        categories=categories,
        macro_average=float(np.mean(averaged)) if averaged else float("nan"),
        counts=counts,
        elapsed_s=elapsed,
        examples_per_s=len(items) / elapsed if elapsed > 0 else float("nan"),
        settings=settings,
        items=records if keep_items else None,
    )
