"""Helpers for the data tests: tiny tokenizers trained in the test (nothing downloaded) and JSONL writers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

CORPUS = [
    "Hello world, this is a tiny corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "<|system|>\nBe brief.\n<|user|>\nWhat is two plus two?\n<|assistant|>\nFour.",
] * 40


def write_jsonl(path: Path, records) -> str:
    """One JSON object per line; a `str` record is written verbatim (for malformed-input tests)."""
    with open(path, "w") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return str(path)


def conv(user: str, reply: str, system: str | None = None) -> dict:
    msgs = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    return {"messages": msgs}


@pytest.fixture(scope="session")
def sp_model_path(tmp_path_factory) -> str:
    """A Llama-like SentencePiece model (identity normalization, byte fallback, BOS=1, EOS=2, no pad)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=300, model_type="bpe",
        byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, hard_vocab_limit=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return str(path)


@pytest.fixture(scope="session")
def hf_tokenizer_path(tmp_path_factory) -> str:
    """A byte-level BPE tokenizer.json with <s>, </s>, <pad> special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    tok.save(str(path))
    return str(path)
