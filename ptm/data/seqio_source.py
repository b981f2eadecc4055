"""seqio Tasks and Mixtures as training data: sources named `seqio:NAME` (the optional `seqio` extra).

Nothing here imports seqio or TensorFlow at module level; the core imports this module only when a `seqio:`
source is configured, and a missing extra is a ConfigError naming it.

Two kinds of Task (chosen by its output features):
- LM (`targets`, optionally `inputs`): batches are exactly what t5x feeds a decoder-only model,
  `seqio.get_dataset(name, task_feature_lengths, DecoderFeatureConverter(pack=...), split, shuffle, seed,
  shard_info=ShardInfo(process_index, process_count), num_epochs, batch_size=B/P)`, its features renamed to
  ptm's (docs/data.md). Each host reads only its shard, as in t5x. The iterator's grain state is the number of
  batches consumed; a restore rebuilds the (deterministic, seeded) pipeline and skips that many batches.
- chat (`messages`): the split's examples (JSON text of the message list) go through ptm's own planner, Tulu
  template and assistant-only mask, exactly like a JSONL source (same ids, same mask, same batches).
"""

from __future__ import annotations

import difflib
import importlib
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np

from ptm.errors import ConfigError, DataError

PREFIX = "seqio:"
EXTRA_HINT = "pip install -e '.[seqio]' (TensorFlow, about 2.4 GB)"


def is_seqio(path: str) -> bool:
    return isinstance(path, str) and path.startswith(PREFIX)


def task_name(path: str) -> str:
    name = path[len(PREFIX):]
    if not name:
        raise ConfigError(f"{path!r}: expected seqio:NAME (a registered Task or Mixture)")
    return name


def seqio_module():
    """The seqio module, imported lazily (TensorFlow kept off accelerators and quiet)."""
    os.environ.setdefault("EPATH_USE_TF", "false")  # gs:// stays on gcsfs, as without TensorFlow
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        import seqio
        import tensorflow as tf
    except ImportError as e:
        raise ConfigError(f"seqio sources need the optional `seqio` extra ({e}); install it: {EXTRA_HINT}") from e
    try:  # TensorFlow only runs the input pipeline: never let it take GPU memory (t5x does the same)
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:  # already initialised
        pass
    return seqio


def import_modules(modules: Sequence[str]) -> None:
    """Import the Python modules that register Tasks/Mixtures (`--seqio_module`, `DataConfig.seqio_modules`)."""
    if isinstance(modules, str):
        modules = [modules]
    modules = list(modules or ())
    if modules:
        seqio_module()
    for m in modules:
        try:
            importlib.import_module(m)
        except Exception as e:  # any failure inside the user's module
            raise ConfigError(f"seqio module {m!r} failed to import: {type(e).__name__}: {e}") from e


def get_provider(name: str):
    """The registered Task or Mixture `name`; unknown names list the registered ones."""
    seqio = seqio_module()
    tasks, mixtures = sorted(seqio.TaskRegistry.names()), sorted(seqio.MixtureRegistry.names())
    if name in mixtures or name in tasks:
        return seqio.get_mixture_or_task(name)

    def listing(names: list[str]) -> str:
        return ", ".join(names[:40]) + (f" ... and {len(names) - 40} more" if len(names) > 40 else "") or "none"

    close = difflib.get_close_matches(name, tasks + mixtures, n=5)
    raise ConfigError(
        f"seqio: no Task or Mixture named {name!r}" + (f" (closest: {', '.join(close)})" if close else "")
        + f". Registered tasks: {listing(tasks)}; mixtures: {listing(mixtures)}. The module that registers it is "
        "given with --seqio_module=MODULE or DataConfig.seqio_modules")


def kind(name: str, provider=None) -> str:
    """'chat' (a `messages` feature) or 'lm' (`targets`, optionally `inputs`)."""
    feats = dict((provider or get_provider(name)).output_features)
    if "messages" in feats:
        return "chat"
    if "targets" in feats:
        return "lm"
    raise ConfigError(f"seqio:{name}: output features {sorted(feats)} have neither 'targets' (LM, with 'inputs' "
                      "for prefix-LM) nor 'messages' (chat); ptm cannot train on it")


def check_split(name: str, provider, split: str) -> None:
    """A split the Task/Mixture does not have is a DataError listing the ones it has."""
    splits = list(getattr(provider, "splits", ()) or ())
    if splits and split not in splits:
        raise DataError(f"seqio:{name} has no split {split!r} (splits: {', '.join(splits)})")


def vocabulary(name: str):
    """The vocabulary of a Task/Mixture's `targets` (and `inputs`, which must be the same one)."""
    feats = dict(get_provider(name).output_features)
    keys = [k for k in ("inputs", "targets") if k in feats]
    if not keys:
        raise ConfigError(f"seqio:{name}: no 'inputs'/'targets' output feature carries a vocabulary (features: "
                          f"{sorted(feats)}); a chat Task is text: give a tokenizer file instead")
    vocabs = [feats[k].vocabulary for k in keys]
    if any(v != vocabs[0] for v in vocabs[1:]):
        raise ConfigError(f"seqio:{name}: 'inputs' and 'targets' have different vocabularies ({vocabs[0]} vs "
                          f"{vocabs[1]}); a decoder-only model reads both with one tokenizer")
    return vocabs[0]


# --- chat Tasks: examples into ptm's own pipeline -------------------------------------------------------------

def _messages(value: Any, where: str) -> list[dict]:
    if isinstance(value, dict) and "role" in value and "content" in value:  # {"role": [...], "content": [...]}
        roles, contents = np.asarray(value["role"]).tolist(), np.asarray(value["content"]).tolist()
        return [{"role": _text(r), "content": _text(c)} for r, c in zip(roles, contents, strict=True)]
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, bytes | str):
        try:
            obj = json.loads(value)
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: 'messages' is not JSON text: {e}") from e
        return obj["messages"] if isinstance(obj, dict) and "messages" in obj else obj
    raise DataError(f"{where}: 'messages' must be JSON text (a string feature) or role/content lists, got "
                    f"{type(value).__name__}")


def _text(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _split_rows(name: str, provider, split: str, use_cached: bool, max_items: int | None = None) -> list:
    """A split's examples, unshuffled and untrimmed, as numpy dicts; a bad split or a failing read is a DataError
    naming the Task and split."""
    check_split(name, provider, split)
    try:
        ds = provider.get_dataset(sequence_length=None, split=split, use_cached=use_cached, shuffle=False,
                                  num_epochs=1, trim_output_features=False)
        if max_items:
            ds = ds.take(max_items)
        return list(ds.as_numpy_iterator())
    except (ValueError, KeyError) as e:
        raise DataError(f"seqio:{name} split {split!r}: {e}") from e


def read_chat_examples(path: str, split: str = "train", use_cached: bool = False) -> list:
    """Every example of a chat Task's split, in the Task's order (unshuffled), as `ptm.data.sources.Example`."""
    from ptm.data.sources import _check

    name = task_name(path)
    provider = get_provider(name)
    seqio = seqio_module()
    if not isinstance(provider, seqio.Task):
        raise ConfigError(f"seqio:{name} is a Mixture; read it with read_examples (its Tasks by their rates)")
    if kind(name, provider) != "chat":
        raise ConfigError(f"seqio:{name}: not a chat Task (no 'messages' output feature)")
    rows = _split_rows(name, provider, split, use_cached)
    out = []
    for i, ex in enumerate(rows, 1):
        where = f"seqio:{name}/{split}:example {i}"
        if "messages" not in ex:
            raise DataError(f"{where}: no 'messages' feature (features: {sorted(ex)})")
        out.append(_check({"messages": _messages(ex["messages"], where)}, where))
    if not out:
        raise DataError(f"seqio:{name} split {split!r}: no examples")
    return out


# --- any Task/Mixture as examples for ptm's planner (DataConfig.seqio_lm = "examples") ------------------------

DECODER_START_ID = 0  # seqio's DecoderFeatureConverter starts every decoder input with id 0, as t5x does


def read_lm_examples(path: str, split: str = "train", use_cached: bool = False) -> list:
    """Every example of an LM Task's split (unshuffled) as `TokenizedExample`: ids = [0] + inputs + targets,
    loss on the targets. ptm's shift (inputs = ids[:-1], targets = ids[1:]) then gives each example exactly the
    unpacked `decoder_input_tokens` / `decoder_target_tokens` / `decoder_loss_weights` of seqio's
    DecoderFeatureConverter (untrimmed: ptm's `overlong` applies instead of TASK_FEATURE_LENGTHS)."""
    from ptm.data.sources import TokenizedExample

    name = task_name(path)
    task = get_provider(name)
    feats = dict(task.output_features)
    rows = _split_rows(name, task, split, use_cached)
    out = []
    for i, ex in enumerate(rows, 1):
        where = f"seqio:{name}/{split}:example {i}"
        missing = [k for k in ("inputs", "targets") if k in feats and k not in ex]
        if missing:
            raise DataError(f"{where}: no {missing} feature (features: {sorted(ex)})")
        inp = np.asarray(ex["inputs"], np.int32).reshape(-1) if "inputs" in feats else np.zeros(0, np.int32)
        tgt = np.asarray(ex["targets"], np.int32).reshape(-1)
        ids = np.concatenate([[DECODER_START_ID], inp, tgt]).astype(np.int32)
        mask = np.concatenate([np.zeros(1 + len(inp), np.uint8), np.ones(len(tgt), np.uint8)])
        out.append(TokenizedExample(ids, mask, where))
    if not out:
        raise DataError(f"seqio:{name} split {split!r}: no examples")
    return out


def _mixture_sample(counts: Sequence[int], rates: Sequence[float]) -> list[int]:
    """How many examples of each Task one finite epoch of a Mixture holds: proportional to the rates, until the
    first Task runs out (what seqio's `sample_from_datasets(stop_on_empty_dataset=True)` does in expectation)."""
    scale = min(n / r for n, r in zip(counts, rates, strict=True) if r > 0)
    return [min(n, int(np.floor(r * scale + 0.5))) if r > 0 else 0 for n, r in zip(counts, rates, strict=True)]


def read_examples(path: str, split: str = "train", use_cached: bool = False, *, tokenizer=None) -> list:
    """A `seqio:` source as examples for ptm's planner (like a JSONL file): a chat Task's conversations, an LM
    Task's token ids (`read_lm_examples`; the vocabulary must be `tokenizer`'s), or a Mixture's Tasks in
    proportion to its rates (`_mixture_sample`; each Task's sample is a fixed seeded subset, in file order)."""
    name = task_name(path)
    provider = get_provider(name)
    seqio = seqio_module()
    k = kind(name, provider)
    if k == "lm" and tokenizer is not None:
        check_vocabulary(provider, tokenizer, name)
    read = read_chat_examples if k == "chat" else read_lm_examples
    if isinstance(provider, seqio.Task):
        return read(path, split, use_cached)
    tasks = list(seqio.get_subtasks(provider))
    per_task = [read(f"{PREFIX}{t.name}", split, use_cached) for t in tasks]
    take = _mixture_sample([len(x) for x in per_task], [float(provider.get_rate(t)) for t in tasks])
    out = []
    for i, (examples, c) in enumerate(zip(per_task, take, strict=True)):
        pick = np.sort(np.random.default_rng([4, i]).permutation(len(examples))[:c])
        out.extend(examples[j] for j in pick)
    return out


# --- LM Tasks/Mixtures: seqio's DecoderFeatureConverter --------------------------------------------------------

# seqio's DecoderFeatureConverter output -> ptm batch key
FEATURE_MAP = {"decoder_input_tokens": "inputs", "decoder_target_tokens": "targets",
               "decoder_loss_weights": "loss_mask", "decoder_segment_ids": "segment_ids",
               "decoder_positions": "positions"}


def to_ptm_batch(b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """seqio decoder features -> ptm's batch dict (unpacked batches get segment 1 / positions 0.. on non-pad)."""
    targets = np.asarray(b["decoder_target_tokens"], np.int32)
    out = {"inputs": np.asarray(b["decoder_input_tokens"], np.int32), "targets": targets,
           "loss_mask": np.asarray(b["decoder_loss_weights"], np.float32)}
    if "decoder_segment_ids" in b:
        out["segment_ids"] = np.asarray(b["decoder_segment_ids"], np.int32)
        out["positions"] = np.asarray(b["decoder_positions"], np.int32)
    else:
        seg = (targets != 0).astype(np.int32)
        out["segment_ids"] = seg
        out["positions"] = (np.arange(targets.shape[-1], dtype=np.int32)[None, :] * seg).astype(np.int32)
    return out


def feature_lengths(config, provider, name: str) -> dict[str, int]:
    """`task_feature_lengths` (t5x TASK_FEATURE_LENGTHS); the converted length must be `seq_len`."""
    feats = dict(provider.output_features)
    tfl = dict(config.task_feature_lengths) if config.task_feature_lengths else None
    if tfl is None:
        if "inputs" in feats:
            raise ConfigError(f"seqio:{name} has 'inputs' (prefix-LM): set DataConfig.task_feature_lengths "
                              "(t5x TASK_FEATURE_LENGTHS), e.g. {'inputs': a, 'targets': b} with a + b = seq_len")
        tfl = {"targets": int(config.seq_len)}
    missing = [k for k in tfl if k not in feats]
    if missing:
        raise ConfigError(f"seqio:{name}: task_feature_lengths names {missing}, not output features of the "
                          f"Task/Mixture ({sorted(feats)})")
    if "targets" not in tfl:
        raise ConfigError(f"seqio:{name}: task_feature_lengths needs 'targets', got {tfl}")
    if "inputs" in feats and "inputs" not in tfl:
        raise ConfigError(f"seqio:{name} has 'inputs': task_feature_lengths must give its length too, got {tfl}")
    total = sum(int(tfl[k]) for k in ("inputs", "targets") if k in tfl)
    if total != config.seq_len:
        raise ConfigError(f"seqio:{name}: task_feature_lengths {tfl} give decoder length {total}, but "
                          f"DataConfig.seq_len = {config.seq_len}; set seq_len = {total}")
    return {k: int(v) for k, v in tfl.items()}


def check_vocabulary(provider, tokenizer, name: str) -> None:
    """The Task's vocabularies must be the run's tokenizer (vocab size and EOS id), before training starts."""
    feats = dict(provider.output_features)
    for key in ("inputs", "targets"):
        if key not in feats:
            continue
        v = feats[key].vocabulary
        try:
            size, eos = int(v.vocab_size), v.eos_id
        except Exception as e:  # a vocabulary that cannot even load
            raise ConfigError(f"seqio:{name}: cannot load the {key!r} vocabulary {v!r}: {e}") from e
        if size != tokenizer.vocab_size or eos != tokenizer.eos_id:
            spm = getattr(v, "sentencepiece_model_file", None)
            hint = f" (use train.tokenizer = {spm!r})" if spm else ""
            raise ConfigError(
                f"seqio:{name}: the {key!r} vocabulary {type(v).__name__} (vocab_size {size}, eos_id {eos}) does "
                f"not match the run's tokenizer {tokenizer.name!r} (vocab_size {tokenizer.vocab_size}, eos_id "
                f"{tokenizer.eos_id}){hint}")


def _batch_counts(b: dict[str, np.ndarray]) -> tuple[int, int, int]:
    """(examples, non-padding tokens, loss tokens) of one ptm batch."""
    seg = b["segment_ids"]
    return int(seg.max(axis=1).sum()), int((seg != 0).sum()), int(b["loss_mask"].sum())


def own_shard_only(process_count: int) -> bool:
    """True in a real run of `process_count` JAX processes: each plans its own shard and they exchange counts."""
    if process_count <= 1:
        return False
    import jax

    return jax.process_count() == process_count


def gather_arrays(local: np.ndarray) -> list[np.ndarray]:
    """Every process's int64 [n, k] array (n may differ between processes), by process index."""
    from ptm.parallel import sync

    local = np.asarray(local, np.int64)
    k = local.shape[1]
    lengths = [row[0] for row in sync.gather_ints([local.shape[0]])]
    padded = np.zeros((max(lengths), k), np.int64)
    padded[: local.shape[0]] = local
    flat = sync.gather_ints(padded.reshape(-1).tolist())
    return [np.asarray(f, np.int64).reshape(-1, k)[:n] for f, n in zip(flat, lengths, strict=True)]


class SeqioBatchIterator(grain.DatasetIterator):
    """A grain-checkpointable iterator over one host's seqio batches.

    State: the number of batches consumed (plus the source, seed and shard, checked on restore). Restoring
    rebuilds the seeded pipeline and `skip`s that many batches: the input pipeline recomputes (reads,
    preprocesses, packs) the skipped batches, no model work, so resume costs about as much time as feeding
    that many batches took.
    """

    def __init__(self, make_dataset: Callable[[], Any], num_batches: int, ident: dict):
        super().__init__()
        self._make, self._n, self._ident = make_dataset, int(num_batches), dict(ident)
        self._k = 0
        self._it = None

    def __next__(self) -> dict[str, np.ndarray]:
        if self._k >= self._n:
            raise StopIteration
        if self._it is None:
            ds = self._make()
            if self._k:
                ds = ds.skip(self._k)
            self._it = ds.prefetch(2).as_numpy_iterator()
        try:
            b = next(self._it)
        except StopIteration:
            raise DataError(f"{self._ident['source']}: the pipeline ended after {self._k} batches; the plan "
                            f"expected {self._n}") from None
        self._k += 1
        return to_ptm_batch(b)

    def get_state(self) -> dict:
        return {"batches_done": self._k, **self._ident}

    def set_state(self, state: dict) -> None:
        for k, v in self._ident.items():
            if k in state and state[k] != v:
                raise DataError(f"data iterator checkpoint was saved for {k}={state[k]!r}, this run has {v!r}")
        self._k = int(state["batches_done"])
        self._it = None

    def __str__(self) -> str:
        return f"SeqioBatchIterator({self._ident}, {self._k}/{self._n})"


def host_dataset(config, name: str, tfl: dict[str, int], shard: int, num_shards: int):
    """Host `shard` of `num_shards`' batches, exactly as t5x builds them (tf.data, numpy via as_numpy_iterator)."""
    seqio = seqio_module()
    return seqio.get_dataset(
        name, task_feature_lengths=tfl, feature_converter=seqio.DecoderFeatureConverter(pack=config.pack),
        dataset_split=config.split, use_cached=config.use_cached, shuffle=config.shuffle,
        num_epochs=None if config.num_steps else config.num_epochs,
        shard_info=seqio.ShardInfo(index=shard, num_shards=num_shards), verbose=False, seed=config.seed,
        batch_size=config.global_batch_size // num_shards)


def plan_counts(config, name: str, tfl: dict[str, int], shard: int, num_shards: int) -> np.ndarray:
    """[batches, 3] (examples, tokens, loss tokens) of one host's batches: one pass of its input pipeline."""
    try:
        ds = host_dataset(config, name, tfl, shard, num_shards)
        if config.num_steps:
            ds = ds.take(config.num_steps)
        counts = [_batch_counts(to_ptm_batch(b)) for b in ds.as_numpy_iterator()]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"seqio:{name} split {config.split!r}: {type(e).__name__}: {e}") from e
    return np.asarray(counts, np.int64).reshape(-1, 3)


def build_lm_train_data(config, tokenizer, *, process_index: int, process_count: int, stats):
    """(iterator, stats) for one `seqio:NAME` LM source (see the module docstring). `stats` is a fresh
    DataStats; it is filled in here."""
    seqio = seqio_module()
    if len(config.sources) != 1:
        raise ConfigError("a seqio LM source (targets/inputs features) must be the only source; mix Tasks with a "
                          "seqio Mixture and its rates, or set DataConfig.seqio_lm='examples' (ptm's planner)")
    src = config.sources[0]
    if src.max_examples is not None or src.epochs != 1.0 or src.rate != 1.0:
        raise ConfigError(f"source {src.path}: max_examples/epochs/rate do not apply to a seqio LM source with "
                          "seqio_lm='t5x' (use DataConfig.num_epochs / num_steps and a Mixture's rates, or "
                          "DataConfig.seqio_lm='examples')")
    name = task_name(src.path)
    provider = get_provider(name)
    check_split(name, provider, config.split)
    check_vocabulary(provider, tokenizer, name)
    tfl = feature_lengths(config, provider, name)
    per_host = config.global_batch_size // process_count

    def make(shard: int):
        return lambda: host_dataset(config, name, tfl, shard, process_count)

    # Plan: every host must take the same number of steps, and stats.seen(k) needs every host's counts. In a
    # real multi-process run each host plans only its own shard and the hosts exchange their counts; a single
    # process standing in for P hosts (tests, tools) plans all P shards itself.
    def plan_shard(shard: int) -> np.ndarray:
        return plan_counts(config, name, tfl, shard, process_count)

    def count_examples(task, shard: int = 0, num_shards: int = 1) -> int:  # after preprocessing
        ds = task.get_dataset(tfl, split=config.split, use_cached=config.use_cached, shuffle=False, num_epochs=1,
                              shard_info=seqio.ShardInfo(index=shard, num_shards=num_shards))
        return int(ds.reduce(np.int64(0), lambda x, _: x + 1))

    tasks = list(seqio.get_subtasks(provider))
    if own_shard_only(process_count):
        per_shard = gather_arrays(plan_shard(process_index))
        mine = [count_examples(t, process_index, process_count) for t in tasks]
        sizes = np.sum(gather_arrays(np.asarray([mine])), axis=0).reshape(-1).tolist()
    else:
        per_shard = [plan_shard(shard) for shard in range(process_count)]
        sizes = [count_examples(t) for t in tasks]
    num_batches = min(len(c) for c in per_shard)
    if config.num_steps and num_batches < config.num_steps:
        raise DataError(f"seqio:{name} split {config.split!r}: yields {num_batches} batches, not num_steps="
                        f"{config.num_steps} (empty split?)")
    if num_batches == 0:
        raise DataError(f"seqio:{name} split {config.split!r}: not one full batch of {per_host} rows per host "
                        f"({process_count} hosts) after packing")
    per_batch = sum(c[:num_batches] for c in per_shard)
    cum = np.zeros((num_batches + 1, 3), np.int64)
    np.cumsum(per_batch, axis=0, out=cum[1:])

    for task, n in zip(tasks, sizes, strict=True):
        stats.sources[task.name] = {"path": f"{PREFIX}{task.name}", "read": int(n), "examples": int(n)}
    distinct = int(sum(sizes))
    stats.examples = distinct
    stats.num_batches = num_batches
    stats.packed_rows = num_batches * config.global_batch_size
    stats._cum = cum
    stats.examples_seen, stats.tokens, stats.loss_tokens = (int(x) for x in cum[-1])
    ident = {"source": src.path, "split": config.split, "seed": config.seed,
             "shard": f"{process_index}/{process_count}"}
    return SeqioBatchIterator(make(process_index), num_batches, ident), stats


# --- eval: a Task's split as eval items ---------------------------------------------------------------------

def task_and_split(spec: str, default_split: str = "validation") -> tuple[str, str]:
    """`seqio:TASK[:SPLIT]` -> (TASK, SPLIT). seqio names may contain ':' themselves, so a registered name
    wins: the last ':part' is the split only when the whole is not a Task/Mixture."""
    rest = task_name(spec)
    seqio = seqio_module()
    names = set(seqio.TaskRegistry.names()) | set(seqio.MixtureRegistry.names())
    if rest in names or ":" not in rest:
        return rest, default_split
    head, split = rest.rsplit(":", 1)
    if head in names and split:
        return head, split
    get_provider(head)  # raises, naming the Task without the split and listing the registered names
    raise AssertionError("unreachable")


def subtask_names(name: str) -> list[str]:
    """A Task's own name, or the Tasks of a Mixture (in its order)."""
    return [t.name for t in seqio_module().get_subtasks(get_provider(name))]


def metric_names(name: str) -> list[str]:
    """The names of a Task's metric functions (predict and score metrics), to choose an eval scorer from."""
    provider = get_provider(name)
    fns = list(getattr(provider, "metric_fns", ()) or ())
    fns += [f for f in getattr(provider, "score_metric_fns", ()) or () if f not in fns]
    return [getattr(f, "__name__", None) or getattr(getattr(f, "func", None), "__name__", repr(f)) for f in fns]



def eval_records(path: str, split: str = "validation", scorer: str = "exact_match", *, modules: Sequence[str] = (),
                 use_cached: bool = False, max_items: int | None = None) -> list[dict]:
    """A Task's split as eval-set records (docs/eval.md format; write them as JSONL for `ptm eval`): the
    `inputs` text is the user turn, the `targets` text the reference, `scorer` chosen by the caller. Texts are
    the Task's `*_pretokenized` features when present, else its token ids decoded with its vocabulary."""
    import_modules(modules)
    name = task_name(path)
    provider = get_provider(name)
    if kind(name, provider) != "lm":
        raise ConfigError(f"seqio:{name}: eval items need an LM Task ('targets', optionally 'inputs')")
    feats = dict(provider.output_features)
    rows = _split_rows(name, provider, split, use_cached, max_items)

    def text(ex, key):
        if f"{key}_pretokenized" in ex:
            return _text(ex[f"{key}_pretokenized"])
        ids = [int(i) for i in np.asarray(ex[key]).tolist() if int(i) != feats[key].vocabulary.eos_id]
        return feats[key].vocabulary.decode(ids)

    out = []
    for i, ex in enumerate(rows):
        prompt = text(ex, "inputs") if "inputs" in feats else ""
        out.append({"task": name, "messages": [{"role": "user", "content": prompt}] if prompt else [],
                    "reference": text(ex, "targets"), "scorer": scorer, "id": f"{split}:{i}"})
    if not out:
        raise DataError(f"seqio:{name} split {split!r}: no examples")
    return out
