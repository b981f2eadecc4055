"""Vocabulary surgery: merge inputs whose vocabularies differ (32000 vs 32002 with added tokens, padded embeddings).

`tokenizer = "base" | "union" | <input path>` picks the output vocabulary: the base model's (`pre`, else the first
input), the union (the base's tokens by id, then each other input's tokens it lacks, in input order), or one
input's. Each input is then seen through a `VocabView`: its embedding and LM head have one row per output token,
in output order. A token the input has keeps its row; one it lacks takes the base model's row, else the row of
the only input that has it, else the mean of the rows of the inputs that have it (so a task vector is zero where
a model never knew the token). The views are ordinary InputStores, so the engine streams, shards and merges them
with any method; an embedding is built whole (one tensor at a time) on first read.
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


def plan(spec: str, base_path: str | None, paths: list[str], stores: list[S.InputStore]) -> Surgery:
    """Which tokens the output has, from the inputs' tokenizers (`stores[k]` is input `paths[k]`)."""
    files = [tokenizer_file(s) for s in stores]
    toks = [_tokenizer(f) for f in files]
    vocabs = [t.get_vocab(with_added_tokens=True) for t in toks]
    base = paths.index(base_path) if base_path in paths else 0
    if spec == "union":
        out = _ordered(vocabs[base], files[base])
        seen = set(out)
        added = []
        for k, v in enumerate(vocabs):
            for t in _ordered(v, files[k]):
                if t not in seen:
                    seen.add(t)
                    out.append(t)
                    added.append((k, t))
        return Surgery(out, base, vocabs, files=_union_files(files, toks, base, added, len(vocabs[base])),
                       tokenizer_path=None)
    if spec == "base":
        k = base
    elif spec in paths:
        k = paths.index(spec)
    else:
        raise ConfigError(f"tokenizer {spec!r}: give 'base', 'union' or one of the inputs {paths}")
    return Surgery(_ordered(vocabs[k], files[k]), base, vocabs, tokenizer_dir=os.path.dirname(files[k]),
                   tokenizer_path=files[k])


def _union_files(files: list[str], toks: list[Any], base: int, added: list[tuple[int, str]], n_base: int
                 ) -> dict[str, bytes]:
    """The base tokenizer with every token it lacks added (special where its source marks it so), ids in order."""
    from tokenizers import AddedToken

    tk = _tokenizer(files[base])
    for i, (k, t) in enumerate(added):
        src = toks[k].get_added_tokens_decoder().get(toks[k].token_to_id(t))
        at = AddedToken(t, single_word=src.single_word, lstrip=src.lstrip, rstrip=src.rstrip,
                        normalized=src.normalized, special=src.special) if src else AddedToken(t, normalized=False)
        (tk.add_special_tokens if at.special else tk.add_tokens)([at])
        if tk.token_to_id(t) != n_base + i:
            raise MergeError(f"{files[k]}: token {t!r} could not be added to the union tokenizer as id {n_base + i}")
    out = {"tokenizer.json": tk.to_str(pretty=True).encode()}
    cfg_path = os.path.join(os.path.dirname(files[base]), "tokenizer_config.json")
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
        n = len(surgery.tokens)
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

    def _plan_rows(self) -> tuple[dict[int, tuple[np.ndarray, np.ndarray]], list[tuple[int, list[tuple[int, int]]]]]:
        """Where each output row comes from (the rule of the module docstring), independent of the tensor:
        {input j: (output rows, its rows)} for copied rows, and [(output row, [(j, row), ...])] for means."""
        vocabs, base, k = self.surgery.vocabs, self.surgery.base, self.k
        copy_: dict[int, tuple[list[int], list[int]]] = {}
        means = []
        for o, t in enumerate(self.surgery.tokens):
            j = k if t in vocabs[k] else base if t in vocabs[base] else None
            if j is None:
                have = [i for i, v in enumerate(vocabs) if t in v]
                if len(have) > 1:
                    means.append((o, [(i, vocabs[i][t]) for i in have]))
                    continue
                j = have[0]
            dst, src = copy_.setdefault(j, ([], []))
            dst.append(o)
            src.append(vocabs[j][t])
        return {j: (np.asarray(d), np.asarray(r)) for j, (d, r) in copy_.items()}, means

    def _build(self, name: str) -> np.ndarray:
        if self._sources is None:
            self._sources = self._plan_rows()
        copies, means = self._sources
        rows = {j: self._rows(j, name) for j in {*copies, *(i for _, have in means for i, _ in have)}}
        for j, (_, src) in copies.items():
            if src.size and src.max() >= rows[j].shape[0]:
                t = self.surgery.tokens[int(copies[j][0][src.argmax()])]
                raise MergeError(f"{self.stores[j].path}: tensor {name!r} has {rows[j].shape[0]} rows but its "
                                 f"tokenizer gives token {t!r} id {int(src.max())}")
        own = rows.get(self.k, next(iter(rows.values())))
        out = np.empty((len(self.surgery.tokens), *own.shape[1:]), own.dtype)
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
        return out if VOCAB_AXIS[name] == 0 else np.ascontiguousarray(out.T)

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


def views(spec: str, base_path: str | None, paths: list[str], stores: list[S.InputStore]) -> list[S.InputStore]:
    """Every input re-indexed to the output vocabulary of `spec` (`base_path`: the base model, else paths[0])."""
    if not isinstance(spec, str):
        raise ConfigError(f"tokenizer must be 'base', 'union' or an input path, got {spec!r}")
    surgery = plan(spec, base_path, paths, stores)
    return [VocabView(k, stores, surgery) for k in range(len(stores))]
