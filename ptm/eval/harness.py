"""Evaluation harness: an eval suite's items -> generation and log-likelihood requests (ptm.eval.decode) ->
per-item scores (ptm.eval.scorers) -> per-task, per-category and macro averages."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from ptm.data.chat import encode_prompt
from ptm.data.tokenizers import Tokenizer
from ptm.errors import CheckpointError, ConfigError, DataError
from ptm.eval import scorers
from ptm.eval.decode import Generation, GenerationConfig, compiled_for, generate, loglikelihoods
from ptm.eval.evalset import EvalItem, load_suite
from ptm.model.config import ModelConfig
from ptm.parallel.sync import gather_ints

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


def place_on_mesh(params, config: ModelConfig, mesh: Mesh):
    """Put a param tree on the mesh with the training shardings. jax Arrays are resharded if needed; numpy
    leaves (an in-memory merge every process computed in full) are sliced per device, so this also works when
    the mesh spans processes (each process supplies only its own shards)."""
    from ptm.model.sharding import param_shardings

    shardings = param_shardings(config, mesh)

    def put(x, sh):
        if isinstance(x, jax.Array):
            return x if x.sharding == sh else jax.device_put(x, sh)
        a = np.asarray(x)
        return jax.make_array_from_callback(a.shape, sh, lambda idx: a[idx])

    return jax.tree.map(put, params, shardings)


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


class _Lazy(Sequence):
    """Requests built (tokenized) on first access and kept: `generate`/`loglikelihoods` given sort keys read
    only this process's rows of each batch, so on a slice every host tokenizes just its share."""

    def __init__(self) -> None:
        self._make: list[Callable[[], Any]] = []
        self._done: dict[int, Any] = {}

    def append(self, make: Callable[[], Any]) -> None:
        self._make.append(make)

    def __len__(self) -> int:
        return len(self._make)

    def __getitem__(self, i):  # type: ignore[override]
        if i not in self._done:
            self._done[i] = self._make[i]()
        return self._done[i]


@dataclass
class _Requests:
    """The model calls an eval suite needs, in two batched streams, and which item each belongs to. Prompts are
    tokenized lazily; `*_keys` (characters) order the batches without tokenizing, the same on every host."""

    gen_prompts: _Lazy = field(default_factory=_Lazy)
    gen_keys: list[int] = field(default_factory=list)
    gen_stops: list[tuple[str, ...]] = field(default_factory=list)
    gen_rows: list[tuple[int, int]] = field(default_factory=list)  # (item, sample): reproducible sampling
    gen_owner: list[int] = field(default_factory=list)
    ll_pairs: _Lazy = field(default_factory=_Lazy)
    ll_keys: list[int] = field(default_factory=list)
    ll_owner: list[tuple[int, str | None]] = field(default_factory=list)  # (item, choice or None = text)
    encoded: set[int] = field(default_factory=set)  # items whose prompt this process tokenized


def _chars(messages: Sequence[dict[str, Any]]) -> int:
    return sum(len(str(m.get("content", ""))) for m in messages)


def _requests(items: Sequence[EvalItem], tokenizer: Tokenizer, gen: GenerationConfig, choice_eos: bool) -> _Requests:
    req = _Requests()
    prompts: dict[int, list[int]] = {}

    def prompt(k: int) -> list[int]:
        if k not in prompts:
            it = items[k]
            req.encoded.add(k)
            prompts[k] = encode_prompt(it.messages, tokenizer, where=it.where)
        return prompts[k]

    for k, it in enumerate(items):
        sc = scorers.get_scorer(it.scorer)
        chars = _chars(it.messages)
        if sc.mode == "generate":
            for s in range(scorers.num_samples_for(sc, it.meta, gen.num_samples)):
                req.gen_prompts.append(lambda k=k: prompt(k))
                req.gen_keys.append(chars)
                req.gen_stops.append(tuple(it.meta.get("stop", ())))
                req.gen_rows.append((k, s))
                req.gen_owner.append(k)
        elif sc.mode == "choice":
            eos = [tokenizer.eos_id] if choice_eos else []
            for c in it.choices or []:
                req.ll_pairs.append(lambda k=k, c=c, eos=eos: (prompt(k), tokenizer.encode(c) + eos))
                req.ll_keys.append(chars + len(c))
                req.ll_owner.append((k, c))
        else:
            ref = it.reference if isinstance(it.reference, str) else it.reference[0]
            if it.messages:
                req.ll_pairs.append(lambda k=k, ref=ref: (prompt(k), tokenizer.encode(ref) + [tokenizer.eos_id]))
            else:
                req.ll_pairs.append(lambda ref=ref: _raw_text_pair(tokenizer, ref))
            req.ll_keys.append(chars + len(ref))
            req.ll_owner.append((k, None))
    return req


def _raw_text_pair(tokenizer: Tokenizer, ref: str) -> tuple[list[int], list[int]]:
    """Perplexity of raw text: condition on BOS (or, without one, on the first token)."""
    ids = tokenizer.encode(ref)
    ctx = [tokenizer.bos_id] if tokenizer.bos_id is not None else ids[:1]
    return ctx, ids if tokenizer.bos_id is not None else ids[1:]


def _score_items(items: Sequence[EvalItem], req: _Requests, gens: list[Generation], lls: list,
                 num_examples: int, keep_items: bool):
    """Per-task metrics, a few examples per task, and (optionally) one record per item."""
    outputs: dict[int, list[Generation]] = {}
    for k, g in zip(req.gen_owner, gens, strict=True):
        outputs.setdefault(k, []).append(g)
    choice_ll: dict[int, dict[str, float]] = {}
    text_ll: dict[int, tuple[float, int]] = {}
    for (k, c), (ll, ntok, _) in zip(req.ll_owner, lls, strict=True):
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
        rec = {"task": it.task, "id": it.id, "where": it.where, "reference": it.reference, **rec,
               "score": m.get("score")}
        if len(examples.setdefault(it.task, [])) < num_examples:
            prompt = it.messages[-1]["content"] if it.messages else ""
            examples[it.task].append(
                {"prompt": prompt, **{k2: rec[k2] for k2 in ("output", "reference", "score") if k2 in rec}}
            )
        if keep_items:
            records.append(rec)
    return per_task, examples, records


def _task_results(items: Sequence[EvalItem], per_task: dict[str, list[scorers.Metrics]],
                  examples: dict[str, list[dict[str, Any]]]) -> dict[str, TaskResult]:
    first = {}
    for it in items:
        first.setdefault(it.task, it)
    tasks: dict[str, TaskResult] = {}
    for task, ms in per_task.items():
        it = first[task]
        sc = scorers.get_scorer(it.scorer)
        agg = sc.aggregate(ms)
        tasks[task] = TaskResult(task=task, category=it.category, scorer=it.scorer, score=float(agg["score"]),
                                 metrics=agg, n_items=len(ms), higher_is_better=sc.higher_is_better,
                                 averaged=sc.averaged, examples=examples.get(task, []))
    return dict(sorted(tasks.items()))


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
    loaded = isinstance(eval_files, list | tuple) and eval_files and all(isinstance(i, EvalItem) for i in eval_files)
    items = list(eval_files) if loaded else load_suite(eval_files)
    _check_tasks(items)
    gen = generation or GenerationConfig(max_new_tokens=max_new_tokens)
    if mesh is None and jax.process_count() > 1:
        raise ConfigError("evaluating on several processes needs a mesh over all their devices (--mesh / [mesh])")
    if mesh is not None:
        params = place_on_mesh(params, model_config, mesh)
    fns = compiled_for(model_config, mesh, int(tokenizer.vocab_size))
    shapes_before = len(fns.shapes)
    req = _requests(items, tokenizer, gen, choice_eos)  # all work first: each kind runs as one batched stream

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(req.gen_prompts) + len(req.ll_pairs), desc=f"eval {where}", unit="seq", leave=False)
    try:
        stats: dict[str, int] = {}
        gens = generate(params, model_config, tokenizer, req.gen_prompts, gen, batch_size=batch_size, mesh=mesh,
                        stops=req.gen_stops, row_ids=req.gen_rows, sort_keys=req.gen_keys, progress=bar,
                        stats=stats)
        lls = loglikelihoods(params, model_config, tokenizer, req.ll_pairs, batch_size=batch_size, mesh=mesh,
                             sort_keys=req.ll_keys, progress=bar)
    finally:
        if bar is not None:
            bar.close()

    per_task, examples, records = _score_items(items, req, gens, lls, num_examples, keep_items)
    tasks = _task_results(items, per_task, examples)
    by_cat: dict[str, list[float]] = {}
    for t in tasks.values():
        if t.averaged:
            by_cat.setdefault(t.category, []).append(t.score)
    averaged = [t.score for t in tasks.values() if t.averaged]
    elapsed = time.perf_counter() - t0
    counts = {
        "items": len(items),
        "tasks": len(tasks),
        "generated_sequences": len(req.gen_prompts),
        "generated_tokens": int(sum(len(g.tokens) for g in gens)),
        # per process (SPMD: each generated only its rows of every batch); sums to generated_tokens
        "generated_tokens_by_host": [r[0] for r in gather_ints([stats.get("host_generated_tokens", 0)])],
        "prompts_tokenized_by_host": [r[0] for r in gather_ints([len(req.encoded)])],
        "loglik_sequences": len(req.ll_pairs),
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
        tasks=tasks,
        categories={c: float(np.mean(v)) for c, v in sorted(by_cat.items())},
        macro_average=float(np.mean(averaged)) if averaged else float("nan"),
        counts=counts,
        elapsed_s=elapsed,
        examples_per_s=len(items) / elapsed if elapsed > 0 else float("nan"),
        settings=settings,
        items=records if keep_items else None,
    )
