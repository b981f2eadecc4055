"""Training data: mixtures, epochs, seeded order, packing, per-host batches, as a checkpointable iterator.

Everything is planned up front: every example is tokenized into memory once, then each epoch's example order
and its packing into rows of `seq_len` are computed deterministically from the seed, so the number of batches
(and hence of optimizer steps) is known before training starts. The grain dataset is a `MapDataset` over batch
indices whose map builds the host's rows of that batch from the plan; its iterator state is the next index.

Semantics (see docs/data.md):
- a source's subset is the first `max_examples` records after a shuffle seeded by `subset_seed` alone, so
  subsets of several sizes are nested and do not depend on the training seed;
- per mixture epoch a source contributes round(n * epochs * rate) examples (n = its examples after filtering):
  whole passes over it, then a seeded sample without replacement for the fractional rest;
- each example is shifted *within* itself (inputs = ids[:-1], targets = ids[1:]), so no target crosses
  examples; an example occupies len(ids) - 1 positions and is over-long if that exceeds `seq_len`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath

import grain
import numpy as np
from tqdm import tqdm

from ptm.data.chat import encode_chat
from ptm.data.sources import TokenizedExample, read_examples
from ptm.data.tokenizers import Tokenizer
from ptm.errors import ConfigError, DataError

OVERLONG = ("truncate", "drop")
SEQIO_LM = ("t5x", "examples")
_OPEN_ROWS = 8  # packing considers this many partly filled rows (first fit), in example order otherwise
_BATCH_KEYS = ("inputs", "targets", "loss_mask", "segment_ids", "positions")


@dataclass
class SourceConfig:
    """One dataset in a mixture. `epochs` and `rate` multiply: the source appears round(n*epochs*rate) times
    per mixture epoch (e.g. epochs=2 repeats it twice, rate=0.5 takes a fresh half of it each epoch)."""

    path: str
    name: str = ""
    max_examples: int | None = None  # first N after a shuffle seeded by subset_seed (nested across N)
    epochs: float = 1.0
    rate: float = 1.0
    subset_seed: int = 0

    @property
    def label(self) -> str:
        return self.name or PurePosixPath(self.path.rstrip("/")).name or self.path


@dataclass
class DataConfig:
    sources: Sequence[SourceConfig] = ()
    seq_len: int = 512
    global_batch_size: int = 8
    seed: int = 0
    overlong: str = "truncate"  # "truncate" | "drop"
    shuffle: bool = True
    pack: bool = True
    num_epochs: int = 1
    # seqio sources (`seqio:NAME`, docs/data.md); JSONL/Parquet sources ignore these.
    seqio_modules: Sequence[str] = ()  # modules registering the Tasks/Mixtures (t5x MIXTURE_OR_TASK_MODULE)
    mixture_or_task_name: str | None = None  # t5x MIXTURE_OR_TASK_NAME: same as sources=[SourceConfig('seqio:N')]
    task_feature_lengths: Mapping[str, int] | None = None  # t5x TASK_FEATURE_LENGTHS (LM sources)
    split: str = "train"
    use_cached: bool = False  # t5x USE_CACHED_TASKS
    num_steps: int | None = None  # t5x TRAIN_STEPS: repeat a seqio LM source and take this many batches
    # seqio LM sources: "t5x" = seqio's own DecoderFeatureConverter batches (one source, whole split); "examples" =
    # the Tasks' token ids through ptm's planner like JSONL (subsets, rates, mixing; `ptm experiment` uses it)
    seqio_lm: str = "t5x"

    def __post_init__(self):
        if self.mixture_or_task_name:
            implied = [SourceConfig(f"seqio:{self.mixture_or_task_name}")]
            if self.sources and list(self.sources) != implied:  # (dataclasses.replace passes both back in)
                raise ConfigError("set DataConfig.mixture_or_task_name or DataConfig.sources, not both")
            self.sources = implied


@dataclass
class DataStats:
    """What a run trained on. Counts of tokens/loss tokens/example visits cover the whole run (all epochs)."""

    examples: int = 0  # distinct training examples after filtering
    examples_seen: int = 0  # example visits over all epochs
    tokens: int = 0  # non-padding positions over all batches
    loss_tokens: int = 0
    skipped: int = 0  # no assistant tokens
    truncated: int = 0
    dropped: int = 0  # over-long with overlong="drop", or nothing left to learn from after truncation
    packed_rows: int = 0
    padding_rows: int = 0  # all-padding rows that fill the last batch
    num_batches: int = 0
    seq_len: int = 0
    global_batch_size: int = 0
    sources: dict = field(default_factory=dict)  # label -> {"read", "examples", "skipped", ...}
    # Cumulative [num_batches + 1] global counts after k batches; for checkpoint metadata at any step.
    _cum: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        d["packing_efficiency"] = (self.tokens / (self.num_batches * self.global_batch_size * self.seq_len)
                                   if self.num_batches else 0.0)
        return d

    def seen(self, batches_done: int) -> dict:
        """Global `examples_seen`, `tokens_seen`, `loss_tokens_seen` after `batches_done` batches."""
        if self._cum is None:
            raise ValueError("no per-batch counts recorded")
        k = min(max(int(batches_done), 0), self.num_batches)
        e, t, lt = (int(x) for x in self._cum[k])
        return {"examples_seen": e, "tokens_seen": t, "loss_tokens_seen": lt}


@dataclass
class _Pool:
    """All tokenized examples, flat. Example i is tokens[offsets[i]:offsets[i+1]]."""

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    source_ranges: list[tuple[int, int]]

    @property
    def spans(self) -> np.ndarray:  # positions an example occupies in a row
        return np.diff(self.offsets) - 1


def _validate(config: DataConfig, process_count: int, process_index: int) -> None:
    if not config.sources:
        raise ConfigError("DataConfig.sources is empty")
    if config.seq_len < 1:
        raise ConfigError(f"DataConfig.seq_len must be >= 1, got {config.seq_len}")
    if config.global_batch_size < 1:
        raise ConfigError(f"DataConfig.global_batch_size must be >= 1, got {config.global_batch_size}")
    if config.overlong not in OVERLONG:
        raise ConfigError(f"DataConfig.overlong must be one of {OVERLONG}, got {config.overlong!r}")
    if config.num_epochs < 1:
        raise ConfigError(f"DataConfig.num_epochs must be >= 1, got {config.num_epochs}")
    if config.seed < 0:
        raise ConfigError(f"DataConfig.seed must be >= 0, got {config.seed}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ConfigError(f"bad process_index={process_index} / process_count={process_count}")
    if config.global_batch_size % process_count:
        raise ConfigError(f"global_batch_size={config.global_batch_size} is not divisible by "
                          f"process_count={process_count}")
    for s in config.sources:
        if s.max_examples is not None and s.max_examples < 1:
            raise ConfigError(f"source {s.label}: max_examples must be >= 1, got {s.max_examples}")
        if not (s.epochs > 0 and s.rate > 0):
            raise ConfigError(f"source {s.label}: epochs and rate must be > 0, got {s.epochs}, {s.rate}")
        if s.subset_seed < 0:
            raise ConfigError(f"source {s.label}: subset_seed must be >= 0")
    if config.num_steps is not None and config.num_steps < 1:
        raise ConfigError(f"DataConfig.num_steps must be >= 1, got {config.num_steps}")
    if config.seqio_lm not in SEQIO_LM:
        raise ConfigError(f"DataConfig.seqio_lm must be one of {SEQIO_LM}, got {config.seqio_lm!r}")


def _seqio_kinds(config: DataConfig) -> dict[str, str]:
    """path -> 'lm' | 'chat' for the `seqio:` sources (imports seqio and the task modules only if any)."""
    paths = [s.path for s in config.sources if str(s.path).startswith("seqio:")]
    if not paths:
        if config.num_steps is not None:
            raise ConfigError("DataConfig.num_steps applies to seqio LM sources only (JSONL runs take whole epochs)")
        return {}
    from ptm.data import seqio_source

    seqio_source.import_modules(config.seqio_modules)
    return {p: seqio_source.kind(seqio_source.task_name(p)) for p in paths}


def _read(src: SourceConfig, config: DataConfig, tokenizer: Tokenizer) -> list:
    if str(src.path).startswith("seqio:"):
        from ptm.data import seqio_source

        return seqio_source.read_examples(src.path, config.split, config.use_cached, tokenizer=tokenizer)
    return read_examples(src.path)


def _subset(n: int, src: SourceConfig) -> np.ndarray:
    """Indices (file order) of the source's subset: a prefix of one seeded permutation, so N1 <= N2 nests."""
    if src.max_examples is None:
        return np.arange(n)
    if src.max_examples > n:
        raise DataError(f"{src.path}: max_examples={src.max_examples} but the source has only {n} examples")
    perm = np.random.default_rng([src.subset_seed, 3]).permutation(n)
    return np.sort(perm[: src.max_examples])


def _tokenize(config: DataConfig, tokenizer: Tokenizer, stats: DataStats) -> _Pool:
    toks: list[np.ndarray] = []
    masks: list[np.ndarray] = []
    ranges: list[tuple[int, int]] = []
    limit = config.seq_len + 1  # ids; an example of k ids fills k - 1 positions
    for src in config.sources:
        records = _read(src, config, tokenizer)
        chosen = _subset(len(records), src)
        s = {"path": src.path, "read": len(records), "subset": len(chosen), "examples": 0, "skipped": 0,
             "truncated": 0, "dropped": 0}
        start = len(toks)
        for idx in tqdm(chosen, desc=f"tokenize {src.label}", disable=len(chosen) < 5000, leave=False):
            ex = records[idx]
            if isinstance(ex, TokenizedExample):
                ids, mask = ex.ids, ex.mask
            else:
                ids, mask = encode_chat(ex.messages, tokenizer, where=ex.where)
            if not mask.any():
                s["skipped"] += 1
                continue
            if len(ids) > limit:
                if config.overlong == "drop":
                    s["dropped"] += 1
                    continue
                ids, mask = ids[:limit], mask[:limit]
                if not mask[1:].any():  # the reply started beyond seq_len: nothing to learn from
                    s["dropped"] += 1
                    continue
                s["truncated"] += 1
            toks.append(ids)
            masks.append(mask)
        s["examples"] = len(toks) - start
        if s["examples"] == 0:
            raise DataError(f"{src.path}: no usable examples ({s['skipped']} without assistant tokens, "
                            f"{s['dropped']} dropped as over-long)")
        ranges.append((start, len(toks)))
        stats.sources[src.label] = s
        for k in ("skipped", "truncated", "dropped"):
            setattr(stats, k, getattr(stats, k) + s[k])
    stats.examples = len(toks)
    offsets = np.zeros(len(toks) + 1, np.int64)
    np.cumsum([len(t) for t in toks], out=offsets[1:])
    tokens = np.concatenate(toks).astype(np.int32)
    return _Pool(tokens, np.concatenate(masks).astype(np.uint8), offsets, ranges)


def _epoch_order(config: DataConfig, pool: _Pool, epoch: int) -> np.ndarray:
    parts = []
    for i, (src, (a, b)) in enumerate(zip(config.sources, pool.source_ranges, strict=True)):
        n = b - a
        count = math.floor(n * src.epochs * src.rate + 0.5)
        if count == 0:
            raise ConfigError(f"source {src.label}: epochs*rate={src.epochs * src.rate} of {n} examples "
                              "rounds to 0 examples per epoch")
        full, rest = divmod(count, n)
        parts.extend([np.arange(a, b)] * full)
        if rest:
            pick = (np.random.default_rng([config.seed, 2, epoch, i]).permutation(n)[:rest] if config.shuffle
                    else np.arange(rest))
            parts.append(a + np.sort(pick))
    order = np.concatenate(parts)
    if config.shuffle:
        order = order[np.random.default_rng([config.seed, 1, epoch]).permutation(len(order))]
    return order


def _pack(order: np.ndarray, spans: np.ndarray, seq_len: int, pack: bool) -> list[list[int]]:
    """Rows of example ids. First fit over a few open rows keeps the (shuffled) order roughly intact."""
    if not pack:
        return [[int(e)] for e in order]
    closed: list[list[int]] = []
    open_rows: list[list] = []  # [free positions, example ids]
    for e in order.tolist():
        n = int(spans[e])
        for r in open_rows:
            if r[0] >= n:
                r[0] -= n
                r[1].append(e)
                break
        else:
            r = [seq_len - n, [e]]
            open_rows.append(r)
            if len(open_rows) > _OPEN_ROWS:
                closed.append(open_rows.pop(0)[1])
        if r[0] == 0 and any(x is r for x in open_rows):  # full: close it now
            open_rows = [x for x in open_rows if x is not r]
            closed.append(r[1])
    closed.extend(r[1] for r in open_rows)
    return closed


@dataclass
class _Plan:
    pool: _Pool
    row_ptr: np.ndarray  # [rows + 1] into ex_ids
    ex_ids: np.ndarray
    num_rows: int
    num_batches: int


class _BatchMaker:
    """batch index -> this host's rows of that global batch, as a dict of numpy arrays."""

    def __init__(self, plan: _Plan, seq_len: int, global_batch: int, pad_id: int, lo: int, hi: int):
        self.plan, self.seq_len, self.global_batch, self.pad_id = plan, seq_len, global_batch, pad_id
        self.lo, self.hi = lo, hi

    def __call__(self, i: int) -> dict[str, np.ndarray]:
        p, pool = self.plan, self.plan.pool
        b, L = self.hi - self.lo, self.seq_len
        inputs = np.full((b, L), self.pad_id, np.int32)
        targets = np.full((b, L), self.pad_id, np.int32)
        loss_mask = np.zeros((b, L), np.float32)
        segment_ids = np.zeros((b, L), np.int32)
        positions = np.zeros((b, L), np.int32)
        for j in range(b):
            r = int(i) * self.global_batch + self.lo + j
            if r >= p.num_rows:
                continue  # all-padding row at the end of the last batch
            pos = 0
            for seg, e in enumerate(p.ex_ids[p.row_ptr[r]: p.row_ptr[r + 1]], 1):
                s, t = pool.offsets[e], pool.offsets[e + 1]
                n = int(t - s - 1)
                inputs[j, pos: pos + n] = pool.tokens[s: t - 1]
                targets[j, pos: pos + n] = pool.tokens[s + 1: t]
                loss_mask[j, pos: pos + n] = pool.mask[s + 1: t]
                segment_ids[j, pos: pos + n] = seg
                positions[j, pos: pos + n] = np.arange(n, dtype=np.int32)
                pos += n
        return {"inputs": inputs, "targets": targets, "loss_mask": loss_mask, "segment_ids": segment_ids,
                "positions": positions}


def _plan(config: DataConfig, tokenizer: Tokenizer) -> tuple[_Plan, DataStats]:
    stats = DataStats(seq_len=config.seq_len, global_batch_size=config.global_batch_size)
    pool = _tokenize(config, tokenizer, stats)
    spans = pool.spans
    rows: list[list[int]] = []
    for epoch in range(config.num_epochs):
        rows.extend(_pack(_epoch_order(config, pool, epoch), spans, config.seq_len, config.pack))
    counts = np.array([len(r) for r in rows], np.int64)
    row_ptr = np.zeros(len(rows) + 1, np.int64)
    np.cumsum(counts, out=row_ptr[1:])
    ex_ids = np.fromiter((e for r in rows for e in r), np.int64, count=int(row_ptr[-1]))
    B = config.global_batch_size
    num_batches = -(-len(rows) // B)
    stats.packed_rows = len(rows)
    stats.padding_rows = num_batches * B - len(rows)
    stats.num_batches = num_batches

    # Per-batch global counts -> cumulative, for "seen so far" metadata at any step.
    starts = pool.offsets[:-1]
    loss_per_ex = np.add.reduceat(pool.mask.astype(np.int64), starts) - pool.mask[starts]  # target side
    per_row = np.zeros((num_batches * B, 3), np.int64)
    row_of = np.repeat(np.arange(len(rows)), counts)
    np.add.at(per_row, row_of, np.stack([np.ones_like(ex_ids), spans[ex_ids], loss_per_ex[ex_ids]], 1))
    cum = np.zeros((num_batches + 1, 3), np.int64)
    np.cumsum(per_row.reshape(num_batches, B, 3).sum(1), axis=0, out=cum[1:])
    stats._cum = cum
    stats.examples_seen, stats.tokens, stats.loss_tokens = (int(x) for x in cum[-1])
    return _Plan(pool, row_ptr, ex_ids, len(rows), num_batches), stats


def _maker(plan: _Plan, config: DataConfig, tokenizer: Tokenizer, process_index: int, process_count: int
           ) -> _BatchMaker:
    per_host = config.global_batch_size // process_count
    lo = process_index * per_host
    return _BatchMaker(plan, config.seq_len, config.global_batch_size, tokenizer.pad_id, lo, lo + per_host)


def build_train_data(config: DataConfig, tokenizer: Tokenizer, *, process_index: int = 0,
                     process_count: int = 1, read_threads: int = 2, prefetch: int = 4
                     ) -> tuple[grain.DatasetIterator, DataStats]:
    """A checkpointable iterator over this host's part of each global batch, and the run's data stats.

    Yields `stats.num_batches` dicts of [global_batch_size / process_count, seq_len] arrays (Batches);
    process p gets rows [p*B/P, (p+1)*B/P) of every global batch. Save/restore the iterator with
    `grain.checkpoint.CheckpointSave` / `CheckpointRestore` inside an Orbax `Composite`.
    """
    _validate(config, process_count, process_index)
    kinds = _seqio_kinds(config)  # imports the seqio task modules, if any source needs them
    if config.seqio_lm == "t5x" and "lm" in kinds.values():
        from ptm.data import seqio_source

        return seqio_source.build_lm_train_data(
            config, tokenizer, process_index=process_index, process_count=process_count,
            stats=DataStats(seq_len=config.seq_len, global_batch_size=config.global_batch_size))
    if config.num_steps is not None:
        raise ConfigError("DataConfig.num_steps applies to seqio LM sources with seqio_lm='t5x' only (ptm's "
                          "planner takes whole epochs)")
    plan, stats = _plan(config, tokenizer)
    ds = grain.MapDataset.range(plan.num_batches).map(_maker(plan, config, tokenizer, process_index,
                                                             process_count))
    opts = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
    return iter(ds.to_iter_dataset(opts)), stats


def build_eval_batches(config: DataConfig, tokenizer: Tokenizer, *, process_index: int = 0,
                       process_count: int = 1) -> tuple[list[dict[str, np.ndarray]], DataStats]:
    """Held-out batches in a fixed order: no shuffle, one epoch, each example once (epochs/rate ignored)."""
    cfg = dataclasses.replace(
        config, shuffle=False, num_epochs=1,
        sources=[dataclasses.replace(s, epochs=1.0, rate=1.0) for s in config.sources])
    _validate(cfg, process_count, process_index)
    kinds = _seqio_kinds(cfg)
    if cfg.seqio_lm == "t5x" and "lm" in kinds.values():
        raise ConfigError("held-out batches from a seqio LM source need DataConfig.seqio_lm='examples' (or use a "
                          "chat Task or JSONL)")
    plan, stats = _plan(cfg, tokenizer)
    make = _maker(plan, cfg, tokenizer, process_index, process_count)
    return [make(i) for i in range(plan.num_batches)], stats
