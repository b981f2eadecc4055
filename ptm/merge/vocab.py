"""Vocabulary surgery: merge inputs whose vocabularies differ (32000 vs 32002 with added tokens, padded embeddings).

`tokenizer = "base" | "union" | <input path>` picks the output vocabulary: the base model's (`pre`, else the first
input), the union (the base's tokens by id, then each other input's tokens it lacks, in input order), or one
input's. Each input is then seen through a `VocabView`: its embedding and LM head have one row per output token,
in output order. A token the input has keeps its row; one it lacks takes the base model's row, else the row of
the only input that has it, else the mean of the rows of the inputs that have it (so a task vector is zero where
a model never knew the token). The views are ordinary InputStores, so the engine streams, shards and merges them
with any method; an embedding is built whole (one tensor at a time) on first read.

A spec may also be a mapping, mergekit's `tokenizer:` block: `{source, tokens, pad_to_multiple_of}`. `tokens`
overrides the row of named tokens: `{source: <input> | {kind: zero} | {kind: model_token, model, token | token_id},
force}` gives that row to every input that lacks the token, or with `force` to every input (so the merge of
identical rows returns it); a listed token the output vocabulary lacks is added after it, in the order listed.
`pad_to_multiple_of = m` appends rows up to a multiple of m (the tokenizer is unchanged), each input's padding
rows being the mean of its own output rows: what mergekit 0.1.5 gives (measured).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from ptm.ckpt import stores as S
from ptm.errors import ConfigError, MergeError

# tensor name -> its vocabulary axis (ptm names, HF names); tied models simply have no head
VOCAB_AXIS = {"embed.embedding": 0, "lm_head.kernel": 1, "model.embed_tokens.weight": 0, "lm_head.weight": 0}
SPECS = ("base", "union")
SPEC_KEYS = ("source", "tokens", "pad_to_multiple_of")


@dataclass(frozen=True)
class TokenSource:
    """Where one listed token's row comes from: input `model`'s row for `token` (or its row `token_id`), or
    zeros (`model` None); `force`: for every input, not only those lacking the token."""

    token: str
    model: str | None
    source_token: str | None
    token_id: int | None
    force: bool


@dataclass(frozen=True)
class Spec:
    source: str
    tokens: tuple[TokenSource, ...] = ()
    pad_to_multiple_of: int | None = None


def _model_ref(v: Any, paths: list[str], at: str) -> str:
    if not isinstance(v, str):
        raise ConfigError(f"{at}: a model is one of the inputs' paths, got {v!r}")
    m = v.removeprefix("model:")
    if m not in paths:
        raise ConfigError(f"{at}: model {m!r} is not one of the inputs {paths}")
    return m


def _token_source(tok: Any, c: Any, paths: list[str], where: str) -> TokenSource:
    at = f"{where}.tokens[{tok!r}]"
    if not isinstance(tok, str) or not tok:
        raise ConfigError(f"{where}.tokens: a token is a non-empty string, got {tok!r}")
    if not isinstance(c, dict) or set(c) - {"source", "force"}:
        raise ConfigError(f"{at}: give {{source: ..., force: true|false}}, got {c!r}")
    force = c.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{at}.force must be true or false, got {force!r}")
    src = c.get("source")
    if src is None:
        raise ConfigError(f"{at}: needs a source (an input, {{kind: zero}} or {{kind: model_token, model, token}})")
    if isinstance(src, str):
        return TokenSource(tok, _model_ref(src, paths, f"{at}.source"), tok, None, force)
    kind = src.get("kind") if isinstance(src, dict) else None
    if kind == "zero" and set(src) == {"kind"}:
        return TokenSource(tok, None, None, None, force)
    if kind == "model_token" and not set(src) - {"kind", "model", "token", "token_id"} and "model" in src and (
            ("token" in src) != ("token_id" in src)):
        model = _model_ref(src["model"], paths, f"{at}.source.model")
        if "token" in src:
            if not isinstance(src["token"], str):
                raise ConfigError(f"{at}.source.token must be a string, got {src['token']!r}")
            return TokenSource(tok, model, src["token"], None, force)
        tid = src["token_id"]
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0:
            raise ConfigError(f"{at}.source.token_id must be an integer >= 0, got {tid!r}")
        return TokenSource(tok, model, None, tid, force)
    raise ConfigError(f"{at}.source: an input, {{kind: zero}} or {{kind: model_token, model: ..., token: ...}} "
                      f"(or token_id), got {src!r}")


def parse_spec(spec: Any, paths: list[str], where: str = "tokenizer") -> Spec:
    """A recipe's `tokenizer` (a source string or a `{source, tokens, pad_to_multiple_of}` mapping) checked against
    the inputs: ConfigError naming the key, token or model, before anything is read."""
    if isinstance(spec, str):
        spec = {"source": spec}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where} must be 'base', 'union', an input path or a mapping {{source, tokens, "
                          f"pad_to_multiple_of}}, got {spec!r}")
    bad = set(spec) - set(SPEC_KEYS)
    if bad:
        raise ConfigError(f"{where}: unsupported key(s) {sorted(bad)} (supported: {list(SPEC_KEYS)})")
    src = spec.get("source", "union")
    if not isinstance(src, str):
        raise ConfigError(f"{where}.source must be 'base', 'union' or an input path, got {src!r}")
    src = src.removeprefix("model:")
    if src not in SPECS and src not in paths:
        raise ConfigError(f"{where}.source {src!r}: give 'base', 'union' or one of the models (inputs) {paths}")
    pad = spec.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad <= 0):
        raise ConfigError(f"{where}.pad_to_multiple_of must be an integer > 0, got {pad!r}")
    toks = spec.get("tokens") or {}
    if not isinstance(toks, dict):
        raise ConfigError(f"{where}.tokens must be a mapping token -> {{source, force}}, got {toks!r}")
    return Spec(src, tuple(_token_source(t, c, paths, where) for t, c in toks.items()), pad)


def _real_path(st: S.InputStore) -> str:
    """The model an input's embedding comes from (a frankenmerge stack: its first slice's model)."""
    segs = getattr(st, "segments", None)
    return segs[0][0].path if segs else st.path


def tokenizer_file(st: S.InputStore) -> str:
    """The tokenizer.json of an input: next to an HF model, or the one its ptm metadata names."""
    p = _real_path(st)
    d = p if os.path.isdir(p) else os.path.dirname(p)
    cands = [os.path.join(d, "tokenizer.json")]
    tok = (st.meta or {}).get("tokenizer")
    if isinstance(tok, str):
        cands.insert(0, tok if tok.endswith(".json") else os.path.join(tok, "tokenizer.json"))
    for c in cands:
        if os.path.isfile(c):
            return c
    raise MergeError(f"{p}: vocabulary surgery needs the input's tokenizer.json (looked for {', '.join(cands)})")


def _tokenizer(path: str):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception for bad JSON
        raise MergeError(f"{path}: cannot read tokenizer ({e})") from e


def _ordered(vocab: dict[str, int], where: str) -> list[str]:
    toks = sorted(vocab, key=vocab.__getitem__)
    if [vocab[t] for t in toks] != list(range(len(toks))):
        raise MergeError(f"{where}: token ids are not 0..{len(toks) - 1} without gaps")
    return toks


@dataclass
class Surgery:
    """The output vocabulary and where its tokenizer files come from."""

    tokens: list[str]
    base: int  # index of the base input
    vocabs: list[dict[str, int]]
    tokenizer_dir: str | None = None  # copy the tokenizer files from here (base / one input)
    files: dict[str, bytes] | None = None  # or write these (union)
    tokenizer_path: str | None = None  # recorded in ptm metadata (Orbax outputs)
    n_rows: int = 0  # output rows: len(tokens) padded up to pad_to_multiple_of
    overrides: dict[str, tuple[int | None, int, bool]] | None = None  # token -> (input or None = zero, row, force)


def plan(spec: Any, base_path: str | None, paths: list[str], stores: list[S.InputStore]) -> Surgery:
    """Which tokens the output has, from the inputs' tokenizers (`stores[k]` is input `paths[k]`)."""
    sp = parse_spec(spec, paths)
    files = [tokenizer_file(s) for s in stores]
    toks = [_tokenizer(f) for f in files]
    vocabs = [t.get_vocab(with_added_tokens=True) for t in toks]
    base = paths.index(base_path) if base_path in paths else 0
    k = base if sp.source in SPECS else paths.index(sp.source)
    out = _ordered(vocabs[k], files[k])
    seen = set(out)
    added: list[tuple[int | None, str]] = []  # (an input that has it, or None; token), in output order
    if sp.source == "union":
        for j, v in enumerate(vocabs):
            for t in _ordered(v, files[j]):
                if t not in seen:
                    seen.add(t)
                    out.append(t)
                    added.append((j, t))
    overrides = {}
    for ts in sp.tokens:
        overrides[ts.token] = _override_row(ts, paths, vocabs)
        if ts.token not in seen:  # a listed token the output lacks is added (mergekit's documented rule)
            seen.add(ts.token)
            out.append(ts.token)
            added.append((next((j for j, v in enumerate(vocabs) if ts.token in v), None), ts.token))
    m = sp.pad_to_multiple_of or 1
    n_rows = -(-len(out) // m) * m
    if added:
        return Surgery(out, base, vocabs, files=_extended_files(files, toks, k, added, len(vocabs[k])),
                       n_rows=n_rows, overrides=overrides)
    return Surgery(out, base, vocabs, tokenizer_dir=os.path.dirname(files[k]), tokenizer_path=files[k],
                   n_rows=n_rows, overrides=overrides)


def _override_row(ts: TokenSource, paths: list[str], vocabs: list[dict[str, int]]) -> tuple[int | None, int, bool]:
    """(input index or None for zeros, its row, force) of a listed token; ConfigError if that row does not exist."""
    at = f"tokenizer.tokens[{ts.token!r}]"
    if ts.model is None:
        return None, 0, ts.force
    j = paths.index(ts.model)
    if ts.token_id is not None:
        if ts.token_id >= len(vocabs[j]):
            raise ConfigError(f"{at}: token_id {ts.token_id} is past the tokenizer of {ts.model} "
                              f"({len(vocabs[j])} tokens)")
        return j, ts.token_id, ts.force
    if ts.source_token not in vocabs[j]:
        raise ConfigError(f"{at}: token {ts.source_token!r} is not in the tokenizer of {ts.model}")
    return j, vocabs[j][ts.source_token], ts.force


def _extended_files(files: list[str], toks: list[Any], k: int, added: list[tuple[int | None, str]], n_out: int
                    ) -> dict[str, bytes]:
    """Input k's tokenizer with the `added` tokens appended (special where the input they come from marks them so),
    ids in order."""
    from tokenizers import AddedToken

    tk = _tokenizer(files[k])
    for i, (j, t) in enumerate(added):
        src = toks[j].get_added_tokens_decoder().get(toks[j].token_to_id(t)) if j is not None else None
        at = AddedToken(t, single_word=src.single_word, lstrip=src.lstrip, rstrip=src.rstrip,
                        normalized=src.normalized, special=src.special) if src else AddedToken(
            t, normalized=j is None)
        (tk.add_special_tokens if at.special else tk.add_tokens)([at])
        if tk.token_to_id(t) != n_out + i:
            where = files[j] if j is not None else "tokenizer.tokens"
            raise MergeError(f"{where}: token {t!r} could not be added to the output tokenizer as id {n_out + i}")
    out = {"tokenizer.json": tk.to_str(pretty=True).encode()}
    cfg_path = os.path.join(os.path.dirname(files[k]), "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg["added_tokens_decoder"] = {
            str(i): {"content": a.content, "lstrip": a.lstrip, "normalized": a.normalized, "rstrip": a.rstrip,
                     "single_word": a.single_word, "special": a.special}
            for i, a in sorted(tk.get_added_tokens_decoder().items())}
        out["tokenizer_config.json"] = (json.dumps(cfg, indent=2) + "\n").encode()
    return out


class VocabView(S.InputStore):
    """Input `k` with its embedding and LM head re-indexed to the output vocabulary (see the module docstring)."""

    def __init__(self, k: int, stores: list[S.InputStore], surgery: Surgery):
        self.k, self.stores, self.surgery = k, stores, surgery
        inner = stores[k]
        self.inner, self.path, self.kind = inner, inner.path, inner.kind
        self.paths = getattr(inner, "paths", [inner.path])
        self._cache: dict[str, np.ndarray] = {}
        self._sources: Any = None  # _plan_rows(), computed on first use
        self._infos = dict(inner.tensors())
        n = surgery.n_rows or len(surgery.tokens)
        for name, ax in VOCAB_AXIS.items():
            if name in self._infos:
                info = self._infos[name]
                shape = list(info.shape)
                shape[ax] = n
                self._infos[name] = S.TensorInfo(name, tuple(shape), info.dtype)
        self.meta = copy.deepcopy(inner.meta)
        if self.meta:
            if isinstance(self.meta.get("model"), dict):
                self.meta["model"]["vocab_size"] = n
            self.meta["tokenizer"] = surgery.tokenizer_path

    def tensors(self) -> dict[str, S.TensorInfo]:
        return self._infos

    def _rows(self, j: int, name: str) -> np.ndarray:
        """Input j's tensor `name` with the vocabulary on axis 0 (a view for an axis-0 tensor)."""
        st = self.stores[j]
        if name not in st.tensors():
            raise MergeError(f"{st.path}: no tensor {name!r} (tied and untied heads cannot be mixed)")
        a = st.read(name, ())
        return a if VOCAB_AXIS[name] == 0 else a.T

    def _plan_rows(self) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[tuple[int, list[tuple[int, int]]]],
                                  list[int]]:
        """Where each output row comes from (the rules of the module docstring), independent of the tensor:
        {input j: (output rows, its rows)} for copied rows, [(output row, [(j, row), ...])] for means, and the
        output rows that are zero."""
        vocabs, base, k = self.surgery.vocabs, self.surgery.base, self.k
        over = self.surgery.overrides or {}
        copy_: dict[int, tuple[list[int], list[int]]] = {}
        means, zeros = [], []
        for o, t in enumerate(self.surgery.tokens):
            ov = over.get(t)
            if ov is not None and (ov[2] or t not in vocabs[k]):
                j, r = ov[0], ov[1]
                if j is None:
                    zeros.append(o)
                    continue
            else:
                j = k if t in vocabs[k] else base if t in vocabs[base] else None
                if j is None:
                    have = [i for i, v in enumerate(vocabs) if t in v]
                    if len(have) > 1:
                        means.append((o, [(i, vocabs[i][t]) for i in have]))
                        continue
                    j = have[0]
                r = vocabs[j][t]
            dst, src = copy_.setdefault(j, ([], []))
            dst.append(o)
            src.append(r)
        return {j: (np.asarray(d), np.asarray(r)) for j, (d, r) in copy_.items()}, means, zeros

    def _build(self, name: str) -> np.ndarray:
        if self._sources is None:
            self._sources = self._plan_rows()
        copies, means, zeros = self._sources
        need = {*copies, *(i for _, have in means for i, _ in have)} or {self.k}
        rows = {j: self._rows(j, name) for j in need}
        for j, (dst, src) in copies.items():
            if src.size and src.max() >= rows[j].shape[0]:
                t = self.surgery.tokens[int(dst[src.argmax()])]
                raise MergeError(f"{self.stores[j].path}: tensor {name!r} has {rows[j].shape[0]} rows but its "
                                 f"tokenizer gives token {t!r} id {int(src.max())}")
        own = rows.get(self.k, next(iter(rows.values())))
        n = len(self.surgery.tokens)
        out = np.empty((self.surgery.n_rows or n, *own.shape[1:]), own.dtype)
        bits = {2: np.uint16, 4: np.uint32, 8: np.uint64}[own.dtype.itemsize]
        raw = out.view(bits)  # rows copied as raw bits: numpy's generic copy of bf16 is ~10x slower
        for j, (dst, src) in copies.items():
            if rows[j].dtype != own.dtype:
                raise MergeError(f"{self.stores[j].path}: tensor {name!r} has dtype {rows[j].dtype}, "
                                 f"{self.stores[self.k].path} has {own.dtype}")
            r = rows[j].view(bits)
            if np.array_equal(dst, np.arange(dst[0], dst[0] + dst.size)) and np.array_equal(
                    src, np.arange(src[0], src[0] + src.size)):
                raw[dst[0]:dst[0] + dst.size] = r[src[0]:src[0] + src.size]
            else:
                raw[dst] = r[src]
        for o, have in means:
            for i, r in have:
                if r >= rows[i].shape[0]:
                    raise MergeError(f"{self.stores[i].path}: tensor {name!r} has {rows[i].shape[0]} rows but its "
                                     f"tokenizer gives token {self.surgery.tokens[o]!r} id {r}")
            out[o] = np.mean([rows[i][r].astype(np.float32) for i, r in have], axis=0).astype(own.dtype)
        raw[zeros] = 0
        if out.shape[0] > n:  # padding rows: the mean of this input's output rows (float32, cast back)
            out[n:] = np.mean(out[:n], axis=0, dtype=np.float32).astype(own.dtype)
        return out if VOCAB_AXIS[name] == 0 else np.ascontiguousarray(out.T)

    def reads_are_views(self, name: str) -> bool:
        if name not in VOCAB_AXIS or name not in self._infos:
            return self.inner.reads_are_views(name)
        return False  # built in memory

    def read_async(self, name: str, index: Any):
        if name not in VOCAB_AXIS or name not in self._infos:
            return self.inner.read_async(name, index)
        if name not in self._cache:
            self._cache.clear()  # one vocabulary tensor at a time
            self._cache[name] = self._build(name)
        return _Done(self._cache[name][index])


class _Done:
    def __init__(self, v: np.ndarray):
        self.v = v

    def result(self) -> np.ndarray:
        return self.v


def views(spec: Any, base_path: str | None, paths: list[str], stores: list[S.InputStore]) -> list[S.InputStore]:
    """Every input re-indexed to the output vocabulary of `spec` (a source string or a mapping, see
    `parse_spec`; `base_path`: the base model, else paths[0])."""
    surgery = plan(spec, base_path, paths, stores)
    return [VocabView(k, stores, surgery) for k in range(len(stores))]
