from __future__ import annotations

import json
import shutil

import pytest

from ptm.data.tokenizers import ByteTokenizer, HFTokenizer, SentencePieceTokenizer, load_tokenizer
from ptm.errors import DataError

TEXT = "<|user|>\nhi Ünïcode ✓\n\n  two  spaces, tabs\tand <|assistant|>\n"


def test_byte_round_trip_and_specials():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    ids = tok.encode(TEXT)
    assert max(ids) < 256 and tok.decode(ids) == TEXT
    assert len({tok.pad_id, tok.bos_id, tok.eos_id}) == 3 and min(tok.pad_id, tok.bos_id, tok.eos_id) >= 256
    assert tok.vocab_size == 259
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == TEXT  # specials are not text


def test_sentencepiece_round_trip(sp_model_path, tmp_path):
    tok = load_tokenizer(sp_model_path)
    assert isinstance(tok, SentencePieceTokenizer)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert (tok.bos_id, tok.eos_id) == (1, 2) and tok.pad_id == tok.eos_id  # Llama-style: no pad piece
    assert all(0 <= i < tok.vocab_size for i in ids)
    # Found by directory and by content when the name says nothing.
    shutil.copy(sp_model_path, tmp_path / "tokenizer.model")
    assert isinstance(load_tokenizer(str(tmp_path)), SentencePieceTokenizer)
    shutil.copy(sp_model_path, tmp_path / "tok.bin")
    assert load_tokenizer(str(tmp_path / "tok.bin")).encode(TEXT) == ids


def test_hf_round_trip_and_special_tokens(hf_tokenizer_path, tmp_path):
    tok = load_tokenizer(hf_tokenizer_path)
    assert isinstance(tok, HFTokenizer)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    # A tokenizer_config.json next to the file names the tokens explicitly.
    shutil.copy(hf_tokenizer_path, tmp_path / "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "<pad>"}))
    tok2 = load_tokenizer(str(tmp_path))
    assert tok2.eos_id == 2 and tok2.bos_id == 0
    with pytest.raises(DataError, match="not in the vocabulary"):
        HFTokenizer(hf_tokenizer_path, eos_token="<|nope|>")


def test_bad_tokenizer_paths(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.model"))
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="tokenizer.json"):
        load_tokenizer(str(bad))
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"\x00\x01garbage")
    with pytest.raises(DataError, match="junk.model"):
        load_tokenizer(str(junk))


@pytest.mark.parametrize("which", ["byte", "sp", "hf"])
def test_special_token_text_in_content_stays_text(which, sp_model_path, hf_tokenizer_path):
    tok = load_tokenizer({"byte": "byte", "sp": sp_model_path, "hf": hf_tokenizer_path}[which])
    text = "a </s> b <s> c <pad>"
    ids = tok.encode(text)
    assert tok.eos_id not in ids and tok.bos_id not in ids
    assert tok.decode(ids) == text
