"""Merge outputs record their inputs' tokenizer, so `ptm eval OUT` and `ptm convert ptm-to-hf OUT` find it."""

from __future__ import annotations

import io
import json

import jax
import orbax.checkpoint as ocp
import pytest

from ptm.ckpt import format as ckpt_format
from ptm.cli import main
from ptm.merge import engine
from ptm.merge.recipe import Recipe
from ptm.model.config import ModelConfig
from ptm.model.llama import init_params

CFG = ModelConfig(vocab_size=384, embed_dim=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64,
                  dtype="float32", max_seq_len=64)


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> str:
    """A SentencePiece model whose vocabulary (384) is not the byte tokenizer's (259)."""
    import sentencepiece as spm

    words = [f"word{i} thing{i % 7} stuff{i % 13}" for i in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(words), model_writer=buf, vocab_size=384,
                                   model_type="bpe", byte_fallback=True, hard_vocab_limit=False, minloglevel=2,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    path = tmp_path_factory.mktemp("sp") / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return str(path)


def _ckpt(path, seed: int, tokenizer: str) -> str:
    params = jax.jit(init_params, static_argnums=0)(CFG, jax.random.key(seed))
    ck = ocp.StandardCheckpointer()
    ck.save(path / "params", params)
    ck.wait_until_finished()
    ckpt_format.write_meta(path, ckpt_format.make_meta(CFG.to_dict(), step=1, tokenizer=tokenizer))
    return str(path)


def test_merged_output_names_the_common_tokenizer_and_eval_and_export_use_it(tmp_path, sp_model):
    paths = {r: _ckpt(tmp_path / r, i, sp_model) for i, r in enumerate(("pre", "general", "skill"))}
    out = tmp_path / "merged"
    rec = Recipe(method="task_arithmetic", inputs={"pre": paths["pre"], "general": paths["general"],
                                                     "skills": [paths["skill"]]}, weights=0.5, out=str(out))
    summary = engine.merge(rec, progress=False, summary=False)
    assert not summary.notes
    assert ckpt_format.read_meta(out)["tokenizer"] == sp_model
    suite = tmp_path / "suite"
    suite.mkdir()
    item = {"task": "t", "messages": [{"role": "user", "content": "word1"}], "reference": "thing1",
            "scorer": "exact_match", "category": "general"}
    (suite / "s.jsonl").write_text(json.dumps(item) + "\n")
    assert main(["eval", str(out), "--suite", str(suite), "--max-new-tokens", "4", "--batch-size", "1"]) == 0
    hf = tmp_path / "hf"
    assert main(["convert", "ptm-to-hf", str(out), str(hf)]) == 0
    assert (hf / "tokenizer.model").read_bytes() == open(sp_model, "rb").read()


def test_disagreeing_tokenizers_are_reported_not_recorded(tmp_path, sp_model):
    a, b = _ckpt(tmp_path / "a", 0, sp_model), _ckpt(tmp_path / "b", 1, "byte")
    rec = Recipe(method="linear", inputs={"models": [a, b]}, weights=[0.5, 0.5], out=str(tmp_path / "m"))
    summary = engine.merge(rec, progress=False, summary=False)
    assert ckpt_format.read_meta(tmp_path / "m")["tokenizer"] is None
    assert any("different tokenizers" in n for n in summary.notes)
    assert any("different tokenizers" in line for line in summary.lines())
