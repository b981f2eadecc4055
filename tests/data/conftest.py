"""Fixtures for the data tests: tiny tokenizers trained in the test (nothing downloaded)."""

from __future__ import annotations

import io

import pytest
from datahelpers import CORPUS


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
