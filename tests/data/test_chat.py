from __future__ import annotations

import numpy as np
import pytest
from datahelpers import conv, write_jsonl

from ptm.data.chat import encode_chat, encode_prompt
from ptm.data.pipeline import DataConfig, SourceConfig, build_train_data
from ptm.data.tokenizers import ByteTokenizer, load_tokenizer
from ptm.errors import DataError

MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "Four."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, I think."},
]


def _spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) runs of mask == 1."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2], strict=True))


def test_single_turn_exact_bytes():
    tok = ByteTokenizer()
    ids, mask = encode_chat(conv("Hi", "Hello!", system="S")["messages"], tok)
    prompt = list(b"<|system|>\nS\n<|user|>\nHi\n<|assistant|>\n")
    expected = [tok.bos_id] + prompt + list(b"Hello!") + [tok.eos_id] + list(b"\n")
    assert ids.tolist() == expected
    want = np.zeros(len(expected), np.uint8)
    want[1 + len(prompt): 1 + len(prompt) + len(b"Hello!") + 1] = 1  # reply bytes and EOS
    assert mask.tolist() == want.tolist()


@pytest.mark.parametrize("which", ["byte", "sp", "hf"])
def test_multi_turn_mask_covers_replies_and_eos_only(which, sp_model_path, hf_tokenizer_path):
    tok = load_tokenizer({"byte": "byte", "sp": sp_model_path, "hf": hf_tokenizer_path}[which])
    ids, mask = encode_chat(MULTI, tok)
    replies = [m["content"] for m in MULTI if m["role"] == "assistant"]
    spans = _spans(mask)
    assert len(spans) == len(replies)
    for (a, b), reply in zip(spans, replies, strict=True):
        assert ids[b - 1] == tok.eos_id  # each masked run ends with EOS
        assert tok.decode(ids[a: b - 1]).strip() == reply
    unmasked = tok.decode(ids[mask == 0])
    for m in MULTI[:2] + MULTI[3:4]:
        assert m["content"] in unmasked  # system/user text is never trained on
    assert "<|assistant|>" in unmasked and "Four" not in unmasked
    if tok.bos_id is not None:
        assert ids[0] == tok.bos_id and mask[0] == 0


@pytest.mark.parametrize("which", ["byte", "sp", "hf"])
def test_encode_prompt_is_training_prefix(which, sp_model_path, hf_tokenizer_path):
    tok = load_tokenizer({"byte": "byte", "sp": sp_model_path, "hf": hf_tokenizer_path}[which])
    ids, mask = encode_chat(MULTI, tok)
    for k, (start, _) in zip((2, 4), _spans(mask), strict=True):  # before each assistant reply
        prompt = encode_prompt(MULTI[:k], tok)
        assert prompt == ids[:start].tolist()
        assert tok.decode(prompt).endswith("<|assistant|>\n")


def test_no_assistant_turn_gives_empty_mask():
    ids, mask = encode_chat([{"role": "user", "content": "hello?"}], ByteTokenizer())
    assert len(ids) > 0 and not mask.any()


def test_unknown_role_names_file_and_line(tmp_path):
    bad = {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [conv("a", "b"), conv("c", "d"), bad])
    with pytest.raises(DataError, match=rf"{path}:3: .*'tool'"):
        build_train_data(DataConfig(sources=[SourceConfig(path)], seq_len=64, global_batch_size=2),
                         ByteTokenizer())
