"""Tokenizers behind one small protocol: built-in bytes, SentencePiece (Llama), Hugging Face tokenizer.json.

Chat markers (`<|user|>` ...) are always tokenized as plain text, so no tokenizer needs special tokens for
them; only BOS/EOS/PAD are used as ids directly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from etils import epath

from ptm.errors import ConfigError, DataError


@runtime_checkable
class Tokenizer(Protocol):
    name: str

    @property
    def vocab_size(self) -> int: ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; then pad=256, bos=257, eos=258. No files, no downloads."""

    name = "byte"
    pad_id = 256
    bos_id = 257
    eos_id = 258
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def _read_bytes(path: str) -> bytes:
    try:
        return epath.Path(path).read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: tokenizer file not found") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read tokenizer file: {e}") from e


class SentencePieceTokenizer:
    """A SentencePiece model file (e.g. Llama's tokenizer.model), local or gs://.

    `extra_ids` appends that many ids after the model's pieces, as seqio's `SentencePieceVocabulary(extra_ids=N)`
    does (T5's sentinels): they count in `vocab_size`, are never produced by `encode` and decode to nothing.
    """

    def __init__(self, path: str, extra_ids: int = 0):
        import sentencepiece as spm

        self.path = str(path)
        self.extra_ids = int(extra_ids)
        self.name = f"sentencepiece:{self.path}" + (f"+{self.extra_ids}" if self.extra_ids else "")
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(_read_bytes(self.path))
        except (RuntimeError, TypeError) as e:
            raise DataError(f"{self.path}: not a SentencePiece model: {e}") from e
        if self._sp.eos_id() < 0:
            raise DataError(f"{self.path}: SentencePiece model has no EOS piece (the chat template needs it)")

    @property
    def vocab_size(self) -> int:
        return int(self._sp.GetPieceSize()) + self.extra_ids

    @property
    def bos_id(self) -> int | None:
        b = self._sp.bos_id()
        return None if b < 0 else int(b)

    @property
    def eos_id(self) -> int:
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        # Llama has no pad piece; padded positions are masked out anyway, so any valid id will do.
        p = self._sp.pad_id()
        return int(p) if p >= 0 else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def decode(self, ids) -> str:
        n = self._sp.GetPieceSize()
        return self._sp.DecodeIds([int(i) for i in ids if int(i) < n])


_BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[BOS]")
_EOS_CANDIDATES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (via the `tokenizers` library), local or gs://.

    BOS/EOS/PAD come from the arguments, else from a `tokenizer_config.json` next to the file, else from
    common token names (`<s>`, `</s>`, ...). No BOS is fine; no EOS is an error (the chat template needs it).
    """

    def __init__(self, path: str, *, bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        from tokenizers import Tokenizer as _HFTok

        self.path = str(path)
        self.name = f"hf:{self.path}"
        try:
            self._tok = _HFTok.from_str(_read_bytes(self.path).decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception subclasses for bad JSON
            raise DataError(f"{self.path}: not a Hugging Face tokenizer.json: {e}") from e
        # Text is text: "</s>" typed in a message must not become EOS (the library would match it by default).
        self._tok.encode_special_tokens = True
        cfg = self._sidecar_config()
        self._bos = self._pick(bos_token or cfg.get("bos_token"), _BOS_CANDIDATES, "bos_token")
        eos = self._pick(eos_token or cfg.get("eos_token"), _EOS_CANDIDATES, "eos_token")
        if eos is None:
            raise DataError(f"{self.path}: no EOS token found; pass eos_token= (the chat template needs one)")
        self._eos = eos
        pad = self._pick(pad_token or cfg.get("pad_token"), _PAD_CANDIDATES, "pad_token")
        self._pad = eos if pad is None else pad

    def _sidecar_config(self) -> dict:
        p = epath.Path(self.path).parent / "tokenizer_config.json"
        try:
            if not p.exists():
                return {}
            cfg = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            raise DataError(f"{p}: unreadable tokenizer_config.json: {e}") from e
        out = {}
        for k in ("bos_token", "eos_token", "pad_token"):
            v = cfg.get(k)
            if isinstance(v, dict):  # older configs store AddedToken dicts
                v = v.get("content")
            if isinstance(v, str):
                out[k] = v
        return out

    def _pick(self, explicit: str | None, candidates: tuple[str, ...], what: str) -> int | None:
        if explicit is not None:
            i = self._tok.token_to_id(explicit)
            if i is None:
                raise DataError(f"{self.path}: {what} {explicit!r} is not in the vocabulary")
            return int(i)
        for c in candidates:
            i = self._tok.token_to_id(c)
            if i is not None:
                return int(i)
        return None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def seqio_tokenizer(spec: str, seqio_modules: Sequence[str] = ()) -> SentencePieceTokenizer:
    """`seqio:NAME`: the vocabulary of a registered Task/Mixture's output features, as ptm's tokenizer.

    A `SentencePieceVocabulary` becomes ptm's SentencePiece tokenizer on the same model file (and `extra_ids`),
    so training, eval and the Task agree on every id. Other vocabularies (seqio's ByteVocabulary has its own id
    offsets) are refused, as are Tasks whose `inputs` and `targets` vocabularies differ.
    """
    from ptm.data import seqio_source

    seqio_source.import_modules(seqio_modules)
    name = seqio_source.task_name(spec)
    vocab = seqio_source.vocabulary(name)
    seqio = seqio_source.seqio_module()
    if not isinstance(vocab, seqio.SentencePieceVocabulary):
        raise ConfigError(f"{spec}: its vocabulary is a {type(vocab).__name__}; ptm takes a seqio Task's "
                          "vocabulary only when it is a SentencePieceVocabulary (give train.tokenizer / tokenizer "
                          "= a tokenizer file instead)")
    return SentencePieceTokenizer(vocab.sentencepiece_model_file, extra_ids=vocab.extra_ids)


def load_tokenizer(spec: str, seqio_modules: Sequence[str] = ()) -> Tokenizer:
    """`"byte"`, a path (local or gs://) to tokenizer.json / tokenizer.model or a directory with one, or
    `seqio:NAME` (the SentencePiece vocabulary of a registered seqio Task; `seqio_modules` register it)."""
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("seqio:"):
        return seqio_tokenizer(spec, seqio_modules)
    p = epath.Path(spec)
    try:
        if p.is_dir():
            for fname in ("tokenizer.json", "tokenizer.model"):
                if (p / fname).exists():
                    return load_tokenizer(str(p / fname))
            raise DataError(f"{spec}: directory has neither tokenizer.json nor tokenizer.model")
        if not p.exists():
            raise DataError(f"{spec}: tokenizer not found (use 'byte' or a path to tokenizer.json / .model)")
    except OSError as e:
        raise DataError(f"{spec}: cannot access tokenizer: {e}") from e
    if spec.endswith(".json"):
        return HFTokenizer(spec)
    if spec.endswith(".model"):
        return SentencePieceTokenizer(spec)
    # Unknown suffix: sniff. tokenizer.json is a JSON object; a SentencePiece model is a binary protobuf.
    with p.open("rb") as f:
        head = f.read(64).lstrip()
    return HFTokenizer(spec) if head.startswith(b"{") else SentencePieceTokenizer(spec)
